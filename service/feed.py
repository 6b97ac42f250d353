"""The change feed: sequencer election, the LISTEN connection, and catch-up reads.

Two background loops per process, each owning one dedicated connection outside the pool:

``Sequencer`` — at most one process at a time holds a session advisory lock and calls
``realtime.sequence_v3()``, which numbers the changes of transactions committed since its
previous snapshot, in place (see ``sql/migrations/003_lean_capture.sql``; the queries are
named in ``sql/queries/feed.sql``). Writers take no lock and, under load, send no NOTIFY:
with ``WAKEUP=auto`` the sequencer polls every ``POLL_INTERVAL`` while changes keep coming and,
once idle, raises the wake-up flag (the sequence ``realtime.wakeup``, mirrored in
``realtime.sequencer.wake_writers``) so the next writer's transaction sends one
payload-free NOTIFY that wakes it at once. A notification lost in the hand-over costs at most
the idle poll period, never an event. The leader also prunes history.

``Listener`` — LISTENs on ``realtime_events`` (one NOTIFY per sequenced batch, from the
sequencer), *then* reads ``position > cursor`` (each position joined to its change, the
payload assembled as text by the same statement) until caught up, and again on every
notification and every second regardless: a lost notification is a delay, not a loss. On a
lost connection it reconnects with jittered backoff, LISTENs again and catches up from its
cursor, so the hub sees every position exactly once, in order. Every read of events also
reads the pruned watermark in the same statement: a gap becomes ``reset``, never silence.

``History`` — the same reads for streams catching up (replay), through the pool.

Both loops use ``dedicated`` (their own connection, closed or terminated on the way out),
``pause`` (the one wait: stop, a wake-up, or a timeout) and ``log_loss`` (a lost connection is
a warning; anything else is a bug with a traceback, and the loop reconnects all the same).
Each backs off on repeated failures and resets its backoff only once its loop has really
worked (the listener: a read *and* its reader registration; the sequencer: a numbering
batch), never after a mere connect or LISTEN: a read-only database accepts both and then
refuses every write, which once made the listener reconnect 261 times in 30 s. Until then
each says why in ``failure``, and ``/readyz`` answers 503 naming it.

The sequencer asks ``realtime.sequencing_blocked()`` before it leads (and on every poll as a
follower): on a read-only node or session, or without privileges, it does not lead but fails
with the reason. It prunes in bounded steps (``prune``), and a step cancelled by a statement
timeout is logged and retried smaller, never taken for a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import db, metrics, timelines
from .hub import Event, Hub, Subscription
from .queries import Lock, query
from .settings import Settings

log = logging.getLogger("pgsse.feed")

BATCH = 2000
SAFETY_POLL_SECONDS = 1.0
IDLE_POLL_SECONDS = 0.1
PRUNE_EVERY_SECONDS = 60.0
BUSY_BATCH = 50  # rows per batch above which the sequencer polls 4x less often

REGISTER_EVERY_SECONDS = 2.0

# Pruning runs between numbering batches, in steps of positions, one statement (and one
# transaction) each. A step aims at PRUNE_STEP_SECONDS, far below any sane statement_timeout;
# the size adapts (halved when slow, doubled when quick; when cancelled, quartered and never
# again grown past half the size that was cancelled: on a loaded machine step times vary, and
# a size near the timeout would be cancelled again and again). A turn
# prunes for about PRUNE_SLICE_SECONDS, then numbering goes on; while more is due the next
# turn comes PRUNE_AGAIN_SECONDS later, not PRUNE_EVERY_SECONDS.
PRUNE_STEP_SECONDS = 0.05
PRUNE_SLICE_SECONDS = 0.2
PRUNE_AGAIN_SECONDS = 0.3
PRUNE_BATCH_FIRST = 5000
PRUNE_BATCH_LEAST = 100
PRUNE_BATCH_MOST = 50_000

# What a lost or killed feed connection raises (asyncpg raises InternalClientError when a
# backend is killed mid-query). These mean "reconnect and catch up"; anything else is a bug,
# logged with its traceback (and the feed still reconnects: it must not stay down).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

REPLAY_BATCH = 1000

# A pruning step cancelled by the role's or database's statement_timeout (or lock_timeout,
# waiting for a row someone holds): not a lost connection.
PRUNE_CANCELLED: tuple[type[BaseException], ...] = (
    asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError,
)


async def pause(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """The feed's one wait: until ``stop`` (or ``wake``) is set, or ``seconds`` pass."""
    waits = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


@contextlib.asynccontextmanager
async def dedicated(url: str, application_name: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own, outside the pool (LISTEN and session locks need one):
    closed on the way out, terminated if closing hangs on a dead network."""
    conn: asyncpg.Connection = await asyncpg.connect(
        url, timeout=5, server_settings={"application_name": application_name})
    try:
        yield conn
    finally:
        try:
            await asyncio.wait_for(conn.close(), timeout=2)
        except CONNECTION_ERRORS:
            conn.terminate()


class Backoff:
    def __init__(self, first: float = 0.1, most: float = 5.0) -> None:
        self.first, self.most, self.delay = first, most, first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self, stop: asyncio.Event) -> None:
        delay = self.delay * random.uniform(0.5, 1.5)
        self.delay = min(self.delay * 2, self.most)
        await pause(stop, delay)


def describe(exc: BaseException) -> str:
    """A failure, short enough for ``/readyz``."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:200]


class SequencingBlocked(Exception):
    """This session cannot number changes (a read-only node or session, missing
    privileges): the sequencer backs off and tries again on a new connection."""


def log_loss(exc: BaseException, what: str, event: str) -> None:
    """A lost connection is a warning; anything else is a bug, logged with its traceback."""
    if isinstance(exc, CONNECTION_ERRORS):
        log.warning(f"{what} lost", extra={"event": f"{event}_lost", "error": repr(exc)})
    else:
        log.error(f"{what} failed", exc_info=exc, extra={"event": f"{event}_error"})


class EventDecoder:
    """Database rows → ``Event``; oversized payloads become truncated events with the key,
    the position, the size, and where to fetch the whole event (``GET /events/<position>``)."""

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self.key_columns: dict[str, list[str]] = {}

    async def load_keys(self, conn: db.Connection) -> None:
        rows = await conn.fetch(query("key_columns"))
        self.key_columns = {row["tbl"]: list(row["key_columns"]) for row in rows}

    def decode(self, row: Any) -> Event:
        payload: str = row["payload"]
        data = payload.encode()
        if len(data) > self.max_event_bytes:
            data = self.truncate(row["position"], row["topics"], payload, row["tbl"], len(data))
        return Event.build(row["position"], row["topics"], row["type"], data,
                           row["created_at"], row["tbl"])

    def truncate(self, position: int, topics: list[str], payload: str, table: str | None,
                 size: int) -> bytes:
        body = json.loads(payload)
        slim: dict[str, Any] = {}
        if isinstance(body, dict) and table is not None:
            source = body.get("row") or body.get("old") or {}
            key = {col: source.get(col) for col in self.key_columns.get(table, [])}
            slim = {k: body.get(k) for k in ("topic", "op", "table", "ts")}
            slim.update({"row": None, "old": None, "key": key})
        else:
            slim["topic"] = topics[0] if topics else None
        slim.update({"truncated": True, "position": position, "bytes": size,
                     "href": f"/events/{position}"})
        return json.dumps(slim, separators=(",", ":")).encode()


@dataclass(slots=True)
class HistoryRead:
    frames: list[bytes]   # the subscription's frames in the range read
    upto: int             # the last position the read covered
    pruned: bool          # positions after the asked one are gone: the caller must reset


class History:
    """Reads of ``realtime.events`` for streams (replay and catch-up), through the pool.

    Every read returns the rows *and* ``pruned_through`` from one statement, hence one
    snapshot: prune deletes rows and raises the watermark in one transaction, so a read
    either has the rows or knows they are gone. Never a silent gap.
    """

    def __init__(self, database: db.Database, decoder: EventDecoder,
                 batch: int = REPLAY_BATCH) -> None:
        self.database = database
        self.decoder = decoder
        self.batch = batch

    async def bounds(self) -> tuple[int, int]:
        """The sequencer's head and the pruned watermark."""
        row = await self.database.pool.fetchrow(query("sequencer_bounds"))
        assert row is not None
        return row["last_position"], row["pruned_through"]

    async def read(self, sub: Subscription, after: int, until: int) -> HistoryRead:
        rows = await self.database.pool.fetch(query("replay_events"), after, until, self.batch)
        if rows[0]["pruned_through"] > after:
            return HistoryRead([], after, True)
        wanted = sub.topic_set
        frames = []
        upto = until
        for row in rows:
            if row["position"] is None:
                break
            event = self.decoder.decode(row)
            upto = event.position
            if event.reaches(wanted):
                frames.append(event.frame_for(sub))
        if len(rows) < self.batch:
            upto = until  # the whole range was read
        return HistoryRead(frames, upto, False)

    async def event(self, position: int) -> Any:
        """One event, whole (``GET /events/<position>``), or None when absent or pruned."""
        return await self.database.pool.fetchrow(query("event_by_position"), position)

    async def skipped(self, position: int) -> bool:
        """Whether ``position`` was skipped on a change of primary (``timelines.py``)."""
        return bool(await self.database.pool.fetchval(query("position_skipped"), position))


class Listener:
    def __init__(self, settings: Settings, url: str, hub: Hub, decoder: EventDecoder) -> None:
        self.settings = settings
        self.url = url
        self.hub = hub
        self.decoder = decoder
        self.connected = False
        self.cursor: int | None = None
        self.head = 0
        self.last_read = 0.0
        # Since when the head has been ahead of the cursor (None: caught up). NOTIFY raises
        # the head a moment before the rows are read, so "behind" alone is normal.
        self.behind_since: float | None = None
        self.name = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.registered_at = 0.0
        # Why the loop last failed, until it has really worked again (None: working).
        self.failure: str | None = None
        self._wake = asyncio.Event()
        self.started = asyncio.Event()
        # Called with each batch after the hub has it (aggregates track table versions).
        self.on_batch: list[Callable[[list[Event]], None]] = []

    @property
    def lag_seconds(self) -> float:
        """How long the feed has been behind the sequencer's head (0 when caught up)."""
        if self.behind_since is None:
            return 0.0
        return time.monotonic() - self.behind_since

    @property
    def caught_up(self) -> bool:
        """Connected, reading, and not behind for longer than ``READY_MAX_LAG``."""
        return (
            self.connected and self.cursor is not None
            and self.lag_seconds <= self.settings.ready_max_lag_seconds
            and time.monotonic() - self.last_read < 5 * SAFETY_POLL_SECONDS
        )

    def _advance_head(self, head: int) -> None:
        if head > self.head:
            self.head = head
        if self.cursor is not None and self.head > self.cursor:
            if self.behind_since is None:
                self.behind_since = time.monotonic()
        else:
            self.behind_since = None

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        if isinstance(payload, str) and payload.isdigit():
            self._advance_head(int(payload))
        self._wake.set()

    def _on_terminate(self, _conn: Any) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        first = True
        while not stop.is_set():
            try:
                async with dedicated(self.url, "pgsse-listener") as conn:
                    await self._listen(conn)
                    if not first:
                        log.info("change feed reconnected",
                                 extra={"event": "feed_reconnected", "cursor": self.cursor})
                    first = False
                    self.started.set()
                    self.registered_at = 0.0  # register at once: it proves we can write
                    while not stop.is_set():
                        # Cleared before reading, never after: a NOTIFY that lands while a
                        # read is in flight (too late for its snapshot) must wake the next.
                        self._wake.clear()
                        await self.catch_up(conn)
                        # Read and registered: only now does the loop work (LISTEN alone
                        # succeeds on a read-only database).
                        self.failure = None
                        backoff.reset()
                        await pause(stop, SAFETY_POLL_SECONDS, self._wake)
                        if conn.is_closed():
                            raise asyncpg.InterfaceError("feed connection closed")
            except Exception as exc:  # the loop must outlive any failure: reconnect
                if stop.is_set():
                    break
                if self.connected:
                    metrics.FEED_RECONNECTS.inc()
                self.failure = describe(exc)
                log_loss(exc, "change feed", "feed")
                await backoff.sleep(stop)
            finally:
                self.connected = False
                metrics.FEED_UP.set(0)
        log.info("change feed stopped", extra={"event": "feed_stopped"})

    async def _listen(self, conn: asyncpg.Connection) -> None:
        """LISTEN first, then learn the head: nothing committed after this can be missed."""
        conn.add_termination_listener(self._on_terminate)
        await conn.add_listener("realtime_events", self._on_notify)
        await self.decoder.load_keys(conn)
        row = await conn.fetchrow(query("sequencer_bounds"))
        assert row is not None, "realtime.sequencer has its one row from the first migration"
        head: int = row["last_position"]
        if self.cursor is None:
            self.cursor = head
            self.hub.position = head
        self._advance_head(head)
        await self.rebase(conn)
        self.connected = True
        metrics.FEED_UP.set(1)

    async def catch_up(self, conn: asyncpg.Connection) -> None:
        assert self.cursor is not None
        while True:
            rows = await conn.fetch(query("read_events"), self.cursor, BATCH)
            self.last_read = time.monotonic()
            pruned_through: int = rows[0]["pruned_through"]
            if pruned_through > self.cursor:
                # Positions after the cursor were pruned before this replica read them (it
                # was away, or an operator pruned everything): every live client is told.
                log.warning("history pruned before it was read", extra={
                    "event": "feed_gap", "cursor": self.cursor, "pruned_through": pruned_through})
                metrics.FEED_GAPS.inc()
                self.cursor = pruned_through
                self.hub.gap(pruned_through)
            if await self._skipped(conn, rows[0]["position"]):
                continue  # past a range skipped on a change of primary (timelines.py)
            if rows[0]["position"] is None:  # the one row of the LEFT JOIN: no events
                self._advance_head(self.cursor)
                break
            limit = self.settings.max_event_bytes
            known = self.decoder.key_columns
            if any(len(row["payload"]) > limit and row["tbl"] is not None and row["tbl"] not in known
                   for row in rows):
                await self.decoder.load_keys(conn)
            events = [self.decoder.decode(row) for row in rows]
            self.cursor = events[-1].position
            self._advance_head(self.cursor)
            metrics.EVENTS_READ.inc(len(events))
            metrics.FEED_LAG_SECONDS.set(max(0.0, time.time() - events[-1].created_at))
            self.hub.fanout(events)
            for callback in self.on_batch:
                callback(events)
            if len(rows) < BATCH:
                break
        metrics.FEED_LAG_POSITIONS.set(max(0, self.head - self.cursor))
        if time.monotonic() - self.registered_at >= REGISTER_EVERY_SECONDS:
            await self.register(conn)
            self.registered_at = time.monotonic()

    async def register(self, conn: asyncpg.Connection) -> None:
        """Automatic pruning never removes what this replica has not read yet."""
        await conn.execute(query("register_reader"), self.name, self.cursor)

    async def _skipped(self, conn: asyncpg.Connection, first: int | None) -> bool:
        """Positions are dense but for a skip on a change of primary: nothing to read while
        the head is ahead, or a jump, is when to look for one (``timelines.py``)."""
        assert self.cursor is not None
        jumped = self.head > self.cursor if first is None else first > self.cursor + 1
        return jumped and await self.rebase(conn)

    async def rebase(self, conn: asyncpg.Connection) -> bool:
        """Past a range of positions skipped on a change of primary (``timelines.py``)."""
        assert self.cursor is not None
        moved = await timelines.rebase(conn, self.cursor, self.hub)
        if moved is None:
            return False
        self.cursor = moved
        self._advance_head(moved)
        return True


class Sequencer:
    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url
        self.leader = False
        # Why this process's sequencer cannot number, until it has numbered (or, following,
        # found its session writable) again; None: it can.
        self.failure: str | None = None
        self.prune_batch = PRUNE_BATCH_FIRST
        self.prune_batch_most = PRUNE_BATCH_MOST
        self._wake = asyncio.Event()

    def _on_wakeup(self, *_args: Any) -> None:
        self._wake.set()

    def _working(self, backoff: Backoff) -> None:
        """The loop has really worked: a batch numbered, or, following, a writable session."""
        if self.failure is not None:
            log.info("sequencer can number again", extra={"event": "sequencer_recovered"})
            self.failure = None
        backoff.reset()
        metrics.SEQUENCER_CAN_NUMBER.set(1)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(0.5, 5.0)
        metrics.HISTORY_RETENTION.set(self.settings.history_retention_seconds)
        while not stop.is_set():
            try:
                async with dedicated(self.url, "pgsse-sequencer") as conn:
                    while not stop.is_set():
                        blocked = await conn.fetchval(query("sequencing_blocked"))
                        if blocked is not None:
                            raise SequencingBlocked(blocked)
                        if await conn.fetchval(query("try_lead"), Lock.SEQUENCER_LEADER):
                            break
                        self._working(backoff)  # following, on a session that could lead
                        await pause(stop, random.uniform(0.5, 1.5))
                    if stop.is_set():
                        break
                    self.leader = True
                    metrics.SEQUENCER_LEADER.set(1)
                    log.info("sequencer elected", extra={"event": "sequencer_leader"})
                    await timelines.observe(conn)  # a new primary: skip, never reuse positions
                    await conn.add_listener("realtime_wakeup", self._on_wakeup)
                    await self.lead(conn, stop, backoff)
            except Exception as exc:  # the loop must outlive any failure: reconnect
                if stop.is_set():
                    break
                self.failure = describe(exc)
                metrics.SEQUENCER_CAN_NUMBER.set(0)
                metrics.SEQUENCER_RECONNECTS.inc()
                if isinstance(exc, SequencingBlocked):
                    log.warning("sequencer cannot number", extra={
                        "event": "sequencer_blocked", "error": str(exc)})
                else:
                    log_loss(exc, "sequencer connection", "sequencer")
                await backoff.sleep(stop)
            finally:
                self.leader = False
                metrics.SEQUENCER_LEADER.set(0)
        log.info("sequencer stopped", extra={"event": "sequencer_stopped"})

    async def lead(self, conn: asyncpg.Connection, stop: asyncio.Event, backoff: Backoff) -> None:
        mode = self.settings.wakeup
        poll = self.settings.poll_interval_seconds
        await conn.execute(query("set_wake_writers"), mode != "poll")
        writers_wake = mode != "poll"
        next_prune = time.monotonic() + 5.0
        idle_since: float | None = None
        while not stop.is_set():
            # Cleared before numbering, never after: a writer's NOTIFY that lands while a
            # batch is numbered (too late for its snapshot) must wake the next one.
            self._wake.clear()
            moved = await conn.fetchval(query("sequence"), BATCH)
            self._working(backoff)
            now = time.monotonic()
            if moved:
                metrics.EVENTS_SEQUENCED.inc(moved)
                idle_since = None
                if moved >= BATCH:
                    continue
            elif idle_since is None:
                idle_since = now
            if now >= next_prune:
                more = await self.prune(conn)
                next_prune = time.monotonic() + (PRUNE_AGAIN_SECONDS if more else PRUNE_EVERY_SECONDS)
            # Each batch has a fixed cost (its commit above all): under a heavy write load,
            # poll less often so batches grow; under a light one stay quick for latency.
            wait = poll * 4 if moved >= BUSY_BATCH else poll
            if mode == "poll":
                await pause(stop, wait)
                continue
            if mode == "auto":
                idle = idle_since is not None and now - idle_since >= 0.05
                if idle and not writers_wake:
                    await conn.execute(query("set_wake_writers"), True)
                    writers_wake = True
                    continue  # re-check: a writer may have committed before seeing the flag
                if not idle and writers_wake:
                    await conn.execute(query("set_wake_writers"), False)
                    writers_wake = False
                if not writers_wake:
                    await pause(stop, wait)
                    continue
            # Writers wake us: wait for a NOTIFY, with a short safety poll.
            await pause(stop, IDLE_POLL_SECONDS if mode == "auto" else SAFETY_POLL_SECONDS,
                        self._wake)

    async def prune(self, conn: asyncpg.Connection) -> bool:
        """Prune history past ``HISTORY_RETENTION`` for about ``PRUNE_SLICE_SECONDS``, in
        steps of at most ``prune_batch`` positions; True when more is due.

        Each step is one statement and one transaction: its rows go and ``pruned_through``
        rises together, so readers still get ``reset``, never a silent gap. A step cancelled
        by a statement timeout is not a lost connection: logged, counted, and the next steps
        are a quarter of the size."""
        try:
            more = await self._prune_steps(conn)
        except PRUNE_CANCELLED as exc:
            metrics.HISTORY_PRUNE_TIMEOUTS.inc()
            more = self.prune_batch > PRUNE_BATCH_LEAST  # else: wait for the next round
            self.prune_batch_most = max(PRUNE_BATCH_LEAST, self.prune_batch // 2)
            self.prune_batch = max(PRUNE_BATCH_LEAST, self.prune_batch // 4)
            log.warning("history prune step cancelled (a timeout); smaller steps next",
                        extra={"event": "history_prune_timeout", "error": str(exc),
                               "batch": self.prune_batch})
        await self.record_history_stats(conn)
        return more

    async def _prune_steps(self, conn: asyncpg.Connection) -> bool:
        retention = self.settings.history_retention_seconds
        target = await conn.fetchval(query("prune_target"), retention)
        if target is None:
            return False
        removed = 0
        until = time.monotonic() + PRUNE_SLICE_SECONDS
        try:
            while True:
                began = time.monotonic()
                row = await conn.fetchrow(query("prune_step"), target, self.prune_batch)
                took = time.monotonic() - began
                assert row is not None
                removed += row["removed"]
                metrics.HISTORY_PRUNED.inc(row["removed"])
                if took < PRUNE_STEP_SECONDS / 2:
                    self.prune_batch = min(self.prune_batch_most, self.prune_batch * 2)
                elif took > PRUNE_STEP_SECONDS * 2:
                    self.prune_batch = max(PRUNE_BATCH_LEAST, self.prune_batch // 2)
                if row["pruned_through"] >= target:
                    return False
                if time.monotonic() >= until:
                    return True
        finally:
            if removed:
                log.info("history pruned", extra={"event": "history_pruned", "removed": removed,
                                                  "target": target, "batch": self.prune_batch})

    async def record_history_stats(self, conn: asyncpg.Connection) -> None:
        try:
            row = await conn.fetchrow(query("history_stats"))
        except PRUNE_CANCELLED:
            return  # a timeout: the gauges keep their last values until next time
        assert row is not None
        metrics.NOTIFY_QUEUE_USAGE.set(row["usage"] or 0)
        metrics.HISTORY_ROWS.set(max(0.0, row["rows"] or 0))
        metrics.HISTORY_AGE.set(row["age"] or 0)
