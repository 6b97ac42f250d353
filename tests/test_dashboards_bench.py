"""Smoke run of ``make bench``'s dashboards scenario: on pgsse, the aggregate statements that
dashboards cause follow the changes, not the number of dashboards."""

from __future__ import annotations

from typing import Any

from bench import dashboards
from tests.support import eventually, stats


async def test_pgsse_dashboards_cost_the_same_statements_at_3_and_12(start_server: Any) -> None:
    server = start_server({"DEMO": "1", "DEMO_RATE": "10", "AGGREGATE_RATE_PER_SECOND": "100000",
                           "MAX_CONNECTIONS_PER_CLIENT": "1000"})
    await eventually(lambda: stats(server)["position"] > 0, timeout=30,
                     what="the demo writer's first events")
    few = await dashboards.run_case(server.port, "pgsse", 3, 4.0, sample=3, tail=1.0)
    many = await dashboards.run_case(server.port, "pgsse", 12, 4.0, sample=3, tail=1.0)
    for case in (few, many):
        assert case["errors"] == 0, case
        assert case["changes"] > 0 and case["staleness"]["samples"] > 0, case
    per_change = [c["aggregate_queries_by_server"] / c["changes"] for c in (few, many)]
    # 4× the dashboards: the same queries per change (one per invalidated key, whoever asks),
    # while each dashboard still refetched what changed.
    assert per_change[1] <= 1.5 * per_change[0] + 0.5, (per_change, few, many)
    assert many["http_requests"] > 2 * few["http_requests"], (few, many)
