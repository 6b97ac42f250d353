"""``WORKERS=N``: N processes behind one port, each with its own feed and hub.

The kernel spreads connections over the workers (SO_REUSEPORT), so these tests open enough
of them that both workers hold some, and check that through ``/stats`` (each answer names
the worker that gave it) before relying on it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pgsse.settings import ConfigError, Settings, usable_cores

from tests import test_stream
from tests.support import ServerProcess, eventually, free_port, metric, open_stream, read_sse
from tests.test_stream import head, publish, wait_head
from tests.tools import require_tool

Start = Callable[..., Any]
TWO = {"WORKERS": "2"}


@pytest.fixture
def start_two(start_server: Start) -> Start:
    """``start_server`` with ``WORKERS=2``."""
    def start(env: dict[str, str] | None = None, **kwargs: Any) -> ServerProcess:
        server: ServerProcess = start_server({**TWO, **(env or {})}, **kwargs)
        both_live(server)
        return server

    return start


def both_live(server: ServerProcess, timeout: float = 30) -> None:
    """Wait until both workers read the feed. ``/readyz`` is answered by whichever worker a
    connection reaches, and a worker serves HTTP before its listener is up: until then its
    ``/events`` answers ``retry:`` and closes."""
    deadline = time.monotonic() + timeout
    while metric(server, "pgsse_feed_up") != 2:
        assert time.monotonic() < deadline, "both workers did not come up"
        time.sleep(0.05)


def per_worker(server: ServerProcess, workers: int = 2, timeout: float = 10) -> dict[int, Any]:
    """``/stats`` of every worker: each request is a new connection, which the kernel hands
    to either worker, so ask until each has answered."""
    seen: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"only workers {sorted(seen)} answered"
        body = httpx.get(server.url + "/stats", timeout=5).json()
        seen[body["worker"]] = body
    return seen


async def both_hold_clients(server: ServerProcess, total: int) -> dict[int, Any]:
    def check() -> dict[int, Any] | None:
        seen = per_worker(server)
        counts = [seen[i]["clients"] for i in (0, 1)]
        return seen if sum(counts) == total and min(counts) > 0 else None

    result: dict[int, Any] = await eventually(check, timeout=10, interval=0.1,
                                              what=f"{total} streams held by both workers")
    return result


def test_workers_setting() -> None:
    assert Settings().workers == 1
    assert Settings.from_env({"WORKERS": "auto"}).workers == usable_cores()
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    assert Settings.from_env({"WORKERS": "3"}).workers == 3
    for bad in ("0", "-1", "many", ""):
        with pytest.raises(ConfigError, match="WORKERS"):
            Settings.from_env({"WORKERS": bad})


@pytest.mark.parametrize("cpu_max,cap", [("max 100000\n", None), ("150000 100000\n", 2),
                                         ("50000 100000\n", 1)])
def test_auto_workers_follow_a_cgroup_cpu_quota(tmp_path: Path, cpu_max: str,
                                               cap: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    cores = len(os.sched_getaffinity(0))
    assert usable_cores(path) == (cores if cap is None else min(cores, cap))


async def test_two_workers_deliver_every_event_exactly_once(start_two: Start,
                                                           conn: asyncpg.Connection) -> None:
    server = start_two()
    pids = {body["pid"] for body in per_worker(server).values()}
    assert len(pids) == 2, "two processes answer on one port"
    clients, events = 40, 120
    start = await head(conn)
    tasks = [await open_stream(server.url + "/events", params={"topic": "spread"}, timeout=30,
                               until=lambda s: len(s.events) >= events) for _ in range(clients)]
    await both_hold_clients(server, clients)
    for batch in range(0, events, 10):  # some transactions of several events
        async with conn.transaction():
            await publish(conn, "spread", 10, start=batch)
    streams = await asyncio.gather(*tasks)
    for stream in streams:
        assert [int(e.id or 0) for e in stream.events] == list(range(start + 1, start + events + 1))
        assert [e.json()["i"] for e in stream.events] == list(range(events))


async def test_a_resume_lands_on_either_worker_without_a_gap(start_two: Start,
                                                             conn: asyncpg.Connection) -> None:
    server = start_two()
    start = await head(conn)
    await publish(conn, "again", 30)
    end = await wait_head(conn, start + 30)
    assert end == start + 30
    # Each worker must have read them, or a resume finds nothing to replay and goes live.
    await eventually(lambda: all(w["position"] >= end for w in per_worker(server).values()),
                     timeout=10, interval=0.05, what="both workers at the head")
    rng = random.Random(7)
    for _ in range(16):  # 16 fresh connections: both workers serve resumes (p ≈ 1 - 2^-15)
        after = start + rng.randrange(0, 30)
        got = await read_sse(server.url + "/events", timeout=10,
                             params={"topic": "again"}, headers={"Last-Event-ID": str(after)},
                             until=lambda s, a=after: len(s.events) >= end - a)
        assert [int(e.id or 0) for e in got.events] == list(range(after + 1, end + 1))
    text = httpx.get(server.url + "/metrics", timeout=5).text
    by_worker = {w: sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                        if line.startswith("pgsse_replays_total{") and f'worker="{w}"' in line)
                 for w in ("0", "1")}
    assert sum(by_worker.values()) == 16 and min(by_worker.values()) > 0, by_worker


async def test_sigterm_drains_both_workers_and_the_group_exits(start_two: Start) -> None:
    server = start_two()
    assert server.proc is not None
    clients = 24
    tasks = [await open_stream(server.url + "/events", params={"topic": "t"}, timeout=20)
             for _ in range(clients)]
    seen = await both_hold_clients(server, clients)
    pids = [seen[0]["pid"], seen[1]["pid"]]
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    streams = await asyncio.gather(*tasks)
    assert time.monotonic() - began < 4
    for stream in streams:
        # Drained, not cut: each stream ends with the short jittered retry: of a shutdown.
        assert stream.ended and stream.error is None
        assert len(stream.retries) == 2 and stream.retries[1] <= 3000
    assert await asyncio.to_thread(server.proc.wait, 15) in (0, -signal.SIGTERM)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz", timeout=2)


async def test_a_worker_that_dies_is_started_again(start_two: Start,
                                                   conn: asyncpg.Connection) -> None:
    server = start_two()
    seen = per_worker(server)
    victim = seen[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = per_worker(server)
        return now[0]["pid"] != victim and now[1]["pid"] == seen[1]["pid"]

    await eventually(replaced, timeout=30, interval=0.2, what="worker 0 started again")
    await asyncio.to_thread(server.wait_ready, 30)
    await asyncio.to_thread(both_live, server)
    # Both serve streams again: events reach clients on the new worker too.
    start = await head(conn)
    tasks = [await open_stream(server.url + "/events", params={"topic": "back"}, timeout=20,
                               until=lambda s: len(s.events) >= 5) for _ in range(16)]
    await both_hold_clients(server, 16)
    await publish(conn, "back", 5)
    for stream in await asyncio.gather(*tasks):
        assert [int(e.id or 0) for e in stream.events] == list(range(start + 1, start + 6))


async def test_one_prometheus_scrape_sees_every_worker(start_two: Start, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    promtool = require_tool("promtool")
    server = start_two()
    text = httpx.get(server.url + "/metrics", timeout=5).text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: pgsse\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expr: str) -> list[Any]:
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                 params={"query": expr}, timeout=2)
            return list(response.json()["data"]["result"])
        except (httpx.HTTPError, KeyError, ValueError):
            return []

    try:
        feed = await eventually(lambda: query("pgsse_feed_up") if len(query("pgsse_feed_up")) == 2
                                else None, timeout=30, interval=0.5,
                                what="pgsse_feed_up from both workers in Prometheus")
        assert sorted(r["metric"]["worker"] for r in feed) == ["0", "1"]
        assert all(r["value"][1] == "1" for r in feed)
        up = query("sum(pgsse_worker_up)")
        assert up and up[0]["value"][1] == "2"
        leaders = query("sum(pgsse_sequencer_leader)")
        assert leaders and leaders[0]["value"][1] == "1", "one sequencer for the group"
    finally:
        proc.terminate()
        proc.wait(10)


# --- the loss tests, with two workers ------------------------------------------------------

@pytest.mark.timeout(240)
async def test_concurrent_writers_exactly_once_with_two_workers(
        start_two: Start, conn: asyncpg.Connection, database: str) -> None:
    await test_stream.test_concurrent_writers_exactly_once_in_commit_order(
        start_two(), conn, database)


@pytest.mark.timeout(240)
async def test_nothing_lost_while_feed_backends_are_killed_with_two_workers(
        start_two: Start, conn: asyncpg.Connection, database: str) -> None:
    await test_stream.test_nothing_lost_while_feed_backends_are_killed(start_two(), conn, database)


async def test_slow_client_is_dropped_and_loses_nothing_with_two_workers(
        start_two: Start, conn: asyncpg.Connection) -> None:
    await test_stream.test_slow_client_is_dropped_and_loses_nothing(start_two, conn)


async def test_the_demo_with_two_workers_installs_once_and_writes(start_two: Start,
                                                                  conn: asyncpg.Connection) -> None:
    # make run: DEMO=1 and WORKERS=auto; both workers install the demo schema at once.
    server = start_two({"DEMO": "1", "DEMO_RATE": "40"})
    for body in per_worker(server).values():
        assert body["worker"] in (0, 1)
    start = await head(conn)
    await wait_head(conn, start + 20, timeout=20)  # the workers' writers keep it moving
    assert httpx.get(server.url + "/", timeout=5).status_code == 200
