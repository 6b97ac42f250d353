"""``pgsse advise``: the scans it reports, the index it suggests, and that the index works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pgsse import advise

from tests.support import ROOT, eventually

BILLS = """\
-- Latest paid bills of one commissioner since a date.
-- param commissioner_id: int = 7
-- param status: text = paid
-- param since: timestamp = 2024-03-01T00:00:00Z
SELECT id, amount, created_at FROM shop.bills
WHERE commissioner_id = :commissioner_id AND status = :status AND created_at >= :since
ORDER BY created_at DESC
LIMIT 20
"""

TINY = """\
-- A 50-row lookup.
-- param code: text = c7
SELECT id, code FROM shop.tiny WHERE code = :code
"""

SUGGESTION = ("CREATE INDEX CONCURRENTLY bills_commissioner_id_status_created_at_idx "
              "ON shop.bills (commissioner_id, status, created_at);")


@pytest.fixture
async def shop(conn: asyncpg.Connection, tmp_path: Path) -> Path:
    await conn.execute("""
        CREATE SCHEMA shop;
        CREATE TABLE shop.bills (id bigserial PRIMARY KEY, commissioner_id int NOT NULL,
                                 status text NOT NULL, created_at timestamptz NOT NULL,
                                 amount numeric NOT NULL);
        INSERT INTO shop.bills (commissioner_id, status, created_at, amount)
        SELECT i % 500, (ARRAY['paid','open','void'])[1 + i % 3],
               timestamptz '2024-01-01' + i * interval '1 minute', i % 1000
        FROM generate_series(1, 200000) i;
        CREATE TABLE shop.tiny (id int PRIMARY KEY, code text NOT NULL);
        INSERT INTO shop.tiny SELECT i, 'c' || i FROM generate_series(1, 50) i;
        GRANT USAGE ON SCHEMA shop TO pgsse_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA shop TO pgsse_reader;
        ANALYZE shop.bills; ANALYZE shop.tiny;
    """)
    aggregates = tmp_path / "aggregates"
    aggregates.mkdir()
    (aggregates / "latest_bills.sql").write_text(BILLS)
    (aggregates / "tiny_lookup.sql").write_text(TINY)
    return aggregates


def run_advise(database: str, aggregates: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSSE_", "AUTH_"))}
    env.update(DATABASE_URL=database, AGGREGATES_DIR=str(aggregates), DEMO="0")
    return subprocess.run([sys.executable, "-m", "pgsse", "advise", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def node_types(node: dict[str, Any]) -> list[tuple[str, str | None]]:
    found = [(node["Node Type"], node.get("Index Name"))]
    for child in node.get("Plans", []):
        found += node_types(child)
    return found


async def test_reports_the_scan_and_its_index_then_nothing_once_created(
        database: str, conn: asyncpg.Connection, shop: Path) -> None:
    result = run_advise(database, shop, "--json")
    assert result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)
    assert findings == [{
        "aggregate": "latest_bills", "table": "shop.bills", "rows": 200000, "node": "Seq Scan",
        "reason": findings[0]["reason"], "suggestion": SUGGESTION}]
    assert "commissioner_id" in findings[0]["reason"]

    await conn.execute(SUGGESTION)  # verbatim: CONCURRENTLY, outside a transaction
    await conn.execute("ANALYZE shop.bills")
    result = run_advise(database, shop, "--json")
    assert (result.returncode, json.loads(result.stdout)) == (0, []), result.stderr
    plan = await conn.fetchval(
        "EXPLAIN (FORMAT JSON) SELECT id, amount, created_at FROM shop.bills"
        " WHERE commissioner_id = 7 AND status = 'paid' AND created_at >= '2024-03-01'"
        " ORDER BY created_at DESC LIMIT 20")
    nodes = node_types(json.loads(plan)[0]["Plan"])
    assert any(index == "bills_commissioner_id_status_created_at_idx" for _, index in nodes), nodes
    assert not any(kind == "Seq Scan" for kind, _ in nodes), nodes


async def test_small_tables_only_below_min_rows_and_text_output(database: str, shop: Path) -> None:
    result = run_advise(database, shop, "--json", "--min-rows", "300000")
    assert (result.returncode, json.loads(result.stdout)) == (0, []), result.stderr
    result = run_advise(database, shop, "--json", "--min-rows", "10")
    assert result.returncode == 1
    tables = {(f["aggregate"], f["table"]) for f in json.loads(result.stdout)}
    assert tables == {("latest_bills", "shop.bills"), ("tiny_lookup", "shop.tiny")}
    tiny = [f for f in json.loads(result.stdout) if f["aggregate"] == "tiny_lookup"][0]
    assert tiny["suggestion"] == "CREATE INDEX CONCURRENTLY tiny_code_idx ON shop.tiny (code);"
    text = run_advise(database, shop)
    assert text.returncode == 1 and "latest_bills: Seq Scan of shop.bills" in text.stdout
    assert SUGGESTION in text.stdout


async def test_params_as_given_and_bad_params(database: str, shop: Path) -> None:
    # The value chosen changes the plan's filter, not the suggestion.
    result = run_advise(database, shop, "--json", "--param", "commissioner_id=3")
    assert result.returncode == 1
    assert "3" in json.loads(result.stdout)[0]["reason"]
    for bad in (["--param", "nosuch=1"], ["--param", "commissioner_id=abc"], ["--param", "x"]):
        result = run_advise(database, shop, *bad)
        assert result.returncode == 2 and "pgsse advise:" in result.stderr, (bad, result.stderr)


async def test_claim_bound_parameter_without_default_uses_the_generic_plan(
        database: str, shop: Path) -> None:
    (shop / "latest_bills.sql").write_text(BILLS.replace(
        "-- param commissioner_id: int = 7", "-- param commissioner_id: int from claim org.id"))
    # Two generic plans explained on one connection (the prepared statement is released).
    (shop / "tiny_lookup.sql").write_text(TINY.replace("= c7", "from claim code"))
    result = run_advise(database, shop, "--json")
    assert result.returncode == 1, result.stderr
    (finding,) = json.loads(result.stdout)
    assert finding["suggestion"] == SUGGESTION
    assert "$1" in finding["reason"]  # a generic plan's placeholder


async def test_a_sort_that_spills_is_reported(database: str, conn: asyncpg.Connection,
                                              shop: Path) -> None:
    (shop / "sorted_bills.sql").write_text(
        "-- Every bill by amount.\nSELECT id, amount FROM shop.bills ORDER BY amount, id\n")
    name = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"ALTER DATABASE {name} SET work_mem = '64kB'")
    await conn.execute(f"ALTER DATABASE {name} SET max_parallel_workers_per_gather = 0")
    result = run_advise(database, shop, "--json", "--min-rows", "1000000")
    findings = [f for f in json.loads(result.stdout) if f["aggregate"] == "sorted_bills"]
    assert result.returncode == 1 and findings, result.stdout + result.stderr
    assert findings[0]["node"] == "Sort" and "spilled" in findings[0]["reason"]
    assert findings[0]["suggestion"] == (
        "CREATE INDEX CONCURRENTLY bills_amount_id_idx ON shop.bills (amount, id);")


async def test_start_up_logs_one_warning_per_aggregate_with_findings(
        start_server: Any, shop: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(shop)})

    def warned() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("event") == "aggregate_advice"]

    found = await eventually(warned, timeout=30, what="the advice warning")
    assert [w["aggregate"] for w in found] == ["latest_bills"]


@pytest.mark.parametrize(("expression", "expected"), [
    ("((b.a = $1) AND (b.c >= $2))", [("b", "a", "="), ("b", "c", ">=")]),
    ("((b.s)::text = 'x = y'::text)", [("b", "s", "=")]),
    ("(5 < b.n)", [("b", "n", ">")]),
    ("(b.k = ANY ('{1,2}'::integer[]))", [("b", "k", "= ANY")]),
    ("((b.a = 1) OR (b.c = 2))", []),
    ('(b."Odd Col" <= now())', [("b", '"Odd Col"', "<=")]),
])
def test_filter_terms(expression: str, expected: list[tuple[str, str, str]]) -> None:
    assert [advise.comparison(t) for t in advise.conjuncts(expression)] == expected
