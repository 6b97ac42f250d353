"""Read replicas, side by side in one run (``python -m bench.replicas``; also ``make bench``):

1. commit → client latency (p50/p99) for a client of a standby-reading pgsse
   (``READ_DATABASE_URL``, default ``READ_POLL_INTERVAL``) and of a primary-reading one, both
   running at once on the same writes; replication lag included.
2. the primary's statements per second (``pg_stat_statements``, every statement of the
   database, nested ones included, the writer's INSERTs excluded) with 1, 2 and 4 pgsse
   replicas reading the primary vs reading the standby, each replica with one stream and an
   aggregate poll, under the same write rate; and how many of those are feed, history or
   aggregate statements.

The primary + hot standby pair is built from the embedded PostgreSQL's binaries
(``tests/replication.py``) under .data/bench/replicas. Results: bench/results/replicas.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from typing import Any

import asyncpg
import httpx

from . import infra

WRITE_RATE = 100          # transactions per second, one INSERT each
LATENCY_SECONDS = 10
STATEMENT_SECONDS = 6
REPLICA_COUNTS = (1, 2, 4)
READ_MARKS = ("payload_v3", "pgsse_reader", "SELECT last_position, pruned_through",
              "SELECT tbl, position FROM realtime.table_versions")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def write(url: str, seconds: float, rate: int, stop_at: list[int]) -> int:
    """Autocommit INSERTs at ``rate``/s; each row carries the wall clock sent at."""
    conn = await asyncpg.connect(url)
    sent = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            await conn.execute("INSERT INTO bench_items (sent_at) VALUES ($1)", time.time())
            sent += 1
            delay = started + sent / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await conn.close()
    stop_at.append(sent)
    return sent


async def receive(port: int, latencies: list[float], ready: asyncio.Event,
                  done: asyncio.Event) -> None:
    """One SSE client: receipt time − the row's ``sent_at`` for every insert."""
    async with httpx.AsyncClient(timeout=None) as client, client.stream(
            "GET", f"http://127.0.0.1:{port}/events", params={"topic": "bench_items"}) as response:
        buffer = ""
        async for chunk in response.aiter_text():
            now = time.time()
            ready.set()
            buffer += chunk
            *frames, buffer = buffer.split("\n\n")
            for frame in frames:
                for line in frame.split("\n"):
                    if line.startswith("data: "):
                        row = json.loads(line[6:]).get("row") or {}
                        if "sent_at" in row:
                            latencies.append((now - row["sent_at"]) * 1000.0)
            if done.is_set():
                return


async def poll_aggregate(port: int, done: asyncio.Event) -> int:
    count = 0
    async with httpx.AsyncClient(timeout=10) as client:
        while not done.is_set():
            await client.get(f"http://127.0.0.1:{port}/aggregates/event_types")
            count += 1
            await asyncio.sleep(0.1)
    return count


async def start_servers(specs: list[tuple[str, str, str | None]]) -> list[infra.Server]:
    servers = []
    for name, url, read_url in specs:
        extra = {"READ_DATABASE_URL": read_url} if read_url else {}
        servers.append(infra.pgsse_server(name, url, infra.free_port(), **extra).start())
    await asyncio.gather(*(s.wait_ready() for s in servers))
    return servers


def stop_servers(servers: list[infra.Server]) -> None:
    for server in servers:
        server.stop()


async def latency(primary: str, standby: str) -> dict[str, Any]:
    servers = await start_servers([("replica-primary-reading", primary, None),
                                   ("replica-standby-reading", primary, standby)])
    try:
        done = asyncio.Event()
        results: dict[str, list[float]] = {"primary_reading": [], "standby_reading": []}
        readies = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(receive(s.port, results[k], r, done))
                 for s, k, r in zip(servers, results, readies, strict=True)]
        await asyncio.sleep(1.0)
        sent: list[int] = []
        await write(primary, LATENCY_SECONDS, WRITE_RATE, sent)
        deadline = time.monotonic() + 10
        while (time.monotonic() < deadline
               and min(len(v) for v in results.values()) < sent[0]):
            await asyncio.sleep(0.05)
        done.set()
        for task in tasks:
            task.cancel()
        out: dict[str, Any] = {"sent": sent[0], "write_rate": WRITE_RATE}
        for key, values in results.items():
            out[key] = {"received": len(values), "p50_ms": _r(percentile(values, 0.5)),
                        "p99_ms": _r(percentile(values, 0.99))}
        p50s = (out["standby_reading"]["p50_ms"], out["primary_reading"]["p50_ms"])
        out["p50_ratio_standby_vs_primary"] = _r(p50s[0] / p50s[1]) if all(p50s) else None
        return out
    finally:
        stop_servers(servers)


async def statements(primary: str, standby: str, count: int, reading: str) -> dict[str, Any]:
    read_url = standby if reading == "standby" else None
    servers = await start_servers([(f"replica-{reading}-{i}", primary, read_url)
                                   for i in range(count)])
    try:
        done = asyncio.Event()
        sinks: list[list[float]] = [[] for _ in servers]
        readies = [asyncio.Event() for _ in servers]
        tasks = [asyncio.create_task(receive(s.port, sink, r, done))
                 for s, sink, r in zip(servers, sinks, readies, strict=True)]
        polls = [asyncio.create_task(poll_aggregate(s.port, done)) for s in servers]
        await asyncio.sleep(1.0)
        conn = await asyncpg.connect(primary)
        try:
            await conn.execute("SELECT pg_stat_statements_reset()")
            started = time.monotonic()
            await write(primary, STATEMENT_SECONDS, WRITE_RATE, [])
            elapsed = time.monotonic() - started
            rows = await conn.fetch(
                "SELECT query, calls FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())")
        finally:
            await conn.close()
        done.set()
        for task in tasks:
            task.cancel()
        aggregate_requests = sum(await asyncio.gather(*polls))
        # The writer's own work (its INSERT and the capture trigger's) is the same in every
        # configuration: left out.
        counted = [(r["query"], r["calls"]) for r in rows
                   if not any(mark in r["query"] for mark in
                              ("bench_items", "pg_stat_statements", "TG_TABLE"))]
        reads = sum(calls for query, calls in counted if any(m in query for m in READ_MARKS))
        top = sorted(counted, key=lambda qc: -qc[1])[:6]
        return {"replicas": count, "reading": reading, "seconds": round(elapsed, 2),
                "statements_per_s": _r(sum(c for _, c in counted) / elapsed),
                "feed_history_aggregate_statements_per_s": _r(reads / elapsed),
                "events_received": [len(s) for s in sinks],
                "aggregate_requests": aggregate_requests,
                "top": [{"query": q[:90], "calls": c} for q, c in top]}
    finally:
        stop_servers(servers)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def prepare(url: str) -> None:
    from pgsse import db

    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        await conn.execute("CREATE TABLE bench_items (id bigserial PRIMARY KEY, "
                           "sent_at float8 NOT NULL)")
        await conn.execute("SELECT realtime.watch('bench_items')")
    finally:
        await conn.close()


async def run() -> dict[str, Any]:
    from tests.replication import build_pair

    base = infra.DATA / "replicas"
    shutil.rmtree(base, ignore_errors=True)
    log("replicas: building a primary + hot standby pair …")
    pair = await asyncio.to_thread(build_pair, base)
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "write_rate": WRITE_RATE,
                           "read_poll_interval": "20ms (default)"}
    try:
        primary, standby = pair.primary.url(), pair.standby.url()
        await prepare(primary)
        log("replicas: commit → client latency, standby-reading vs primary-reading")
        out["latency"] = await latency(primary, standby)
        log(f"  {out['latency']}")
        out["primary_statements"] = []
        for count in REPLICA_COUNTS:
            for reading in ("primary", "standby"):
                log(f"replicas: primary statements/s, {count} replica(s) reading the {reading}")
                result = await statements(primary, standby, count, reading)
                log(f"  {result['statements_per_s']}/s, feed/history/aggregate "
                    f"{result['feed_history_aggregate_statements_per_s']}/s")
                out["primary_statements"].append(result)
    finally:
        await asyncio.to_thread(pair.stop)
        shutil.rmtree(base, ignore_errors=True)
    return out


def table(out: dict[str, Any]) -> str:
    lat = out["latency"]
    lines = [f"read replicas ({out['cpu_count']} cores, {lat['write_rate']} tx/s, "
             f"READ_POLL_INTERVAL {out['read_poll_interval']})",
             "  commit → client     p50 ms   p99 ms",
             f"  primary-reading  {lat['primary_reading']['p50_ms']:>9} "
             f"{lat['primary_reading']['p99_ms']:>8}",
             f"  standby-reading  {lat['standby_reading']['p50_ms']:>9} "
             f"{lat['standby_reading']['p99_ms']:>8}",
             f"  p50 ratio standby/primary: {lat['p50_ratio_standby_vs_primary']} (target ≤ 1.5)",
             "  primary statements/s   replicas  reading the primary  reading the standby"]
    by = {(r["replicas"], r["reading"]): r for r in out["primary_statements"]}
    for count in REPLICA_COUNTS:
        p, s = by[(count, "primary")], by[(count, "standby")]
        lines.append(f"  {'':20}{count:>8}  {p['statements_per_s']:>8} "
                     f"({p['feed_history_aggregate_statements_per_s']} reads)"
                     f"  {s['statements_per_s']:>8} "
                     f"({s['feed_history_aggregate_statements_per_s']} reads)")
    return "\n".join(lines)


def main() -> int:
    infra.pin_self(infra.CLIENT_CORE)
    out = asyncio.run(run())
    infra.RESULTS.mkdir(parents=True, exist_ok=True)
    path = infra.RESULTS / "replicas.json"
    path.write_text(json.dumps(out, indent=2))
    print(table(out))
    print(f"\nreport: {path.relative_to(infra.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
