"""The hub: fan-out of events to subscriptions, in memory, never awaiting a client.

Protocol:
- The feed hands the hub batches of ``Event`` in position order (``fanout``). Each event was
  encoded to its SSE frame once; the same bytes object goes into every matching
  subscription's buffer. Subscriptions are indexed by topic, and an event is looked up under
  each prefix of each of its topics, so the work per event is proportional to the number
  of subscribers it reaches, not to the number of subscriptions.
- A subscription buffers frames up to ``limit`` bytes. Over the bound it is closed as
  ``slow`` and its buffer dropped: its client reconnects with the last id it really
  received and replays the rest from history, so memory stays bounded and nothing is lost.
- ``subscribe`` is synchronous: the caller learns ``hub.position`` at the same instant it
  starts receiving, so "replay up to that position, then live" has no gap and no overlap.
- A subscription skips events at or below its ``cursor`` (a client may resume from a
  position this replica has not fanned out yet).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from . import metrics
from .topics import prefixes

if TYPE_CHECKING:
    from starlette.types import Send

HEARTBEAT = b": keep-alive\n\n"


@dataclass(slots=True)
class Event:
    position: int
    topics: tuple[str, ...]
    type: str
    frame: bytes
    created_at: float
    table: str | None
    keys: tuple[str, ...]

    @classmethod
    def build(
        cls, position: int, topics: Iterable[str], type_: str, data: bytes, created_at: float,
        table: str | None,
    ) -> Event:
        topics = tuple(topics)
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (position, type_.encode(), data)
        keys: dict[str, None] = {}
        for topic in topics:
            for key in prefixes(topic):
                keys[key] = None
        return cls(position, topics, type_, frame, created_at, table, tuple(keys))


class Subscription:
    """One client's live feed: a bounded byte buffer, then direct writes.

    While the stream replays history, frames wait in ``buffer`` and the stream's task is
    woken to write them. Once live, the stream hands over its ASGI ``send`` (``direct``) and
    the hub writes each batch itself, synchronously: with the socket accepting data an ASGI
    server's send completes without suspending, so a write costs no task switch. A send that
    would suspend means the client's socket and the server's buffer are full — the client
    cannot keep up — so the write is abandoned and the subscription closed as ``slow``.
    """

    __slots__ = (
        "topics", "cursor", "limit", "buffer", "size", "first_at", "waiter", "closed",
        "last_write", "ends_at", "mark", "client_key", "task", "sending", "direct", "parked",
    )

    def __init__(self, topics: tuple[str, ...], cursor: int, limit: int, ends_at: float,
                 client_key: str = "") -> None:
        self.topics = topics
        self.cursor = cursor
        self.limit = limit
        self.buffer: list[bytes] = []
        self.size = 0
        self.first_at = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.closed: str | None = None
        self.last_write = time.monotonic()
        self.ends_at = ends_at
        self.mark = 0
        self.client_key = client_key
        # The stream's task, and whether it is blocked writing to a full socket: a slow
        # client's write can block forever, so closing it as slow cancels that write.
        self.task: asyncio.Task[object] | None = None
        self.sending = False
        self.direct: Send | None = None
        self.parked = False  # the stream's task is waiting for the client to leave

    def push(self, frame: bytes, created_at: float = 0.0) -> None:
        if self.closed is not None:
            return
        if not self.buffer:
            self.first_at = created_at
        self.buffer.append(frame)
        self.size += len(frame)
        if self.size > self.limit:
            self.close("slow")

    def flush(self) -> None:
        """Write what is buffered now (live), or wake the stream's task (replaying)."""
        if self.direct is None or not self.buffer or self.closed is not None:
            self.wake()
            return
        first_at = self.first_at
        count = len(self.buffer)
        chunk = self.take()
        write = cast(Coroutine[Any, Any, None],
                     self.direct({"type": "http.response.body", "body": chunk, "more_body": True}))
        try:
            write.send(None)
        except StopIteration:
            self.last_write = time.monotonic()
            metrics.observe_delivery(count, first_at)
            return
        except Exception:
            self.close("error")
            return
        write.close()  # it suspended: the socket is full
        self.close("slow")

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self, reason: str) -> None:
        if self.closed is None:
            if reason == "slow":
                metrics.SLOW_CLIENTS_DROPPED.inc()
            self.closed = reason
            self.direct = None
            self.buffer.clear()
            self.size = 0
            self.wake()
            if self.task is not None and (
                    (self.parked and reason != "disconnect")
                    or (self.sending and reason in ("slow", "shutdown"))):
                self.task.cancel()

    async def wait(self) -> None:
        """Return once something is buffered or the subscription is closed."""
        while not self.buffer and self.closed is None:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def wait_closed(self) -> None:
        while self.closed is None:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def take(self) -> bytes:
        """Everything buffered, as one chunk (coalesced into one write)."""
        chunk = self.buffer[0] if len(self.buffer) == 1 else b"".join(self.buffer)
        self.buffer.clear()
        self.size = 0
        return chunk


class Hub:
    def __init__(self, position: int = 0, recent_bytes: int = 8 << 20) -> None:
        self.position = position
        # The latest events, positions contiguous up to ``position``: most resumes (a
        # reconnect, a deploy) are served from here without touching the database.
        self.recent: deque[Event] = deque()
        self.recent_bytes = 0
        self.recent_limit = recent_bytes
        self.subscriptions: set[Subscription] = set()
        self._index: dict[str, set[Subscription]] = {}
        self._tick = 0
        self.draining = False

    def __len__(self) -> int:
        return len(self.subscriptions)

    def subscribe(self, sub: Subscription) -> int:
        """Start delivering to ``sub``; returns the position it is live from."""
        self.subscriptions.add(sub)
        for topic in sub.topics:
            self._index.setdefault(topic, set()).add(sub)
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
        metrics.CONNECTED_CLIENTS.set(len(self.subscriptions))

    def topic_count(self) -> int:
        return len(self._index)

    def fanout(self, events: list[Event]) -> None:
        """Hand each event's frame to every matching subscription; wake each once."""
        if not events:
            return
        started = time.perf_counter()
        index = self._index
        touched: list[Subscription] = []
        for event in events:
            self._tick += 1
            tick = self._tick
            position = event.position
            frame = event.frame
            for key in event.keys:
                subs = index.get(key)
                if not subs:
                    continue
                for sub in subs:
                    if sub.mark == tick or sub.cursor >= position or sub.closed is not None:
                        continue
                    sub.mark = tick
                    sub.cursor = position
                    if not sub.buffer:
                        touched.append(sub)
                    sub.push(frame, event.created_at)
            if position > self.position:
                self.position = position
            self._remember(event)
        for sub in touched:
            sub.flush()
        metrics.FANOUT_DURATION.observe(time.perf_counter() - started)

    def _remember(self, event: Event) -> None:
        recent = self.recent
        if recent and recent[-1].position + 1 != event.position:
            recent.clear()  # keep the window contiguous
            self.recent_bytes = 0
        if not self.recent_limit:
            return
        recent.append(event)
        self.recent_bytes += len(event.frame)
        while self.recent_bytes > self.recent_limit and len(recent) > 1:
            self.recent_bytes -= len(recent.popleft().frame)

    def replay_from_memory(self, after: int, until: int, topics: tuple[str, ...]) -> list[bytes] | None:
        """Frames of ``(after, until]`` matching ``topics``, or ``None`` if not all in memory."""
        recent = self.recent
        if not recent or recent[0].position > after + 1 or recent[-1].position < until:
            return None
        wanted = set(topics)
        start = after + 1 - recent[0].position
        frames = []
        for event in itertools.islice(recent, start, None):
            if event.position > until:
                break
            if not wanted.isdisjoint(event.keys):
                frames.append(event.frame)
        return frames

    def publish_transient(self, topic: str, frame: bytes) -> None:
        """An event without a position (e.g. ``aggregate.invalidated``) to live streams."""
        self._tick += 1
        tick = self._tick
        for key in prefixes(topic):
            for sub in self._index.get(key, ()):
                if sub.mark == tick or sub.closed is not None:
                    continue
                sub.mark = tick
                sub.push(frame, time.time())
                sub.flush()

    def sweep(self, heartbeat_seconds: float) -> None:
        """Heartbeats for quiet streams; end streams past their deadline."""
        now = time.monotonic()
        quiet_since = now - heartbeat_seconds
        for sub in list(self.subscriptions):
            if sub.closed is not None:
                continue
            if now >= sub.ends_at:
                sub.close("max_age")
            elif sub.last_write <= quiet_since and not sub.buffer:
                sub.push(HEARTBEAT)
                sub.flush()

    def close_all(self, reason: str) -> None:
        for sub in list(self.subscriptions):
            sub.close(reason)

    async def run_sweeper(self, heartbeat_seconds: float, stop: asyncio.Event) -> None:
        """Owned by the app lifespan; ends when ``stop`` is set."""
        period = max(0.05, min(heartbeat_seconds / 3, 1.0))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=period * random.uniform(0.9, 1.1))
            except TimeoutError:
                self.sweep(heartbeat_seconds)
