"""Aggregates follow the shape of their tables (contract section 14).

``ALTER TABLE`` (add, drop, rename or retype a column), renaming or dropping a table, and
``GRANT``/``REVOKE`` commit no row, so they move no table version and no ETag: without this
module an aggregate went on answering 304, or its cached 200, with the old columns, and a
query that no longer compiled surfaced as a generic failure.

- **Noticing**: every ``SHAPE_POLL_SECONDS`` one catalogue query fingerprints every table the
  aggregates read, by name: its oid, columns (name, type, typmod, order), and privileges. A
  changed fingerprint marks the aggregates reading that table *stale*. (pgsse installs no
  event trigger — that needs a superuser — so a change is noticed within one poll; the
  fingerprint costs one small catalogue read per second per process.)
- **Preparing again**: a stale aggregate is inspected again (``catalog.inspect``, as at
  start-up) by the poller at once and, should a request come first, by that request before
  it is served; both share one inspection. Its result columns and types (``shape``) are part
  of its ETag, so a new shape is a new ETag: no 304 and no cached body of the old shape
  survives it, while an ``ADD COLUMN`` the aggregate does not select changes nothing. The
  asyncpg statement cache needs no flushing: every aggregate is wrapped in a query whose own
  result is always one ``text`` (and a ``bigint`` when paged), so "cached plan must not change
  result type" cannot arise; PostgreSQL re-plans the inner query itself.
- **Broken**: an aggregate that no longer compiles (or whose query fails with a class-42 or
  "feature not supported" error) answers 503 ``aggregate_unavailable`` naming the SQL error,
  from memory, and ``/readyz`` lists it under ``degraded`` (still 200: the rest serves). It is
  tried again when its tables' fingerprint changes, and at most every ``RETRY_SECONDS``
  otherwise (by the poller, or by a request): it recovers by itself once the schema allows.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import asyncpg

from .caching import SingleFlight
from .catalog import Aggregate
from .errors import Unavailable
from .queries import query
from .sqlfiles import AggregateFileError

log = logging.getLogger("pgsse.aggregates")

SHAPE_POLL_SECONDS = 1.0
RETRY_SECONDS = 2.0
PROBE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, Unavailable)


class AggregateUnavailable(Unavailable):
    """The aggregate does not compile against the schema as it is now."""

    code = "aggregate_unavailable"


class Shapes:
    """Which aggregates are stale or broken, and the poller that notices schema changes.

    ``inspect(aggregate)`` prepares one aggregate again (raising ``AggregateFileError`` when it
    is broken); ``pool()`` is the connection pool the fingerprint is read through;
    ``changed(aggregate)`` is told when its tables changed (its ETag moved), once it has been
    prepared again: subscribers of ``aggregates/<name>`` get an ``aggregate.invalidated``."""

    def __init__(self, items: dict[str, Aggregate],
                 inspect: Callable[[Aggregate], Awaitable[None]],
                 pool: Callable[[], asyncpg.Pool],
                 changed: Callable[[Aggregate], None]) -> None:
        self.items = items
        self.inspect = inspect
        self.pool = pool
        self.changed = changed
        self.fingerprints: dict[str, str] = {}
        self.stale: set[str] = set()
        self.broken: dict[str, str] = {}  # name → the SQL error, as answered
        self.retry_at: dict[str, float] = {}
        self.flights: SingleFlight[None] = SingleFlight()

    def degraded(self) -> list[str]:
        return sorted(self.broken)

    async def ensure(self, aggregate: Aggregate) -> None:
        """Before serving: prepare a stale aggregate again; raise while it is broken."""
        name = aggregate.name
        # Joining one under way matters: served meanwhile, an answer would carry the new
        # tables' fingerprints with the old result shape, an ETag that lives one poll.
        if (name in self.stale or name in self.flights.flights
                or (name in self.broken and time.monotonic() >= self.retry_at[name])):
            await self.flights.run(name, lambda: self._refresh(aggregate))
        problem = self.broken.get(name)
        if problem is not None:
            raise AggregateUnavailable(f"aggregate {name!r} does not compile against the "
                                       f"current schema: {problem}")

    def failed(self, aggregate: Aggregate, problem: str) -> AggregateUnavailable:
        """Its query failed in a way that says the schema moved before the poller noticed:
        503 from memory until it is inspected again (the poller, or a request after
        ``RETRY_SECONDS``), so a storm of requests does not become a storm of inspections."""
        self._broke(aggregate, problem)
        return AggregateUnavailable(f"aggregate {aggregate.name!r} failed against the current "
                                    f"schema: {problem}")

    async def _refresh(self, aggregate: Aggregate) -> None:
        name = aggregate.name
        self.stale.discard(name)
        try:
            await self.inspect(aggregate)
        except AggregateFileError as exc:
            self._broke(aggregate, exc.problem)
            return
        except PROBE_ERRORS as exc:  # the database is away: not the aggregate's fault
            self.stale.add(name)
            raise Unavailable("the aggregate could not be prepared; try again") from exc
        if self.broken.pop(name, None) is not None:
            log.info("aggregate recovered", extra={"event": "aggregate_recovered", "aggregate": name})
        self.retry_at.pop(name, None)

    def _broke(self, aggregate: Aggregate, problem: str) -> None:
        if self.broken.get(aggregate.name) != problem:
            log.warning("aggregate unavailable", extra={
                "event": "aggregate_unavailable", "aggregate": aggregate.name, "error": problem})
        self.broken[aggregate.name] = problem
        self.retry_at[aggregate.name] = time.monotonic() + RETRY_SECONDS

    # -- the poller --------------------------------------------------------------------

    async def fingerprint(self, tables: Iterable[str]) -> dict[str, str]:
        names = sorted(set(tables))
        schemas, relations = zip(*(t.partition(".")[::2] for t in names), strict=True) if names else ((), ())
        async with self.pool().acquire() as conn:
            rows = await conn.fetch(query("table_shapes"), list(schemas), list(relations))
        return {row["t"]: row["shape"] for row in rows}

    async def baseline(self) -> None:
        """The fingerprints the aggregates were inspected against (at start-up)."""
        self.fingerprints = await self.fingerprint(t for a in self.items.values() for t in a.tables)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("watching aggregate tables' shapes", extra={"event": "shapes_started"})
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), SHAPE_POLL_SECONDS)
                    break
                except TimeoutError:
                    pass
                try:
                    await self.check()
                except PROBE_ERRORS as exc:  # the database is away: the next tick tries again
                    log.debug("shape check failed", extra={"event": "shapes_failed", "error": repr(exc)})
        finally:
            log.info("stopped watching aggregate tables' shapes", extra={"event": "shapes_stopped"})

    async def check(self) -> None:
        """One poll: mark the aggregates whose tables changed stale, and prepare them again."""
        now = await self.fingerprint(t for a in self.items.values() for t in a.tables)
        changed = {t for t, shape in now.items() if self.fingerprints.get(t) != shape}
        self.fingerprints = now
        due = [a for a in self.items.values()
               if changed.intersection(a.tables)
               or (a.name in self.broken and time.monotonic() >= self.retry_at[a.name])]
        moved = [a for a in due if changed.intersection(a.tables)]
        for aggregate in due:
            self.stale.add(aggregate.name)
        for aggregate in due:
            if aggregate.name in self.stale:  # a request may have done it meanwhile
                try:
                    await self.flights.run(aggregate.name, functools.partial(self._refresh, aggregate))
                except Unavailable:
                    pass  # the database is away: it stays stale, its next request retries
        for aggregate in moved:
            self.changed(aggregate)
        if due:
            # Inspecting may have found other tables (a view redefined): fingerprint them too.
            self.fingerprints.update(await self.fingerprint(
                t for a in due for t in a.tables if t not in self.fingerprints))
