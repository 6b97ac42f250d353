"""The lifespan's owner: starts every background loop, and stops them through one path.

Start-up, in the background (``/readyz`` says 503 meanwhile): the pool (retried with backoff
while PostgreSQL is down), migrations, the demo schema, then the sequencer, the listener, the
hub's sweeper and the demo writer, then aggregates once the feed has its position. Any other
start-up failure (a broken aggregate file, a failing migration, a role the service cannot
use) is logged with its reason and stops the process with status 2. Shutdown: drain streams first, then set ``stop``, which
every loop waits on, and wait for them within ``SHUTDOWN_GRACE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .aggregates import Aggregates
from .db import Database, migrate
from .feed import Listener, Sequencer
from .hub import CloseReason, Hub
from .settings import Settings
from .sqlfiles import AggregateFileError

log = logging.getLogger("pgsse.lifecycle")


class Lifecycle:
    def __init__(self, settings: Settings, database: Database, hub: Hub, listener: Listener,
                 sequencer: Sequencer, aggregates: Aggregates,
                 reads: Database | None = None) -> None:
        self.settings = settings
        self.database = database
        self.reads = reads or database  # READ_DATABASE_URL: a hot standby's pool
        self.hub = hub
        self.listener = listener
        self.sequencer = sequencer
        self.aggregates = aggregates
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.started_at = time.time()
        self._starter: asyncio.Task[None] | None = None
        self._independent: list[tuple[str, Callable[[asyncio.Event], Coroutine[Any, Any, None]]]] = []

    def ready_for_streams(self) -> bool:
        return self.listener.cursor is not None and not self.hub.draining

    def drain(self) -> None:
        """SIGTERM: readiness fails, streams end now with a short jittered ``retry:``."""
        if not self.hub.draining:
            log.info("draining", extra={"event": "draining", "clients": len(self.hub)})
            self.hub.draining = True
            self.hub.close_all(CloseReason.SHUTDOWN)

    async def __aenter__(self) -> Lifecycle:
        if not self.settings.auth_enabled:
            log.warning("AUTH_SECRET and AUTH_JWKS_URL are not set: every stream and aggregate is open to anyone",
                        extra={"event": "auth_disabled"})
        self._starter = asyncio.create_task(self._start_or_exit(), name="start")
        for name, run in self._independent:
            self._spawn(run(self.stop), name)
        return self

    def also_run(self, name: str, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        """A loop that needs no database (JWKS refresh): started with the process, stopped
        with the others through ``stop``."""
        self._independent.append((name, run))

    async def __aexit__(self, *exc_info: object) -> None:
        self.drain()
        self.stop.set()
        if self._starter is not None:
            self._starter.cancel()
            with contextlib.suppress(BaseException):
                await self._starter
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=self.settings.shutdown_grace_seconds)
        await self.database.close()
        if self.reads is not self.database:
            await self.reads.close()
        log.info("stopped", extra={"event": "stopped"})

    async def _start_or_exit(self) -> None:
        """The one start-up failure path: a broken aggregate file, a migration that fails,
        a role the service cannot use — logged with the reason, and the process exits 2
        (a database that is down is not a failure: it is retried, ``/readyz`` says 503)."""
        try:
            await self._start()
        except asyncio.CancelledError:
            raise
        except AggregateFileError as exc:
            self._fail(str(exc), "aggregate_invalid", None)
        except Exception as exc:
            self._fail(f"start-up failed: {exc!r}", "startup_failed", exc)

    def _fail(self, message: str, event: str, exc: BaseException | None) -> None:
        log.critical(message, exc_info=exc, extra={"event": event})
        print(f"pgsse: {message}", file=sys.stderr, flush=True)
        os._exit(2)  # from a background task: the only way to stop uvicorn with a status

    async def _start(self) -> None:
        settings = self.settings
        pool = await self.database.connect(self.stop, min_size=1, max_size=10)
        async with pool.acquire() as conn:
            await migrate(conn)
            if settings.demo:
                from . import demo

                await demo.install(conn)
        self._spawn(self.sequencer.run(self.stop), "sequencer")
        self._spawn(self.listener.run(self.stop), "listener")
        self._spawn(self.hub.run_sweeper(settings.heartbeat_seconds, settings.slow_client_seconds,
                                         self.stop), "sweeper")
        if settings.demo:
            from . import demo

            self._spawn(demo.Writer(self.database.url, settings.demo_rate).run(self.stop),
                        "demo-writer")
        if self.reads is not self.database:  # a standby that is down: retried, sequencing runs
            await self.reads.connect(self.stop, min_size=1, max_size=10)
        await self.listener.started.wait()
        await self.aggregates.start()  # a broken file names itself, its line and the problem
        self._spawn(self.aggregates.shapes.run(self.stop), "shapes")
        from . import advise  # a leaf: plain EXPLAINs, one warning per aggregate with findings

        self._spawn(advise.startup_warnings(self.database.pool,
                                            list(self.aggregates.items.values())), "advise")
        log.info("ready", extra={"event": "started", "position": self.hub.position})

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", exc_info=t.exception(),
                          extra={"event": "task_failed", "task": name})

        task.add_done_callback(done)
