"""A Mercure hub on pgsse's engine: ``/.well-known/mercure`` (``MERCURE=1``).

Publish (``POST``, form fields ``topic`` ×n, ``data``, ``private``, ``id``, ``type``,
``retry``) stores the update with ``realtime.publish`` under the reserved topic
``_mercure`` in one transaction, so it is numbered, kept, replayed and read by every replica
like any pgsse event; the answer is 200 ``text/plain`` with the update's id (the publisher's,
else a generated ``urn:uuid:``).

Subscribe (``GET``, SSE) is an ``EventStream`` on that topic with Mercure's wire format
(``Subscription.render``): each update is parsed and encoded once (``Updates``), then each
subscription only decides whether it matches — its selectors against the update's topics,
and for a private update its token's subscribe selectors too. Frames carry the Mercure id as
``id:`` and start with the comment ``: <position>`` (how the hub rewinds a stream whose
socket filled up). Resume: ``Last-Event-ID`` (header), ``lastEventID`` (0.x),
``last_event_id`` (1.0) or ``Mercure-Last-Event-ID``: a publisher's id or a position;
``earliest`` replays everything retained; an id that history no longer holds gets pgsse's
``event: reset`` and the stream continues from the present.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

import asyncpg
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..db import Database
from ..errors import BadRequest, Forbidden, PgsseError, Unauthorized, Unavailable
from ..hub import Event, Rendered, http_chunk
from ..queries import query
from ..settings import Settings
from ..stream import MAX_POSITION, EventStream
from ..topics import MERCURE_TOPIC
from . import selectors as sel
from .tokens import Grant, MercureTokens, token_from

log = logging.getLogger("pgsse.mercure")

MAX_BODY = 1 << 20
MAX_SELECTORS = 64
CACHE_UPDATES = 8192
_FIELD_FORBIDDEN = ("\r", "\n", "\0")


@dataclass(frozen=True, slots=True)
class Update:
    topics: tuple[str, ...]
    private: bool
    rendered: Rendered  # (frame, HTTP chunk): the same bytes for every subscriber


class Matcher:
    """A subscription's selectors, with the exact ones in a set (the common case: one
    lookup per update topic instead of a call per selector)."""

    __slots__ = ("everything", "exact", "others")

    def __init__(self, selectors: Iterable[sel.Selector]) -> None:
        found = list(selectors)
        self.everything = any(s.kind == "any" for s in found)
        self.exact = frozenset(s.text for s in found if s.kind == "exact")
        self.others = tuple(s for s in found if s.kind not in ("any", "exact"))

    def __call__(self, topics: tuple[str, ...]) -> bool:
        if self.everything or not self.exact.isdisjoint(topics):
            return True
        return bool(self.others) and sel.any_matches(self.others, topics)


class Updates:
    """Each ``_mercure`` event parsed and encoded once, whoever renders it (bounded)."""

    def __init__(self) -> None:
        self.cache: OrderedDict[int, Update | None] = OrderedDict()

    def get(self, event: Event) -> Update | None:
        update = self.cache.get(event.position, False)
        if update is not False:
            return update  # type: ignore[return-value]
        update = self.parse(event)
        self.cache[event.position] = update
        if len(self.cache) > CACHE_UPDATES:
            self.cache.popitem(last=False)
        return update

    @staticmethod
    def parse(event: Event) -> Update | None:
        if MERCURE_TOPIC not in event.topics:
            return None
        try:
            body = json.loads(event.data)
            topics = tuple(t for t in body["topics"] if isinstance(t, str))
            head = [b": %d\n" % event.position, b"id: %s\n" % body["id"].encode()]
            if body.get("type"):
                head.append(b"event: %s\n" % body["type"].encode())
            if isinstance(body.get("retry"), int):
                head.append(b"retry: %d\n" % body["retry"])
            data = body.get("data") or ""
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("unreadable Mercure update", extra={"event": "mercure_bad_update",
                                                            "position": event.position})
            return None
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        frame = b"".join(head) + b"".join(b"data: %s\n" % line.encode() for line in lines) + b"\n"
        return Update(topics, bool(body.get("private")), (frame, http_chunk(frame)))


class Mercure:
    def __init__(self, settings: Settings, database: Database, stream: EventStream) -> None:
        self.settings = settings
        self.database = database
        self.stream = stream
        self.updates = Updates()
        jwks = stream.auth.jwks
        self.publishers = MercureTokens(settings.mercure_publisher_jwt_key,
                                        settings.mercure_audience, settings.mercure_issuer, jwks)
        self.subscribers = MercureTokens(settings.mercure_subscriber_jwt_key,
                                         settings.mercure_audience, settings.mercure_issuer, jwks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            if request.method in ("GET", "HEAD"):
                await self.subscribe(request, scope, receive, send)
                return
            if request.method == "POST":
                response: Response = await self.publish(request)
            else:
                response = PgsseError("method not allowed", code="method_not_allowed").response()
                response.status_code = 405
        except PgsseError as exc:
            response = exc.response()
        await response(scope, receive, send)

    # -- subscribe ------------------------------------------------------------------------

    def _selectors(self, request: Request) -> list[sel.Selector]:
        found: list[sel.Selector] = []
        try:
            for name, value in request.query_params.multi_items():
                if name == "topic":
                    found.append(sel.legacy(value))
                elif name == "match":
                    found.append(sel.exact(value))
                elif name == "match_urlpattern":
                    found.append(sel.urlpattern(value))
        except sel.SelectorError as exc:
            raise BadRequest(str(exc), code="invalid_selector", param="topic") from exc
        if not found:
            raise BadRequest("at least one topic selector is required (topic, match or "
                             "match_urlpattern)", code="invalid_selector", param="topic")
        if len(found) > MAX_SELECTORS:
            raise BadRequest(f"at most {MAX_SELECTORS} topic selectors", code="invalid_selector",
                             param="topic")
        return found

    async def _position(self, request: Request) -> int | None:
        raw = (request.headers.get("last-event-id") or request.headers.get("mercure-last-event-id")
               or request.query_params.get("last_event_id")
               or request.query_params.get("lastEventID") or "")
        raw = raw.strip()
        if not raw:
            return None
        if raw == "earliest":
            return 0
        try:
            found = await self.database.pool.fetchval(query("mercure_position"), raw[:1024])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise Unavailable("history is unreachable; try again") from exc
        if found is not None:
            return int(found)
        if raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) <= MAX_POSITION:
            return int(raw)
        return MAX_POSITION  # unknown: pgsse says reset (unknown_position), then live

    async def subscribe(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        selectors = self._selectors(request)
        token = token_from(request)
        if token is not None:
            grant = self.subscribers.verify(token)
        elif self.settings.mercure_anonymous:
            grant = Grant()
        else:
            raise Unauthorized("a Mercure subscriber token is required (MERCURE_ANONYMOUS is off)")
        position = await self._position(request)
        wanted, allowed = Matcher(selectors), Matcher(grant.subscribe)
        updates = self.updates

        def render(event: Event) -> Rendered | None:
            update = updates.get(event)
            if update is None or not wanted(update.topics):
                return None
            if update.private and not allowed(update.topics):
                return None
            return update.rendered

        client_key = grant.subject or (request.client.host if request.client else "")
        self.stream.limits.check_stream(client_key)
        method = request.method
        del request
        await self.stream.serve(scope, receive, send, method=method, topics=(MERCURE_TOPIC,),
                                position=position, client_key=client_key,
                                expires_at=grant.expires_at, render=render)

    # -- publish --------------------------------------------------------------------------

    async def publish(self, request: Request) -> Response:
        token = token_from(request)
        if token is None:
            raise Unauthorized("a Mercure publisher token is required")
        grant = self.publishers.verify(token)
        fields = await _form(request)
        topics = [v for k, v in fields if k == "topic"]
        if not topics:
            raise BadRequest("at least one topic is required", code="invalid_update", param="topic")
        for topic in topics:
            if not sel.any_matches(grant.publish, [topic]):
                raise Forbidden(f"the token may not publish to {topic!r}", param="topic")
        single = _single(fields)
        update_id = single.get("id") or f"urn:uuid:{uuid.uuid4()}"
        kind = single.get("type") or None
        for name, value in (("id", update_id), ("type", kind or "")):
            if any(c in value for c in _FIELD_FORBIDDEN) or len(value) > 1024:
                raise BadRequest(f"{name} must be one line of at most 1024 characters",
                                 code="invalid_update", param=name)
        retry: int | None = None
        if single.get("retry"):
            if not single["retry"].isdigit() or len(single["retry"]) > 9:
                raise BadRequest("retry is a number of milliseconds", code="invalid_update",
                                 param="retry")
            retry = int(single["retry"])
        payload = {"id": update_id, "topics": topics, "data": single.get("data", ""),
                   "private": "private" in single, "type": kind, "retry": retry}
        try:
            await self.database.pool.execute(query("mercure_publish"), json.dumps(payload))
        except asyncpg.PostgresError as exc:
            raise BadRequest(f"update refused: {exc}", code="invalid_update") from exc
        except (OSError, asyncpg.InterfaceError) as exc:
            raise Unavailable("the database is unreachable; try again") from exc
        return PlainTextResponse(update_id)


async def _form(request: Request) -> list[tuple[str, str]]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/x-www-form-urlencoded", ""):
        raise BadRequest("updates are application/x-www-form-urlencoded", code="invalid_update")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(f"an update is at most {MAX_BODY} bytes", code="update_too_large")
    try:
        return parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False,
                         max_num_fields=1000)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"unreadable form: {exc}", code="invalid_update") from exc


def _single(fields: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in fields:
        if name != "topic":
            out.setdefault(name, value)
    return out


RenderHook = Callable[[Event], Rendered | None]


class DiscoveryLink:
    """Mercure discovery: ``Link: </.well-known/mercure>; rel="mercure"`` on the wrapped
    responses (the aggregates), relative so it holds behind any proxy or mount prefix."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "")
        link = f'<{root}/.well-known/mercure>; rel="mercure"'.encode()

        async def send_with_link(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"link", link)]}
            await send(message)

        await self.app(scope, receive, send_with_link)
