"""``GET /aggregates/{name}``: raw-SQL files answered from memory until their data changes.

Protocol:
- At start-up every file is parsed (``sqlfiles``) and inspected (``catalog``): prepared as
  ``pgsse_reader`` (a broken file stops start-up) and the tables it reads found from its
  generic plan, which sees through views and joins, unless ``-- depends:`` names them.
- A table's *version* is the last position that touched it: ``realtime.table_versions`` at
  start, merged (max) with every batch the listener hands ``on_events`` — the same numbers
  on every replica, whatever the order the two arrive in.
- The ETag is a hash of (name, normalised parameters incl. claim-bound ones, the versions of
  the tables read, the ttl bucket). ``If-None-Match`` is compared with the ETag computed from
  the versions in memory *now*, so a 304 needs no query and is never stale relative to the
  position this replica has processed.
- Tables nobody watches have no versions. An aggregate reading one is served with an ETag
  hashed from its result: never stale, but every request (concurrent ones shared) runs the
  query, and no ``aggregate.invalidated`` is sent for it. Start-up logs a warning naming the
  tables; ``realtime.watch`` on them makes the aggregate free again. We chose this over
  watching them automatically: pgsse never adds triggers (a cost for every writer) to a
  table behind its owner's back. A table stops being watched at a position: unwatch, DROP
  TABLE and a rename leave a marker in the feed (``catalog.UNWATCHED_MARKER``, no stream gets
  it); from it on, the aggregates reading that table are served as unwatched, until the
  table's next captured change (it is watched again) restores versions and free 304s.
- Results are cached (LRU, bounded in bytes) under the ETag they were computed for;
  concurrent misses for one key and ETag share one query (single flight). ``meta.position``
  is the hub position taken before the query ran: every event at or before it is in ``data``.
- Each query runs in a read-only transaction as role ``pgsse_reader`` with
  ``request.jwt.claims`` set to the caller's claims, so row-level security applies. With
  auth on, those claims (less the token's timestamps) are part of the cache key and ETag:
  one tenant's rows never reach another, even through a policy the SQL does not mention.
- Queries run on a pool of their own, shared out per aggregate with a bounded wait and a
  statement timeout (``admission``); schema changes are followed (``shapes``): the result's
  columns and types are part of the ETag, and an aggregate that no longer compiles answers
  503 ``aggregate_unavailable`` until it does again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import catalog, export, metrics
from .admission import Admission, statement_timeout
from .caching import (
    GZIP_MIN,
    Entry,
    ResultCache,
    SingleFlight,
    accepts_gzip,
    cache_control,
    if_none_match,
    weak_etag,
)
from .catalog import Aggregate
from .errors import BadRequest, NotFound, PgsseError, Unavailable
from .hub import Event, Subscription, Transient
from .queries import query
from .settings import Settings
from .shapes import Shapes
from .sqlparams import resolve
from .topics import covers

if TYPE_CHECKING:
    from .auth import Authenticator
    from .db import Database
    from .freshness import Freshness
    from .hub import Hub
    from .limits import Limits

log = logging.getLogger("pgsse.aggregates")
VOLATILE_CLAIMS = frozenset({"exp", "iat", "nbf", "jti"})
# The ETag memo (the 304 path) is bounded in bytes of keys, like the result cache.
ETAG_MEMO_BYTES = 8 << 20
ETAG_ENTRY_OVERHEAD = 400  # dict slot, tuple, strings: measured with tracemalloc, rounded up
MAX_PARAM_CHARS = 1024
# Errors that say the schema moved under a prepared aggregate: class 42 (undefined column or
# table, permission denied, …) and 0A000 ("cached plan must not change result type").
SCHEMA_ERRORS = (asyncpg.SyntaxOrAccessError, asyncpg.FeatureNotSupportedError)
CLIENT_TIMEOUT_MARGIN = 5.0  # should the server's own statement_timeout not fire


@dataclass(frozen=True)
class Collaborators:
    """What aggregates use of the rest of the service, handed in by ``create_app``."""

    database: Database
    hub: Hub
    auth: Authenticator
    limits: Limits
    freshness: Freshness | None = None  # min_position (issue 22)

    @property
    def pool(self) -> asyncpg.Pool:
        return self.database.pool

    @property
    def aggregate_pool(self) -> asyncpg.Pool:
        return self.database.aggregate_pool


class Aggregates:
    def __init__(self, settings: Settings, deps: Collaborators) -> None:
        self.settings = settings
        self.deps = deps
        self.items = {spec.name: Aggregate(spec) for spec in catalog.load_files(settings)}
        self.versions: dict[str, int] = {}
        # Tables not watched as of the position processed: at start-up, those realtime.watches
        # lacks; then each unwatch marker adds its table, and the table's next change (it is
        # captured again) takes it out. An aggregate reading one is served as unwatched.
        self.unwatched_tables: set[str] = set()
        self.by_table: dict[str, list[Aggregate]] = {}
        self.cache = ResultCache(settings.aggregate_cache_bytes)
        self.flights: SingleFlight[Entry] = SingleFlight()
        self.etags: dict[Hashable, tuple[tuple[int, ...], int, str, tuple[str, ...]]] = {}
        self.etag_bytes = 0
        self.counters: dict[tuple[str, str], Any] = {}
        self.hits = self.misses = self.queries = 0
        self.ready = False
        self.exporter = export.Exporter.from_settings(settings)
        self.admission = Admission(settings.aggregate_pool_size,
                                   settings.aggregate_pool_wait_seconds)
        self.shapes = Shapes(self.items, self._reinspect, lambda: self.deps.pool,
                             lambda a: self.deps.hub.publish_transient(invalidation(a.name)))

    # -- lifecycle and versions --------------------------------------------------------

    async def start(self) -> None:
        state = self.deps
        auth = state.auth.enabled
        async with state.pool.acquire() as conn:
            for aggregate in self.items.values():
                await catalog.inspect(conn, aggregate)
                await self.exporter.prepare(conn, aggregate)
            watched = await catalog.watched_tables(conn)
            rows = await conn.fetch(query("table_versions"))
        for row in rows:
            self._bump(row["tbl"], row["position"])
        self._bump(catalog.EVENTS_TABLE, state.hub.position)
        # (Markers the feed handed over meanwhile are kept: the union errs on "unwatched".)
        self.unwatched_tables |= {t for a in self.items.values() for t in a.tables
                                  if t not in watched}
        for aggregate in self.items.values():
            aggregate.unwatched = tuple(t for t in aggregate.tables if t in self.unwatched_tables)
            if aggregate.unwatched:
                log.warning("aggregate reads tables nobody watches: its ETag comes from its result",
                            extra={"event": "aggregate_unwatched", "aggregate": aggregate.name,
                                   "tables": list(aggregate.unwatched)})
            for table in aggregate.tables:
                self.by_table.setdefault(table, []).append(aggregate)
            aggregate.headers = {
                "Cache-Control": cache_control(aggregate.spec.cache, auth),
                "Vary": "Accept-Encoding, Authorization, Cookie" if auth else "Accept-Encoding"}
            aggregate.raw_headers = [(k.lower().encode(), v.encode())
                                     for k, v in aggregate.headers.items()]
        await self.shapes.baseline()
        self.ready = True
        log.info("aggregates loaded", extra={"event": "aggregates_loaded", "count": len(self.items)})

    async def _reinspect(self, aggregate: Aggregate) -> None:
        """Prepare one aggregate again after a schema change (``shapes``), as at start-up."""
        before = aggregate.tables
        async with self.deps.pool.acquire() as conn:
            await catalog.inspect(conn, aggregate)
            await self.exporter.prepare(conn, aggregate)
            if aggregate.tables != before:
                watched = await catalog.watched_tables(conn)
                aggregate.unwatched = tuple(t for t in aggregate.tables if t not in watched)
                for table in before:
                    readers = self.by_table.get(table, [])
                    if aggregate in readers:
                        readers.remove(aggregate)
                for table in aggregate.tables:
                    self.by_table.setdefault(table, []).append(aggregate)

    def _bump(self, table: str, position: int) -> bool:
        if position > self.versions.get(table, 0):
            self.versions[table] = position
            return True
        return False

    def on_events(self, events: list[Event]) -> None:
        """Called with every batch, after the hub fanned it out: versions, invalidations."""
        if not events:
            return
        touched: dict[str, int] = {}
        unwatched = self.unwatched_tables
        for event in events:
            table = event.table
            if table is None:
                continue
            if event.type == catalog.UNWATCHED_MARKER:
                self._set_watched(table, False)
            elif table in unwatched:
                self._set_watched(table, True)
            touched[table] = event.position
        touched[catalog.EVENTS_TABLE] = events[-1].position
        invalidated: dict[str, None] = {}
        for table, position in touched.items():
            if self._bump(table, position):
                for aggregate in self.by_table.get(table, ()):
                    invalidated[aggregate.name] = None
        if self.ready:
            for name in invalidated:
                self.deps.hub.publish_transient(invalidation(name))

    def _set_watched(self, table: str, watched: bool) -> None:
        """From this position on, ``table`` is (not) watched: its aggregates' ETags come from
        versions (free 304s) or from results (never stale once its changes go uncaptured)."""
        if watched:
            self.unwatched_tables.discard(table)
        else:
            self.unwatched_tables.add(table)
            log.info("table unwatched: aggregates reading it are served from their results",
                     extra={"event": "aggregate_table_unwatched", "table": table})
        for aggregate in self.by_table.get(table, ()):
            aggregate.unwatched = tuple(t for t in aggregate.tables if t in self.unwatched_tables)

    def on_resume(self, sub: Subscription, position: int) -> list[Transient]:
        """One ``aggregate.invalidated`` per subscribed aggregate whose tables changed since."""
        return [invalidation(name) for name, aggregate in self.items.items()
                if any(covers(topic, aggregate.topic) for topic in sub.topics)
                and any(self.versions.get(t, 0) > position for t in aggregate.tables)]

    def cache_stats(self) -> dict[str, Any]:
        return {"entries": len(self.cache), "bytes": self.cache.bytes, "hits": self.hits,
                "etag_memo_bytes": self.etag_bytes, "busy": self.admission.rejected,
                "degraded": self.shapes.degraded(),
                "misses": self.misses, "queries": self.queries, "in_flight": len(self.flights)}

    # -- HTTP --------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [Route("/aggregates", self.list_endpoint, methods=["GET", "HEAD"]),
                Route("/aggregates/{name}", self.endpoint, methods=["GET", "HEAD"])]

    def _state(self) -> Collaborators:
        if not self.ready:
            raise Unavailable("aggregates are not loaded yet")
        return self.deps

    async def list_endpoint(self, request: Request) -> Response:
        """The aggregates this caller may read: name, description, params, cache."""
        principal = await self._state().auth.identify(request)
        return JSONResponse({"aggregates": [
            {"name": a.name, "description": a.spec.description,
             "params": [p.describe() for p in a.spec.params], "cache": a.spec.cache}
            for a in sorted(self.items.values(), key=lambda a: a.name)
            if principal.allows(a.topic)]})

    async def endpoint(self, request: Request) -> Response:
        name = request.path_params["name"]
        aggregate = self.items.get(name)
        if aggregate is None:
            raise NotFound(f"no aggregate named {name!r}", param="name")
        try:
            return await self._serve(request, aggregate)
        except PgsseError as exc:
            if 400 <= exc.status < 500:
                self._count(name, "4xx")
            elif exc.status == 503:  # busy, aggregate_timeout, aggregate_unavailable, unavailable
                self._count(name, exc.code)
            raise

    async def _serve(self, request: Request, aggregate: Aggregate) -> Response:
        state = self._state()
        principal = await state.auth.identify(request)
        principal.require([aggregate.topic])
        if state.freshness is not None:  # min_position: wait for this replica's feed
            await state.freshness.require(request.query_params.get("min_position"))
        state.limits.check_rate(principal.subject or (request.client.host if request.client else ""))
        await self.shapes.ensure(aggregate)  # prepared again after a schema change, or 503
        auth = state.auth.enabled
        fmt = export.requested_format(request, aggregate.spec)
        for name, value in request.query_params.multi_items():
            if len(value) > MAX_PARAM_CHARS:
                raise BadRequest(f"parameter values are at most {MAX_PARAM_CHARS} characters",
                                 code="parameter_too_long", param=name)
        values, fields = resolve(aggregate.spec.params, request.query_params,
                                 principal.claims if auth else None, aggregate.columns,
                                 aggregate.spec.paged, export.QUERY_PARAMS if fmt else frozenset())
        if fmt is not None:  # streamed from a cursor, never cached (export.py)
            return self.exporter.response(
                request, aggregate, fmt, values, fields,
                json.dumps(principal.claims, default=str) if auth else "{}", state.pool,
                state.hub.position, lambda since: self._changed_since(aggregate, since),
                lambda outcome: self._count(aggregate.name, outcome))
        tenant = None
        if auth:  # token timestamps left out: a refreshed token still hits the cache
            tenant = json.dumps({k: v for k, v in principal.claims.items()
                                 if k not in VOLATILE_CLAIMS}, sort_keys=True, default=str)
        key = (aggregate.name, tuple(values.items()), fields, tenant)
        given = request.headers.get("if-none-match")
        if aggregate.unwatched:
            etag = None
            entry = None
        else:
            etag = self._etag(aggregate, key)
            if given is not None and if_none_match(given, etag):
                self.hits += 1
                self._count(aggregate.name, "304")
                return NotModified(aggregate.raw_headers, etag)
            entry = self.cache.get(key, etag)
        if entry is not None:
            self.hits += 1
        else:
            self.misses += 1
            claims = json.dumps(principal.claims, default=str) if auth else "{}"
            entry = await self.flights.run(
                (key, etag), lambda: self._fill(aggregate, key, etag, values, fields, claims))
            if etag is None and given is not None and if_none_match(given, entry.etag):
                self._count(aggregate.name, "304")
                return NotModified(aggregate.raw_headers, entry.etag)
        self._count(aggregate.name, "200")
        headers = {**aggregate.headers, "ETag": entry.etag}
        body = entry.body
        if len(body) >= GZIP_MIN and accepts_gzip(request.headers.get("accept-encoding", "")):
            body = self.cache.gzipped(key, entry)
            headers["Content-Encoding"] = "gzip"
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return Response(status_code=200, headers=headers, media_type="application/json")
        return Response(body, headers=headers, media_type="application/json")

    def _changed_since(self, aggregate: Aggregate, position: int) -> str:
        """Whether a table the aggregate reads changed after ``position`` (for resumed exports)."""
        if aggregate.unwatched:
            return "unknown"
        return "true" if any(self.versions.get(t, 0) > position for t in aggregate.tables) else "false"

    def _count(self, name: str, outcome: str) -> None:
        counter = self.counters.get((name, outcome))
        if counter is None:
            counter = self.counters[(name, outcome)] = metrics.AGGREGATE_REQUESTS.labels(name, outcome)
        counter.inc()

    def _etag(self, aggregate: Aggregate, key: Hashable) -> str:
        versions = tuple([self.versions.get(t, 0) for t in aggregate.tables])
        ttl = aggregate.spec.ttl
        bucket = int(time.time() // ttl) if ttl else 0
        # DDL moves no version: the tables' catalogue fingerprints and the result's columns
        # and types stand for it (``shapes``), the same strings on every replica.
        schema = (aggregate.shape, *[self.shapes.fingerprints.get(t, "") for t in aggregate.tables])
        known = self.etags.get(key)
        if (known is not None and known[0] == versions and known[1] == bucket
                and known[3] == schema):
            return known[2]  # the 304 path: no hashing while nothing changed
        text = json.dumps(key, default=str)
        etag = weak_etag(text, json.dumps([aggregate.tables, versions, bucket]), *schema)
        if known is None:
            # Bounded in bytes, keys included (parameter values are in the key): a flood of
            # unique parameters costs at most ETAG_MEMO_BYTES, then the memo starts over.
            self.etag_bytes += len(text) + ETAG_ENTRY_OVERHEAD
            if self.etag_bytes > ETAG_MEMO_BYTES:
                self.etags.clear()
                self.etag_bytes = len(text) + ETAG_ENTRY_OVERHEAD
        self.etags[key] = (versions, bucket, etag, schema)
        return etag

    async def _fill(self, aggregate: Aggregate, key: Hashable, etag: str | None,
                    values: dict[str, Any], fields: tuple[str, ...], claims: str) -> Entry:
        """Run the query (once per key and ETag, see ``SingleFlight``) and cache the body."""
        state = self._state()
        position = state.hub.position  # taken first: every event up to it is in the result
        spec = aggregate.spec
        args: list[Any] = [values[name] for name in spec.order]
        args.append([c for c in aggregate.columns if fields and c not in fields])
        if spec.paged:
            page, limit = values["page"], values["limit"]
            args += [limit, (page - 1) * limit]
        timeout = spec.timeout or self.settings.aggregate_timeout_seconds
        started: float | None = None  # the query's time, not the queue's
        try:
            for attempt in range(2):
                try:
                    async with self.admission.connection(state.aggregate_pool, aggregate.name) as conn:
                        started = time.perf_counter()
                        self.queries += 1
                        row, total = await self._query(conn, aggregate, args, claims, timeout)
                    break
                except asyncpg.InvalidCachedStatementError:
                    # Cannot happen with our wrappers (their own result is always text, and a
                    # bigint when paged); should it, asyncpg has dropped the statement from its
                    # cache, and preparing it again in a new transaction is the cure.
                    if attempt:
                        raise
        except (asyncpg.DataError, asyncpg.InvalidParameterValueError) as exc:
            # Out-of-range arithmetic and the like, from a value the caller chose.
            raise BadRequest(f"invalid parameter value: {exc}", code="invalid_parameter") from exc
        except (asyncpg.QueryCanceledError, TimeoutError) as exc:
            log.warning("aggregate query timed out", extra={
                "event": "aggregate_timeout", "aggregate": aggregate.name, "timeout": timeout})
            raise Unavailable(f"aggregate {aggregate.name!r} took longer than its {timeout:g}s "
                              "statement timeout", code="aggregate_timeout",
                              headers={"Retry-After": str(max(1, math.ceil(timeout)))}) from exc
        except SCHEMA_ERRORS as exc:
            raise self.shapes.failed(aggregate, catalog.problem(exc)) from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("aggregate query failed", extra={"event": "aggregate_failed",
                                                         "aggregate": aggregate.name, "error": repr(exc)})
            raise Unavailable("the aggregate query failed; try again") from exc
        finally:
            if started is not None:
                metrics.AGGREGATE_QUERY_DURATION.labels(aggregate.name).observe(
                    time.perf_counter() - started)
        data = (row[0] if row is not None else None) or "[]"
        meta: dict[str, Any] = {}
        if spec.paged:
            meta = {"page": values["page"], "limit": values["limit"], "total": total or 0,
                    "totalPages": math.ceil((total or 0) / values["limit"])}
        if etag is None:  # unwatched tables: the result itself decides
            etag = weak_etag(json.dumps(key, default=str), data, json.dumps(meta))
        body = b'{"data":%s,"meta":%s}' % (
            data.encode(), json.dumps({"position": position, **meta}, separators=(",", ":")).encode())
        entry = Entry(etag, body)
        if not aggregate.unwatched:
            self.cache.put(key, entry)
        return entry

    @staticmethod
    async def _query(conn: Any, aggregate: Aggregate, args: list[Any], claims: str,
                     seconds: float) -> tuple[Any, int | None]:
        """The wrapped query in a read-only transaction as ``pgsse_reader``: (row, total)."""
        spec = aggregate.spec
        async with conn.transaction(readonly=True):
            await conn.execute(query("become_reader"), claims, statement_timeout(seconds))
            client_timeout = seconds + CLIENT_TIMEOUT_MARGIN
            row = await conn.fetchrow(aggregate.query, *args, timeout=client_timeout)
            total = None
            if spec.paged:
                total = row[1] if row is not None else None
                if total is None:  # past the last page: no row carried the count
                    total = await conn.fetchval(aggregate.count_query, *args[:len(spec.order)],
                                                timeout=client_timeout)
        return row, total

    def openapi_paths(self, errors: dict[str, Any],
                      allows: Callable[[str], bool] | None = None) -> dict[str, Any]:
        return catalog.openapi_paths([a for a in self.items.values()
                                      if allows is None or allows(a.topic)], errors)


class NotModified(Response):
    """A 304 with prebuilt raw headers: the hot path of a polled aggregate."""

    def __init__(self, raw_headers: list[tuple[bytes, bytes]], etag: str) -> None:
        self.status_code = 304
        self.body = b""
        self.background = None
        self.raw_headers = [*raw_headers, (b"etag", etag.encode())]


def invalidation(name: str) -> Transient:
    return Transient(f"aggregates/{name}", "aggregate.invalidated",
                     b'{"aggregate":"%s"}' % name.encode())
