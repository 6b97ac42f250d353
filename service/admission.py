"""Who may take a connection of the aggregate pool, for how long, and for how long one waits.

An aggregate's duration is its author's (and its caller's parameters'), so the aggregate pool
is shared out rather than first come, first served (issue 20: one client's 100 requests to a
5 s aggregate held all ten connections of the one pool for 50 s, and everything else waited):

- **A share per aggregate**: one aggregate holds at most ``ceil(pool / 2)`` connections at a
  time (a semaphore per name, taken *before* the pool's own queue). Its extra requests queue
  behind each other on that semaphore, never in the pool's queue in front of another
  aggregate's. Half, not less: a single busy aggregate (the common case) still gets most of
  the pool, and the other half stays open to the rest. Two slow aggregates together can still
  fill the pool; three cannot starve a fourth for longer than their statement timeout.
- **A bounded wait**: the share and then a connection must be had within
  ``AGGREGATE_POOL_WAIT`` (default 5 s), else 503 ``busy`` with ``Retry-After``, instead of
  an unbounded queue that turns into timeouts at the client (or at a proxy).
- **A statement timeout** per aggregate: ``-- timeout:`` in its file, else
  ``AGGREGATE_TIMEOUT`` (10 s); set with ``SET LOCAL`` in the query's own transaction, so it
  dies with it and the connection goes back to the pool usable. A timed-out query answers 503
  ``aggregate_timeout`` (with ``Retry-After``), never a 500.

Readiness, history replays, ``/events/{position}`` and resume bounds use other pools
(``db.Database``): nothing here can make them wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

import asyncpg

from .db import Connection
from .errors import Unavailable


class Busy(Unavailable):
    """No aggregate connection within ``AGGREGATE_POOL_WAIT``."""

    code = "busy"


class Admission:
    def __init__(self, pool_size: int, wait_seconds: float) -> None:
        self.share = max(1, math.ceil(pool_size / 2))
        self.wait_seconds = wait_seconds
        self.retry_after = str(max(1, math.ceil(wait_seconds)))
        self.shares: dict[str, asyncio.Semaphore] = {}
        self.rejected = 0

    @contextlib.asynccontextmanager
    async def connection(self, pool: asyncpg.Pool, name: str) -> AsyncIterator[Connection]:
        """A connection of ``pool`` for aggregate ``name``, within the share and the wait."""
        share = self.shares.get(name)
        if share is None:
            share = self.shares[name] = asyncio.Semaphore(self.share)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        try:
            async with asyncio.timeout(self.wait_seconds):
                await share.acquire()
        except TimeoutError:
            raise self._busy(name) from None
        try:
            try:
                conn = await pool.acquire(timeout=max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise self._busy(name) from None
            try:
                yield conn
            finally:
                await pool.release(conn)
        finally:
            share.release()

    def _busy(self, name: str) -> Busy:
        self.rejected += 1
        return Busy(f"aggregate {name!r} is busy: no database connection within "
                    f"{self.wait_seconds:g}s; try again later",
                    headers={"Retry-After": self.retry_after})


def statement_timeout(seconds: float) -> str:
    """A ``statement_timeout`` value (whole milliseconds, at least 1)."""
    return f"{max(1, round(seconds * 1000))}ms"
