"""``create_app(settings)``: routes, middleware, and the lifespan that owns every loop.

The lifespan starts, in the background, the connection to PostgreSQL (retried with backoff
while ``/readyz`` answers 503), migrations, the sequencer, the listener and the hub's
sweeper; on shutdown it drains streams first and stops each loop through one ``stop`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import clientjs, db, metrics
from .aggregates import Aggregates
from .auth import Authenticator
from .errors import Forbidden, NotFound, PgsseError, Unavailable
from .feed import EventDecoder, Listener, Sequencer
from .hub import Hub
from .limits import Limits
from .middleware import RequestContext
from .settings import Settings
from .sqlfiles import AggregateFileError
from .stream import EventStream

log = logging.getLogger("pgsse.app")
STATIC = Path(__file__).parent / "static"


class State:
    """Everything the request handlers share; built by ``create_app``, filled by the lifespan."""

    def __init__(self, settings: Settings, database_url: str | None = None) -> None:
        self.settings = settings
        self.database_url = database_url or settings.database_url
        self.hub = Hub(recent_bytes=settings.replay_memory_bytes)
        self.auth = Authenticator(settings)
        self.limits = Limits(settings.max_connections_per_client, settings.aggregate_rate_per_second)
        self._pool: asyncpg.Pool | None = None
        self.listener: Listener | None = None
        self.sequencer: Sequencer | None = None
        self.decoder = EventDecoder(settings.max_event_bytes)
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.started_at = time.time()
        self.aggregates = Aggregates(settings)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Unavailable("the database is not connected yet")
        return self._pool

    @property
    def ready_for_streams(self) -> bool:
        return self.listener is not None and self.listener.cursor is not None and not self.hub.draining

    def drain(self) -> None:
        """SIGTERM: readiness fails, streams end now with a short jittered ``retry:``."""
        if not self.hub.draining:
            log.info("draining", extra={"event": "draining", "clients": len(self.hub)})
            self.hub.draining = True
            self.hub.close_all("shutdown")

    async def start(self) -> None:
        url = self.database_url
        assert url is not None
        self._pool = await db.wait_for_pool(url, self.stop, min_size=1, max_size=10)
        async with self._pool.acquire() as conn:
            await db.migrate(conn)
            if self.settings.demo:
                from . import demo

                await demo.install(conn)
        self.listener = Listener(self.settings, url, self.hub)
        self.decoder = self.listener.decoder
        self.listener.on_batch.append(self.aggregates.on_events)
        self.sequencer = Sequencer(self.settings, url)
        self._spawn(self.sequencer.run(self.stop), "sequencer")
        self._spawn(self.listener.run(self.stop), "listener")
        self._spawn(self.hub.run_sweeper(self.settings.heartbeat_seconds, self.stop), "sweeper")
        if self.settings.demo:
            from . import demo

            self._spawn(demo.Writer(url, self.settings.demo_rate).run(self.stop), "demo-writer")
        await self.listener.started.wait()
        try:
            await self.aggregates.start(self)
        except AggregateFileError as exc:
            # A broken aggregate stops start-up, naming the file, the line and the problem.
            log.critical(str(exc), extra={"event": "aggregate_invalid"})
            print(f"pgsse: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
        log.info("ready", extra={"event": "started", "position": self.hub.position})

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", exc_info=t.exception(),
                          extra={"event": "task_failed", "task": name})

        task.add_done_callback(done)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: State = request.app.state.pgsse
    checks: dict[str, Any] = {}
    try:
        await asyncio.wait_for(state.pool.fetchval("SELECT 1"), timeout=1.0)
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the reason goes in the body
        checks["database"] = f"failed: {type(exc).__name__}"
    listener = state.listener
    if listener is None or not listener.connected:
        checks["feed"] = "disconnected"
    elif not listener.caught_up:
        checks["feed"] = f"behind ({listener.cursor} of {listener.head})"
    else:
        checks["feed"] = "ok"
    checks["aggregates"] = "ok" if state.aggregates.ready else "loading"
    checks["draining"] = state.hub.draining
    ok = (checks["database"] == "ok" and checks["feed"] == "ok"
          and checks["aggregates"] == "ok" and not state.hub.draining)
    body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "checks": checks}
    if not state.auth.enabled:
        body["warnings"] = ["auth_disabled"]
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


async def stats(request: Request) -> Response:
    state: State = request.app.state.pgsse
    principal = state.auth.authenticate(request)
    if state.auth.enabled and "*" not in principal.grants:
        raise Forbidden("/stats needs a token granting '*'")
    listener = state.listener
    head = listener.head if listener else 0
    body: dict[str, Any] = {
        "clients": len(state.hub),
        "topics": state.hub.topic_count(),
        "position": state.hub.position,
        "head": head,
        "lag": max(0, head - state.hub.position),
        "sequencer_leader": bool(state.sequencer and state.sequencer.leader),
        "draining": state.hub.draining,
        "uptime_seconds": round(time.time() - state.started_at, 1),
        "cache": state.aggregates.cache_stats(),
    }
    return JSONResponse(body)


async def dashboard(request: Request) -> Response:
    state: State = request.app.state.pgsse
    if not state.settings.demo:
        raise NotFound("the dashboard is served only with DEMO=1")
    return FileResponse(STATIC / "dashboard.html", headers={"Cache-Control": "no-cache"})


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    allowed = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
    if name not in allowed:
        raise NotFound("no such file")
    return FileResponse(STATIC / name, media_type=allowed[name], headers={"Cache-Control": "no-cache"})


async def pgsse_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PgsseError)
    return exc.response()


async def not_found(request: Request, exc: Exception) -> Response:
    code = getattr(exc, "status_code", 404)
    if code == 405:
        return JSONResponse({"error": {"code": "method_not_allowed", "message": "method not allowed"}},
                            status_code=405)
    return NotFound("no such route").response()


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"event": "unhandled_error"})
    return PgsseError("internal error").response()


def create_app(settings: Settings, database_url: str | None = None) -> Starlette:
    state = State(settings, database_url)
    stream = EventStream(state)
    stream.resume_hooks.append(state.aggregates.on_resume)
    from . import openapi

    routes = [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/events", stream, methods=["GET", "HEAD"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
        *state.aggregates.routes(),
        Route("/", dashboard, methods=["GET", "HEAD"]),
        Route("/static/{name}", static_file, methods=["GET", "HEAD"]),
        *clientjs.routes(),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not settings.auth_enabled:
            log.warning("AUTH_SECRET is not set: every stream and aggregate is open to anyone",
                        extra={"event": "auth_disabled"})
        starter = asyncio.create_task(state.start(), name="start")
        try:
            yield
        finally:
            state.drain()
            state.stop.set()
            starter.cancel()
            with contextlib.suppress(BaseException):
                await starter
            if state.tasks:
                await asyncio.wait(state.tasks, timeout=settings.shutdown_grace_seconds)
            if state._pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(state._pool.close(), timeout=3)
            log.info("stopped", extra={"event": "stopped"})

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
    # Streams (long-lived, many) and aggregates (polled, mostly 304s) skip the router and
    # exception middleware but keep the same request-id, CORS, auth and limit code.
    app.stream_stack = _wrap(stream, middleware)
    app.aggregate_stack = _wrap(AggregateEndpoint(state.aggregates), middleware)
    app.state.pgsse = state
    return app


def _wrap(inner: ASGIApp, middleware: list[Middleware]) -> ASGIApp:
    for entry in reversed(middleware):
        inner = entry.cls(inner, *entry.args, **entry.kwargs)
    return inner


class AggregateEndpoint:
    """``/aggregates/{name}`` as plain ASGI; errors map to JSON as everywhere else."""

    def __init__(self, aggregates: Aggregates) -> None:
        self.aggregates = aggregates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["path_params"] = {"name": scope["path"][len("/aggregates/"):]}
        request = Request(scope, receive)
        try:
            response = await self.aggregates.endpoint(request)
        except PgsseError as exc:
            response = exc.response()
        except Exception as exc:
            response = await server_error(request, exc)
        await response(scope, receive, send)


class PgsseApp(Starlette):
    stream_stack: ASGIApp | None = None
    aggregate_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.stream_stack is not None and scope["type"] == "http"
                and scope["path"] == "/events" and scope["method"] in ("GET", "HEAD")):
            scope["app"] = self
            await self.stream_stack(scope, receive, send)
            return
        if (self.aggregate_stack is not None and scope["type"] == "http"
                and scope["path"].startswith("/aggregates/") and scope["method"] in ("GET", "HEAD")
                and "/" not in scope["path"][len("/aggregates/"):]):
            scope["app"] = self
            await self.aggregate_stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

