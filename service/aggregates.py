"""``GET /aggregates/{name}``: raw-SQL files answered from memory until their data changes.

Protocol:
- At start-up every file is parsed (``sqlfiles``), prepared as ``pgsse_reader`` (a broken
  file stops start-up), and the tables it reads are found from its generic plan (which sees
  through views and joins) unless ``-- depends:`` names them.
- A table's *version* is the last position that touched it, from ``realtime.table_versions``
  at start and then from every batch the listener reads — the same numbers on every replica.
- The ETag is a hash of (name, normalised parameters incl. claim-bound ones, the versions of
  the tables read, the ttl bucket). ``If-None-Match`` is compared with the ETag computed from
  the versions in memory *now*, so a 304 needs no query and is never stale relative to the
  position this replica has processed.
- Tables nobody watches have no versions. Such an aggregate is served with an ETag hashed
  from its result (never stale, but each request runs the query); start-up logs a warning
  naming the tables, and ``realtime.watch`` on them makes it free again. We chose this over
  watching them automatically: pgsse never adds triggers to a table on its own.
- Results are cached (LRU, bounded in bytes) by the same key; concurrent misses for one key
  share one query (single flight). ``meta.position`` is the hub position taken before the
  query ran, so every event at or before it is reflected in ``data``.
- Each query runs in a read-only transaction as role ``pgsse_reader`` with
  ``request.jwt.claims`` set to the caller's claims, so row-level security applies.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import metrics
from .errors import BadRequest, Forbidden, NotFound, PgsseError, Unavailable
from .hub import Event, Subscription
from .settings import SQL_DIR, Settings
from .sqlfiles import AggregateFile, AggregateFileError, coerce, parse
from .topics import covers

if TYPE_CHECKING:
    from .app import State

log = logging.getLogger("pgsse.aggregates")
MAX_LIMIT = 1000
VOLATILE_CLAIMS = {"exp", "iat", "nbf", "jti"}
GZIP_MIN = 512


def if_none_match(header: str, etag: str) -> bool:
    """Weak comparison against a header value: ``*`` or a comma-separated list of tags."""
    header = header.strip()
    if header == "*":
        return True
    opaque = etag[2:] if etag.startswith("W/") else etag
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate and candidate == opaque:
            return True
    return False


class Aggregate:
    def __init__(self, spec: AggregateFile) -> None:
        self.spec = spec
        self.name = spec.name
        self.tables: tuple[str, ...] = ()
        self.columns: tuple[str, ...] = ()
        self.unwatched: tuple[str, ...] = ()
        n = len(spec.order)
        wrapped = f"SELECT coalesce(jsonb_agg(to_jsonb(q) - ${n + 1}::text[]), '[]'::jsonb)::text FROM ({spec.sql}) q"
        if spec.paged:
            wrapped = (
                f"SELECT coalesce(jsonb_agg(to_jsonb(q) - '__pgsse_total'::text - ${n + 1}::text[]),"
                f" '[]'::jsonb)::text, max(q.__pgsse_total) FROM (SELECT s.*, count(*) OVER () AS __pgsse_total"
                f" FROM ({spec.sql}) s LIMIT ${n + 2}::bigint OFFSET ${n + 3}::bigint) q")
        self.query = wrapped
        self.count_query = f"SELECT count(*) FROM ({spec.sql}) s"


class Aggregates:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.items: dict[str, Aggregate] = {}
        self.versions: dict[str, int] = {}
        self.by_table: dict[str, list[Aggregate]] = {}
        self.cache: OrderedDict[tuple[Any, ...], tuple[str, bytes, bytes | None]] = OrderedDict()
        self.cache_bytes = 0
        self.inflight: dict[tuple[Any, ...], asyncio.Future[tuple[str, bytes]]] = {}
        self.etags: dict[tuple[Any, ...], tuple[tuple[int, ...], int, str]] = {}
        self.counters: dict[tuple[str, str], Any] = {}
        self.hits = self.misses = self.queries = 0
        self.state: State | None = None
        self.ready = False
        for spec in self.load_files():
            self.items[spec.name] = Aggregate(spec)

    def load_files(self) -> list[AggregateFile]:
        dirs = [SQL_DIR / "aggregates"]
        if self.settings.demo:
            dirs.append(SQL_DIR / "demo" / "aggregates")
        if self.settings.aggregates_dir is not None:
            dirs.append(self.settings.aggregates_dir)
        found: dict[str, Path] = {}
        for directory in dirs:
            for path in sorted(Path(directory).glob("*.sql")):
                found[path.stem] = path  # later directories override
        return [parse(path) for path in found.values()]

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, state: State) -> None:
        self.state = state
        async with state.pool.acquire() as conn:
            for aggregate in self.items.values():
                await self._inspect(conn, aggregate)
            rows = await conn.fetch("SELECT tbl, position FROM realtime.table_versions")
            watched = {r["t"] for r in await conn.fetch(
                "SELECT n.nspname || '.' || c.relname AS t FROM realtime.watches w "
                "JOIN pg_class c ON c.oid = w.tbl JOIN pg_namespace n ON n.oid = c.relnamespace")}
        for row in rows:
            self.versions[row["tbl"]] = max(self.versions.get(row["tbl"], 0), row["position"])
        for aggregate in self.items.values():
            aggregate.unwatched = tuple(t for t in aggregate.tables if t not in watched)
            if aggregate.unwatched:
                log.warning("aggregate reads tables nobody watches: its ETag comes from its result",
                            extra={"event": "aggregate_unwatched", "aggregate": aggregate.name,
                                   "tables": list(aggregate.unwatched)})
            for table in aggregate.tables:
                self.by_table.setdefault(table, []).append(aggregate)
        self.ready = True
        log.info("aggregates loaded", extra={"event": "aggregates_loaded", "count": len(self.items)})

    async def _inspect(self, conn: Any, aggregate: Aggregate) -> None:
        spec = aggregate.spec
        try:
            async with conn.transaction():
                await conn.execute("SELECT set_config('role', 'pgsse_reader', true)")
                stmt = await conn.prepare(aggregate.query)
                aggregate.columns = await self._columns(conn, spec)
                if spec.depends is not None:
                    aggregate.tables = spec.depends
                else:
                    aggregate.tables = await self._plan_tables(conn, spec)
                del stmt
        except asyncpg.PostgresError as exc:
            raise AggregateFileError(spec.path, 1, f"query does not prepare: {exc}") from exc

    @staticmethod
    async def _columns(conn: Any, spec: AggregateFile) -> tuple[str, ...]:
        stmt = await conn.prepare(f"SELECT * FROM ({spec.sql}) q LIMIT 0")
        return tuple(attr.name for attr in stmt.get_attributes())

    @staticmethod
    async def _plan_tables(conn: Any, spec: AggregateFile) -> tuple[str, ...]:
        await conn.execute("SELECT set_config('plan_cache_mode', 'force_generic_plan', true)")
        await conn.execute(f"PREPARE pgsse_dependencies AS {spec.sql}")
        try:
            nulls = ", ".join(["NULL"] * len(spec.order))
            args = f"({nulls})" if spec.order else ""
            plan = await conn.fetchval(
                f"EXPLAIN (FORMAT JSON, VERBOSE) EXECUTE pgsse_dependencies{args}")
        finally:
            await conn.execute("DEALLOCATE pgsse_dependencies")
        found: set[str] = set()

        def walk(node: dict[str, Any]) -> None:
            if "Relation Name" in node:
                found.add(f"{node.get('Schema', 'public')}.{node['Relation Name']}")
            for child in node.get("Plans", []):
                walk(child)

        walk(json.loads(plan)[0]["Plan"])
        return tuple(sorted(found))

    def on_events(self, events: list[Event]) -> None:
        touched: dict[str, int] = {}
        for event in events:
            if event.table is not None:
                touched[event.table] = event.position
        if not touched:
            return
        invalidated: dict[str, Aggregate] = {}
        for table, position in touched.items():
            if position > self.versions.get(table, 0):
                self.versions[table] = position
            for aggregate in self.by_table.get(table, ()):
                invalidated[aggregate.name] = aggregate
        if self.state is not None:
            for name in invalidated:
                self.state.hub.publish_transient(f"aggregates/{name}", invalidation_frame(name))

    async def on_resume(self, sub: Subscription, position: int, live_from: int) -> list[bytes]:
        frames = []
        for name, aggregate in self.items.items():
            topic = f"aggregates/{name}"
            if any(covers(t, topic) for t in sub.topics) and any(
                    self.versions.get(t, 0) > position for t in aggregate.tables):
                frames.append(invalidation_frame(name))
        return frames

    def cache_stats(self) -> dict[str, Any]:
        return {"entries": len(self.cache), "bytes": self.cache_bytes, "hits": self.hits,
                "misses": self.misses, "queries": self.queries}

    # -- HTTP --------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [Route("/aggregates", self.list_endpoint, methods=["GET", "HEAD"]),
                Route("/aggregates/{name}", self.endpoint, methods=["GET", "HEAD"])]

    async def list_endpoint(self, request: Request) -> Response:
        state = self._state()
        state.auth.authenticate(request)
        return JSONResponse({"aggregates": [
            {"name": a.name, "description": a.spec.description,
             "params": [p.describe() for p in a.spec.params], "cache": a.spec.cache}
            for a in sorted(self.items.values(), key=lambda a: a.name)]})

    def _state(self) -> State:
        if self.state is None or not self.ready:
            raise Unavailable("aggregates are not loaded yet")
        return self.state

    async def endpoint(self, request: Request) -> Response:
        name = request.path_params["name"]
        aggregate = self.items.get(name)
        if aggregate is None:
            raise NotFound(f"no aggregate named {name!r}", param="name")
        try:
            return await self._serve(request, aggregate)
        except PgsseError as exc:
            if 400 <= exc.status < 500:
                metrics.AGGREGATE_REQUESTS.labels(name, "4xx").inc()
            raise

    async def _serve(self, request: Request, aggregate: Aggregate) -> Response:
        state = self._state()
        principal = state.auth.authenticate(request)
        principal.require([f"aggregates/{aggregate.name}"])
        state.limits.check_rate(principal.subject or (request.client.host if request.client else ""))
        values, fields, paging = self._params(request, aggregate, principal.claims,
                                              state.auth.enabled)
        claims = json.dumps(principal.claims, sort_keys=True, default=str) if principal.claims else "{}"
        # With auth on, the caller's claims are part of the key: row-level security may
        # read them even where the SQL does not, and one tenant's rows must never reach
        # another. Token timestamps are left out so a refreshed token still hits.
        tenant = None
        if state.auth.enabled:
            scope = {k: v for k, v in principal.claims.items() if k not in VOLATILE_CLAIMS}
            tenant = json.dumps(scope, sort_keys=True, default=str)
        key = (aggregate.name, tuple(values), fields, paging, tenant)
        headers = {"Cache-Control": self._cache_control(aggregate, state.auth.enabled),
                   "Vary": "Accept-Encoding" + (", Authorization, Cookie" if state.auth.enabled else "")}
        etag = None if aggregate.unwatched else self._etag(aggregate, key)
        given = request.headers.get("if-none-match")
        if etag is not None and given is not None and if_none_match(given, etag):
            self.hits += 1
            self._count(aggregate.name, "304")
            return NotModified(headers, etag)
        entry = self.cache.get(key) if etag is not None else None
        if entry is not None and entry[0] == etag:
            self.hits += 1
            self.cache.move_to_end(key)
            body = entry[1]
        else:
            self.misses += 1
            etag, body = await self._single_flight(key, aggregate, values, fields, paging, claims, etag)
            if given is not None and if_none_match(given, etag):
                self._count(aggregate.name, "304")
                return Response(status_code=304, headers={**headers, "ETag": etag})
        self._count(aggregate.name, "200")
        headers["ETag"] = etag
        if "gzip" in request.headers.get("accept-encoding", "") and len(body) >= GZIP_MIN:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return Response(status_code=200, headers=headers, media_type="application/json")
        return Response(body, headers=headers, media_type="application/json")

    def _count(self, name: str, outcome: str) -> None:
        counter = self.counters.get((name, outcome))
        if counter is None:
            counter = self.counters[(name, outcome)] = metrics.AGGREGATE_REQUESTS.labels(name, outcome)
        counter.inc()

    @staticmethod
    def _cache_control(aggregate: Aggregate, auth: bool) -> str:
        value = aggregate.spec.cache
        if auth:
            parts = [p.strip() for p in value.split(",") if p.strip() and p.strip() != "public"]
            value = ", ".join(["private", *[p for p in parts if p != "private"]])
        return value

    def _etag(self, aggregate: Aggregate, key: tuple[Any, ...]) -> str:
        versions = tuple(self.versions.get(t, 0) for t in aggregate.tables)
        ttl = aggregate.spec.ttl
        bucket = int(time.time() // ttl) if ttl else 0
        known = self.etags.get(key)
        if known is not None and known[0] == versions and known[1] == bucket:
            return known[2]  # the 304 path: no hashing while nothing changed
        raw = json.dumps([key, list(zip(aggregate.tables, versions, strict=True)), bucket],
                         default=str, separators=(",", ":"))
        etag = 'W/"' + hashlib.sha256(raw.encode()).hexdigest()[:32] + '"'
        if len(self.etags) > 100_000:
            self.etags.clear()
        self.etags[key] = (versions, bucket, etag)
        return etag

    def _params(self, request: Request, aggregate: Aggregate, claims: dict[str, Any],
                auth: bool) -> tuple[list[Any], tuple[str, ...], tuple[int, int] | None]:
        spec = aggregate.spec
        query = request.query_params
        declared = {p.name for p in spec.params}
        for name in query.keys():
            if name not in declared and name not in ("fields", "access_token"):
                raise BadRequest(f"unknown parameter {name!r}", code="unknown_parameter", param=name)
            if len(query.getlist(name)) > 1:
                raise BadRequest(f"parameter {name!r} given more than once", code="invalid_parameter",
                                 param=name)
        resolved: dict[str, Any] = {}
        for param in spec.params:
            if param.claim is not None and auth:
                if param.name in query:
                    raise Forbidden(f"{param.name} comes from the token", param=param.name)
                if param.claim not in claims:
                    raise Forbidden(f"token has no claim {param.claim!r}", param=param.name)
                raw_claim = claims[param.claim]
                try:
                    resolved[param.name] = coerce(param.type, str(raw_claim).lower()
                                                  if isinstance(raw_claim, bool) else str(raw_claim))
                except ValueError as exc:
                    raise Forbidden(f"claim {param.claim!r}: {exc}", param=param.name) from exc
            elif param.name in query:
                try:
                    resolved[param.name] = coerce(param.type, query[param.name])
                except ValueError as exc:
                    raise BadRequest(f"{param.name}: {exc}", code="invalid_parameter",
                                     param=param.name) from exc
            elif param.has_default:
                resolved[param.name] = param.default
            else:
                raise BadRequest(f"{param.name} is required", code="missing_parameter", param=param.name)
        fields: tuple[str, ...] = ()
        if "fields" in query:
            fields = tuple(f.strip() for f in query["fields"].split(",") if f.strip())
            unknown = [f for f in fields if f not in aggregate.columns]
            if unknown or not fields:
                raise BadRequest(f"unknown field {unknown[0] if unknown else ''!r}; columns: "
                                 f"{', '.join(aggregate.columns)}", code="invalid_fields", param="fields")
        paging = None
        if spec.paged:
            page, limit = resolved["page"], resolved["limit"]
            if page is None or page < 1:
                raise BadRequest("page starts at 1", code="invalid_parameter", param="page")
            if limit is None or not 1 <= limit <= MAX_LIMIT:
                raise BadRequest(f"limit must be 1 to {MAX_LIMIT}", code="invalid_parameter", param="limit")
            paging = (page, limit)
        return [resolved[name] for name in spec.order], fields, paging

    async def _single_flight(self, key: tuple[Any, ...], aggregate: Aggregate, values: list[Any],
                             fields: tuple[str, ...], paging: tuple[int, int] | None, claims: str,
                             etag: str | None) -> tuple[str, bytes]:
        pending = self.inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
        self.inflight[key] = future
        try:
            result = await self._run(aggregate, values, fields, paging, claims, etag)
            future.set_result(result)
            if etag is not None:
                self._store(key, result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            del self.inflight[key]

    async def _run(self, aggregate: Aggregate, values: list[Any], fields: tuple[str, ...],
                   paging: tuple[int, int] | None, claims: str, etag: str | None) -> tuple[str, bytes]:
        state = self._state()
        position = state.hub.position
        hidden = [c for c in aggregate.columns if fields and c not in fields]
        args: list[Any] = [*values, hidden]
        if paging is not None:
            args += [paging[1], (paging[0] - 1) * paging[1]]
        started = time.perf_counter()
        self.queries += 1
        try:
            async with state.pool.acquire() as conn, conn.transaction(readonly=True):
                await conn.execute(
                    "SELECT set_config('role', 'pgsse_reader', true),"
                    " set_config('request.jwt.claims', $1, true),"
                    " set_config('statement_timeout', '15s', true)", claims)
                row = await conn.fetchrow(aggregate.query, *args)
                total = None
                if paging is not None:
                    total = row[1] if row is not None and row[1] is not None else None
                    if total is None:
                        total = await conn.fetchval(aggregate.count_query, *values)
        except (asyncpg.DataError, asyncpg.InvalidParameterValueError) as exc:
            raise BadRequest(f"invalid parameter value: {exc}", code="invalid_parameter") from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("aggregate query failed", extra={"event": "aggregate_failed",
                                                         "aggregate": aggregate.name, "error": repr(exc)})
            raise Unavailable("the aggregate query failed; try again") from exc
        finally:
            metrics.AGGREGATE_QUERY_DURATION.labels(aggregate.name).observe(time.perf_counter() - started)
        data = row[0] if row is not None else "[]"
        meta: dict[str, Any] = {"position": position}
        if paging is not None:
            meta.update({"page": paging[0], "limit": paging[1], "total": total,
                         "totalPages": math.ceil((total or 0) / paging[1])})
        body = b'{"data":' + data.encode() + b',"meta":' + json.dumps(meta).encode() + b"}"
        if etag is None:
            etag = 'W/"r' + hashlib.sha256(data.encode()).hexdigest()[:31] + '"'
        return etag, body

    def _store(self, key: tuple[Any, ...], result: tuple[str, bytes]) -> None:
        limit = self.settings.aggregate_cache_bytes
        size = len(result[1])
        if size > limit // 4:
            return
        old = self.cache.pop(key, None)
        if old is not None:
            self.cache_bytes -= len(old[1])
        self.cache[key] = (result[0], result[1], None)
        self.cache_bytes += size
        while self.cache_bytes > limit and self.cache:
            _, evicted = self.cache.popitem(last=False)
            self.cache_bytes -= len(evicted[1])
        metrics.AGGREGATE_CACHE_BYTES.set(self.cache_bytes)

    def openapi_paths(self, errors: dict[str, Any]) -> dict[str, Any]:
        schema_types = {"int": ("integer", None), "float": ("number", None), "numeric": ("string", None),
                        "text": ("string", None), "bool": ("boolean", None),
                        "date": ("string", "date"), "timestamp": ("string", "date-time")}
        paths: dict[str, Any] = {"/aggregates": {"get": {
            "summary": "List aggregates", "responses": {"200": {"description": "Aggregates",
                                                                 "content": {"application/json": {"schema": {"type": "object"}}}}}}}}
        for aggregate in self.items.values():
            params = []
            for p in aggregate.spec.params:
                kind, fmt = schema_types[p.type]
                schema: dict[str, Any] = {"type": kind}
                if fmt:
                    schema["format"] = fmt
                params.append({"name": p.name, "in": "query", "required": p.required and p.claim is None,
                               "schema": schema})
            params.append({"name": "fields", "in": "query", "schema": {"type": "string"}})
            paths[f"/aggregates/{aggregate.name}"] = {"get": {
                "summary": aggregate.spec.description or aggregate.name,
                "parameters": params,
                "responses": {"200": {"description": "Rows and meta",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              "304": {"description": "Not modified"}, **errors}}}
        return paths


class NotModified(Response):
    """A 304 with prebuilt raw headers: the hot path of a polled aggregate."""

    def __init__(self, headers: dict[str, str], etag: str) -> None:
        self.status_code = 304
        self.body = b""
        self.background = None
        self.raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self.raw_headers.append((b"etag", etag.encode()))


def invalidation_frame(name: str) -> bytes:
    return b'event: aggregate.invalidated\ndata: {"aggregate":"%s"}\n\n' % name.encode()
