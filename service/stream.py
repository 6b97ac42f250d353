"""``GET /events``: the SSE stream, a plain ASGI app fed by the hub.

One coroutine per client (uvicorn's request task) plus one small task waiting for the
disconnect. The stream:

1. validates topics and the resume position (``Last-Event-ID`` header, else
   ``last_event_id``/``lastEventId``), authenticates, and applies the connection limits;
2. subscribes to the hub *before* reading history, learning position ``L`` it is live from;
3. if resuming from ``P``: ``reset`` when positions after ``P`` were pruned or ``P`` is beyond
   the head, else replays ``(P, L]`` from ``realtime.events`` filtered by its topics;
4. then writes whatever the hub buffered (positions > ``L``), coalesced, until the client
   leaves, its token expires, ``STREAM_MAX_SECONDS`` pass, it falls too far behind, or the
   process drains — each ending with the frame that tells the browser what to do next.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from . import metrics
from .errors import BadRequest, PgsseError, Unavailable
from .hub import Event, Subscription
from .topics import is_valid

if TYPE_CHECKING:
    from .app import State

MAX_TOPICS = 32
MAX_POSITION = 2**63 - 1
REPLAY_BATCH = 1000

REPLAY_SQL = """
SELECT position, topics, type, tbl, payload::text AS payload,
       extract(epoch FROM created_at)::float8 AS created_at
FROM realtime.events WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3
"""

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]

ResumeHook = Callable[[Subscription, int, int], Awaitable[list[bytes]]]


def parse_topics(request: Request) -> tuple[str, ...]:
    topics = request.query_params.getlist("topic")
    if not topics:
        raise BadRequest("at least one ?topic= is required", code="invalid_topic", param="topic")
    if len(topics) > MAX_TOPICS:
        metrics.REJECTED.labels("topics_per_stream").inc()
        raise BadRequest(f"at most {MAX_TOPICS} topics per stream", code="too_many_topics",
                         param="topic")
    for topic in topics:
        if not is_valid(topic):
            raise BadRequest(
                "topics are /-separated non-empty segments of [A-Za-z0-9_.:@%-], "
                "at most 256 characters", code="invalid_topic", param="topic")
    return tuple(dict.fromkeys(topics))


def parse_position(request: Request) -> int | None:
    raw = request.headers.get("last-event-id")
    param = "Last-Event-ID"
    if not raw:
        for name in ("last_event_id", "lastEventId"):
            raw = request.query_params.get(name)
            if raw:
                param = name
                break
    if not raw:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_POSITION:
        raise BadRequest("the last event id must be a decimal position from 0 to 2^63-1",
                         code="invalid_last_event_id", param=param)
    return int(raw)


def retry_frame(low_ms: int, high_ms: int) -> bytes:
    return b"retry: %d\n\n" % random.randint(low_ms, high_ms)


def reset_frame(position: int, reason: str) -> bytes:
    data = json.dumps({"reason": reason}, separators=(",", ":")).encode()
    return b"id: %d\nevent: reset\ndata: %s\n\n" % (position, data)


AUTH_EXPIRED_FRAME = b'event: auth_expired\ndata: {"reason":"token_expired"}\n\n'


class EventStream:
    def __init__(self, state: State) -> None:
        self.state = state
        self.resume_hooks: list[ResumeHook] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        state = self.state
        try:
            topics = parse_topics(request)
            position = parse_position(request)
            principal = state.auth.authenticate(request)
            principal.require(topics)
            client_key = principal.subject or (request.client.host if request.client else "")
            state.limits.check_stream(client_key)
        except PgsseError as exc:
            await exc.response()(scope, receive, send)
            return
        method = request.method
        del request  # parsed headers and query: not worth keeping for hours per stream
        settings = state.settings
        full = len(state.hub) >= settings.max_connections
        if full or not state.ready_for_streams:
            # A browser EventSource gives up for good on a non-200: answer 200, ask it to
            # come back a little later (jittered), and close.
            metrics.REJECTED.labels("process_connections" if full else "not_ready").inc()
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            await send({"type": "http.response.body", "body": retry_frame(1000, 5000)})
            return
        if method == "HEAD":
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            await send({"type": "http.response.body", "body": b""})
            return

        now = time.monotonic()
        lifetime = settings.stream_max_seconds * random.uniform(0.9, 1.0)
        if principal.expires_at is not None:
            lifetime = min(lifetime, principal.expires_at - time.time())
        sub = Subscription(topics, 0, settings.client_buffer_bytes, now + lifetime, client_key)
        expires_is_auth = principal.expires_at is not None and principal.expires_at - time.time() <= lifetime
        state.limits.opened(client_key)
        live_from = state.hub.subscribe(sub)
        # Live events at or below a resume position must not be delivered again, even if
        # this replica has not fanned them out yet (the client may come from one ahead).
        sub.cursor = live_from if position is None else max(live_from, position)
        # While replaying, a helper task notices the client leaving; once live, the stream's
        # own task waits for that instead (one task per idle stream, not two).
        watcher = asyncio.ensure_future(self._watch_disconnect(receive, sub))
        sub.task = asyncio.current_task()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            await send({"type": "http.response.body",
                        "body": b"retry: %d\n\n" % settings.retry_ms, "more_body": True})
            if position is not None:
                try:
                    await self._resume(sub, position, live_from, send)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, Unavailable):
                    # History is unreachable right now: come back shortly, from the same id.
                    sub.close("history_unavailable")
            await self._pump(sub, send, receive, watcher)
            reason = sub.closed or "disconnect"
            metrics.STREAMS_ENDED.labels(reason).inc()
            tail = b""
            if reason == "max_age" and expires_is_auth:
                tail = AUTH_EXPIRED_FRAME
            elif reason in ("shutdown", "max_age", "history_unavailable"):
                tail = retry_frame(250, 3000)
            if reason not in ("disconnect", "slow"):
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            # A slow client's response is left incomplete on purpose: the server then closes
            # the connection instead of keeping it alive for another request.
        except asyncio.CancelledError:
            if sub.closed not in ("slow", "shutdown") or not sub.sending:
                raise
            # The write to this client's full socket was abandoned; returning without
            # completing the response makes the server close the connection.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            metrics.STREAMS_ENDED.labels(sub.closed).inc()
        finally:
            watcher.cancel()
            state.hub.unsubscribe(sub)
            state.limits.closed(client_key)

    @staticmethod
    async def _watch_disconnect(receive: Receive, sub: Subscription) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                sub.close("disconnect")
                return

    async def _resume(self, sub: Subscription, position: int, live_from: int,
                      send: Send) -> None:
        state = self.state
        row = await state.pool.fetchrow(
            "SELECT last_position, pruned_through FROM realtime.sequencer WHERE id = 1")
        assert row is not None
        head = max(row["last_position"], live_from)
        reason = None
        if position > head:
            reason = "unknown_position"
        elif position < row["pruned_through"]:
            reason = "history_expired"
        if reason is not None:
            # Start over from the present, atomically (no await in between): drop what
            # was buffered and take live events after the hub's current position.
            sub.buffer.clear()
            sub.size = 0
            sub.cursor = state.hub.position
            metrics.REPLAYS.labels("reset").inc()
            await send({"type": "http.response.body", "body": reset_frame(sub.cursor, reason),
                        "more_body": True})
            return
        if position >= live_from:
            return  # nothing to replay; live events up to ``position`` are skipped
        extra = []
        for hook in self.resume_hooks:
            extra.extend(await hook(sub, position, live_from))
        if extra:
            await send({"type": "http.response.body", "body": b"".join(extra), "more_body": True})
        frames = state.hub.replay_from_memory(position, live_from, sub.topics)
        if frames is not None:
            metrics.REPLAYS.labels("memory").inc()
            if frames:
                await send({"type": "http.response.body", "body": b"".join(frames),
                            "more_body": True})
                metrics.EVENTS_DELIVERED.inc(len(frames))
            return
        metrics.REPLAYS.labels("history").inc()
        await self._replay(sub, position, live_from, send)

    async def _replay(self, sub: Subscription, after: int, until: int, send: Send) -> None:
        wanted = set(sub.topics)
        decoder = self.state.decoder
        cursor = after
        while cursor < until and sub.closed is None:
            rows = await self.state.pool.fetch(REPLAY_SQL, cursor, until, REPLAY_BATCH)
            if not rows:
                break
            frames = []
            for row in rows:
                event: Event = decoder.decode(row)
                if not wanted.isdisjoint(event.keys):
                    frames.append(event.frame)
            cursor = rows[-1]["position"]
            if frames:
                await send({"type": "http.response.body", "body": b"".join(frames),
                            "more_body": True})
                metrics.EVENTS_DELIVERED.inc(len(frames))

    @staticmethod
    async def _pump(sub: Subscription, send: Send, receive: Receive,
                    watcher: asyncio.Future[None]) -> None:
        """Write what was buffered during replay, then hand the hub the socket."""
        while sub.buffer and sub.closed is None:
            count = len(sub.buffer)
            first_at = sub.first_at
            sub.sending = True
            await send({"type": "http.response.body", "body": sub.take(), "more_body": True})
            sub.sending = False
            sub.last_write = time.monotonic()
            metrics.observe_delivery(count, first_at)
        if sub.closed is not None:
            return
        sub.direct = send  # from here on the hub writes (no await since the check)
        if watcher.done():
            return
        watcher.cancel()
        sub.parked = True
        try:
            while sub.closed is None:
                message = await receive()
                if message["type"] == "http.disconnect":
                    sub.close("disconnect")
        except asyncio.CancelledError:
            if sub.closed is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # woken by ``close`` for its own reason: finish normally
        finally:
            sub.parked = False
