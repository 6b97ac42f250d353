"""``pgsse advise``: the indexes the aggregates need, read from their plans.

For every loaded aggregate the statement *as served* (the wrapped query of ``catalog``, as
``pgsse_reader``, with each parameter at its default or at a ``--param`` value) is run under
``EXPLAIN (ANALYZE, FORMAT JSON, VERBOSE)`` in a transaction that is rolled back. When a
parameter has neither (a claim-bound one without default), the generic plan is explained
instead, without ``ANALYZE`` (so spills cannot be seen for that aggregate).

A finding is

- a ``Seq Scan`` of a table whose estimated size (``pg_class.reltuples``, else the plan's
  own row counts) is at least ``min_rows``; the suggested index is built from the plan, not
  from the SQL text: the scan's ``Filter`` conjuncts comparing a column of that table with
  ``=`` (or ``= ANY``) come first, in the order the planner prints them, then one more
  column: the range-compared column that is also a sort key above the scan, else the first
  range-compared column, else the first sort key of that table above the scan (the
  ``ORDER BY`` of an ``ORDER BY … LIMIT``);
- a ``Sort`` that spilled to disk (``Sort Space Type: Disk``), a ``Hash`` that needed more
  than one batch, or a ``HashAggregate`` that wrote to disk: an index on the sort keys when
  they are columns of one scanned table, else a ``work_mem`` for ``pgsse_reader`` sized from
  what spilled.

The same findings (from plain ``EXPLAIN``, never running a query) are logged once per
aggregate at start-up. Nothing in the data path imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import asyncpg

from . import catalog
from .queries import query
from .sqlfiles import coerce

log = logging.getLogger("pgsse.advise")

DEFAULT_MIN_ROWS = 10_000
EXPLAIN_TIMEOUT = "60s"

_EQUALITY = {"=": "=", "= ANY": "= ANY"}
_RANGE = {"<", "<=", ">", ">="}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "="}
# One side of a comparison as EXPLAIN VERBOSE prints a column: ``o.col``, ``(o.col)::text``,
# ``o."Odd Name"``; the alias and the column in the planner's own quoting.
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_COLUMN = re.compile(rf"^\(*(?P<alias>{_IDENT})\.(?P<col>{_IDENT})\)*(?:::[\w .\"\[\]]+)?$")
_OPERATOR = re.compile(r"\s(=|<>|<=|>=|<|>)\s(ANY\s)?")


@dataclasses.dataclass(frozen=True)
class Finding:
    aggregate: str
    table: str | None
    rows: int | None
    node: str
    reason: str
    suggestion: str | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        where = f" of {self.table}" if self.table else ""
        rows = f" (~{self.rows:,} rows)" if self.rows is not None else ""
        fix = f"\n    suggestion: {self.suggestion}" if self.suggestion else ""
        return f"{self.aggregate}: {self.node}{where}{rows}: {self.reason}{fix}"


class AdviseError(Exception):
    """A problem with the request itself (an unknown ``--param``, a bad value)."""


def parse_params(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise AdviseError(f"--param takes NAME=VALUE, got {pair!r}")
        out[name.strip()] = value
    return out


async def advise(conn: asyncpg.Connection, aggregates: Sequence[catalog.Aggregate], *,
                 min_rows: int = DEFAULT_MIN_ROWS, params: Mapping[str, str] | None = None,
                 analyze: bool = True) -> list[Finding]:
    """Findings for every aggregate (``inspect``-ed or not: this inspects them)."""
    params = dict(params or {})
    declared = {p.name for a in aggregates for p in a.spec.params}
    unknown = sorted(set(params) - declared)
    if unknown:
        raise AdviseError(f"no aggregate declares the parameter(s): {', '.join(unknown)}")
    findings: list[Finding] = []
    for aggregate in aggregates:
        if not aggregate.columns:
            await catalog.inspect(conn, aggregate)
        findings += await explain_one(conn, aggregate, min_rows=min_rows, params=params,
                                      analyze=analyze)
    return findings


async def explain_one(conn: Any, aggregate: catalog.Aggregate, *,
                      min_rows: int, params: Mapping[str, str], analyze: bool) -> list[Finding]:
    spec = aggregate.spec
    args: list[Any] = []
    generic = False
    for name in spec.order:
        param = spec.param(name)
        assert param is not None
        if name in params:
            try:
                args.append(coerce(param.type, params[name]))
            except ValueError as exc:
                raise AdviseError(f"--param {name}: {exc}") from exc
        elif param.has_default:
            args.append(param.default)
        else:
            args.append(None)
            generic = True
    args.append([])  # ?fields= leaves nothing out
    if spec.paged:
        page = args[spec.order.index("page")] or 1
        limit = args[spec.order.index("limit")] or 50
        args += [limit, (page - 1) * limit]
    options = "FORMAT JSON, VERBOSE" + (", ANALYZE" if analyze and not generic else "")
    tx = conn.transaction(readonly=True)
    await tx.start()
    try:
        await conn.execute(query("become_reader"), "{}", EXPLAIN_TIMEOUT)
        if generic:
            # A value the planner would fold (x = NULL) hides the scan: explain the generic
            # plan of a prepared statement instead ($n stay placeholders).
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE pgsse_advise AS {aggregate.query}")
            nulls = ", ".join(["NULL"] * len(args))
            text = await conn.fetchval(f"EXPLAIN ({options}) EXECUTE pgsse_advise({nulls})")
        else:
            text = await conn.fetchval(f"EXPLAIN ({options}) {aggregate.query}", *args)
        plan = json.loads(text)
        root = plan[0]["Plan"]
        sizes = await _table_sizes(conn, root)
    finally:
        await tx.rollback()
        if generic:  # a prepared statement outlives the rolled-back transaction
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.execute("DEALLOCATE pgsse_advise")
    return list(_findings(aggregate.name, root, sizes, min_rows))


async def _table_sizes(conn: Any, root: dict[str, Any]) -> dict[str, int]:
    names = sorted({_qualified(n) for n, _ in _walk(root, ()) if "Relation Name" in n})
    rows = await conn.fetch(
        "SELECT t, c.reltuples::bigint AS n FROM unnest($1::text[]) AS t"
        " LEFT JOIN pg_class c ON c.oid = to_regclass(t)", names)
    return {r["t"]: r["n"] for r in rows if r["n"] is not None and r["n"] >= 0}


def _walk(node: dict[str, Any], ancestors: tuple[dict[str, Any], ...]
          ) -> Iterator[tuple[dict[str, Any], tuple[dict[str, Any], ...]]]:
    yield node, ancestors
    for child in node.get("Plans", []):
        yield from _walk(child, (*ancestors, node))


def _qualified(node: dict[str, Any]) -> str:
    return f"{_quote(node.get('Schema', 'public'))}.{_quote(node['Relation Name'])}"


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def _findings(aggregate: str, root: dict[str, Any], sizes: Mapping[str, int],
              min_rows: int) -> Iterator[Finding]:
    scans = {n.get("Alias"): n for n, _ in _walk(root, ()) if "Relation Name" in n}
    for node, ancestors in _walk(root, ()):
        kind = node.get("Node Type", "")
        if kind == "Seq Scan":
            table = _qualified(node)
            rows = sizes.get(table)
            if rows is None or rows <= 0:  # never analysed: what the plan saw
                rows = int(node.get("Actual Rows", node.get("Plan Rows", 0)) +
                           node.get("Rows Removed by Filter", 0))
            if rows < min_rows:
                continue
            columns = index_columns(node, ancestors)
            yield Finding(aggregate, table, rows, kind, _scan_reason(node, columns),
                          _create_index(table, columns) if columns else None)
        elif kind in ("Sort", "Incremental Sort") and node.get("Sort Space Type") == "Disk":
            keys = [_column_of(k.rsplit(" ", 1)[0] if k.endswith((" DESC", " ASC")) else k)
                    for k in node.get("Sort Key", [])]
            aliases = {k[0] for k in keys if k is not None}
            used = node.get("Sort Space Used", 0)
            if keys and None not in keys and len(aliases) == 1 and next(iter(aliases)) in scans:
                scan = scans[next(iter(aliases))]
                table = _qualified(scan)
                cols = [k[1] for k in keys if k is not None]
                yield Finding(aggregate, table, sizes.get(table), kind,
                              f"sort spilled to disk ({used} kB); an index in the sort order "
                              "lets the plan read rows already sorted",
                              _create_index(table, cols))
            else:
                yield Finding(aggregate, None, None, kind, f"sort spilled to disk ({used} kB)",
                              _work_mem(used))
        elif kind == "Hash" and node.get("Hash Batches", 1) > 1:
            used = node.get("Peak Memory Usage", 0) * node.get("Hash Batches", 1)
            yield Finding(aggregate, None, None, kind,
                          f"hash table spilled to disk ({node['Hash Batches']} batches)",
                          _work_mem(used))
        elif kind == "Aggregate" and node.get("Disk Usage", 0) > 0:
            used = node["Disk Usage"]
            yield Finding(aggregate, None, None, "HashAggregate",
                          f"hash aggregate spilled to disk ({used} kB)", _work_mem(used))


def _scan_reason(node: dict[str, Any], columns: list[str]) -> str:
    if node.get("Filter"):
        return f"sequential scan filtering {node['Filter']}"
    if columns:
        return "sequential scan feeding a sort on " + ", ".join(columns)
    return "sequential scan of the whole table (no filter or sort an index could serve)"


def _create_index(table: str, columns: Sequence[str]) -> str:
    bare = table.rsplit(".", 1)[-1].strip('"')
    name = re.sub(r"[^a-z0-9_]+", "_", "_".join([bare, *(c.strip('"') for c in columns)]).lower())
    name = (name[:59].rstrip("_") + "_idx")
    return f"CREATE INDEX CONCURRENTLY {name} ON {table} ({', '.join(columns)});"


def _work_mem(kilobytes: float) -> str:
    megabytes = max(8, 1 << max(0, int(kilobytes * 2 // 1024)).bit_length())
    # Aggregates run under SET ROLE pgsse_reader, which applies no per-role settings: the
    # setting belongs to the role the service logs in as (run this as that role).
    return f"ALTER ROLE CURRENT_USER SET work_mem = '{megabytes}MB';"


def index_columns(scan: dict[str, Any], ancestors: Sequence[dict[str, Any]]) -> list[str]:
    """Equality-filtered columns of ``scan``'s table, then one range or sort column."""
    alias = scan.get("Alias")
    equal: list[str] = []
    ranged: list[str] = []
    for conjunct in conjuncts(scan.get("Filter", "")):
        found = comparison(conjunct)
        if found is None or found[0] != alias:
            continue
        _, column, op = found
        target = equal if op in _EQUALITY else ranged if op in _RANGE else None
        if target is not None and column not in target:
            target.append(column)
    sort: list[str] = []
    for node in reversed(ancestors):  # the nearest sort above the scan
        if node.get("Node Type") in ("Sort", "Incremental Sort"):
            for key in node.get("Sort Key", []):
                bare = re.sub(r"\s+(DESC|ASC)(\s+NULLS\s+(FIRST|LAST))?$", "", key)
                bare = re.sub(r"\s+NULLS\s+(FIRST|LAST)$", "", bare)
                col = _column_of(bare)
                if col is None or col[0] != alias:
                    break
                sort.append(col[1])
            break
    last = ([c for c in ranged if c in sort[:1]] or ranged[:1] or
            [c for c in sort if c not in equal][:1])
    return equal + [c for c in last if c not in equal]


def conjuncts(expression: str) -> list[str]:
    """Split ``((a = 1) AND (b > 2))`` into its top-level AND terms (none for an OR)."""
    text = _unwrap(expression.strip())
    parts: list[str] = []
    start = 0
    for i, depth, quoted in _scan(text):
        if depth or quoted or i < start:
            continue
        if text.startswith(" AND ", i):
            parts.append(text[start:i])
            start = i + 5
        elif text.startswith(" OR ", i):
            return []
    parts.append(text[start:])
    return [_unwrap(p.strip()) for p in parts if p.strip()]


def _scan(text: str) -> Iterator[tuple[int, int, bool]]:
    """Each character's index, the parenthesis depth after it, and whether it is inside a
    quoted literal (EXPLAIN prints literals as '…'::type)."""
    depth, quoted = 0, False
    for i, ch in enumerate(text):
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch in "()":
            depth += 1 if ch == "(" else -1
        yield i, depth, quoted


def _unwrap(text: str) -> str:
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for _, depth, _quoted in _scan(text):
        if depth < 0:
            return False
    return depth == 0


def comparison(conjunct: str) -> tuple[str, str, str] | None:
    """``(alias, column, operator)`` of a ``column op value`` term (either way round)."""
    for match in _OPERATOR.finditer(conjunct):
        left, right = conjunct[:match.start()].strip(), conjunct[match.end():].strip()
        if not _balanced(left) or not _balanced(right):
            continue
        op = match.group(1) + (" ANY" if match.group(2) else "")
        col = _column_of(left)
        if col is not None and _column_of(right) is None:
            return col[0], col[1], op
        col = _column_of(right)
        if col is not None and _column_of(left) is None and op in _FLIP:
            return col[0], col[1], _FLIP[op]
        return None
    return None


def _column_of(text: str) -> tuple[str, str] | None:
    match = _COLUMN.match(_unwrap(text.strip()))
    if match is None or not _balanced(text):
        return None
    alias = match.group("alias")
    return (alias[1:-1].replace('""', '"') if alias.startswith('"') else alias), match.group("col")


async def startup_warnings(pool: asyncpg.Pool, aggregates: Sequence[catalog.Aggregate],
                           min_rows: int = DEFAULT_MIN_ROWS) -> None:
    """One warning per aggregate with findings, from plain EXPLAIN (no query is run)."""
    for aggregate in aggregates:
        try:
            async with pool.acquire() as conn:
                found = await explain_one(conn, aggregate, min_rows=min_rows, params={},
                                          analyze=False)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.info("index advice skipped", extra={"event": "advise_skipped",
                                                     "aggregate": aggregate.name, "error": repr(exc)})
            continue
        if found:
            log.warning("aggregate plan scans large tables: see `pgsse advise`",
                        extra={"event": "aggregate_advice", "aggregate": aggregate.name,
                               "findings": [f.as_dict() for f in found]})


def add_arguments(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    parser.add_argument("--min-rows", type=int, default=DEFAULT_MIN_ROWS,
                        help="report sequential scans of tables of at least this many rows")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter value for every aggregate that declares NAME "
                             "(default: each parameter's default; none: the generic plan)")
    parser.add_argument("--no-analyze", action="store_true",
                        help="plain EXPLAIN: run no aggregate (spills then go unseen)")


def run(args: Any, settings: Any, database_url: str) -> int:
    """Exit status: 0 nothing found, 1 findings, 2 a problem (bad --param, broken file)."""
    import asyncio
    import sys

    from .sqlfiles import AggregateFileError

    async def go() -> list[Finding]:
        params = parse_params(args.param)
        items = [catalog.Aggregate(spec) for spec in catalog.load_files(settings)]
        conn = await asyncpg.connect(database_url)
        try:
            return await advise(conn, items, min_rows=args.min_rows, params=params,
                                analyze=not args.no_analyze)
        finally:
            await conn.close()

    try:
        findings = asyncio.run(go())
    except (AdviseError, AggregateFileError) as exc:
        print(f"pgsse advise: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    elif findings:
        for finding in findings:
            print(finding.describe())
    else:
        print(f"no findings: no aggregate scans a table of {args.min_rows:,}+ rows or spills")
    return 1 if findings else 0
