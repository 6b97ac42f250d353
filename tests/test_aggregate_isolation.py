"""One slow aggregate cannot take the service from everyone else (issue 20, point 1).

A storm of slow aggregate requests with distinct parameters (so single flight cannot fold
them) must not delay readiness, a resuming stream's replay, ``GET /events/{position}`` or a
fast aggregate; the wait for an aggregate connection is bounded (503 ``busy`` with
``Retry-After``); ``-- timeout:`` and ``AGGREGATE_TIMEOUT`` bound each statement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pgsse.sqlfiles import AggregateFileError, parse

from tests.support import eventually, metric, read_sse, stats

Start = Callable[..., Any]
SLOW_SECONDS = 3
STORM = 100  # well past the pool (10 before, 8 aggregate connections now): the point is the queue
# "Each answers within 1 s" (issue 20) is the target; the bound leaves room for a loaded
# 2-core machine. Without the isolation each of these waited for the whole storm (~20 s).
PROMPT = 2.0

SLOW = f"""-- Slow on purpose: one row after {SLOW_SECONDS} s.
-- param n: int
SELECT :n AS n FROM pg_sleep({SLOW_SECONDS})
"""
FAST = """-- Fast: how many items (k only makes each request a query of its own).
-- param k: int
SELECT :k AS k, count(*) AS items FROM public.items
"""
CAPPED = """-- Would take 30 s, stopped by its own timeout.
-- timeout: 500ms
SELECT 1 AS one FROM pg_sleep(30)
"""
DEFAULTED = """-- Would take 30 s, stopped by AGGREGATE_TIMEOUT.
SELECT 1 AS one FROM pg_sleep(30)
"""


@pytest.fixture
async def agg_dir(conn: asyncpg.Connection, tmp_path: Path) -> Path:
    await conn.execute("CREATE TABLE public.items (id serial PRIMARY KEY, label text)")
    await conn.execute("SELECT realtime.watch('public.items', 'items')")
    await conn.execute("GRANT SELECT ON public.items TO pgsse_reader")
    for i in range(5):
        await conn.execute("INSERT INTO public.items (label) VALUES ($1)", f"i{i}")
    while await conn.fetchval("SELECT realtime.sequence_v1()"):
        pass
    directory = tmp_path / "aggregates"
    directory.mkdir()
    for name, text in (("slow", SLOW), ("fast", FAST), ("capped", CAPPED),
                       ("defaulted", DEFAULTED)):
        (directory / f"{name}.sql").write_text(text)
    return directory


async def timed(what: str, make: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.monotonic()
    result = await make()
    return time.monotonic() - started, result


async def test_a_slow_aggregate_storm_leaves_the_rest_alone(
        start_server: Start, conn: asyncpg.Connection, agg_dir: Path) -> None:
    server = start_server({
        "AGGREGATES_DIR": str(agg_dir), "AGGREGATE_RATE_PER_SECOND": "100000",
        "REPLAY_MEMORY_BYTES": "0",  # a resume reads history from the database
    })  # AGGREGATE_POOL_WAIT at its default (5 s): the queue stands while the checks run
    head = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
    await eventually(lambda: stats(server)["position"] >= head, what="events fanned out")
    first = await conn.fetchval("SELECT min(position) FROM realtime.events")

    async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                 limits=httpx.Limits(max_connections=STORM + 20)) as client:
        storm = [asyncio.create_task(client.get("/aggregates/slow", params={"n": i}))
                 for i in range(STORM)]
        # The storm has arrived: its queries hold every connection they may take.
        await eventually(lambda: stats(server)["cache"]["in_flight"] >= 20, timeout=20,
                         what="the storm in flight")

        async def resume_first_event() -> Any:
            return await read_sse(server.url + "/events", params={"topic": "items"},
                                  headers={"Last-Event-ID": str(first - 1)}, max_events=1,
                                  timeout=30)

        checks = {
            "readyz": lambda: client.get("/readyz"),
            "event lookup": lambda: client.get(f"/events/{first}"),
            "fast aggregate": lambda: client.get("/aggregates/fast", params={"k": 1}),
            "resume": resume_first_event,
        }
        took: dict[str, float] = {}
        for name, make in checks.items():
            took[name], result = await timed(name, make)
            if name == "resume":
                assert result.events and result.events[0].id == str(first), result
            else:
                assert result.status_code == 200, (name, result.status_code, result.text)
        slowest = max(took, key=took.__getitem__)
        assert took[slowest] < PROMPT, f"{slowest} took {took[slowest]:.1f}s: {took}"

        answers = await asyncio.gather(*storm)
    by_status: dict[int, int] = {}
    for answer in answers:
        by_status[answer.status_code] = by_status.get(answer.status_code, 0) + 1
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "busy"
            assert int(answer.headers["retry-after"]) >= 1
        else:
            assert answer.status_code == 200, answer.text
    # The slow aggregate holds at most half the aggregate pool (4 of 8) at a time, and a
    # request waits at most AGGREGATE_POOL_WAIT (5 s) for one: most of the storm is told to
    # come back later instead of queueing for a minute.
    print("answered in", {k: round(v, 3) for k, v in took.items()}, "storm:", by_status)
    assert by_status.get(503, 0) >= STORM // 2, by_status
    assert by_status.get(200, 0) >= 4, by_status
    busy = metric(server, 'pgsse_aggregate_requests_total{aggregate="slow",outcome="busy"}')
    assert busy == by_status[503], "counted by outcome, for alerts"
    # Nothing was poisoned: the slow aggregate answers again once the storm is over.
    again = httpx.get(server.url + "/aggregates/fast", params={"k": 2}, timeout=10)
    assert again.status_code == 200 and again.json()["data"] == [{"k": 2, "items": 5}]


async def test_statement_timeouts_answer_503_and_keep_the_pool(
        start_server: Start, agg_dir: Path) -> None:
    # One aggregate connection: every query below runs on the connection the timed-out
    # ones left behind.
    server = start_server({"AGGREGATES_DIR": str(agg_dir), "AGGREGATE_TIMEOUT": "700ms",
                           "AGGREGATE_RATE_PER_SECOND": "100000", "AGGREGATE_POOL_SIZE": "1"})
    for name in ("capped", "defaulted"):
        # Each timed-out query must give its connection back in a usable state.
        for _ in range(3):
            started = time.monotonic()
            answer = httpx.get(f"{server.url}/aggregates/{name}", timeout=30)
            took = time.monotonic() - started
            assert answer.status_code == 503, (name, answer.status_code, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "aggregate_timeout", error
            assert "retry-after" in answer.headers
            assert took < 10, f"{name} took {took:.1f}s"
    fast = httpx.get(server.url + "/aggregates/fast", params={"k": 3}, timeout=10)
    assert fast.status_code == 200 and fast.json()["data"] == [{"k": 3, "items": 5}]


@pytest.mark.parametrize("value", ["soon", "0s", "-1s", ""])
def test_a_bad_timeout_header_names_file_and_line(tmp_path: Path, value: str) -> None:
    path = tmp_path / "bad.sql"
    path.write_text(f"-- A description.\n-- param x: int = 1\n-- timeout: {value}\nSELECT 1 AS x\n")
    with pytest.raises(AggregateFileError) as caught:
        parse(path)
    assert caught.value.line == 3 and "timeout" in caught.value.problem


def test_the_timeout_header_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "good.sql"
    path.write_text("-- A description.\n-- timeout: 2s\nSELECT 1 AS x\n")
    assert parse(path).timeout == 2.0
    path.write_text("-- A description.\nSELECT 1 AS x\n")
    assert parse(path).timeout is None


class CountingPool:
    """Stands in for an asyncpg pool of ``size`` connections (admission only acquires and
    releases), counting what is held."""

    def __init__(self, size: int) -> None:
        self.free = asyncio.Semaphore(size)
        self.held = 0

    async def acquire(self, timeout: float | None = None) -> object:
        async with asyncio.timeout(timeout):
            await self.free.acquire()
        self.held += 1
        return object()

    async def release(self, conn: object) -> None:
        self.held -= 1
        self.free.release()


async def test_one_aggregate_takes_at_most_half_the_pool_and_waits_boundedly() -> None:
    from pgsse.admission import Admission, Busy

    pool = CountingPool(8)
    admission = Admission(8, 0.3)
    release = asyncio.Event()
    inside = 0

    async def hold(name: str) -> None:
        nonlocal inside
        async with admission.connection(pool, name):  # type: ignore[arg-type]
            inside += 1
            await release.wait()

    slow = [asyncio.create_task(hold("slow")) for _ in range(6)]
    await eventually(lambda: inside == 4, what="four slow queries running")
    assert pool.held == 4, "the other two queue on the slow aggregate's own share"
    async with admission.connection(pool, "fast"):  # type: ignore[arg-type]
        assert pool.held == 5, "a fast aggregate does not wait behind the slow ones"
    started = time.monotonic()
    with pytest.raises(Busy) as caught:
        async with admission.connection(pool, "slow"):  # type: ignore[arg-type]
            pass
    assert time.monotonic() - started < 5
    assert caught.value.status == 503 and caught.value.code == "busy"
    assert caught.value.headers["Retry-After"] == "1"
    release.set()
    await asyncio.gather(*slow, return_exceptions=True)
    assert pool.held == 0, "every connection given back, also by the ones told busy"
    # the two that queued were either served or told busy; none kept a share
    async with admission.connection(pool, "slow"):  # type: ignore[arg-type]
        assert pool.held == 1
