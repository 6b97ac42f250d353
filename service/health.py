"""Operations endpoints: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/stats``,
``/metrics``.

Readiness means "send me traffic": the database answers, the change feed is connected and
not behind for longer than ``READY_MAX_LAG`` (NOTIFY raises the head a few milliseconds
before the rows are read, so merely "behind" is the normal state under load), aggregates are
loaded, and the process is not draining. The feed and the sequencer also report a failing
loop (``failing: <why>``) until it has really worked again: on a read-only database the
feed connects and LISTENs and the sequencer takes the lock, so "connected" alone would
look caught up while nothing is numbered.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import metrics, workers
from .aggregates import Aggregates
from .auth import Authenticator
from .db import Database
from .errors import Forbidden, Unavailable
from .feed import Listener, Sequencer
from .hub import Hub, SubState
from .replica import StandbyReader

PROBE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, Unavailable)


class Health:
    def __init__(self, database: Database, hub: Hub, listener: Listener, sequencer: Sequencer,
                 aggregates: Aggregates, auth: Authenticator, started_at: float) -> None:
        self.database = database
        self.hub = hub
        self.listener = listener
        self.sequencer = sequencer
        self.aggregates = aggregates
        self.auth = auth
        self.started_at = started_at

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, Any] = {}
        try:
            # Its own connection: this measures the database, not a queue for the pool.
            await asyncio.wait_for(self.database.probe_pool.fetchval("SELECT 1"), timeout=1.0)
            checks["database"] = "ok"
        except PROBE_ERRORS as exc:
            checks["database"] = f"failed: {type(exc).__name__}"
        listener = self.listener
        if listener.failure is not None:
            checks["feed"] = f"failing: {listener.failure}"
        elif not listener.connected:
            checks["feed"] = "disconnected"
        elif not listener.caught_up:
            checks["feed"] = (f"behind ({listener.cursor} of {listener.head}, "
                              f"{listener.lag_seconds:.1f}s)")
        else:
            checks["feed"] = "ok"
        failure = self.sequencer.failure
        checks["sequencer"] = "ok" if failure is None else f"failing: {failure}"
        checks["aggregates"] = "ok" if self.aggregates.ready else "loading"
        checks["draining"] = self.hub.draining
        if self.auth.jwks is not None:  # issue 21: no key until one JWKS fetch succeeded
            checks["jwks"] = self.auth.jwks.status()
        ok = (checks["database"] == "ok" and checks["feed"] == "ok" and failure is None
              and checks["aggregates"] == "ok" and not self.hub.draining
              and checks.get("jwks", "ok") == "ok")
        if isinstance(listener, StandbyReader):  # READ_DATABASE_URL: the standby's own check
            checks["replica"] = listener.replica_check()
            ok = ok and checks["replica"] == "ok"
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "checks": checks}
        # Aggregates that no longer compile against the schema (contract section 14): the
        # rest of the service serves, so still ready.
        body["degraded"] = self.aggregates.shapes.degraded()
        if not self.auth.enabled:
            body["warnings"] = ["auth_disabled"]
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        body, content_type = await metrics.exposition()
        return Response(body, media_type=content_type)

    async def stats(self, request: Request) -> Response:
        principal = await self.auth.identify(request)
        if self.auth.enabled and "*" not in principal.grants:
            raise Forbidden("/stats needs a token granting '*'")
        hub = self.hub
        head = max(self.listener.head, hub.position)
        states = {state.value: 0 for state in SubState if state is not SubState.CLOSED}
        for sub in hub.subscriptions:
            if sub.state is not SubState.CLOSED:
                states[sub.state.value] += 1
        body: dict[str, Any] = {
            "clients": len(hub),
            "streams": states,
            "topics": hub.topic_count(),
            "position": hub.position,
            "head": head,
            "lag": max(0, head - hub.position),
            "lag_seconds": round(self.listener.lag_seconds, 3),
            "replay_window": {"events": len(hub.recent), "bytes": hub.recent_bytes},
            "sequencer_leader": self.sequencer.leader,
            "draining": hub.draining,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            # Per process: with WORKERS=N each worker answers for itself (which one: here).
            "worker": workers.index(), "pid": os.getpid(),
            "cache": self.aggregates.cache_stats(),
        }
        return JSONResponse(body)
