"""pgsse: committed PostgreSQL changes streamed to browsers over Server-Sent Events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The Python API (contract section 10). ``publish`` is light (no driver, no web framework),
# so it is bound here; ``App`` (Starlette) and ``Client`` (httpx) load on first use, so
# ``import pgsse`` in a worker that only publishes stays cheap.
from .publish import publish

__version__ = "0.1.0"
__all__ = ["App", "Client", "ClientError", "Event", "publish"]

if TYPE_CHECKING:
    from .asgi import App
    from .subscriber import Client, ClientError, Event

_LAZY = {"App": "asgi", "Client": "subscriber", "ClientError": "subscriber", "Event": "subscriber"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pgsse' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
