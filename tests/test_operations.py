"""Operations: configuration errors, health, metrics, logs, request ids, rolling restarts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from tests.support import ROOT, eventually, log_records, open_stream, read_sse_resuming, stats

Start = Callable[..., Any]


def test_bad_configuration_stops_startup_naming_every_variable() -> None:
    env = {**os.environ, "PORT": "abc", "AUTH_SECRET": "", "HEARTBEAT_SECONDS": "-1",
           "HISTORY_RETENTION": "forever", "LOG_FORMAT": "xml"}
    result = subprocess.run([sys.executable, "-m", "pgsse", "serve"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for name in ("PORT", "AUTH_SECRET", "HEARTBEAT_SECONDS", "HISTORY_RETENTION", "LOG_FORMAT"):
        assert name in lines[0]


def test_help_on_every_command() -> None:
    for command in ("serve", "migrate", "demo", "token"):
        result = subprocess.run([sys.executable, "-m", "pgsse", command, "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "usage:" in result.stdout


async def test_database_down_at_startup_is_retried(start_server: Start, pg_url: str,
                                                   template_url: str) -> None:
    parts = urlsplit(pg_url)
    name = f"late_{os.getpid()}_{int(time.time() * 1000) % 100000}"
    late_url = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
    server = start_server(url=late_url, wait_ready=False)
    deadline = time.monotonic() + 15
    while True:
        try:
            health = httpx.get(server.url + "/healthz", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert health.status_code == 200
    ready = httpx.get(server.url + "/readyz", timeout=3)
    assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE pgsse_template')
    finally:
        await conn.close()
    try:
        await asyncio.to_thread(server.wait_ready, 20)
        body = httpx.get(server.url + "/readyz").json()
        assert body["status"] == "ready" and body["warnings"] == ["auth_disabled"]
    finally:
        server.stop()
        conn = await asyncpg.connect(pg_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def test_request_id_is_echoed_or_generated_and_logs_are_json(server: Any) -> None:
    given = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = httpx.get(server.url + "/healthz?access_token=supersecrettoken")
    generated = made.headers["x-request-id"]
    assert len(generated) >= 16 and generated != given.headers["x-request-id"]
    # The anchor: the very request that carried the token is logged...
    secret_line = await eventually(lambda: next(
        (r for r in log_records(server) if r.get("request_id") == generated), None),
        what="the access line of the request with a token")
    assert secret_line["event"] == "http_request" and secret_line["route"] == "/healthz"
    assert secret_line["query"] == "access_token=[redacted]"
    records = log_records(server)
    assert records and all("event" in r for r in records)
    access = [r for r in records if r["event"] == "http_request"]
    assert any(r["request_id"] == "abc-123" and r["route"] == "/healthz" for r in access)
    # ...without the token.
    assert "supersecrettoken" not in server.logs()


def test_unknown_route_and_method_get_json_errors(server: Any) -> None:
    missing = httpx.get(server.url + "/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.post(server.url + "/events?topic=a")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


async def test_metrics_pass_promtool_and_name_route_templates(server: Any,
                                                              conn: asyncpg.Connection) -> None:
    from tests.tools import require_tool

    promtool = require_tool("promtool")
    task = await open_stream(server.url + "/events", resuming=True, params={"topic": "m"},
                             until=lambda s: len(s.events) >= 3, timeout=10)
    for i in range(3):
        await conn.execute("SELECT realtime.publish('m/1', 'tick', jsonb_build_object('i', $1::int))", i)
    stream, _ = await task
    assert len(stream.events) == 3
    httpx.get(server.url + "/nope/123")
    text = httpx.get(server.url + "/metrics").text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("pgsse_connected_clients", "pgsse_events_read_total", "pgsse_events_delivered_total",
                 "pgsse_delivery_latency_seconds_bucket", "pgsse_feed_up", "pgsse_feed_reconnects_total",
                 "pgsse_feed_lag_positions", "pgsse_slow_clients_dropped_total",
                 "pgsse_http_requests_total"):
        assert name in text, name
    delivered = [line for line in text.splitlines() if line.startswith("pgsse_events_delivered_total")]
    assert float(delivered[0].split()[-1]) >= 3
    assert 'route="unmatched"' in text and "/nope/123" not in text


async def test_rolling_restart_of_one_replica_loses_nothing(start_server: Start,
                                                            conn: asyncpg.Connection) -> None:
    """Two replicas on one database; one restarts while clients stream and a writer writes.
    Clients of the stopped replica reconnect to the other (as behind a load balancer) with
    their last id; every client ends with every event once, in order."""
    replicas = [start_server(), start_server()]
    start = int(await conn.fetchval("SELECT last_position FROM realtime.sequencer"))
    total = 400
    written = 0

    async def client(index: int) -> list[int]:
        got: list[int] = []
        last = str(start)
        turn = index
        deadline = time.monotonic() + 60
        while len(got) < total and time.monotonic() < deadline:
            replica = replicas[turn % 2]
            turn += 1
            try:
                stream, _ = await read_sse_resuming(
                    replica.url + "/events", params={"topic": "roll"}, last_id=last, timeout=3,
                    until=lambda s: len(got) + len(s.events) >= total)
            except Exception:
                await asyncio.sleep(0.1)
                continue
            got.extend(e.json()["i"] for e in stream.events if e.event == "tick")
            last = stream.last_id or last
        return got

    async def writer() -> None:
        nonlocal written
        for i in range(total):
            await conn.execute("SELECT realtime.publish('roll', 'tick', jsonb_build_object('i', $1::int))", i)
            written = i + 1
            await asyncio.sleep(0.01)  # pacing: the restart happens mid-stream

    clients = [asyncio.create_task(client(i)) for i in range(6)]
    writing = asyncio.create_task(writer())
    # Restart while every client streams and a good part of the events is still to come.
    await eventually(lambda: sum(stats(r)["clients"] for r in replicas) >= 6 and written >= 50,
                     what="six clients streaming")
    assert written < total * 3 // 4, "the writer outran the set-up: the restart would come too late"
    stopped_at = time.monotonic()
    code = await asyncio.to_thread(replicas[0].stop)
    assert time.monotonic() - stopped_at < 5, "drains well within the grace period"
    assert code in (0, -15)
    replicas[0] = start_server()
    await writing
    results = await asyncio.gather(*clients)
    for got in results:
        assert got == list(range(total))
