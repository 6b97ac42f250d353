"""``GET /events``: the SSE stream, a plain ASGI app fed by the hub.

Per client: uvicorn's request task (this coroutine) and one small task waiting for the
client to leave. The stream:

1. validates topics, ``envelope`` and the resume position (``Last-Event-ID`` header, else
   ``last_event_id``/``lastEventId``), authenticates, and applies the connection limits;
2. subscribes to the hub *before* reading anything, learning position ``L`` it is live from;
3. if resuming from ``P``: ``reset`` when ``P`` is beyond the head; else catches up from ``P``
   (the hub's shared log, else history — each history read proves it is complete, see
   ``feed.History``; a gap found there becomes a ``reset`` before anything after it);
4. goes live (``Subscription.go_live``) when level with the hub, with no await in between;
5. whenever its socket fills up the hub hands it back (``CATCHING_UP``) and step 3 repeats;
6. ends when the client leaves, its token expires, ``STREAM_MAX_SECONDS`` pass, it stays
   behind for ``SLOW_CLIENT_SECONDS``, or the process drains — each ending with the frame
   that tells the browser what to do next. A dropped stream's socket is aborted at once, so
   its file descriptor and kernel buffers are freed even if the peer never reads.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from . import metrics
from .auth import Authenticator
from .errors import BadRequest, NotFound, PgsseError, Unavailable
from .feed import History
from .hub import (
    CloseReason,
    Direct,
    Event,
    Hub,
    Rendered,
    Subscription,
    SubState,
    Transient,
    reset_event,
)
from .limits import Limits
from .settings import Settings
from .topics import is_reserved, is_valid

MAX_TOPICS = 32
MAX_POSITION = 2**63 - 1
# How long a final frame (retry:, auth_expired) may wait for a peer that does not read.
FINAL_WRITE_SECONDS = 5.0
LINGER_RESET = struct.pack("ii", 1, 0)

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]

ResumeHook = Callable[[Subscription, int], list[Transient]]
HISTORY_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                  Unavailable)


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
        if is_reserved(topic):
            raise BadRequest(f"topic {topic!r} is reserved (Mercure updates: subscribe at "
                             "/.well-known/mercure)", code="reserved_topic", param="topic")
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


def parse_envelope(request: Request) -> bool:
    raw = request.query_params.get("envelope")
    if raw is None or raw in ("0", "false", ""):
        return False
    if raw in ("1", "true"):
        return True
    raise BadRequest("envelope is 1 or 0", code="invalid_envelope", param="envelope")


def retry_frame(low_ms: int, high_ms: int) -> bytes:
    return b"retry: %d\n\n" % random.randint(low_ms, high_ms)


def transport_of(scope: Scope) -> asyncio.Transport | None:
    """The connection's transport, put in the scope by ``protocol.PgsseHttpProtocol``."""
    transport = scope.get("extensions", {}).get("pgsse.transport")
    # uvloop's transports are not asyncio.Transport subclasses: check what we call.
    if transport is None or not hasattr(transport, "abort"):
        return None
    return transport  # type: ignore[no-any-return]


def direct_of(scope: Scope, transport: asyncio.Transport | None) -> Direct | None:
    """How the hub may write this stream's live events itself (see ``hub.Direct``): our
    protocol's transport and flow control; uvicorn sends every stream chunked (no length)."""
    flow = scope.get("extensions", {}).get("pgsse.flow")
    if transport is None or flow is None:
        return None
    return Direct(transport, flow)


def abort(transport: asyncio.Transport | None) -> None:
    """Close now, and free the kernel's send queue too: with SO_LINGER {on, 0} the close is
    a reset, so unread bytes do not keep the socket alive in the kernel (FIN-WAIT with
    megabytes queued) for a peer that never reads."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except (OSError, AttributeError, ValueError):
            pass  # not a TCP socket (tests over a pipe): the abort alone still frees the fd
    transport.abort()


def abort_later(transport: asyncio.Transport | None, seconds: float) -> None:
    """Abort the socket if its last bytes are still unread after ``seconds``."""
    if transport is None or transport.is_closing():
        return

    def check() -> None:
        if not transport.is_closing() and transport.get_write_buffer_size() > 0:
            abort(transport)

    asyncio.get_running_loop().call_later(seconds, check)


class EventStream:
    def __init__(self, settings: Settings, hub: Hub, auth: Authenticator, limits: Limits,
                 history: History, ready: Callable[[], bool]) -> None:
        self.settings = settings
        self.hub = hub
        self.auth = auth
        self.limits = limits
        self.history = history
        self.ready = ready
        self.resume_hooks: list[ResumeHook] = []
        # A resume from a position the primary has but this process's feed has not read yet
        # (a standby replays later): wait for it (freshness.py) rather than reset.
        self.reach: Callable[[int], Awaitable[bool]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            topics = parse_topics(request)
            position = parse_position(request)
            envelope = parse_envelope(request)
            principal = await self.auth.identify(request)
            principal.require(topics)
            client_key = principal.subject or (request.client.host if request.client else "")
            self.limits.check_stream(client_key)
        except PgsseError as exc:
            await exc.response()(scope, receive, send)
            return
        method = request.method
        del request  # parsed headers and query: not worth keeping for hours per stream
        await self.serve(scope, receive, send, method=method, topics=topics, position=position,
                         client_key=client_key, expires_at=principal.expires_at,
                         envelope=envelope)

    async def serve(self, scope: Scope, receive: Receive, send: Send, *, method: str,
                    topics: tuple[str, ...], position: int | None, client_key: str,
                    expires_at: float | None, envelope: bool = False,
                    render: Callable[[Event], Rendered | None] | None = None) -> None:
        """A validated, authorised stream from ``position`` (None: the present) to its end.
        Edge adapters (Mercure) call this with their own parsing and wire format."""
        settings = self.settings
        full = len(self.hub) >= settings.max_connections
        if full or not self.ready():
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

        lifetime = settings.stream_max_seconds * random.uniform(0.9, 1.0)
        expires_is_auth = False
        if expires_at is not None and expires_at - time.time() <= lifetime:
            lifetime = expires_at - time.time()
            expires_is_auth = True
        sub = Subscription(topics, 0, time.monotonic() + lifetime, client_key, envelope,
                           settings.client_buffer_bytes, render)
        transport = transport_of(scope)
        direct = direct_of(scope, transport)
        self.limits.opened(client_key)
        live_from = self.hub.subscribe(sub)
        # Events at or below a resume position are never delivered again, even if this
        # replica has not read them yet (the client may come from a replica ahead of it).
        sub.cursor = live_from if position is None else position
        protocol = scope.get("extensions", {}).get("pgsse.protocol")
        watcher: asyncio.Future[None] | None = None
        if protocol is not None:
            protocol.on_lost = lambda: sub.close(CloseReason.DISCONNECT)
            if transport is not None and transport.is_closing():
                sub.close(CloseReason.DISCONNECT)
        else:  # another ASGI server: a task waits for http.disconnect
            watcher = asyncio.ensure_future(self._watch_disconnect(receive, sub))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            await send({"type": "http.response.body",
                        "body": b"retry: %d\n\n" % settings.retry_ms, "more_body": True})
            if position is not None:
                await self._resume(sub, position, send)
            while sub.state is not SubState.CLOSED:
                if sub.state is not SubState.LIVE:
                    try:
                        await self._catch_up(sub, send, direct)
                    except HISTORY_ERRORS:
                        # History is unreachable right now: come back shortly, same id.
                        sub.close(CloseReason.HISTORY_UNAVAILABLE)
                    continue
                sub.wakeup.clear()
                if sub.state is SubState.LIVE:
                    await sub.wakeup.wait()
            await self._end(sub, send, transport, expires_is_auth)
        finally:
            if watcher is not None:
                watcher.cancel()
            if protocol is not None:
                protocol.on_lost = None
            self.hub.unsubscribe(sub)
            self.limits.closed(client_key)

    async def _end(self, sub: Subscription, send: Send, transport: asyncio.Transport | None,
                   expires_is_auth: bool) -> None:
        reason = sub.reason or CloseReason.DISCONNECT
        if reason is CloseReason.MAX_AGE and expires_is_auth:
            reason = CloseReason.AUTH_EXPIRED
        metrics.STREAMS_ENDED.labels(reason.value).inc()
        if reason in (CloseReason.DISCONNECT, CloseReason.SLOW, CloseReason.ERROR):
            # Closed means gone: no graceful close waiting for a peer that may never read.
            # The response is left incomplete on purpose, so the server ends the connection.
            abort(transport)
            return
        if reason is CloseReason.AUTH_EXPIRED:
            tail = Transient(None, "auth_expired", b'{"reason":"token_expired"}').frame(
                sub.envelope)
        else:
            tail = retry_frame(250, 3000)
        try:
            await asyncio.wait_for(
                send({"type": "http.response.body", "body": tail, "more_body": False}),
                FINAL_WRITE_SECONDS)
        except TimeoutError:
            abort(transport)
            return
        abort_later(transport, FINAL_WRITE_SECONDS)

    @staticmethod
    async def _watch_disconnect(receive: Receive, sub: Subscription) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                sub.close(CloseReason.DISCONNECT)
                return

    async def _write(self, sub: Subscription, send: Send, body: bytes) -> bool:
        """Await one write, within the time a stream may stay behind; False if dropped."""
        remaining = sub.behind_since + self.settings.slow_client_seconds - time.monotonic()
        try:
            await asyncio.wait_for(
                send({"type": "http.response.body", "body": body, "more_body": True}),
                max(remaining, 0.001))
        except TimeoutError:
            sub.close(CloseReason.SLOW)
            return False
        sub.last_write = time.monotonic()
        return True

    async def _resume(self, sub: Subscription, position: int, send: Send) -> None:
        try:
            head, pruned_through = await self.history.bounds()
            # Numbered by a primary that failed over before the standby had it (timelines.py).
            lost = position > pruned_through and await self.history.skipped(position)
        except HISTORY_ERRORS:
            # The database is away: what the replay window holds can still be served; the
            # catch-up reads say "history unavailable" if it is needed.
            head, pruned_through, lost = self.hub.position, 0, False
        head = max(head, self.hub.position)
        if position > head and not lost and self.reach is not None and await self.reach(position):
            head = position
        if position > head or lost:
            await self._reset(sub, send, "unknown_position")
            return
        if position < pruned_through:
            await self._reset(sub, send, "history_expired")
            return
        transients: list[Transient] = []
        for hook in self.resume_hooks:
            transients.extend(hook(sub, position))
        if transients:
            await self._write(sub, send, b"".join(t.frame(sub.envelope) for t in transients))

    async def _reset(self, sub: Subscription, send: Send, reason: str) -> None:
        """Start over from the present, atomically (no await between reading the position
        and moving the cursor), and say so first."""
        sub.cursor = self.hub.position
        metrics.REPLAYS.labels("reset").inc()
        await self._write(sub, send, reset_event(sub.cursor, reason).frame(sub.envelope))

    async def _catch_up(self, sub: Subscription, send: Send, direct: Direct | None) -> None:
        """Write everything after ``sub.cursor`` up to the hub's position, then go live."""
        hub = self.hub
        source = ""
        try:
            while sub.state is not SubState.CLOSED:
                target = hub.position
                if sub.cursor >= target:
                    sub.go_live(send, direct)  # no await since reading ``target``
                    return
                got = hub.read_recent(sub.cursor, target, sub, sub.chunk_bytes)
                if got is not None:
                    frames, upto = got
                    source = source or "memory"
                else:
                    source = "history"
                    read = await self.history.read(sub, sub.cursor, target)
                    if read.pruned:
                        await self._reset(sub, send, "history_expired")
                        continue
                    frames, upto = read.frames, read.upto
                if frames and not await self._write(sub, send, b"".join(frames)):
                    return
                metrics.EVENTS_DELIVERED.inc(len(frames))
                if not sub.closed:
                    sub.cursor = upto
        finally:
            # Counted once served, whether the stream then goes live or its client has
            # already left with everything it asked for.
            if source:
                metrics.REPLAYS.labels(source).inc()


class EventLookup:
    """``GET /events/<position>``: one retained event, whole — how a client fetches an event
    that was delivered ``truncated`` (over ``MAX_EVENT_BYTES``). Authorised like a stream:
    the token must grant one of the event's topics."""

    def __init__(self, auth: Authenticator, history: History) -> None:
        self.auth = auth
        self.history = history

    async def endpoint(self, request: Request) -> Response:
        raw = request.path_params["position"]
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_POSITION:
            raise BadRequest("the position is a decimal integer from 0 to 2^63-1",
                             code="invalid_position", param="position")
        principal = await self.auth.identify(request)
        row = await self.history.event(int(raw))
        if row is None or any(is_reserved(t) for t in row["topics"]) or not any(
                principal.allows(topic) for topic in row["topics"]):
            # Not granted looks like absent: no probing for other tenants' positions.
            raise NotFound("no retained event at this position (pruned, or never existed)",
                           param="position")
        body = b'{"position":%d,"topics":%s,"type":%s,"data":%s}' % (
            row["position"], json.dumps(list(row["topics"])).encode(),
            json.dumps(row["type"]).encode(), row["payload"].encode())
        return Response(body, media_type="application/json",
                        headers={"Cache-Control": "private, max-age=3600"})
