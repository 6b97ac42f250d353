"""The aggregate catalogue: which ``.sql`` files load, and what each query reads.

Files come from ``sql/aggregates/``, then ``sql/demo/aggregates/`` when the demo is on, then
``AGGREGATES_DIR``; a later directory overrides a same-named file. At start-up ``inspect``
checks each query against the database as ``pgsse_reader``, so that a broken file stops
start-up (``AggregateFileError``: file, line, problem) instead of failing requests:

1. the query is prepared (syntax, names, types) and run once with ``LIMIT 0`` and null
   parameters, which checks the reader's privileges and yields the result columns;
2. the tables it reads come from ``EXPLAIN (FORMAT JSON, VERBOSE)`` of its generic plan:
   every plan node's ``Schema``/``Relation Name``. The plan sees through views, joins,
   sub-queries and row-level security policies; partitions are added as whole trees. A
   ``-- depends:`` header replaces what the plan found (for tables read inside functions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import asyncpg

from .queries import query
from .settings import SQL_DIR, Settings
from .sqlfiles import AggregateFile, AggregateFileError, parse

TOTAL_COLUMN = "__pgsse_total"
# The events table is not watched, yet every event is a row in it: its version is the
# latest position (pruning does not count; ``event_types.sql`` has a ttl for that).
EVENTS_TABLE = "realtime.events"
# The feed's marker of a table that stopped being watched (``realtime.unwatch``, DROP TABLE,
# the old name of a renamed table; migration 005): it carries the table and a position.
UNWATCHED_MARKER = "pgsse.unwatched"



class Aggregate:
    """One loaded file, its wrapped query, and what inspecting it found."""

    def __init__(self, spec: AggregateFile) -> None:
        self.spec = spec
        self.name = spec.name
        self.topic = f"aggregates/{spec.name}"
        self.tables: tuple[str, ...] = ()
        self.unwatched: tuple[str, ...] = ()
        self.columns: tuple[str, ...] = ()
        # The result columns and their types: part of the ETag, so that a schema change that
        # changes the output changes the ETag (``shapes``).
        self.shape = ""
        self.headers: dict[str, str] = {}  # Cache-Control and Vary, set at start
        self.raw_headers: list[tuple[bytes, bytes]] = []
        # (The aliases are unlikely names: a result column called like the alias would
        # make to_jsonb(alias) encode that column instead of the row.)
        # One round trip returns the rows as a JSON array, encoded by to_jsonb; $n+1 lists
        # the columns ?fields= leaves out. Paged: $n+2 limit, $n+3 offset, plus the total.
        n = len(spec.order)
        if spec.paged:
            self.query = (
                f"SELECT coalesce(jsonb_agg(to_jsonb(_pgsse_r) - '{TOTAL_COLUMN}'::text - ${n + 1}::text[]),"
                f" '[]'::jsonb)::text, max(_pgsse_r.{TOTAL_COLUMN}) FROM (SELECT _pgsse_s.*, count(*) OVER ()"
                f" AS {TOTAL_COLUMN} FROM ({spec.sql}) _pgsse_s LIMIT ${n + 2}::bigint"
                f" OFFSET ${n + 3}::bigint) _pgsse_r")
        else:
            self.query = (f"SELECT coalesce(jsonb_agg(to_jsonb(_pgsse_r) - ${n + 1}::text[]),"
                          f" '[]'::jsonb)::text FROM ({spec.sql}) _pgsse_r")
        self.count_query = f"SELECT count(*) FROM ({spec.sql}) s"


def load_files(settings: Settings) -> list[AggregateFile]:
    dirs = [SQL_DIR / "aggregates"]
    if settings.demo:
        dirs.append(SQL_DIR / "demo" / "aggregates")
    if settings.aggregates_dir is not None:
        dirs.append(settings.aggregates_dir)
    found: dict[str, Path] = {}
    for directory in dirs:
        for path in sorted(Path(directory).glob("*.sql")):
            found[path.stem] = path  # later directories override
    return [parse(path) for path in found.values()]


async def watched_tables(conn: Any) -> set[str]:
    return {row["t"] for row in await conn.fetch(query("watched_tables"))} | {EVENTS_TABLE}


async def inspect(conn: Any, aggregate: Aggregate) -> None:
    """Fill ``columns`` and ``tables``; raise ``AggregateFileError`` if the file is broken."""
    spec = aggregate.spec
    nulls = [None] * len(spec.order)
    async with conn.transaction():
        await conn.execute(query("become_inspector"))
        try:
            await conn.prepare(spec.sql)
        except asyncpg.PostgresError as exc:
            raise AggregateFileError(spec.path, _line(spec, exc), _problem(exc)) from exc
        try:
            probe = await conn.prepare(f"SELECT * FROM ({spec.sql}) _pgsse_r LIMIT 0")
            await probe.fetch(*nulls)
            await conn.prepare(aggregate.query)
        except asyncpg.PostgresError as exc:
            raise AggregateFileError(spec.path, spec.line, _problem(exc)) from exc
        columns = tuple(attr.name for attr in probe.get_attributes())
        if len(set(columns)) != len(columns) or TOTAL_COLUMN in columns:
            raise AggregateFileError(spec.path, spec.line,
                                     f"result column names must be unique: {', '.join(columns)}")
        aggregate.columns = columns
        aggregate.shape = ",".join(f"{a.name}:{a.type.schema}.{a.type.name}"
                                   for a in probe.get_attributes())
        if spec.depends is not None:
            for table in spec.depends:
                if await conn.fetchval("SELECT to_regclass($1)", table) is None:
                    raise AggregateFileError(spec.path, 1, f"depends: no table {table}")
            aggregate.tables = spec.depends
            return
        try:
            found = await plan_relations(conn, spec.sql, len(spec.order))
        except asyncpg.PostgresError as exc:
            raise AggregateFileError(spec.path, spec.line, f"EXPLAIN failed: {_problem(exc)}") from exc
        schemas, names = [s for s, _ in found], [r for _, r in found]
        tree = {row["t"] for row in await conn.fetch(query("partition_trees"), schemas, names)}
        aggregate.tables = tuple(sorted({f"{s}.{r}" for s, r in found} | tree))


async def plan_relations(conn: Any, sql: str, params: int) -> set[tuple[str, str]]:
    """(schema, name) of every relation in the generic plan of ``sql``."""
    await conn.execute(f"PREPARE pgsse_dependencies AS {sql}")
    try:
        args = "(" + ", ".join(["NULL"] * params) + ")" if params else ""
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON, VERBOSE) EXECUTE pgsse_dependencies{args}")
    finally:
        await conn.execute("DEALLOCATE pgsse_dependencies")
    found: set[tuple[str, str]] = set()

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            found.add((node.get("Schema", "public"), node["Relation Name"]))
        for child in node.get("Plans", []):
            walk(child)

    walk(json.loads(plan)[0]["Plan"])
    return found


_DENIED = re.compile(r"permission denied for (table|view|materialized view|schema|sequence) (\S+)")


def problem(exc: asyncpg.PostgresError) -> str:
    """The SQL error as a message: SQLSTATE, text, and a hint (the GRANT that fixes it)."""
    return _problem(exc)


def _problem(exc: asyncpg.PostgresError) -> str:
    hint = getattr(exc, "hint", None)
    denied = _DENIED.search(str(exc))
    if denied is not None:
        # Aggregates run as pgsse_reader: say the statement that fixes it.
        kind, name = denied.groups()
        grant = (f"GRANT USAGE ON SCHEMA {name} TO pgsse_reader;" if kind == "schema" else
                 f"GRANT SELECT ON {name} TO pgsse_reader;")
        hint = f"aggregates run as the role pgsse_reader; run: {grant}"
    return f"{exc.sqlstate}: {exc}" + (f" (hint: {hint})" if hint else "")


def _line(spec: AggregateFile, exc: asyncpg.PostgresError) -> int:
    """The file line of the error's character position (``:name`` keeps lines in place)."""
    position = getattr(exc, "position", None)
    if not position or not str(position).isdigit():
        return spec.line
    return spec.line + spec.sql.count("\n", 0, int(position) - 1)


def openapi_paths(items: list[Aggregate], errors: dict[str, Any]) -> dict[str, Any]:
    """``/openapi.json`` entries: one path per aggregate with its typed query parameters."""
    json_object = {"application/json": {"schema": {"type": "object"}}}
    paths: dict[str, Any] = {"/aggregates": {"get": {
        "summary": "List aggregates",
        "responses": {"200": {"description": "Aggregates", "content": json_object}}}}}
    for aggregate in items:
        params = [{"name": p.name, "in": "query", "required": p.required,
                   "schema": param_schema(p.name, p.type, aggregate.spec.paged)}
                  for p in aggregate.spec.params]
        params.append({"name": "fields", "in": "query", "schema": {"type": "string"},
                       "description": "comma-separated result columns to keep"})
        paths[f"/aggregates/{aggregate.name}"] = {"get": {
            "summary": aggregate.spec.description or aggregate.name,
            "parameters": params,
            "responses": {"200": {"description": "Rows and meta", "content": json_object},
                          "304": {"description": "Not modified"},
                          "503": {"description": "busy, aggregate_timeout (both with Retry-After) "
                                                 "or aggregate_unavailable (the schema moved)",
                                  "content": json_object}, **errors}}}
    return paths


def param_schema(name: str, type_: str, paged: bool) -> dict[str, Any]:
    kind, fmt = {"int": ("integer", "int64"), "float": ("number", "double"),
                 "numeric": ("string", None), "text": ("string", None), "bool": ("boolean", None),
                 "date": ("string", "date"), "timestamp": ("string", "date-time")}[type_]
    schema: dict[str, Any] = {"type": kind}
    if fmt:
        schema["format"] = fmt
    if paged and name == "page":
        schema["minimum"] = 1
    if paged and name == "limit":
        schema.update(minimum=1, maximum=1000)
    return schema
