"""Pure ASGI middleware: request id, access log, HTTP metrics, security headers, size limits."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_plus

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .errors import BadRequest
from .logs import redact

log = logging.getLogger("pgsse.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Generated ids: a random per-process prefix and a counter (uuid4 per request was the
# single largest cost of a 304).
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)
MAX_QUERY_BYTES = 8192
MAX_HEADER_BYTES = 16384

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-site"),
]
HTML_CSP = (b"content-security-policy",
            b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            b"connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'")


def loggable_query(query: str) -> str:
    """The query string with every ``access_token`` value redacted, however its name is
    spelled on the wire (``access%5Ftoken`` reaches the app as ``access_token`` too)."""
    if not query:
        return ""
    if "%" not in query and "+" not in query:
        return redact(query)
    pairs = []
    for pair in query.split("&"):
        name, sep, _ = pair.partition("=")
        if sep and unquote_plus(name).strip().lower() == "access_token":
            pair = f"{name}=[redacted]"
        pairs.append(pair)
    return "&".join(pairs)


def route_path(scope: Scope) -> str:
    """The path below the app's mount point: ``scope["path"]`` keeps the whole path and
    ``root_path`` names the prefix (a Starlette ``Mount``, uvicorn's ``--root-path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):]
    return path


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    path = route_path(scope)
    if path == "/events":
        return path  # the hot paths, without matching every route
    if path.startswith("/aggregates/") and "/" not in path[12:]:
        return "/aggregates/{name}"
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "unmatched"


_METRICS: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _route_metrics(route: str, method: str, status: int) -> tuple[Any, Any]:
    """The metric children for one route/method/status, bound once (``labels`` is costly)."""
    key = (route, method, status)
    found = _METRICS.get(key)
    if found is None:
        found = _METRICS[key] = (metrics.HTTP_REQUESTS.labels(route, method, str(status)),
                                 metrics.HTTP_DURATION.labels(route))
    return found


class RequestContext:
    """Takes or makes ``X-Request-ID``, echoes it, logs one line, counts by route template."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = b""
        header_bytes = 0
        for name, value in scope["headers"]:  # one pass: the request id and the size
            header_bytes += len(name) + len(value)
            if name == b"x-request-id":
                given = value
        given_id = given.decode("latin-1")
        request_id = given_id if given and _REQUEST_ID.fullmatch(given_id) else f"{_PREFIX}{next(_COUNTER):08x}"
        scope.setdefault("state", {})["request_id"] = request_id
        route = route_template(self.routes, scope)
        app = self.app
        if len(scope.get("query_string", b"")) > MAX_QUERY_BYTES or header_bytes > MAX_HEADER_BYTES:
            metrics.REJECTED.labels("request_size").inc()
            app = BadRequest("query string or headers too large", code="request_too_large").response()
        rid = request_id.encode()

        # One frame for the whole request (a stream keeps it for hours: keep it small).
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                html = False
                for name, value in headers:
                    if value[:9] == b"text/html" and name.lower() == b"content-type":
                        html = True
                        break
                headers.append((b"x-request-id", rid))
                headers.extend(SECURITY_HEADERS)
                if html:
                    headers.append(HTML_CSP)
                message["headers"] = headers
                elapsed = time.perf_counter() - started
                count, duration = _route_metrics(route, scope["method"], status)
                count.inc()
                duration.observe(elapsed)
                if log.isEnabledFor(logging.INFO):
                    query = scope.get("query_string", b"").decode("latin-1")
                    client = scope.get("client")
                    log.info(
                        "%s %s %d", scope["method"], route, status,
                        extra={"event": "http_request", "request_id": request_id, "route": route,
                               "method": scope["method"], "status": status,
                               "path": scope["path"], "query": loggable_query(query),
                               "client": client[0] if client else None,
                               "duration_ms": round(elapsed * 1000, 2)},
                    )
            await send(message)

        await app(scope, receive, send_wrapper)
