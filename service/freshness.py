"""Read-your-events across replicas: ``GET /aggregates/{name}?min_position=P``.

A client that applied events up to P (from any replica) asks for an aggregate that reflects
them. Replicas read at their own pace (a standby's replay, a listener's poll), so the one
that answers may not have processed P yet: it waits up to ``MIN_POSITION_WAIT`` for its
feed to reach P, woken by each batch the feed hands over, and then answers as usual — its
``meta.position`` (the hub position taken before the query) is then at least P. Past the
wait: 503 ``behind`` with ``Retry-After``, so the client (or a load balancer) tries again or
elsewhere. Without the parameter nothing changes and nothing waits.

The same wait serves a stream resuming from a position this process has not reached although
the primary has (``reach``): a client that moves from a replica that was ahead resumes
without a spurious ``reset``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .errors import BadRequest, Unavailable
from .hub import Event, Hub

MAX_POSITION = 2**63 - 1
RECHECK_SECONDS = 0.1  # the hub's position may also move without a batch (a gap, a skip)


class Freshness:
    def __init__(self, hub: Hub, wait_seconds: float,
                 primary_head: Callable[[], int] = lambda: 0) -> None:
        self.hub = hub
        self.wait_seconds = wait_seconds
        self.primary_head = primary_head  # the last head the feed learned from the primary
        self._moved: asyncio.Event | None = None  # created by the first waiter

    def on_events(self, events: list[Event]) -> None:
        """The feed's batch callback: wake every waiter (they re-check their position)."""
        moved, self._moved = self._moved, None
        if moved is not None:
            moved.set()

    async def require(self, raw: str | None) -> None:
        """Return once the hub's position is at least ``raw`` (absent: at once)."""
        if raw is None or raw == "":
            return
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_POSITION:
            raise BadRequest("min_position is a decimal integer from 0 to 2^63-1",
                             code="invalid_parameter", param="min_position")
        wanted = int(raw)
        if not await self._wait(wanted):
            raise Unavailable(
                f"this replica has processed events up to {self.hub.position}, "
                f"not yet {wanted}; retry", code="behind", param="min_position",
                headers={"Retry-After": "1"}, details={"position": self.hub.position})

    async def reach(self, position: int) -> bool:
        """A resume from beyond this process's position: wait for it when the primary is
        known to have numbered it (a standby behind); False otherwise or past the wait."""
        return position <= self.primary_head() and await self._wait(position)

    async def _wait(self, wanted: int) -> bool:
        deadline = time.monotonic() + self.wait_seconds
        while self.hub.position < wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._moved is None:
                self._moved = asyncio.Event()
            try:
                await asyncio.wait_for(self._moved.wait(), min(remaining, RECHECK_SECONDS))
            except TimeoutError:
                pass
        return True
