"""Streaming exports: ``GET /aggregates/{name}?format=csv|ndjson``, in constant memory.

Protocol:
- The aggregate's own query, with its typed and claim-bound parameters, runs in one
  read-only REPEATABLE READ transaction as ``pgsse_reader`` with the caller's claims (so
  row-level security applies), through a ``DECLARE``d cursor fetched ``BATCH_ROWS`` at a time. Each
  batch is encoded and written before the next is fetched: uvicorn's ``send`` waits while
  the socket is full, so a slow reader slows the cursor instead of growing a buffer. Nothing
  is cached.
- PostgreSQL encodes the rows: NDJSON lines are ``to_jsonb(row)`` (the JSON form's
  encoding); CSV cells are each value's JSON text (numbers and timestamps as the JSON form
  writes them, strings unquoted), quoted per RFC 4180 when needed, NULL as an empty cell and
  an empty string as ``""``. A cell starting with ``#`` is quoted too, so an unquoted ``#``
  at the start of a line is never data: it marks an error (below).
- CSV is safe to open (``EXPORT_CSV_SAFE``, on by default; OWASP "CSV injection"): a cell of
  a column that is not a number, date, boolean or uuid and that starts with ``=``, ``+``,
  ``-``, ``@``, TAB or CR gets a leading ``'``, which spreadsheets read as "text, do not
  evaluate". A cell starting with ``'`` gets one too, so the rule can be undone exactly: drop
  one leading ``'`` from such a cell (``pgsse export`` does, for its resume key). Numeric
  columns are never touched (``-5`` stays a number); a *text* ``-5`` becomes ``'-5``.
  Responses so encoded say ``X-Export-CSV-Safe: true``.
- ``-- export: order by a, b`` names a unique key. The export is then ordered by it, and
  ``after=<key>`` (a JSON array of the key's values as a line shows them, or the bare value
  of a one-column key) resumes just after that row. The key must be NOT NULL and unique in
  the result, or a resume would skip rows: each export checks it as it streams (a row whose
  key is NULL or equals the previous row's), and a violation ends the export with the error
  ``export_key_not_unique`` naming the file (a 500 before the first byte, else the marker
  line below). ``HEAD`` casts ``after`` to the key's types as ``GET`` does (400 alike). ``-- export: count`` sends
  ``X-Total-Count`` (the rows this response carries), counted in the same snapshot first.
- ``X-Export-Position: P``: every event at or before position P is reflected in the rows,
  as ``meta.position`` in the JSON form. A resume may send the first export's position in
  the same request header; the answer then carries ``X-Export-Changed: true|false``
  (``unknown`` for an aggregate reading tables nobody watches).
- End of body: NDJSON ends with ``{"@pgsse":"end","rows":N,"bytes":B,"position":P}``
  (``bytes``: of the lines before it); a CSV body simply ends. An error after the first
  byte writes a marker line (``#pgsse-export-error …`` in CSV, ``{"@pgsse":"error",…}`` in
  NDJSON) and closes the connection without finishing the chunked body, so no client
  mistakes a cut file for a whole one.
- A client that goes away cancels the export at once: the cursor's transaction is rolled
  back and the connection returned to the pool (no ``idle in transaction`` left behind).
- A reader that stays but stops reading loses its export after ``EXPORT_IDLE_SECONDS`` (60 s)
  without progress on its socket (each write waits for the socket to drain, at most that
  long; time spent in the database does not count): the socket is reset, the transaction
  rolled back, the slot and the connection freed. ``EXPORT_MAX_CONCURRENT`` (4) exports run
  at once per process, ``EXPORT_MAX_PER_CLIENT`` (2) per token subject or address; past
  either, 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from . import metrics
from .caching import accepts_gzip
from .catalog import Aggregate
from .errors import BadRequest, PgsseError, TooManyRequests, Unavailable
from .queries import query as named_query
from .settings import Settings
from .sqlfiles import AggregateFile, AggregateFileError

log = logging.getLogger("pgsse.export")

FORMATS = {"csv": "text/csv; charset=utf-8; header=present", "ndjson": "application/x-ndjson"}
ACCEPTED = {"text/csv": "csv", "application/x-ndjson": "ndjson", "application/ndjson": "ndjson",
            "application/json": None}
QUERY_PARAMS = frozenset({"format", "after"})
BATCH_ROWS = 2000  # rows per FETCH: ~100 kB of lines, 500 round trips per million rows
STATEMENT_TIMEOUT = "15s"  # per FETCH, not for the whole export
# The database session's own bound (the socket's is EXPORT_IDLE_SECONDS): a backstop.
IDLE_TIMEOUT = "120s"
GZIP_LEVEL = 1  # exports are large and streamed: speed over the last few percent
POSITION_HEADER = "x-export-position"
CURSOR = "pgsse_export"
FETCH = f"FETCH {BATCH_ROWS} FROM {CURSOR}"


def requested_format(request: Request, spec: AggregateFile) -> str | None:
    """``csv``/``ndjson`` when an export is asked for (``?format=`` or ``Accept``), else None.

    ``format`` is the export's parameter unless the file declares one of that name."""
    if spec.param("format") is None and "format" in request.query_params:
        wanted = request.query_params["format"]
        if wanted not in FORMATS:
            raise BadRequest(f"format must be one of {', '.join(FORMATS)}, got {wanted!r}",
                             code="invalid_parameter", param="format")
        return wanted
    accept = request.headers.get("accept", "")
    if "csv" not in accept and "ndjson" not in accept:
        return None  # the polled JSON path (and every 304) stops here
    best: tuple[float, str | None] = (0.0, None)
    for item in accept.split(","):
        media, _, params = item.partition(";")
        media = media.strip().lower()
        if media not in ACCEPTED:
            continue
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > best[0]:
            best = (quality, ACCEPTED[media])
    return best[1]


def parse_after(raw: str, key: Sequence[str]) -> list[str]:
    """``after=`` → one text per key column (cast to the column's type in SQL)."""
    if raw.startswith("["):
        try:
            values = json.loads(raw)
        except ValueError as exc:
            raise BadRequest("after: not a JSON array", code="invalid_parameter", param="after") from exc
    else:
        values = [raw]
    if (not isinstance(values, list) or len(values) != len(key)
            or not all(isinstance(v, str | int | float) for v in values)):
        raise BadRequest(f"after: expected the key ({', '.join(key)}) as a JSON array of "
                         f"{len(key)} value(s), e.g. after=[...]", code="invalid_parameter",
                         param="after")
    if any("\x00" in v for v in values if isinstance(v, str)):
        raise BadRequest("after: must not contain NUL", code="invalid_parameter", param="after")
    return [v if isinstance(v, str) else json.dumps(v) for v in values]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


FORMULA_START = "=+-@\t\r'"  # OWASP CSV injection, and ' itself so the rule can be undone
KEY_NOT_UNIQUE = "export_key_not_unique"
LINGER_RESET = struct.pack("ii", 1, 0)


def _csv_cell(value: str, safe: bool = False) -> str:
    if safe and value[:1] and value[0] in FORMULA_START:
        value = "'" + value
    if value == "" or value[0] == "#" or any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def _csv_sql(cell: str, safe: bool) -> str:
    """SQL for one CSV cell of a text value: quoted per RFC 4180 where needed and, with
    ``safe``, a ``'`` before a leading formula character (tested with ``left()``: a regular
    expression per cell made a million-row export's query half as slow again)."""
    quote = f"'\"' || replace({cell}, '\"', '\"\"') || '\"'"
    neutral = ""
    if safe:
        neutral = (f" WHEN left({cell}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r', '''') THEN"
                   f" CASE WHEN {cell} ~ '[\",\\r\\n]' THEN '\"''' || replace({cell}, '\"', '\"\"')"
                   f" || '\"' ELSE '''' || {cell} END")
    return (f"CASE WHEN {cell} IS NULL THEN ''{neutral} WHEN {cell} = '' OR "
            f"{cell} ~ '^#|[\",\\r\\n]' THEN {quote} ELSE {cell} END")


@dataclass(frozen=True)
class Query:
    """The SQL of one export request and its arguments."""

    sql: str
    count_sql: str | None
    args: list[Any]
    after_sql: str | None = None  # casts ``after`` alone (HEAD validates with it)
    checked: bool = False  # each row carries a second column: its key is NULL or repeats


@dataclass(frozen=True)
class Columns:
    """What start-up learnt of an aggregate's result columns."""

    key_types: tuple[str, ...] = ()  # SQL type of each export key column, for ``after``
    bare: frozenset[str] = frozenset()  # columns whose CSV cell never needs quotes


# Types whose JSON text never holds a comma, quote, line break or leading '#', nor is empty.
BARE_TYPES = frozenset({"int2", "int4", "int8", "float4", "float8", "numeric", "bool", "date",
                        "time", "timestamp", "timestamptz", "uuid", "oid"})


def build_query(aggregate: Aggregate, columns: Columns, fmt: str, values: dict[str, Any],
                kept: Sequence[str], after: list[str] | None, safe: bool = False) -> Query:
    """SELECT one encoded line per row of the file's query (placeholders only, no values)."""
    spec = aggregate.spec
    args: list[Any] = [values[name] for name in spec.order]

    def bind(value: Any, cast: str) -> str:
        args.append(value)
        return f"(${len(args)}::{cast})"

    if fmt == "ndjson":
        dropped = [c for c in aggregate.columns if c not in kept]
        line = f"(to_jsonb(_pgsse_r) - {bind(dropped, 'text[]')})::text" if dropped else "to_jsonb(_pgsse_r)::text"
        source = f"FROM ({spec.sql}) _pgsse_r"
    else:
        cells = ", ".join(f"c{i}" for i in range(len(kept)))
        quoted = [f"coalesce(v.c{i}, '')" if c in columns.bare else _csv_sql(f"v.c{i}", safe)
                  for i, c in enumerate(kept)]
        line = quoted[0] if len(kept) == 1 else f"concat_ws(',', {', '.join(quoted)})"
        jsons = ", ".join(f"to_jsonb(_pgsse_r.{_ident(c)}) #>> '{{}}'" for c in kept)
        # OFFSET 0 keeps the subquery from being flattened: each cell's JSON text is then
        # computed once, not once per reference in the CASE (a third less query time).
        source = (f"FROM ({spec.sql}) _pgsse_r CROSS JOIN LATERAL (SELECT {jsons} OFFSET 0)"
                  f" AS v({cells})")
    where = ""
    order = ""
    # Every cursor yields (line, key_bad): asyncpg caches the FETCH statement's row shape
    # per connection, so exports with and without a key must yield the same columns.
    check = ", false"
    after_sql = None
    if spec.export_order:
        keys = [f"_pgsse_r.{_ident(c)}" for c, _ in spec.export_order]
        bound = [bind(v, "text") + f"::{t}"
                 for v, t in zip(after or [], columns.key_types, strict=False)]
        directions = {desc for _, desc in spec.export_order}
        if after is not None and len(directions) == 1:
            op = "<" if spec.export_order[0][1] else ">"
            where = f" WHERE ({', '.join(keys)}) {op} ({', '.join(bound)})"
        elif after is not None:  # mixed directions: a > a0 OR (a = a0 AND b < b0) …
            terms = []
            for i, (_, desc) in enumerate(spec.export_order):
                equal = [f"{keys[j]} = {bound[j]}" for j in range(i)]
                terms.append("(" + " AND ".join([*equal, f"{keys[i]} {'<' if desc else '>'} {bound[i]}"]) + ")")
            where = " WHERE " + " OR ".join(terms)
        if where:
            # Rows with a NULL key are kept so the check below sees (and refuses) them; on a
            # NOT NULL column PostgreSQL (17+) folds the test away and keeps its index scan.
            where += "".join(f" OR {k} IS NULL" for k in keys)
        ordering = ", ".join(
            f"{col}{' DESC' if desc else ''}" for col, (_, desc) in zip(keys, spec.export_order, strict=True))
        order = " ORDER BY " + ordering
        # The key is checked as rows stream: the window's order is the cursor's, so it costs
        # no second sort. A NULL or repeated key would make ``after`` skip rows.
        row = keys[0] if len(keys) == 1 else f"ROW({', '.join(keys)})"
        check = (", " + " OR ".join(f"{k} IS NULL" for k in keys)
                 + f" OR {row} IS NOT DISTINCT FROM lag({row}) OVER (ORDER BY {ordering})")
        if after is not None and columns.key_types:
            after_sql = "SELECT " + ", ".join(
                f"(${i + 1}::text)::{t}" for i, t in enumerate(columns.key_types))
    count_sql = f"SELECT count(*) FROM ({spec.sql}) _pgsse_r{where}" if spec.export_count else None
    return Query(f"SELECT {line}{check} {source}{where}{order}", count_sql, args, after_sql,
                 bool(spec.export_order))


class Exporter:
    """Checks each file's export headers at start-up, and builds export responses."""

    def __init__(self, csv_safe: bool = True, idle_seconds: float = 60.0,
                 max_concurrent: int = 4, max_per_client: int = 2) -> None:
        self.columns: dict[str, Columns] = {}
        self.active = 0
        self.by_client: dict[str, int] = {}
        self.csv_safe = csv_safe
        self.idle_seconds = idle_seconds
        self.max_concurrent = max_concurrent
        self.max_per_client = min(max_per_client, max_concurrent)

    @classmethod
    def from_settings(cls, settings: Settings) -> Exporter:
        return cls(settings.export_csv_safe, settings.export_idle_seconds,
                   settings.export_max_concurrent, settings.export_max_per_client)

    def opened(self, client: str) -> None:
        self.active += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        metrics.EXPORTS_ACTIVE.inc()

    def closed(self, client: str) -> None:
        self.active -= 1
        left = self.by_client.pop(client, 1) - 1
        if left > 0:
            self.by_client[client] = left
        metrics.EXPORTS_ACTIVE.dec()

    async def prepare(self, conn: Any, aggregate: Aggregate) -> None:
        """Learn the result columns' types; check ``-- export: order by`` (a bad one stops
        start-up, naming the file and line)."""
        spec = aggregate.spec
        missing = [c for c, _ in spec.export_order if c not in aggregate.columns]
        if missing:
            raise AggregateFileError(spec.path, spec.export_line,
                                     f"export: no result column {missing[0]!r}; columns: "
                                     f"{', '.join(aggregate.columns)}")
        async with conn.transaction():
            await conn.execute(named_query("become_reader"), "{}", "10s")
            probe = await conn.prepare(f"SELECT * FROM ({spec.sql}) _pgsse_r LIMIT 0")
            attributes = probe.get_attributes()
            bare = frozenset(a.name for a in attributes
                             if a.type.schema == "pg_catalog" and a.type.name in BARE_TYPES)
            oids = {a.name: a.type.oid for a in attributes}
            types = []
            for column, _ in spec.export_order:
                types.append(await conn.fetchval("SELECT format_type($1::oid, NULL)", oids[column]))
            self.columns[aggregate.name] = columns = Columns(tuple(types), bare)
            if not spec.export_order:
                return
            query = build_query(aggregate, columns, "csv", dict.fromkeys(spec.order),
                                aggregate.columns, [""] * len(types))
            try:
                await conn.prepare(query.sql)
            except asyncpg.PostgresError as exc:
                raise AggregateFileError(spec.path, spec.export_line,
                                         f"export: {exc.sqlstate}: {exc}") from exc

    def response(self, request: Request, aggregate: Aggregate, fmt: str, values: dict[str, Any],
                 fields: tuple[str, ...], claims: str, pool: asyncpg.Pool, position: int,
                 changed: Callable[[int], str], outcome: Callable[[str], None]) -> ExportResponse:
        """The response for one export request (raises ``BadRequest`` for a bad ``after``)."""
        spec = aggregate.spec
        after = None
        if "after" in request.query_params and spec.param("after") is None:
            if not spec.export_order:
                raise BadRequest(f"after needs an '-- export: order by' key; {aggregate.name} "
                                 "declares none", code="invalid_parameter", param="after")
            after = parse_after(request.query_params["after"], [c for c, _ in spec.export_order])
        key = {c for c, _ in spec.export_order}
        kept = [c for c in aggregate.columns if not fields or c in fields or c in key]
        client = _client_of(request, claims)
        if self.active >= self.max_concurrent:
            metrics.REJECTED.labels("exports").inc()
            raise TooManyRequests(f"at most {self.max_concurrent} exports at once; try again "
                                  "shortly", retry_after=5)
        if self.by_client.get(client, 0) >= self.max_per_client:
            metrics.REJECTED.labels("exports_per_client").inc()
            raise TooManyRequests(f"at most {self.max_per_client} exports at once per client; "
                                  "try again when one ends", retry_after=5)
        safe = self.csv_safe and fmt == "csv"
        query = build_query(aggregate, self.columns.get(aggregate.name, Columns()), fmt, values,
                            kept, after, safe)
        headers = [
            (b"content-type", FORMATS[fmt].encode()),
            (b"content-disposition",
             f'attachment; filename="{aggregate.name}-{position}.{fmt}"'.encode()),
            (b"cache-control", b"no-store"),
            (b"vary", b"Accept, Accept-Encoding, Authorization, Cookie"),
            (b"x-export-position", str(position).encode()),
        ]
        if spec.export_order:
            headers.append((b"x-export-key", json.dumps([c for c, _ in spec.export_order]).encode()))
        if safe:
            headers.append((b"x-export-csv-safe", b"true"))
        given = request.headers.get(POSITION_HEADER, "")
        if given:
            if not given.isdigit() or int(given) > 2**63 - 1:
                raise BadRequest("X-Export-Position must be a position (a decimal integer)",
                                 code="invalid_parameter", param=POSITION_HEADER)
            headers.append((b"x-export-changed", changed(int(given)).encode()))
        gzip = accepts_gzip(request.headers.get("accept-encoding", ""))
        if gzip:
            headers.append((b"content-encoding", b"gzip"))
        header_line = ",".join(_csv_cell(c, safe) for c in kept) if fmt == "csv" else None
        return ExportResponse(self, aggregate.name, query, fmt, header_line, headers, gzip,
                              claims, pool, position, request.method == "HEAD",
                              after is not None, outcome, client, spec)


class ExportResponse(Response):
    """Plain ASGI (a ``Response`` only in type): the export, watching for the client leaving."""

    def __init__(self, exporter: Exporter, name: str, query: Query, fmt: str,
                 header_line: str | None, headers: list[tuple[bytes, bytes]], gzip: bool,
                 claims: str, pool: asyncpg.Pool, position: int, head: bool, resumed: bool,
                 outcome: Callable[[str], None], client: str, spec: AggregateFile) -> None:
        self.exporter, self.name, self.query, self.fmt = exporter, name, query, fmt
        self.header_line, self.start_headers, self.gzip = header_line, headers, gzip
        self.claims, self.pool, self.position, self.head = claims, pool, position, head
        self.resumed, self.outcome = resumed, outcome
        self.client, self.spec = client, spec
        self.rows = self.bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.head:
            await self._head(send)
            return
        self.exporter.opened(self.client)
        idle = self.exporter.idle_seconds

        async def paced(message: Message) -> None:
            # No progress on the socket for ``idle`` seconds: uvicorn's send waits while the
            # peer's receive window and our write buffer are full.
            try:
                await asyncio.wait_for(send(message), idle)
            except TimeoutError:
                raise ReaderIdle from None

        producer = asyncio.ensure_future(self._run(paced))
        watcher = asyncio.ensure_future(_disconnected(receive))
        result = "failed"
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done():
                try:
                    result = producer.result()
                except ReaderIdle:
                    result = "idle"
                    _reset(scope)
                    log.warning("export ended: the reader made no progress", extra={
                        "event": "export_idle", "aggregate": self.name, "rows": self.rows,
                        "seconds": idle})
            else:
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer
                result = "disconnected"
                log.info("export cancelled: the client went away", extra={
                    "event": "export_disconnected", "aggregate": self.name, "rows": self.rows})
        finally:
            producer.cancel()
            watcher.cancel()
            self.exporter.closed(self.client)
            metrics.EXPORTS.labels(self.name, result).inc()

    async def _head(self, send: Send) -> None:
        """HEAD: the headers GET would send; ``after`` cast to the key's types as GET does."""
        if self.query.after_sql is not None:
            after = self.query.args[-len(self.spec.export_order):]
            try:
                async with self.pool.acquire() as conn:
                    await conn.fetchrow(self.query.after_sql, *after)
            except (asyncpg.DataError, OSError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                error: PgsseError
                if isinstance(exc, asyncpg.DataError):
                    self.outcome("4xx")
                    error = BadRequest(f"invalid after value: {exc}", code="invalid_parameter",
                                       param="after")
                else:
                    error = Unavailable("the database did not answer; try again")
                response = error.response()
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": response.raw_headers})
                await send({"type": "http.response.body", "body": b""})
                return
        self.outcome("200")
        await send({"type": "http.response.start", "status": 200, "headers": self.start_headers})
        await send({"type": "http.response.body", "body": b""})

    def _key_error(self, rows: int) -> PgsseError:
        key = ", ".join(c for c, _ in self.spec.export_order)
        message = (f"{self.spec.path}: the export key ({key}) is NULL or repeats after row "
                   f"{rows}; '-- export: order by' must name NOT NULL, unique columns, or a "
                   "resume would skip rows")
        log.error("export key not unique", extra={
            "event": "export_key_not_unique", "aggregate": self.name, "file": str(self.spec.path),
            "rows": rows})
        return PgsseError(message, code=KEY_NOT_UNIQUE)

    async def _run(self, send: Send) -> str:
        """Stream the export; the outcome: ``complete``, ``failed`` or ``rejected``."""
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if self.gzip else None
        started = False
        rows_counter = metrics.EXPORT_ROWS.labels(self.name)
        bytes_counter = metrics.EXPORT_BYTES.labels(self.name)

        async def write(data: bytes, more: bool = True) -> None:
            if compressor is not None:
                data = compressor.compress(data) + compressor.flush(
                    zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH)
            await send({"type": "http.response.body", "body": data, "more_body": more})

        try:
            async with self.pool.acquire() as conn:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    try:
                        await conn.execute(named_query("become_exporter"), self.claims,
                                           STATEMENT_TIMEOUT, IDLE_TIMEOUT)
                        total = None
                        if self.query.count_sql is not None:
                            total = await conn.fetchval(self.query.count_sql, *self.query.args)
                        # DECLARE, not a protocol-level portal: the planner then favours
                        # plans that yield the first rows at once (cursor_tuple_fraction)
                        # over a sort of the whole result before the first byte.
                        await conn.execute(f"DECLARE {CURSOR} NO SCROLL CURSOR FOR {self.query.sql}",
                                           *self.query.args)
                        batch = await conn.fetch(FETCH)
                    except (asyncpg.DataError, asyncpg.InvalidParameterValueError) as exc:
                        raise BadRequest(f"invalid {'after' if self.resumed else 'parameter'} value: {exc}",
                                         code="invalid_parameter",
                                         param="after" if self.resumed else None) from exc
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        log.warning("export query failed", extra={
                            "event": "export_failed", "aggregate": self.name, "error": repr(exc)})
                        raise Unavailable("the export query failed; try again") from exc
                    if self.query.checked and any(r[1] for r in batch):
                        raise self._key_error(next(i for i, r in enumerate(batch) if r[1]))
                    headers = self.start_headers
                    if total is not None:
                        headers = [*headers, (b"x-total-count", str(total).encode())]
                    self.outcome("200")
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    started = True
                    newline = "\r\n" if self.fmt == "csv" else "\n"
                    if self.header_line is not None:
                        await write((self.header_line + newline).encode())
                    try:
                        while batch:
                            bad = None
                            if self.query.checked and any(r[1] for r in batch):
                                bad = next(i for i, r in enumerate(batch) if r[1])
                                batch = batch[:bad]
                            chunk = (newline.join([r[0] for r in batch]) + newline).encode()
                            if bad is not None:
                                if bad:
                                    await write(chunk)
                                    self.rows += bad
                                await self._fail(write, self._key_error(self.rows))
                                return "failed"
                            await write(chunk)
                            self.rows += len(batch)
                            self.bytes += len(chunk)
                            rows_counter.inc(len(batch))
                            bytes_counter.inc(len(chunk))
                            if len(batch) < BATCH_ROWS:
                                break
                            batch = await conn.fetch(FETCH)
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        await self._fail(write, exc)
                        return "failed"
            if self.fmt == "ndjson":
                trailer = {"@pgsse": "end", "rows": self.rows, "bytes": self.bytes,
                           "position": self.position}
                await write((json.dumps(trailer, separators=(",", ":")) + "\n").encode(), more=False)
            else:
                await write(b"", more=False)
            return "complete"
        except PgsseError as exc:
            if started:
                raise
            if 400 <= exc.status < 500:
                self.outcome("4xx")
            response = exc.response()
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
            return "rejected"

    async def _fail(self, write: Callable[..., Any], exc: BaseException) -> None:
        """The marker line, then return with the body unfinished: uvicorn closes the connection."""
        code = getattr(exc, "sqlstate", None) or getattr(exc, "code", None) or "connection_lost"
        log.warning("export failed mid-stream", extra={
            "event": "export_failed", "aggregate": self.name, "rows": self.rows,
            "error": repr(exc)})
        message = str(exc).replace("\r", " ").replace("\n", " ")
        if self.fmt == "ndjson":
            marker = json.dumps({"@pgsse": "error", "code": code, "message": message,
                                 "rows": self.rows}, separators=(",", ":")) + "\n"
        else:
            marker = f"#pgsse-export-error code={code} rows={self.rows} message={message}\r\n"
        await write(marker.encode())


class ReaderIdle(Exception):
    """The reader made no progress for ``EXPORT_IDLE_SECONDS``."""


def _client_of(request: Request, claims: str) -> str:
    """Who an export counts against: the token's subject, else the address."""
    try:
        subject = json.loads(claims).get("sub")
    except (ValueError, AttributeError):
        subject = None
    if subject is not None:
        return f"sub:{subject}"
    return request.client.host if request.client else ""


def _reset(scope: Scope) -> None:
    """Reset the socket of a reader that stopped reading: a graceful close would wait for it
    (and keep the kernel's send buffer) as long as it stays."""
    transport = scope.get("extensions", {}).get("pgsse.transport")
    if transport is None or not hasattr(transport, "abort") or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    transport.abort()


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone away (the request body is read and dropped)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return

