"""Aggregates: raw-SQL files served with ETag, 304 and Cache-Control (being built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

from .hub import Event, Subscription
from .settings import Settings

if TYPE_CHECKING:
    from .app import State


class Aggregates:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def routes(self) -> list[BaseRoute]:
        return []

    async def start(self, state: State) -> None:
        return None

    def on_events(self, events: list[Event]) -> None:
        return None

    async def on_resume(self, sub: Subscription, position: int, live_from: int) -> list[bytes]:
        return []

    def cache_stats(self) -> dict[str, Any]:
        return {}

    def openapi_paths(self, errors: dict[str, Any]) -> dict[str, Any]:
        return {}
