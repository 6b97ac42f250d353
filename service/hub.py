"""The hub: fan-out of events to subscriptions, in memory, never awaiting a client.

Protocol:
- The feed hands the hub batches of ``Event`` in position order (``fanout``). Each event was
  encoded to its SSE frame once; the same bytes object goes to every matching subscription.
  Subscriptions are indexed by topic, and an event is looked up under each prefix of each of
  its topics, so the work per event is proportional to the subscribers it reaches.
- The hub also keeps the latest events (``recent``, positions contiguous up to ``position``,
  bounded in bytes as really held). It is the shared log streams catch up from.
- A subscription is in one of four states (``SubState``). Only a ``LIVE`` one receives from
  ``fanout``: the hub writes to its socket itself, synchronously, in chunks of at most
  ``chunk_bytes``. When a write would block (the client's socket is full — a big transaction,
  a slow network), the hub does not drop the client and holds no copy: the subscription goes
  ``CATCHING_UP`` at the last position written, and its stream's task reads the rest from
  ``recent`` (or history) by cursor, awaiting each write, until it is level again. A client
  is dropped as ``slow`` only when it stays behind for ``SLOW_CLIENT_SECONDS``.
- **Straight to the socket.** A live stream served by our uvicorn protocol (``protocol.py``
  puts the transport and its flow control in the scope) gets each event as an HTTP/1.1 chunk
  built once per event (``Event.chunk``: ``<size>\r\n<frame>\r\n``, what uvicorn's ``send``
  would build per client) written with ``transport.write``: no ASGI message, coroutine or
  middleware per client. "Would block" is uvicorn's own test — the transport has paused
  writing — and leads to the same catching-up hand-over. Without a transport (tests, other
  servers) the hub drives the ASGI ``send`` instead.
- ``subscribe`` is synchronous: the caller learns ``hub.position`` at the same instant it
  starts being tracked; a subscription starts ``REPLAYING`` and goes live only through
  ``go_live`` with no await between the check "cursor == position" and the switch, so
  "replay up to the position, then live" has no gap and no overlap.
- Close reasons are ``CloseReason`` values; ``close`` is the one place a subscription ends.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import json
import random
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from starlette.types import Send

from . import metrics
from .topics import covers, prefixes

HEARTBEAT = b": keep-alive\n\n"
# A line carrying an event's position: "id: 42" (pgsse's frames) or ": 42" (other formats).
_POSITION_LINE = re.compile(rb"(?:^|\n)(?:id)?: (\d+)\n")
DEFAULT_CHUNK = 64 * 1024


def http_chunk(frame: bytes) -> bytes:
    """``frame`` as one chunk of a chunked HTTP/1.1 body (the stream's encoding)."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


class Flow(Protocol):
    """uvicorn's ``FlowControl``: ``write_paused`` while the transport's buffer is full."""

    write_paused: bool


@dataclass(slots=True)
class Direct:
    """A live stream's socket, written without the ASGI ``send``."""

    transport: asyncio.Transport
    flow: Flow


class SubState(enum.Enum):
    REPLAYING = "replaying"      # the stream's task writes history; the hub skips it
    LIVE = "live"                # the hub writes each batch directly
    CATCHING_UP = "catching_up"  # its socket was full: the task reads the shared log by cursor
    CLOSED = "closed"


class CloseReason(enum.Enum):
    """Why a stream ended (the ``pgsse_streams_ended_total`` label)."""

    DISCONNECT = "disconnect"          # the client left
    SLOW = "slow"                      # behind for longer than SLOW_CLIENT_SECONDS
    MAX_AGE = "max_age"                # STREAM_MAX_SECONDS reached: retry and resume
    AUTH_EXPIRED = "auth_expired"      # the token expired: fetch a new one and resume
    SHUTDOWN = "shutdown"              # SIGTERM: reconnect elsewhere
    HISTORY_UNAVAILABLE = "history_unavailable"  # replay could not read the database
    ERROR = "error"                    # the server failed to write


def _safe_field(value: str) -> bytes:
    """An SSE field value can never carry CR, LF or NUL (they would forge fields)."""
    raw = value.encode()
    if b"\n" in raw or b"\r" in raw or b"\0" in raw:
        raw = raw.replace(b"\r", b"\\r").replace(b"\n", b"\\n").replace(b"\0", b"\\0")
    return raw


def _safe_data(data: bytes) -> bytes:
    # JSON text from PostgreSQL is one line; anything else is escaped rather than trusted.
    if b"\n" in data or b"\r" in data:
        data = data.replace(b"\r", b"\\r").replace(b"\n", b"\\n")
    return data


# sys.getsizeof(b"") (bytes objects are this much plus their length) and the rest of an
# Event (its slots, the topics tuple) as the replay window accounts it.
_BYTES_OVERHEAD = sys.getsizeof(b"")
_EVENT_OVERHEAD = 3 * _BYTES_OVERHEAD + 200


@functools.lru_cache(maxsize=65_536)  # key topics (one per row key) can be unbounded
def _keys(topics: tuple[str, ...]) -> tuple[tuple[tuple[str, int], ...], int]:
    """An event's (prefix, topic index) pairs and what they add to its accounted size.
    Events of one table mostly share their topics, so this is worked out once per set."""
    keys: dict[str, int] = {}
    for index, topic in enumerate(topics):
        for key in prefixes(topic):
            keys.setdefault(key, index)
    size = sum(sys.getsizeof(k) + 72 for k in keys) + sum(sys.getsizeof(t) for t in topics)
    return tuple(keys.items()), size


@dataclass(slots=True)
class Event:
    position: int
    topics: tuple[str, ...]
    type: str
    frame: bytes
    created_at: float
    table: str | None
    # (prefix, index of the event topic it is a prefix of), each prefix once
    keys: tuple[tuple[str, int], ...]
    data: bytes
    size: int = 0
    chunk: bytes = b""   # ``frame`` as an HTTP chunk, for streams written directly
    _enveloped: list[bytes | None] | None = None
    # A TRUNCATE: addressed to its topic *and every topic below it* (``big/7`` hears that
    # ``big`` was emptied, though a subscription otherwise only receives its topic and below).
    subtree: bool = False

    @classmethod
    def build(
        cls, position: int, topics: Iterable[str], type_: str, data: bytes, created_at: float,
        table: str | None,
    ) -> Event:
        topics = tuple(topics)
        data = _safe_data(data)
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (position, _safe_field(type_), data)
        keys, keys_size = _keys(topics)
        chunk = http_chunk(frame)
        # What the replay window really holds for this event, not just its frame.
        size = len(frame) + len(chunk) + len(data) + _EVENT_OVERHEAD + keys_size
        subtree = table is not None and type_.endswith(".truncate")
        return cls(position, topics, type_, frame, created_at, table, keys, data, size, chunk,
                   subtree=subtree)

    def reaches(self, wanted: frozenset[str]) -> bool:
        """Whether a stream subscribed to ``wanted`` receives this event."""
        for key, _ in self.keys:
            if key in wanted:
                return True
        return self.subtree and any(covers(topic, t) for topic in self.topics for t in wanted)

    def enveloped(self, index: int) -> bytes:
        """The frame with ``data: {"topic": T, "data": D}`` (``envelope=1``), made once."""
        cache = self._enveloped
        if cache is None:
            cache = self._enveloped = [None] * len(self.topics)
        frame = cache[index]
        if frame is None:
            frame = b'id: %d\nevent: %s\ndata: {"topic":%s,"data":%s}\n\n' % (
                self.position, _safe_field(self.type),
                json.dumps(self.topics[index]).encode(), self.data)
            cache[index] = frame
        return frame

    def frame_for(self, sub: Subscription) -> bytes:
        if sub.render is not None:
            rendered = sub.render(self)  # None: not for this subscription
            return rendered[0] if rendered is not None else b""
        if not sub.envelope:
            return self.frame
        for key, index in self.keys:
            if key in sub.topic_set:
                return self.enveloped(index)
        return self.enveloped(0)


# An edge adapter's encoding of one event: (SSE frame, the frame as an HTTP chunk).
Rendered = tuple[bytes, bytes]


@dataclass(slots=True)
class Transient:
    """An event without a position (``aggregate.invalidated``, ``reset``, ``auth_expired``)."""

    topic: str | None
    type: str
    data: bytes
    position: int | None = None

    def frame(self, envelope: bool) -> bytes:
        data = self.data
        if envelope:
            data = b'{"topic":%s,"data":%s}' % (json.dumps(self.topic).encode(), data)
        head = b"id: %d\n" % self.position if self.position is not None else b""
        return b"%sevent: %s\ndata: %s\n\n" % (head, _safe_field(self.type), _safe_data(data))


def reset_event(position: int, reason: str) -> Transient:
    return Transient(None, "reset", json.dumps({"reason": reason}).encode(), position)


class Subscription:
    """One client's stream as the hub sees it. State changes only through its methods."""

    __slots__ = (
        "topics", "topic_set", "envelope", "cursor", "state", "reason", "send", "pending",
        "pending_bytes", "first_at", "last_write", "ends_at", "client_key", "mark", "wakeup",
        "behind_since", "transients", "chunk_bytes", "direct", "render",
    )

    def __init__(self, topics: tuple[str, ...], cursor: int, ends_at: float,
                 client_key: str = "", envelope: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK,
                 render: Callable[[Event], Rendered | None] | None = None) -> None:
        self.topics = topics
        self.topic_set = frozenset(topics)
        self.envelope = envelope
        self.cursor = cursor            # the last position handed to this client
        self.state = SubState.REPLAYING
        self.reason: CloseReason | None = None
        self.send: Send | None = None   # set while LIVE: the hub writes through it
        self.direct: Direct | None = None  # ... or, when set, straight to the socket
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.first_at = 0.0
        self.last_write = time.monotonic()
        self.ends_at = ends_at
        self.client_key = client_key
        self.mark = 0
        self.wakeup: asyncio.Event = asyncio.Event()
        self.behind_since = time.monotonic()
        self.transients: dict[str, Transient] = {}
        self.chunk_bytes = chunk_bytes
        # Another wire format (an edge adapter's, e.g. Mercure): the event's (frame, chunk)
        # for this subscription, shared by all it suits, or None to skip it. Such a frame
        # starts with the comment ": <position>" (``written_through`` reads it: its ``id:``
        # need not be a position).
        self.render = render

    @property
    def closed(self) -> bool:
        return self.state is SubState.CLOSED

    def push(self, frame: bytes, created_at: float = 0.0) -> None:
        """Queue one SSE frame (as an HTTP chunk when written directly)."""
        self.push_wire(http_chunk(frame) if self.direct is not None else frame, created_at)

    def push_event(self, event: Event) -> None:
        """Queue ``event`` as this stream needs it: the shared bytes, made once per event."""
        if self.render is not None:
            rendered = self.render(event)
            if rendered is not None:
                self.push_wire(rendered[1] if self.direct is not None else rendered[0],
                               event.created_at)
        elif self.envelope:
            self.push(event.frame_for(self), event.created_at)
        else:
            self.push_wire(event.chunk if self.direct is not None else event.frame,
                           event.created_at)

    def push_wire(self, data: bytes, created_at: float = 0.0) -> None:
        if not self.pending:
            self.first_at = created_at
        self.pending.append(data)
        self.pending_bytes += len(data)

    def flush(self) -> None:
        """Write what is pending now; if the socket is full, fall back to catching up."""
        if self.state is not SubState.LIVE or not self.pending:
            self.pending.clear()
            self.pending_bytes = 0
            return
        pending = self.pending
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        count = len(pending)
        first_at = self.first_at
        self.pending = []
        self.pending_bytes = 0
        direct = self.direct
        if direct is not None:
            if direct.transport.is_closing():
                return  # the client left: its stream's task is told and ends it
            if direct.flow.write_paused:
                self.fall_behind(self.written_through(chunk))
                return
            direct.transport.write(chunk)
            self.last_write = time.monotonic()
            metrics.observe_delivery(count, first_at)
            return
        send = self.send
        assert send is not None
        write = cast(Coroutine[Any, Any, None],
                     send({"type": "http.response.body", "body": chunk, "more_body": True}))
        try:
            write.send(None)
        except StopIteration:
            self.last_write = time.monotonic()
            metrics.observe_delivery(count, first_at)
            return
        except Exception:
            self.close(CloseReason.ERROR)
            return
        # It suspended before writing (the server waits for the socket to drain): nothing
        # of ``chunk`` went out. Rewind to the last position written and let the stream's
        # task catch up from the shared log, awaiting the socket.
        write.close()
        self.fall_behind(self.written_through(chunk))

    def written_through(self, unsent: bytes) -> int:
        """The last position fully written before ``unsent``: the first ``id:`` in it (or
        position comment, see ``render``), less one."""
        found = _POSITION_LINE.search(unsent)
        if found is None:
            return self.cursor
        return int(found.group(1)) - 1

    def fall_behind(self, position: int) -> None:
        self.cursor = position
        self.state = SubState.CATCHING_UP
        self.send = None
        self.direct = None
        self.behind_since = time.monotonic()
        metrics.CATCHUPS.inc()
        self.wakeup.set()

    def go_live(self, send: Send, direct: Direct | None = None) -> None:
        """Called by the stream's task when level with the hub, with no await since the check."""
        if self.state is SubState.CLOSED:
            return
        self.state = SubState.LIVE
        self.send = send
        self.direct = direct
        if self.transients:
            for transient in self.transients.values():
                self.push(transient.frame(self.envelope))
            self.transients.clear()
            self.flush()

    def deliver_transient(self, transient: Transient) -> None:
        if self.state is SubState.LIVE:
            self.push(transient.frame(self.envelope), time.time())
            self.flush()
        elif self.state is not SubState.CLOSED:
            # Delivered once the stream is live again (one per topic: they only invalidate).
            self.transients[f"{transient.topic}\0{transient.type}"] = transient

    def close(self, reason: CloseReason) -> None:
        """End the subscription; the stream's task wakes, writes the ending and returns."""
        if self.state is SubState.CLOSED:
            return
        if reason is CloseReason.SLOW:
            metrics.SLOW_CLIENTS_DROPPED.inc()
        self.state = SubState.CLOSED
        self.reason = reason
        self.send = None
        self.direct = None
        self.pending.clear()
        self.pending_bytes = 0
        self.transients.clear()
        self.wakeup.set()


class Hub:
    def __init__(self, position: int = 0, recent_bytes: int = 32 << 20) -> None:
        self.position = position
        # The latest events, positions contiguous up to ``position``: most resumes and every
        # catch-up are served from here without touching the database.
        self.recent: deque[Event] = deque()
        self.recent_bytes = 0
        self.recent_limit = recent_bytes
        self.subscriptions: set[Subscription] = set()
        self._index: dict[str, set[Subscription]] = {}
        # Subscriptions by each *proper* prefix of their topics: who a TRUNCATE reaches below.
        self._below: dict[str, set[Subscription]] = {}
        self._tick = 0
        self.draining = False

    def __len__(self) -> int:
        return len(self.subscriptions)

    def subscribe(self, sub: Subscription) -> int:
        """Track ``sub`` (``REPLAYING``); returns the hub's position at this instant."""
        self.subscriptions.add(sub)
        for topic in sub.topics:
            self._index.setdefault(topic, set()).add(sub)
            for prefix in prefixes(topic)[:-1]:
                self._below.setdefault(prefix, set()).add(sub)
        metrics.CONNECTED_CLIENTS.set(len(self.subscriptions))
        return self.position

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)
        for topic in sub.topics:
            subs = self._index.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._index[topic]
            for prefix in prefixes(topic)[:-1]:
                below = self._below.get(prefix)
                if below is not None:
                    below.discard(sub)
                    if not below:
                        del self._below[prefix]
        metrics.CONNECTED_CLIENTS.set(len(self.subscriptions))

    def topic_count(self) -> int:
        return len(self._index)

    def fanout(self, events: list[Event]) -> None:
        """Write each event's frame to every live matching subscription, in chunks."""
        if not events:
            return
        started = time.perf_counter()
        index = self._index
        live = SubState.LIVE
        touched: list[Subscription] = []
        for event in events:
            self._tick += 1
            tick = self._tick
            position = event.position
            self._remember(event)
            for key, _ in event.keys:
                subs = index.get(key)
                if not subs:
                    continue
                for sub in subs:
                    if sub.mark == tick or sub.state is not live or sub.cursor >= position:
                        continue
                    sub.mark = tick
                    sub.cursor = position
                    if not sub.pending:
                        touched.append(sub)
                    sub.push_event(event)
                    if sub.pending_bytes >= sub.chunk_bytes:
                        sub.flush()
            if event.subtree:
                self._fanout_below(event, tick, touched)
        for sub in touched:
            if sub.pending:
                sub.flush()
        metrics.FANOUT_DURATION.observe(time.perf_counter() - started)

    def _fanout_below(self, event: Event, tick: int, touched: list[Subscription]) -> None:
        """``fanout`` of a subtree event to the streams subscribed below its topics."""
        for topic in event.topics:
            for sub in self._below.get(topic, ()):
                if sub.mark == tick or sub.state is not SubState.LIVE or sub.cursor >= event.position:
                    continue
                sub.mark = tick
                sub.cursor = event.position
                if not sub.pending:
                    touched.append(sub)
                sub.push_event(event)
                if sub.pending_bytes >= sub.chunk_bytes:
                    sub.flush()

    def _remember(self, event: Event) -> None:
        if event.position > self.position:
            self.position = event.position
        recent = self.recent
        if recent and recent[-1].position + 1 != event.position:
            recent.clear()  # keep the window contiguous
            self.recent_bytes = 0
        if not self.recent_limit:
            return
        recent.append(event)
        self.recent_bytes += event.size
        while self.recent_bytes > self.recent_limit and len(recent) > 1:
            self.recent_bytes -= recent.popleft().size

    def gap(self, position: int) -> None:
        """History up to ``position`` was pruned before this process read it: every stream
        that may have missed something gets ``reset`` and continues after ``position``."""
        self.recent.clear()
        self.recent_bytes = 0
        if position > self.position:
            self.position = position
        reset = reset_event(position, "history_expired")
        for sub in list(self.subscriptions):
            if sub.state is SubState.LIVE and sub.cursor < position:
                sub.cursor = position
                sub.push(reset.frame(sub.envelope))
                sub.flush()
            # REPLAYING / CATCHING_UP streams read by cursor and find the gap themselves.

    def skip(self, start: int, end: int) -> None:
        """Positions in ``(start, end]`` were never numbered on the current history (the
        primary changed, see ``timelines.py``): a stream past ``start`` holds events the new
        history lacks and gets ``reset`` (unknown_position); the others lost nothing and
        continue after ``end``."""
        if self.recent and self.recent[-1].position > start:
            self.recent.clear()
            self.recent_bytes = 0
        if end > self.position:
            self.position = end
        reset = reset_event(end, "unknown_position")
        for sub in list(self.subscriptions):
            if sub.state is SubState.LIVE and sub.cursor > start:
                sub.cursor = end
                sub.push(reset.frame(sub.envelope))
                sub.flush()

    def read_recent(self, after: int, until: int, sub: Subscription,
                    max_bytes: int) -> tuple[list[bytes], int] | None:
        """Frames for ``sub`` in ``(after, until]`` from memory, at most about ``max_bytes``;
        with the last position covered. ``None`` when ``after + 1`` is not in memory."""
        recent = self.recent
        if not recent or recent[0].position > after + 1 or recent[-1].position <= after:
            return None
        wanted = sub.topic_set
        frames: list[bytes] = []
        size = 0
        upto = after
        for event in itertools.islice(recent, after + 1 - recent[0].position, None):
            if event.position > until or size >= max_bytes:
                break
            upto = event.position
            if event.reaches(wanted):
                frame = event.frame_for(sub)
                frames.append(frame)
                size += len(frame)
        return frames, upto

    def publish_transient(self, transient: Transient) -> None:
        """An event without a position (``aggregate.invalidated``) to matching streams."""
        assert transient.topic is not None
        self._tick += 1
        tick = self._tick
        for key in prefixes(transient.topic):
            for sub in list(self._index.get(key, ())):
                if sub.mark == tick:
                    continue
                sub.mark = tick
                sub.deliver_transient(transient)

    def sweep(self, heartbeat_seconds: float, slow_seconds: float) -> None:
        """Heartbeats for quiet live streams; end streams past their deadline or too slow."""
        now = time.monotonic()
        quiet_since = now - heartbeat_seconds
        behind_since = now - slow_seconds
        for sub in list(self.subscriptions):
            state = sub.state
            if state is SubState.CLOSED:
                continue
            if now >= sub.ends_at:
                sub.close(CloseReason.MAX_AGE)
            elif state is SubState.CATCHING_UP and sub.behind_since <= behind_since:
                sub.close(CloseReason.SLOW)
            elif state is SubState.LIVE and sub.last_write <= quiet_since and not sub.pending:
                sub.push(HEARTBEAT)
                sub.flush()

    def close_all(self, reason: CloseReason) -> None:
        for sub in list(self.subscriptions):
            sub.close(reason)

    def matching(self, topic: str) -> int:
        """How many streams would receive ``topic`` (for tests and /stats)."""
        return sum(1 for sub in self.subscriptions if any(covers(t, topic) for t in sub.topics))

    async def run_sweeper(self, heartbeat_seconds: float, slow_seconds: float,
                          stop: asyncio.Event) -> None:
        """Owned by the app lifespan; ends when ``stop`` is set."""
        period = max(0.05, min(heartbeat_seconds / 3, 1.0))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=period * random.uniform(0.9, 1.1))
            except TimeoutError:
                self.sweep(heartbeat_seconds, slow_seconds)
