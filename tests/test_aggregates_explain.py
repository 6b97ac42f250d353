"""The demo aggregates stay on indexes: at 100,000 orders no plan scans demo.orders whole."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from pgsse import catalog, demo
from pgsse.settings import SQL_DIR
from pgsse.sqlfiles import parse


def seq_scans(node: dict[str, Any], table: str) -> list[str]:
    found = [node["Node Type"]] if (node.get("Node Type") == "Seq Scan"
                                    and node.get("Relation Name") == table) else []
    for child in node.get("Plans", []):
        found += seq_scans(child, table)
    return found


async def test_demo_aggregates_use_indexes_at_100k_orders(conn: asyncpg.Connection) -> None:
    await demo.install(conn, orders=100_000)
    await conn.execute("ANALYZE")
    assert await conn.fetchval("SELECT count(*) FROM demo.orders") >= 100_000
    paths = sorted((SQL_DIR / "demo" / "aggregates").glob("*.sql"))
    assert {p.stem for p in paths} >= {"daily_sales", "orders_by_status", "top_products",
                                       "payout_summary", "recent_orders"}
    for path in paths:
        aggregate = catalog.Aggregate(parse(path))
        spec = aggregate.spec
        await catalog.inspect(conn, aggregate)
        assert "demo.orders" in aggregate.tables or path.stem == "payout_summary"
        # The statement as served: wrapped, with each parameter's default, as pgsse_reader.
        args: list[Any] = [spec.param(name).default for name in spec.order]  # type: ignore[union-attr]
        args.append([])
        if spec.paged:
            args += [50, 0]
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE pgsse_reader")
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {aggregate.query}", *args)
            root = json.loads(plan)[0]["Plan"]
            assert not seq_scans(root, "orders"), f"{path.name} scans demo.orders: {plan}"
            if spec.paged:  # the page past the end counts separately
                plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {aggregate.count_query}",
                                           *args[:len(spec.order)])
                assert not seq_scans(json.loads(plan)[0]["Plan"], "orders"), path.name
