"""Dashboards: what N open dashboards cost the database, polling vs pgsse.

Each simulated dashboard shows the demo's five aggregates for one store (dashboard ``i``
shows store ``1 + i % 3``) while the demo writer changes the data at ``DEMO_RATE``:

- ``poll``: every 5 s it fetches all five again, no ``If-None-Match`` (what the seed teams'
  dashboards did; the first poll at a random offset within the period, as real tabs open);
- ``pgsse``: it fetches all five once, then holds one ``/events`` stream subscribed to the
  five ``aggregates/<name>`` topics and refetches one, with ``If-None-Match``, on its
  ``aggregate.invalidated``.

Measured per case: database statements (``pg_stat_statements`` calls, all of them, and the
aggregate ones alone, when the extension is loaded; else only the server's own count of the
aggregate queries it ran), database CPU (utime+stime of the PostgreSQL processes from
``/proc``, when given), HTTP requests and bytes received, and staleness: for every change to
``demo.orders`` (position and ``ts`` from an observer stream on ``orders``), the time from
the change until a sampled dashboard holds an ``orders_by_status`` answer whose
``meta.position`` covers it. The raw HTTP client is here (keep-alive, one connection per
dashboard for fetches and one for its stream) so that 1,000 dashboards fit on one core.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

AGGREGATES = ("orders_by_status", "daily_sales", "top_products", "recent_orders",
              "payout_summary")
STALENESS_AGGREGATE = "orders_by_status"
POLL_SECONDS = 5.0


@dataclass
class Counters:
    requests: int = 0
    not_modified: int = 0
    bytes: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: GET, read one response (length or chunked)."""

    def __init__(self, port: int, counters: Counters) -> None:
        self.port = port
        self.counters = counters
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):  # one reconnect: the server may close an idle keep-alive
            try:
                if self.writer is None or self.writer.is_closing():
                    self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
                extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
                assert self.reader is not None
                return await self._response(self.reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0][9:12])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        size = len(head)
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            for _ in range(1_000_000):
                line = await reader.readuntil(b"\r\n")
                n = int(line.split(b";")[0], 16)
                chunk = await reader.readexactly(n + 2)
                size += len(line) + n + 2
                if n == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        self.counters.requests += 1
        self.counters.bytes += size + len(body)
        self.counters.statuses[status] = self.counters.statuses.get(status, 0) + 1
        if status == 304:
            self.counters.not_modified += 1
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = self.reader = None


async def sse_lines(port: int, path: str, on_event: Callable[[str, str, str], None],
                    ready: asyncio.Event, stop: asyncio.Event, counters: Counters) -> None:
    """Follow one SSE stream until ``stop``; ``on_event(id, type, data)`` per event."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        counters.bytes += len(head)
        if head[9:12] != b"200":
            raise RuntimeError(f"stream answered {head[:40]!r}")
        chunked = b"chunked" in head.lower()
        ready.set()
        fields: dict[str, str] = {}
        buffer = raw = b""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                read = asyncio.ensure_future(reader.read(65536))
                await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    break
                data = read.result()
                if not data:
                    break
                counters.bytes += len(data)
                if chunked:
                    raw += data
                    data, raw = _dechunk(raw)
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.rstrip(b"\r").decode()
                    if not line:
                        if "data" in fields:
                            on_event(fields.get("id", ""), fields.get("event", "message"),
                                     fields["data"])
                        fields = {}
                    elif ":" in line and not line.startswith(":"):
                        name, _, value = line.partition(":")
                        if name in ("id", "event", "data"):
                            fields[name] = value[1:] if value.startswith(" ") else value
        finally:
            stopping.cancel()
    finally:
        writer.close()


def _dechunk(raw: bytes) -> tuple[bytes, bytes]:
    """Complete chunks' payload out of ``raw`` (chunked transfer coding), and the rest."""
    out = bytearray()
    for _ in range(1_000_000):
        line_end = raw.find(b"\r\n")
        if line_end < 0:
            break
        size = int(raw[:line_end].split(b";")[0] or b"0", 16)
        if len(raw) < line_end + 2 + size + 2:
            break
        out += raw[line_end + 2:line_end + 2 + size]
        raw = raw[line_end + 2 + size + 2:]
    return bytes(out), raw


@dataclass
class Fetch:
    at: float
    position: int


class Dashboard:
    def __init__(self, index: int, port: int, events_port: int, mode: str, counters: Counters,
                 sample: bool) -> None:
        self.store = 1 + index % 3
        self.port = port
        self.events_port = events_port
        self.mode = mode
        self.counters = counters
        self.http = HttpConnection(port, counters)
        self.etags: dict[str, str] = {}
        self.sample = sample
        self.fetches: list[Fetch] = []  # of STALENESS_AGGREGATE, 200s only
        self.lock = asyncio.Lock()  # one request at a time on the keep-alive connection
        self.pending: set[str] = set()

    def path(self, name: str) -> str:
        return f"/aggregates/{name}?store_id={self.store}"

    async def fetch(self, name: str) -> None:
        headers = {}
        if self.mode == "pgsse" and name in self.etags:
            headers["If-None-Match"] = self.etags[name]
        async with self.lock:
            try:
                status, hdrs, body = await self.http.get(self.path(name), headers)
            except (OSError, asyncio.IncompleteReadError, ValueError, RuntimeError):
                self.counters.errors += 1
                return
        if status == 200:
            self.etags[name] = hdrs.get("etag", "")
            if self.sample and name == STALENESS_AGGREGATE:
                position = json.loads(body)["meta"]["position"]
                self.fetches.append(Fetch(time.time(), position))
        elif status != 304:
            self.counters.errors += 1

    async def run(self, stop: asyncio.Event, ready: asyncio.Event) -> None:
        try:
            if self.mode == "poll":
                ready.set()
                await _wait(stop, random.uniform(0, POLL_SECONDS))
                while not stop.is_set():
                    started = time.monotonic()
                    for name in AGGREGATES:
                        await self.fetch(name)
                    await _wait(stop, max(0.0, POLL_SECONDS - (time.monotonic() - started)))
            else:
                topics = "&".join(f"topic=aggregates/{n}" for n in AGGREGATES)
                wake = asyncio.Event()

                def on_event(_id: str, kind: str, data: str) -> None:
                    if kind == "aggregate.invalidated":
                        self.pending.add(json.loads(data)["aggregate"])
                        wake.set()

                stream_ready = asyncio.Event()
                stream = asyncio.create_task(sse_lines(self.events_port, f"/events?{topics}", on_event,
                                                       stream_ready, stop, self.counters))
                await asyncio.wait({stream, asyncio.ensure_future(stream_ready.wait())},
                                   return_when=asyncio.FIRST_COMPLETED)
                for name in AGGREGATES:  # after subscribing: nothing changes unseen
                    await self.fetch(name)
                ready.set()
                while not stop.is_set():
                    await _wait_event(stop, wake)
                    wake.clear()
                    names, self.pending = self.pending, set()
                    for name in names:
                        await self.fetch(name)
                await stream
        finally:
            ready.set()
            self.http.close()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def _wait_event(stop: asyncio.Event, wake: asyncio.Event) -> None:
    waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
    _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def staleness(changes: dict[int, float], dashboards: list[Dashboard], until: float
              ) -> dict[str, Any]:
    """Per sampled dashboard and change: first covering 200 − change time (seconds)."""
    samples: list[float] = []
    unseen = 0
    for board in dashboards:
        fetches = sorted(board.fetches, key=lambda f: f.at)
        for position, at in changes.items():
            if at > until:
                continue
            seen = next((f.at for f in fetches if f.position >= position and f.at >= at), None)
            if seen is None:
                unseen += 1
            else:
                samples.append(seen - at)
    samples.sort()

    def pct(q: float) -> float | None:
        if not samples:
            return None
        return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1000, 1)

    return {"samples": len(samples), "unseen_at_end": unseen, "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "max_ms": round(samples[-1] * 1000, 1) if samples else None}


async def aggregate_queries(port: int) -> float:
    """The server's own count of aggregate queries it ran (its metrics, every aggregate)."""
    http = HttpConnection(port, Counters())
    try:
        _, _, body = await http.get("/metrics", {})
    finally:
        http.close()
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("pgsse_aggregate_query_duration_seconds_count"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def run_case(port: int, mode: str, dashboards: int, seconds: float, *,
                   fetch_port: int | None = None, sample: int = 20, stats: Any = None,
                   db_cpu: Callable[[], float] | None = None, tail: float = POLL_SECONDS
                   ) -> dict[str, Any]:
    """One case. ``port``: a pgsse with the demo on (its writer makes the changes, its
    streams tell them); ``fetch_port``: where the dashboards fetch (default ``port``; the
    polling baseline for ``poll``); ``stats``: an asyncpg connection to the same database
    with pg_stat_statements, or None; ``db_cpu``: PostgreSQL's CPU seconds so far. Staleness
    counts the changes of the window but its last ``tail`` seconds (every change then had a
    poll period to be seen)."""
    counters = Counters()
    boards = [Dashboard(i, fetch_port or port, port, mode, counters, sample=i < sample)
              for i in range(dashboards)]
    changes: dict[int, float] = {}

    def on_change(event_id: str, _kind: str, data: str) -> None:
        if event_id.isdigit():
            changes[int(event_id)] = _ts(json.loads(data)["ts"])

    stop = asyncio.Event()
    observer_ready = asyncio.Event()
    observer = asyncio.create_task(sse_lines(port, "/events?topic=orders", on_change,
                                             observer_ready, stop, Counters()))
    await asyncio.wait_for(observer_ready.wait(), 30)
    readies = [asyncio.Event() for _ in boards]
    tasks = []
    for board, ready in zip(boards, readies, strict=True):
        tasks.append(asyncio.create_task(board.run(stop, ready)))
        if len(tasks) % 100 == 0:  # ramp: the listen backlog is finite
            await asyncio.sleep(0.05)
    for ready in readies:
        await asyncio.wait_for(ready.wait(), 60)
    # The measured window starts once every dashboard shows its first answers.
    for board in boards:
        board.fetches = board.fetches[-1:]
    start_counters = (counters.requests, counters.bytes, counters.not_modified, counters.errors)
    if stats is not None:
        await stats.execute("SELECT pg_stat_statements_reset()")
    queries_before = await aggregate_queries(port)  # pgsse's own (0 for the baseline)
    cpu_before = db_cpu() if db_cpu else None
    started_wall, started = time.time(), time.monotonic()
    await _wait(asyncio.Event(), seconds)
    elapsed = time.monotonic() - started
    ended_wall = time.time()
    cpu = (db_cpu() - cpu_before) if db_cpu and cpu_before is not None else None
    queries = await aggregate_queries(port) - queries_before
    statements = aggregate_statements = None
    if stats is not None:
        await asyncio.sleep(1.2)  # backends flush their statement counts at most once a second
        row = await stats.fetchrow(
            "SELECT coalesce(sum(calls), 0)::bigint AS total, coalesce(sum(calls) FILTER"
            " (WHERE query LIKE '%_pgsse_r%' OR query LIKE '%_pgsse_s%'), 0)::bigint AS agg"
            " FROM pg_stat_statements WHERE query NOT ILIKE '%pg_stat_statements%'")
        statements, aggregate_statements = int(row["total"]), int(row["agg"])
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(observer, return_exceptions=True)
    window = {k: v for k, v in changes.items() if started_wall <= v <= ended_wall - tail}
    requests = counters.requests - start_counters[0]
    return {
        "mode": mode, "dashboards": dashboards, "seconds": round(elapsed, 1),
        "changes": sum(1 for v in changes.values() if started_wall <= v <= ended_wall),
        "http_requests": requests,
        "http_requests_per_s": round(requests / elapsed, 1),
        "not_modified": counters.not_modified - start_counters[2],
        "bytes_received": counters.bytes - start_counters[1],
        "bytes_per_s": round((counters.bytes - start_counters[1]) / elapsed),
        "errors": counters.errors - start_counters[3],
        "statuses": counters.statuses,
        "aggregate_queries_by_server": int(queries),
        "aggregate_queries_per_s": round(queries / elapsed, 2),
        "db_statements": statements,
        "db_statements_per_s": round(statements / elapsed, 1) if statements is not None else None,
        "db_aggregate_statements": aggregate_statements,
        "db_cpu_seconds": round(cpu, 3) if cpu is not None else None,
        "db_cpu_percent": round(100 * cpu / elapsed, 1) if cpu is not None else None,
        "staleness": staleness(window, [b for b in boards if b.sample], ended_wall),
    }


async def suite(pg: Any, url: str, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Both modes × dashboard counts × writer rates, side by side in one run."""
    import asyncpg

    from . import infra

    counts = (20, 100) if quick else (100, 1000)
    rates = (5, 50)
    seconds = 12.0 if quick else 30.0
    out: dict[str, Any] = {"dashboards": list(counts), "rates": list(rates), "seconds": seconds,
                           "aggregates": list(AGGREGATES), "poll_seconds": POLL_SECONDS,
                           "staleness_of": STALENESS_AGGREGATE, "cases": []}
    stats = await asyncpg.connect(url, timeout=10)
    try:
        await stats.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        for rate in rates:
            port = infra.free_port()
            server = infra.pgsse_server(f"pgsse-dashboards-{rate}", url, port, DEMO="1",
                                        DEMO_RATE=str(rate),
                                        AGGREGATE_RATE_PER_SECOND="100000000").start()
            base_port = infra.free_port()
            env = dict(os.environ, DATABASE_URL=url, PORT=str(base_port))
            baseline = infra.Server(f"baseline-dashboards-{rate}",
                                    [sys.executable, "-m", "bench.dashboards_baseline"],
                                    env, base_port, "/healthz").start()
            try:
                await server.wait_ready()
                await baseline.wait_ready()
                for n in counts:
                    for mode in ("poll", "pgsse"):
                        log(f"  dashboards: {mode}, {n} dashboards, {rate} changes/s")
                        case = await run_case(port, mode, n, seconds, stats=stats, db_cpu=pg.cpu,
                                              fetch_port=base_port if mode == "poll" else None)
                        case["rate"] = rate
                        out["cases"].append(case)
                        log(f"    {case['db_statements_per_s']} statements/s, "
                            f"{case['http_requests_per_s']} req/s, staleness p50 "
                            f"{case['staleness']['p50_ms']} ms")
            finally:
                server.stop()
                baseline.stop()
    finally:
        await stats.close()
    return out


def table(result: dict[str, Any]) -> str:
    rows = ["| changes/s | dashboards | mode | DB statements/s | DB CPU % | HTTP req/s | "
            "KB/s received | staleness p50 / p99 |", "|---|---|---|---|---|---|---|---|"]
    for c in result.get("cases", []):
        s = c["staleness"]
        rows.append(f"| {c['rate']} | {c['dashboards']} | {c['mode']} | {c['db_statements_per_s']} "
                    f"| {c['db_cpu_percent']} | {c['http_requests_per_s']} "
                    f"| {round(c['bytes_per_s'] / 1024, 1)} | {s['p50_ms']} / {s['p99_ms']} ms |")
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result.get("cases", [])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = sorted({(c["rate"], c["dashboards"]) for c in cases})
    x = range(len(labels))
    for offset, mode in ((-0.2, "poll"), (0.2, "pgsse")):
        by = {(c["rate"], c["dashboards"]): c for c in cases if c["mode"] == mode}
        for ax, key in zip(axes, ("db_statements_per_s", "db_cpu_percent", "p50"), strict=True):
            values = [(by[k]["staleness"]["p50_ms"] if key == "p50" else by[k][key]) or 0
                      for k in labels if k in by]
            ax.bar([i + offset for i in x][:len(values)], values, width=0.4, label=mode)
    titles = ("database statements/s", "database CPU %", "staleness p50 (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r}/s\n{n} dash" for r, n in labels])
        ax.legend()
    fig.suptitle("Dashboards: polling every 5 s vs pgsse (ETag + aggregate.invalidated)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
