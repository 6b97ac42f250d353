"""The standby reader: the change feed read from a hot standby (``READ_DATABASE_URL``).

A hot standby holds the same ``realtime.events`` rows, positions and bytes as the primary
(physical replication copies the pages), but it refuses ``LISTEN`` and never sees the
primary's NOTIFY. So ``StandbyReader`` is the ``feed.Listener`` without LISTEN: it reads
``position > cursor`` from the standby every ``READ_POLL_INTERVAL`` with the listener's own
statement and decoder, and hands the hub (and ``on_batch``) the same batches in the same
order. History and aggregates read the same standby through the read pool (``app.py``).

The primary sees one statement from such a process besides sequencing and pruning:
``report_standby_reader`` every ``REGISTER_EVERY_SECONDS``, on a connection of its own — it
records the position read (automatic pruning keeps what a replica has not read) and learns
the primary's head, the lag ``/readyz`` judges (check ``replica``). A primary that is away
delays that report and nothing else: the standby feed keeps flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg

from . import metrics
from .feed import (
    CONNECTION_ERRORS,
    REGISTER_EVERY_SECONDS,
    Backoff,
    EventDecoder,
    Listener,
    dedicated,
    log_loss,
    pause,
)
from .hub import Hub
from .queries import query
from .settings import Settings

log = logging.getLogger("pgsse.replica")

# While events keep arriving, poll this many times faster than READ_POLL_INTERVAL (for this
# long after the last batch): a fixed 20 ms poll adds 10 ms to the median delivery, which
# measured 2.6x the primary-reading replica's median at 100 tx/s (bench/replicas.py). The
# extra reads are the standby's, cheap index probes that mostly find nothing.
BUSY_POLL_DIVISOR = 8
BUSY_SECONDS = 1.0


class StandbyReader(Listener):
    def __init__(self, settings: Settings, url: str, primary_url: str, hub: Hub,
                 decoder: EventDecoder) -> None:
        super().__init__(settings, url, hub, decoder)
        self.primary_url = primary_url
        self.poll = settings.read_poll_interval_seconds
        self.reported_at = 0.0  # when the primary last took our report (monotonic)

    def replica_check(self) -> str:
        """``/readyz``'s ``replica`` check: the standby answers and is not behind the
        primary's head for longer than ``READY_MAX_LAG``."""
        if not self.connected:
            return "standby unreachable"
        if not self.caught_up:
            return (f"behind the primary ({self.cursor} of {self.head}, "
                    f"{self.lag_seconds:.1f}s)")
        return "ok"

    async def run(self, stop: asyncio.Event) -> None:
        reporter = asyncio.create_task(self.report(stop), name="standby-report")
        try:
            await self.read(stop)
        finally:
            reporter.cancel()
            with contextlib.suppress(BaseException):
                await reporter

    async def read(self, stop: asyncio.Event) -> None:
        # Short backoff: a standby back from a restart serves again within seconds.
        backoff = Backoff(0.1, 2.0)
        first = True
        while not stop.is_set():
            try:
                async with dedicated(self.url, "pgsse-standby-reader") as conn:
                    await self._attach(conn)
                    if not first:
                        log.info("standby feed reconnected",
                                 extra={"event": "feed_reconnected", "cursor": self.cursor})
                    first = False
                    backoff.reset()
                    self.started.set()
                    busy_until = 0.0
                    while not stop.is_set():
                        before = self.cursor
                        await self.catch_up(conn)
                        now = time.monotonic()
                        if self.cursor != before:
                            busy_until = now + BUSY_SECONDS
                        busy = now < busy_until
                        await pause(stop, self.poll / BUSY_POLL_DIVISOR if busy else self.poll,
                                    self._wake)
                        if conn.is_closed():
                            raise asyncpg.InterfaceError("standby connection closed")
            except Exception as exc:  # the loop must outlive any failure: reconnect
                if stop.is_set():
                    break
                if self.connected:
                    metrics.FEED_RECONNECTS.inc()
                log_loss(exc, "standby feed", "feed")
                await backoff.sleep(stop)
            finally:
                self.connected = False
                metrics.FEED_UP.set(0)
        log.info("standby feed stopped", extra={"event": "feed_stopped"})

    async def _attach(self, conn: asyncpg.Connection) -> None:
        """The listener's ``_listen`` without LISTEN: polling needs no subscription."""
        conn.add_termination_listener(self._on_terminate)
        await self.decoder.load_keys(conn)
        row = await conn.fetchrow(query("sequencer_bounds"))
        assert row is not None, "realtime.sequencer has its one row from the first migration"
        if self.cursor is None:
            self.cursor = row["last_position"]
            self.hub.position = self.cursor
        self._advance_head(row["last_position"])
        await self.rebase(conn)
        self.connected = True
        metrics.FEED_UP.set(1)

    async def register(self, conn: asyncpg.Connection) -> None:
        """The standby is read-only: ``report`` records the position on the primary."""

    async def report(self, stop: asyncio.Event) -> None:
        """Every ``REGISTER_EVERY_SECONDS``, on the primary: record the position read, learn
        the primary's head."""
        backoff = Backoff(0.5, 5.0)
        while not stop.is_set():
            try:
                async with dedicated(self.primary_url, "pgsse-standby-report") as conn:
                    backoff.reset()
                    while not stop.is_set():
                        if self.cursor is not None:
                            head = await conn.fetchval(
                                query("report_standby_reader"), self.name, self.cursor)
                            self.reported_at = time.monotonic()
                            self._advance_head(head)
                        await pause(stop, REGISTER_EVERY_SECONDS)
            except Exception as exc:  # the loop must outlive any failure: reconnect
                if stop.is_set():
                    break
                if not isinstance(exc, CONNECTION_ERRORS):
                    log_loss(exc, "standby report", "standby_report")
                else:
                    log.warning("primary unreachable for the standby report",
                                extra={"event": "standby_report_lost", "error": repr(exc)})
                await backoff.sleep(stop)
