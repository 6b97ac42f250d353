"""Aggregates against a real PostgreSQL and real pgsse processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import ROOT, open_stream, read_sse_resuming

Start = Callable[..., Any]

SALES = """-- Revenue per shop.
-- param shop: text
-- param min_total: numeric = 0
-- cache: public, max-age=5
SELECT shop, count(*) AS sales, sum(total) AS revenue
FROM public.sales WHERE shop = :shop AND total >= :min_total
GROUP BY shop
"""
PAGED = """-- All sales, paged.
-- param page: int = 1
-- param limit: int = 10
SELECT id, shop, total FROM public.sales ORDER BY id
"""
STOCK = """-- Stock, which nobody watches.
SELECT sum(qty) AS qty FROM public.stock
"""


@pytest.fixture
async def agg_dir(conn: asyncpg.Connection, tmp_path: Path) -> Path:
    await conn.execute("CREATE TABLE public.sales (id serial PRIMARY KEY, shop text, total numeric)")
    await conn.execute("CREATE TABLE public.other (id int)")
    await conn.execute("CREATE TABLE public.stock (qty int)")
    await conn.execute("INSERT INTO public.stock VALUES (5)")
    await conn.execute("SELECT realtime.watch('public.sales', 'sales', 'shop')")
    await conn.execute("SELECT realtime.watch('public.other')")
    await conn.execute("GRANT SELECT ON public.sales, public.other, public.stock TO pgsse_reader")
    await conn.execute("INSERT INTO sales (shop, total) SELECT 's' || (g % 3), g FROM generate_series(1, 25) g")
    # Number these changes now: a server started later begins with them already in its
    # table versions, so its first ETag is final (otherwise its sequencer numbers them
    # just after start-up and the ETag turns over once, racing the test).
    while await conn.fetchval("SELECT realtime.sequence_v1()"):
        pass
    directory = tmp_path / "aggregates"
    directory.mkdir()
    (directory / "sales.sql").write_text(SALES)
    (directory / "paged.sql").write_text(PAGED)
    (directory / "stock.sql").write_text(STOCK)
    return directory


async def settled(conn: asyncpg.Connection, *servers: Any) -> None:
    """Wait until every committed change is numbered and every server has fanned it out
    (rows written before a server starts are numbered once its sequencer runs)."""
    for _ in range(200):
        pending = await conn.fetchval("SELECT count(*) FROM realtime.inbox")
        head = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
        if pending == 0 and all(httpx.get(s.url + "/stats").json()["position"] >= head for s in servers):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("changes were not fanned out")


def queries(server: Any, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    prefix = f'pgsse_aggregate_query_duration_seconds_count{{aggregate="{name}"}}'
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_etag_304_from_memory_and_changes_only_with_the_data(
        start_server: Start, conn: asyncpg.Connection, agg_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(agg_dir)})
    await settled(conn, server)
    one = server.url + "/aggregates/sales?shop=s1"
    first = httpx.get(one)
    assert first.status_code == 200
    body = first.json()
    assert body["data"] == [{"shop": "s1", "sales": 9, "revenue": 117}]
    assert isinstance(body["meta"]["position"], int)
    etag = first.headers["etag"]
    assert etag.startswith('W/"') and first.headers["cache-control"] == "public, max-age=5"
    assert "Accept-Encoding" in first.headers["vary"]
    assert httpx.get(one).headers["etag"] == etag, "stable across identical requests"
    assert httpx.get(one + "&min_total=0").headers["etag"] == etag, "normalised params"
    assert httpx.get(server.url + "/aggregates/sales?shop=s2").headers["etag"] != etag

    before = queries(server, "sales")
    for header in (etag, f'"x", {etag}', etag[2:], "*"):
        cached = httpx.get(one, headers={"If-None-Match": header})
        assert cached.status_code == 304 and cached.content == b""
        assert cached.headers["etag"] == etag and "cache-control" in cached.headers
    assert queries(server, "sales") == before, "a 304 runs no query"

    await conn.execute("INSERT INTO other VALUES (1)")  # a table it does not read
    await settled(conn, server)  # the server has processed that write
    assert httpx.get(one, headers={"If-None-Match": etag}).status_code == 304

    await conn.execute("INSERT INTO sales (shop, total) VALUES ('s0', 1)")  # another key, same table
    for _ in range(100):
        changed = httpx.get(one, headers={"If-None-Match": etag})
        if changed.status_code == 200:
            break
        await asyncio.sleep(0.02)
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["meta"]["position"] > body["meta"]["position"]


async def test_two_replicas_give_the_same_etag(start_server: Start, conn: asyncpg.Connection,
                                               agg_dir: Path) -> None:
    env = {"AGGREGATES_DIR": str(agg_dir)}
    a = start_server(env)
    await conn.execute("INSERT INTO sales (shop, total) VALUES ('s2', 1)")
    await settled(conn, a)  # a has it live
    b = start_server(env)  # b learns it from realtime.table_versions
    url = "/aggregates/sales?shop=s2"
    first = httpx.get(a.url + url).headers["etag"]
    assert first == httpx.get(b.url + url).headers["etag"]
    await conn.execute("INSERT INTO sales (shop, total) VALUES ('s2', 2)")
    await wait_for(lambda: httpx.get(a.url + url).headers["etag"] != first)
    await wait_for(lambda: httpx.get(b.url + url).headers["etag"] != first)
    assert httpx.get(a.url + url).headers["etag"] == httpx.get(b.url + url).headers["etag"]


async def test_single_flight_after_a_change(start_server: Start, conn: asyncpg.Connection,
                                            agg_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(agg_dir), "AGGREGATE_RATE_PER_SECOND": "100000"})
    url = server.url + "/aggregates/sales?shop=s0"
    httpx.get(url)
    await conn.execute("INSERT INTO sales (shop, total) VALUES ('s0', 5)")
    await settled(conn, server)
    before = queries(server, "sales")
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        responses = await asyncio.gather(*(client.get(url) for _ in range(200)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.headers["etag"] for r in responses}) == 1
    assert queries(server, "sales") - before == 1


async def test_bad_parameters_are_400_and_injection_is_only_data(
        start_server: Start, conn: asyncpg.Connection, agg_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(agg_dir)})
    base = server.url + "/aggregates/sales"
    cases = {
        "": "shop", "?shop=s1&nope=1": "nope", "?shop=s1&min_total=abc": "min_total",
        "?shop=s1&min_total=1e999": "min_total", "?shop=s1&fields=nope": "fields",
        "?shop=a&shop=b": "shop",
    }
    for query, param in cases.items():
        response = httpx.get(base + query)
        assert response.status_code == 400, query
        assert response.json()["error"]["param"] == param
    injected = httpx.get(base, params={"shop": "s1'; DROP TABLE sales; --"})
    assert injected.status_code == 200 and injected.json()["data"] == []
    assert await conn.fetchval("SELECT count(*) FROM sales") == 25
    assert httpx.get(server.url + "/aggregates/nope").status_code == 404
    assert httpx.get(server.url + "/aggregates/paged?limit=0").status_code == 400
    assert httpx.get(server.url + "/aggregates/paged?limit=1001").status_code == 400
    assert httpx.get(server.url + "/aggregates/paged?page=0").status_code == 400


async def test_paging_fields_gzip_head_and_listing(start_server: Start, agg_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(agg_dir)})
    page = httpx.get(server.url + "/aggregates/paged?page=3&limit=10&fields=id").json()
    assert page["data"] == [{"id": i} for i in range(21, 26)]
    assert {k: page["meta"][k] for k in ("page", "limit", "total", "totalPages")} == \
        {"page": 3, "limit": 10, "total": 25, "totalPages": 3}
    past = httpx.get(server.url + "/aggregates/paged?page=9&limit=10").json()
    assert past["data"] == [] and past["meta"]["total"] == 25
    plain = httpx.get(server.url + "/aggregates/paged?limit=100")
    zipped = httpx.get(server.url + "/aggregates/paged?limit=100",
                       headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["etag"] == plain.headers["etag"]
    assert zipped.json() == plain.json()  # httpx decodes gzip
    head = httpx.head(server.url + "/aggregates/paged?limit=100")
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == plain.headers["etag"]
    listing = httpx.get(server.url + "/aggregates").json()["aggregates"]
    sales = next(a for a in listing if a["name"] == "sales")
    assert sales["description"] == "Revenue per shop."
    assert sales["params"] == [{"name": "shop", "type": "text", "default": None},
                               {"name": "min_total", "type": "numeric", "default": "0"}]
    assert sales["cache"] == "public, max-age=5"
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/aggregates/sales" in spec["paths"]


async def test_unwatched_table_etag_from_result_never_stale(
        start_server: Start, conn: asyncpg.Connection, agg_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(agg_dir)})
    await settled(conn, server)
    url = server.url + "/aggregates/stock"
    first = httpx.get(url)
    assert first.json()["data"] == [{"qty": 5}]
    assert httpx.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    await conn.execute("UPDATE stock SET qty = 6")
    second = httpx.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert second.status_code == 200 and second.json()["data"] == [{"qty": 6}]


async def test_invalidation_events_live_and_on_resume(
        start_server: Start, conn: asyncpg.Connection, agg_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(agg_dir)})
    await settled(conn, server)
    snapshot = httpx.get(server.url + "/aggregates/sales?shop=s1").json()
    task = await open_stream(server.url + "/events",
                             params=[("topic", "aggregates/sales"), ("topic", "aggregates/paged")],
                             until=lambda s: len(s.events) >= 2, timeout=10)
    await conn.execute("INSERT INTO sales (shop, total) SELECT 's9', g FROM generate_series(1, 50) g")
    stream = await task
    names = sorted(e.json()["aggregate"] for e in stream.events)
    assert names == ["paged", "sales"], "once per aggregate per batch"
    assert all(e.event == "aggregate.invalidated" and e.id is None for e in stream.events)
    resumed, _ = await read_sse_resuming(
        server.url + "/events", params={"topic": "aggregates"},
        last_id=str(snapshot["meta"]["position"]), until=lambda s: len(s.events) >= 3, timeout=5)
    # event_types reads realtime.events, which every change touches.
    assert sorted(e.json()["aggregate"] for e in resumed.events) == ["event_types", "paged", "sales"]


def test_broken_file_stops_startup_naming_file_and_line(tmp_path: Path, database: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.sql").write_text("-- Broken.\n-- param x: integer\nSELECT :x\n")
    env = {"DATABASE_URL": database, "AGGREGATES_DIR": str(bad), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "pgsse", "serve"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "broken.sql:2" in result.stderr and "unknown type" in result.stderr
    (bad / "broken.sql").write_text("-- Broken SQL.\nSELECT * FROM no_such_table\n")
    env["PORT"] = "0"
    result = subprocess.run([sys.executable, "-m", "pgsse", "serve"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "broken.sql" in result.stderr and "no_such_table" in result.stderr


async def test_a_missing_grant_stops_startup_naming_the_statement(
        tmp_path: Path, database: str, conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE private_notes (id int PRIMARY KEY, body text)")
    folder = tmp_path / "aggs"
    folder.mkdir()
    (folder / "notes.sql").write_text("-- Notes.\nSELECT count(*) AS n FROM private_notes\n")
    env = {"DATABASE_URL": database, "AGGREGATES_DIR": str(folder), "PATH": "/usr/bin:/bin",
           "PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "pgsse", "serve"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "notes.sql" in result.stderr
    assert "GRANT SELECT ON private_notes TO pgsse_reader;" in result.stderr, result.stderr[-800:]


async def test_ttl_head_304_and_gzip_refused(start_server: Start, agg_dir: Path) -> None:
    (agg_dir / "ticking.sql").write_text(
        "-- Sales count, with a clock.\n-- ttl: 1s\n-- cache: max-age=1\n"
        "SELECT count(*) AS n FROM public.sales\n")
    server = start_server({"AGGREGATES_DIR": str(agg_dir)})
    url = server.url + "/aggregates/ticking"
    stale = httpx.get(url).headers["etag"]
    await wait_for(lambda: httpx.get(url).headers["etag"] != stale, timeout=3)
    # A HEAD between two GETs that show the same ETag was answered inside that ttl bucket
    # (buckets only move forward): it must be a 304. Retry if a second turned over.
    for _ in range(5):
        etag = httpx.get(url).headers["etag"]
        head = httpx.head(url, headers={"If-None-Match": etag})
        if httpx.get(url).headers["etag"] == etag:
            break
    else:
        raise AssertionError("the ETag turned over on every try")
    assert head.status_code == 304 and head.content == b"" and head.headers["etag"] == etag
    expired = httpx.head(url, headers={"If-None-Match": stale})  # an earlier bucket's ETag
    assert expired.status_code == 200 and expired.headers["etag"] != stale
    big = server.url + "/aggregates/paged?limit=100"
    refused = httpx.get(big, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in refused.headers and refused.json()["meta"]["total"] == 25
    cached = httpx.head(big, headers={"If-None-Match": refused.headers["etag"]})
    assert cached.status_code == 304 and cached.headers["etag"] == refused.headers["etag"]
    assert cached.headers["vary"] == "Accept-Encoding"


async def test_demo_aggregates_for_the_dashboard(start_server: Start) -> None:
    server = start_server({"DEMO": "1", "DEMO_RATE": "0.001"})
    listing = {a["name"] for a in httpx.get(server.url + "/aggregates").json()["aggregates"]}
    assert listing >= {"daily_sales", "orders_by_status", "top_products", "payout_summary",
                       "recent_orders", "event_types"}
    url = server.url + "/aggregates/orders_by_status"
    response = httpx.get(url)
    rows = response.json()["data"]
    assert rows and all(set(row) == {"status", "orders"} for row in rows)
    assert httpx.get(url, headers={"If-None-Match": response.headers["etag"]}).status_code == 304
    page = httpx.get(server.url + "/aggregates/recent_orders?limit=5&status=paid").json()
    assert len(page["data"]) == 5 and {r["status"] for r in page["data"]} == {"paid"}
    assert page["meta"]["totalPages"] == -(-page["meta"]["total"] // 5)
    for name in ("daily_sales", "top_products", "payout_summary"):
        assert httpx.get(f"{server.url}/aggregates/{name}").status_code == 200, name


def test_sql_errors_name_the_line_and_missing_grants_stop_startup(
        tmp_path: Path, database: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    env = {"DATABASE_URL": database, "AGGREGATES_DIR": str(bad), "PATH": "/usr/bin:/bin",
           "PORT": "0"}

    def start() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgsse", "serve"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)

    (bad / "typo.sql").write_text("-- Typo.\n-- param x: int = 1\nSELECT :x AS a,\n"
                                  "       nosuchfunction(:x) AS b\n")
    result = start()
    assert result.returncode == 2 and "typo.sql:4" in result.stderr, result.stderr[-500:]
    (bad / "typo.sql").write_text("-- Unknown header.\n-- cahce: public\nSELECT 1\n")
    result = start()
    assert result.returncode == 2 and "typo.sql:2" in result.stderr, result.stderr[-500:]
    (bad / "typo.sql").write_text("-- Not granted.\nSELECT count(*) FROM realtime.inbox\n")
    result = start()
    assert result.returncode == 2 and "permission denied" in result.stderr, result.stderr[-500:]
