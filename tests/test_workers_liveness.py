"""``WORKERS=N`` liveness: a worker that stops answering (SIGSTOP stands for a hang) is killed
and replaced within ``WORKER_TIMEOUT``, and SIGTERM ends the group within
``SHUTDOWN_GRACE_SECONDS`` whatever a worker does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ServerProcess, eventually, metric
from tests.test_workers import both_live

Start = Callable[..., Any]


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def alive(pid: int) -> bool:
    """Running (not a zombie nor gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def workers_killed_after() -> Iterator[set[int]]:
    """Worker pids a test stopped: killed at the end whatever happened (no orphans left)."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_group(start_server: Start, env: dict[str, str]) -> tuple[ServerProcess, set[int]]:
    server: ServerProcess = start_server({"WORKERS": "2", **env})
    both_live(server)
    assert server.proc is not None
    workers = children(server.proc.pid)
    assert len(workers) == 2, workers
    return server, workers


async def test_a_stopped_worker_is_killed_and_replaced(
        start_server: Start, workers_killed_after: set[int]) -> None:
    timeout = 2.0
    server, workers = start_group(start_server, {"WORKER_TIMEOUT": f"{timeout}s"})
    assert server.proc is not None
    victim = min(workers)
    workers_killed_after.add(victim)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    await eventually(lambda: not alive(victim), timeout=timeout + 10, interval=0.1,
                     what="the stopped worker killed")
    assert time.monotonic() - stopped_at < timeout + 10

    def replaced() -> bool:
        now = children(server.proc.pid)  # type: ignore[union-attr]
        return len(now) == 2 and victim not in now

    await eventually(replaced, timeout=10, what="a new worker in its place")
    await asyncio.to_thread(both_live, server)
    assert '"worker_hung"' in server.logs()
    # Counted, and every scrape answers (whichever worker it reaches).
    for _ in range(6):
        text = httpx.get(server.url + "/metrics", timeout=5).text
        assert 'pgsse_worker_replaced_total{reason="hung"} 1.0' in text, text[-1500:]
    assert metric(server, "pgsse_worker_up") == 2


async def test_sigterm_with_a_stopped_worker_ends_the_group_within_the_grace(
        start_server: Start, workers_killed_after: set[int]) -> None:
    grace = 3.0
    # WORKER_TIMEOUT far above the grace: the shutdown itself must end the stopped worker.
    server, workers = start_group(start_server, {"SHUTDOWN_GRACE_SECONDS": f"{grace}s",
                                                 "WORKER_TIMEOUT": "10m"})
    assert server.proc is not None
    workers_killed_after.update(workers)
    victim = min(workers)
    os.kill(victim, signal.SIGSTOP)
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    def ended() -> bool:
        return server.proc.poll() is not None  # type: ignore[union-attr]

    await eventually(ended, timeout=grace + 8, interval=0.1, what="the supervisor exited")
    assert time.monotonic() - began < grace + 8
    await eventually(lambda: not any(alive(pid) for pid in workers), timeout=2,
                     what="no worker left")
    assert '"workers_killed"' in server.logs()


async def test_metrics_answer_without_a_stopped_sibling(
        start_server: Start, workers_killed_after: set[int]) -> None:
    # Replacement off (10 min): the live worker's scrapes must not wait on the stopped one
    # longer than the sibling timeout (metrics.SIBLING_TIMEOUT, 2 s).
    server, workers = start_group(start_server, {"WORKER_TIMEOUT": "10m"})
    victim = min(workers)
    workers_killed_after.add(victim)
    os.kill(victim, signal.SIGSTOP)
    answered = []
    for _ in range(20):  # a scrape the kernel hands the stopped worker waits: try again
        began = time.monotonic()
        try:
            text = httpx.get(server.url + "/metrics", timeout=6).text
        except httpx.TimeoutException:
            continue
        answered.append(time.monotonic() - began)
        ups = sorted(line.rsplit(" ", 1)[1] for line in text.splitlines()
                     if line.startswith("pgsse_worker_up{"))
        assert ups == ["0.0", "1.0"], ups
        if len(answered) == 3:
            break
    assert len(answered) == 3, "the live worker never answered a scrape"
    assert max(answered) < 5, answered
