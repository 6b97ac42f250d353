"""``create_app(settings)``: every part built once, with only what it uses, in one place.

The data path reads trigger → ``feed.Listener`` → ``hub.Hub`` → ``stream.EventStream``.
Nothing runs at import time; ``lifecycle.Lifecycle`` is the lifespan and owns every loop.
Streams (long-lived, many) and aggregates (polled, mostly 304s) skip the router but keep the
same request-id, CORS, auth and limit code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import clientjs, openapi
from .aggregates import Aggregates, Collaborators
from .auth import Authenticator
from .db import Database
from .errors import NotFound, PgsseError
from .feed import EventDecoder, History, Listener, Sequencer
from .freshness import Freshness
from .health import Health
from .hub import Hub
from .lifecycle import Lifecycle
from .limits import Limits
from .middleware import RequestContext, route_path
from .replica import StandbyReader
from .settings import Settings
from .stream import EventLookup, EventStream

log = logging.getLogger("pgsse.app")
STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def create_app(settings: Settings, database_url: str | None = None) -> PgsseApp:
    url = database_url or settings.database_url
    assert url is not None, "DATABASE_URL (or the embedded PostgreSQL's URL) is required"
    database = Database(url, settings.aggregate_pool_size)
    hub = Hub(recent_bytes=settings.replay_memory_bytes)
    auth = Authenticator(settings)
    limits = Limits(settings.max_connections_per_client, settings.aggregate_rate_per_second)
    decoder = EventDecoder(settings.max_event_bytes)
    # READ_DATABASE_URL: feed, history and aggregates from a hot standby (replica.py).
    reads = (Database(settings.read_database_url, settings.aggregate_pool_size)
             if settings.read_database_url else database)
    history = History(reads, decoder)
    listener = (StandbyReader(settings, reads.url, url, hub, decoder) if reads is not database
                else Listener(settings, url, hub, decoder))
    sequencer = Sequencer(settings, url)
    freshness = Freshness(hub, settings.min_position_wait_seconds, lambda: listener.head)
    aggregates = Aggregates(settings, Collaborators(reads, hub, auth, limits, freshness))
    listener.on_batch.append(aggregates.on_events)
    listener.on_batch.append(freshness.on_events)
    lifecycle = Lifecycle(settings, database, hub, listener, sequencer, aggregates, reads)
    if auth.jwks is not None:  # issue 21: keys fetched in the background from start-up
        lifecycle.also_run("jwks", auth.jwks.run)
    stream = EventStream(settings, hub, auth, limits, history, lifecycle.ready_for_streams)
    stream.resume_hooks.append(aggregates.on_resume)
    stream.reach = freshness.reach
    health = Health(database, hub, listener, sequencer, aggregates, auth, lifecycle.started_at)

    routes = [
        *mercure_routes(settings, database, stream),
        Route("/healthz", health.healthz, methods=["GET", "HEAD"]),
        Route("/readyz", health.readyz, methods=["GET", "HEAD"]),
        Route("/metrics", health.metrics, methods=["GET"]),
        Route("/events", stream, methods=["GET", "HEAD"]),
        Route("/events/{position}", EventLookup(auth, history).endpoint, methods=["GET"]),
        Route("/stats", health.stats, methods=["GET"]),
        Route("/openapi.json", openapi.OpenApi(aggregates, auth).endpoint, methods=["GET"]),
        *aggregates.routes(),
        Route("/", Dashboard(settings.demo).endpoint, methods=["GET", "HEAD"]),
        Route("/static/{name}", static_file, methods=["GET", "HEAD"]),
        *clientjs.routes(),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with lifecycle:
            yield

    middleware = [Middleware(RequestContext, routes=routes)]
    if settings.cors_origins:  # without an allow-list there is nothing to add to any response
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=True,
            allow_methods=["GET", "HEAD"],
            allow_headers=["Authorization", "Last-Event-ID", "If-None-Match", "X-Request-ID"],
            expose_headers=["ETag", "X-Request-ID", "Retry-After"], max_age=600))
    app = PgsseApp(
        routes=routes, middleware=middleware, lifespan=lifespan,
        exception_handlers={PgsseError: pgsse_error, 404: not_found, 405: not_found,
                            500: server_error},
    )
    app.router.redirect_slashes = False  # ours are relative: see ``not_found``
    app.stream_stack = _wrap(stream, middleware)
    app.aggregate_stack = _wrap(AggregateEndpoint(aggregates), middleware)
    if settings.mercure:
        from .mercure import DiscoveryLink

        app.aggregate_stack = DiscoveryLink(app.aggregate_stack)
    app.lifecycle = lifecycle
    return app


def mercure_routes(settings: Settings, database: Database, stream: EventStream) -> list[Route]:
    """``/.well-known/mercure`` when ``MERCURE=1``: an edge adapter over the stream."""
    if not settings.mercure:
        return []
    from .mercure import Mercure

    return [Route("/.well-known/mercure", Mercure(settings, database, stream),
                  methods=["GET", "HEAD", "POST"])]


class Dashboard:
    def __init__(self, demo: bool) -> None:
        self.demo = demo

    async def endpoint(self, request: Request) -> Response:
        if not self.demo:
            raise NotFound("the dashboard is served only with DEMO=1")
        return FileResponse(STATIC / "dashboard.html", headers={"Cache-Control": "no-cache"})


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC_TYPES:
        raise NotFound("no such file")
    return FileResponse(STATIC / name, media_type=STATIC_TYPES[name],
                        headers={"Cache-Control": "no-cache"})


async def pgsse_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PgsseError)
    return exc.response()


async def not_found(request: Request, exc: Exception) -> Response:
    code = getattr(exc, "status_code", 404)
    if code == 405:
        return JSONResponse({"error": {"code": "method_not_allowed", "message": "method not allowed"}},
                            status_code=405)
    path = request.url.path
    if path != "/" and path.endswith("/"):
        # A trailing slash: redirect to the route without it, with a *relative* Location
        # (Starlette's own redirect echoes the Host header).
        scope = {**request.scope, "path": path.rstrip("/")}
        for route in request.app.router.routes:
            if route.matches(scope)[0] is Match.FULL:
                query = request.url.query
                return RedirectResponse(path.rstrip("/") + ("?" + query if query else ""),
                                        status_code=307)
    return NotFound("no such route").response()


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"event": "unhandled_error"})
    return PgsseError("internal error").response()


def _wrap(inner: ASGIApp, middleware: list[Middleware]) -> ASGIApp:
    for entry in reversed(middleware):
        inner = entry.cls(inner, *entry.args, **entry.kwargs)
    return inner


class AggregateEndpoint:
    """``/aggregates/{name}`` as plain ASGI; errors map to JSON as everywhere else."""

    def __init__(self, aggregates: Aggregates) -> None:
        self.aggregates = aggregates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["path_params"] = {"name": route_path(scope)[len("/aggregates/"):]}
        request = Request(scope, receive)
        try:
            response = await self.aggregates.endpoint(request)
        except PgsseError as exc:
            response = exc.response()
        except Exception as exc:  # the one catch-all: a bug becomes a logged 500
            response = await server_error(request, exc)
        await response(scope, receive, send)


class PgsseApp(Starlette):
    stream_stack: ASGIApp | None = None
    aggregate_stack: ASGIApp | None = None
    lifecycle: Lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = route_path(scope)  # mounted under a prefix too (pgsse.App)
            if path == "/events" and self.stream_stack is not None:
                scope["app"] = self
                await self.stream_stack(scope, receive, send)
                return
            if (self.aggregate_stack is not None and path.startswith("/aggregates/")
                    and "/" not in path[len("/aggregates/"):]):
                scope["app"] = self
                await self.aggregate_stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
