"""uvicorn's HTTP protocol with the two things pgsse needs from the connection itself.

- **A header timeout.** uvicorn times out idle keep-alive connections but not a request
  whose headers never complete: 2,000 peers sending one header line every 10 s would each
  hold a socket forever. Here a connection that has not completed its request headers within
  ``HEADER_TIMEOUT`` of connecting (or of starting a request) is closed.
- **Disconnects without a task**: ``on_lost`` is called when the connection is lost, so a
  stream needs no task parked on ``receive()`` to notice its client leave.
- **The transport, in the scope** (``scope["extensions"]["pgsse.transport"]``): a dropped
  stream aborts its socket, because a graceful close waits for a peer that may never read
  (PITFALLS: it keeps the fd and the kernel's send buffer). With it, uvicorn's flow control
  (``pgsse.flow``): the hub writes live events to the transport itself, and stops where
  uvicorn's ``send`` would wait (``write_paused``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def protocol_class(header_timeout: float) -> type[HttpToolsProtocol]:
    class PgsseHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        # Called once when the connection is lost (a stream's way to notice its client
        # leave without a task waiting on ``receive()`` for hours: less memory per stream).
        on_lost: Callable[[], None] | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {
                "pgsse.transport": self.transport,  # type: ignore[dict-item]
                "pgsse.flow": self.flow,  # type: ignore[dict-item]
                "pgsse.protocol": self}  # type: ignore[dict-item]
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)
            callback, self.on_lost = self.on_lost, None
            if callback is not None:
                callback()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being served (its headers completed): not ours to end
            if not self.transport.is_closing():
                self.transport.abort()

    return PgsseHttpProtocol


def uvicorn_kwargs(header_timeout: float) -> dict[str, Any]:
    return {"http": protocol_class(header_timeout)}


def __getattr__(name: str) -> Any:
    """``HttpProtocol``: the class for a host's own uvicorn (``uvicorn main:app --http
    pgsse.protocol:HttpProtocol``), so a mounted ``pgsse.App`` keeps the header timeout,
    the socket abort and the direct writes. ``HEADER_TIMEOUT`` is read when uvicorn loads it."""
    if name != "HttpProtocol":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .settings import Settings

    cls = protocol_class(Settings.from_env().header_timeout_seconds)
    globals()[name] = cls
    return cls
