"""``pgsse.App(**settings)``: the whole service as an ASGI app inside another one.

    rt = pgsse.App(database_url="postgresql://…", auth_secret="…")
    app = FastAPI(lifespan=rt.lifespan)       # or: async with rt.running(): … in your own
    app.mount("/realtime", rt)

Settings are keyword arguments named like the environment variables in lower case
(``history_retention="24h"``, ``cors_origins=["https://a.example"]``), parsed by the same
code as the environment; the rest comes from the environment. A name that is neither an
environment variable nor a ``Settings`` field is a ``TypeError``.

The host's lifespan runs pgsse's background work (pool, change feed, sequencer, pruning):
``running()`` is ``Lifecycle`` as an async context manager. A mount gets no lifespan events
of its own (Starlette sends them to the host only), hence ``rt.lifespan``. Served alone
(``uvicorn module:rt``) the app answers the lifespan protocol itself.

Shutdown: a stream never ends by itself, and uvicorn waits for open responses before it runs
the lifespan's shutdown. While running in the main thread, the app therefore chains a
handler in front of the signal handlers it finds for SIGTERM and SIGINT (the server's):
it drains pgsse's streams (each ends with a short jittered ``retry:``), then calls the
server's own. ``drain()`` does the same for a host that stops another way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.types import Receive, Scope, Send

from .app import PgsseApp, create_app
from .settings import ConfigError, Settings

log = logging.getLogger("pgsse.asgi")

__all__ = ["App", "settings_from"]


class _RecordingEnv(Mapping[str, str]):
    """An environment that remembers the names ``Settings.from_env`` asks for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return self._values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(item) for item in value)
    return str(value)


def settings_from(overrides: Mapping[str, object],
                  environ: Mapping[str, str] | None = None) -> Settings:
    """``Settings`` from keyword arguments named like the environment variables (lower
    case; values as text or as Python values), over the environment."""
    base = dict(os.environ if environ is None else environ)
    probe = _RecordingEnv({})
    Settings.from_env(probe)
    known = probe.asked  # every variable Settings reads, as it reads them
    fields = {f.name for f in dataclasses.fields(Settings)}
    typed: dict[str, Any] = {}
    for key, value in overrides.items():
        name = key.upper()
        if name in known:
            base[name] = _as_text(value)
        elif key in fields:
            typed[key] = Path(value) if key == "data_dir" and isinstance(value, str) else value
        else:
            raise TypeError(f"pgsse.App() got an unknown setting {key!r}")
    settings = Settings.from_env(base, **typed)
    if not settings.database_url:
        raise ConfigError({"DATABASE_URL": "pgsse.App needs database_url= or DATABASE_URL "
                                           "(the embedded PostgreSQL is for pgsse serve)"})
    return settings


class App:
    """The service as an ASGI app to mount (see the module's docstring)."""

    def __init__(self, **settings: object) -> None:
        self.settings = settings_from(settings)
        self._app: PgsseApp = create_app(self.settings)
        self._runs = 0
        self._active = False
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._serve_lifespan(receive, send)
            return
        if not self._active and not self._warned:
            self._warned = True
            log.warning("pgsse.App got a request but is not running: give the host "
                        "lifespan=rt.lifespan, or enter `async with rt.running()` in its own",
                        extra={"event": "not_running"})
        await self._app(scope, receive, send)

    def lifespan(self, app: object = None) -> contextlib.AbstractAsyncContextManager[None]:
        """For ``FastAPI(lifespan=rt.lifespan)`` / ``Starlette(lifespan=rt.lifespan)``."""
        return self.running()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run pgsse's background work for the duration of the block."""
        if self._active:
            raise RuntimeError("this pgsse.App is already running")
        if self._runs:
            # A lifecycle runs once (its loops, pool and hub end with it): a host that is
            # started again (tests, reloads) gets a fresh service on the same settings.
            self._app = create_app(self.settings)
        self._runs += 1
        lifecycle = self._app.lifecycle
        restore = _drain_on_signals(lifecycle.drain)
        self._active = True
        try:
            async with lifecycle:
                yield
        finally:
            self._active = False
            restore()

    def drain(self) -> None:
        """End every stream now, each with a short jittered ``retry:`` (as on SIGTERM)."""
        self._app.lifecycle.drain()

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        """Served alone, not mounted: the lifespan protocol, around ``running()``."""
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.running():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except Exception as exc:
            kind = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{kind}.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def _drain_on_signals(drain: Callable[[], None]) -> Callable[[], None]:
    """Chain ``drain`` in front of the current SIGTERM/SIGINT handlers; return the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    installed: dict[int, tuple[Any, Any]] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # default or ignored: nothing waits for streams to finish

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(drain)
            previous(signum, frame)

        signal.signal(sig, handler)
        installed[sig] = (handler, previous)

    def restore() -> None:
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return restore
