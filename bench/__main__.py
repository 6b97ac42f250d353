"""``make bench`` / ``python -m bench [--quick] [--profile] [--only …]``.

Starts a dedicated embedded PostgreSQL under .data/bench (pinned to core 1 with this load
client), creates a fresh database, and runs, each against pgsse and a baseline
(broadcaster + sse-starlette, ``bench/baseline_app.py``) side by side:

1. idle connections (RSS per connection), 2. fan-out 1 event → N clients (server CPU per
delivery, p50/p99), 3. commit → client latency at 200 tx/s, 4. aggregate requests/s and
queries per change, 5. writer cost (pgbench, watched vs unwatched table), 6. dashboards: N dashboards of five
aggregates polling every 5 s (against a backend that queries per request) vs on pgsse, database
statements/s and CPU, HTTP requests and bytes, staleness (``bench/dashboards.py``).

Streams run against pgsse with WORKERS=1 and WORKERS=2, nginx + nchan (Debian ``nginx`` +
``libnginx-mod-nchan``; skipped with the reason when missing) and the tutorial baseline;
aggregates against a bare Starlette route answering 304 on the same uvicorn
(``bench/bare304.py``). The ratios (fan-out CPU per delivery and idle RSS ÷ nchan; 304 and
cached 200 ÷ the bare 304) are printed and kept under ``ratios`` in the report.

Servers run pinned to core 0 (``taskset -c 0`` equivalent), one at a time. Results:
bench/results/report.json and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from . import dashboards, infra, mercure, replicas, report, scenarios
from .loadclient import install_uvloop

ALL = ("streams", "aggregates", "writer", "replicas", "dashboards", "mercure")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_plan(args: argparse.Namespace) -> scenarios.Plan:
    if args.quick:
        ns = (500, 1000, 2000)
        events = {500: 10, 1000: 8, 2000: 5}
        plan = scenarios.Plan(
            quick=True, profile=args.profile, ns=ns, events_per_n=events, commit_clients=500,
            commit_rate=200, commit_seconds=3, agg_seconds=2, agg_concurrency=16,
            poll_requests=2000, poll_rate=1000, pgbench_seconds=3, budget_s=6 * 60)
    else:
        ns = (1000, 5000, 10000)
        events = {1000: 40, 5000: 12, 10000: 8}
        plan = scenarios.Plan(
            quick=False, profile=args.profile, ns=ns, events_per_n=events, commit_clients=1000,
            commit_rate=200, commit_seconds=10, agg_seconds=5, agg_concurrency=16,
            poll_requests=10_000, poll_rate=1000, pgbench_seconds=10, budget_s=14 * 60)
    if args.ns:
        plan.ns = tuple(int(x) for x in args.ns.split(","))
        plan.events_per_n = {n: max(3, min(40, 40_000 // n)) for n in plan.ns}
        plan.commit_clients = min(plan.commit_clients, max(plan.ns))
    return plan


async def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    only = set(args.only.split(",")) if args.only else set(ALL)
    infra.RESULTS.mkdir(parents=True, exist_ok=True)
    nofile = infra.raise_nofile()
    infra.pin_self(infra.CLIENT_CORE)  # `taskset -c 1` for the load client (and what it spawns)
    meta: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "event_loop": type(asyncio.get_running_loop()).__module__,
        "quick": plan.quick,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pinning": {"server_core": infra.SERVER_CORE, "client_core": infra.CLIENT_CORE,
                    "postgres_core": infra.CLIENT_CORE},
        "open_file_limit": nofile,
        "versions": scenarios.versions(),
        "settings": {
            "pgsse": "HEARTBEAT_SECONDS=600 MAX_CONNECTIONS=20000 MAX_CONNECTIONS_PER_CLIENT=20000 LOG_LEVEL=warning",
            "baseline": "sse-starlette ping=600 s, dict events (the documented pattern), broadcaster Postgres backend",
            "heartbeats": "off in both during measurements (they are not fan-out work)",
        },
        "definitions": {
            "cpu_per_delivery": "server process utime+stime (/proc/<pid>/stat) over the whole round "
                                "(publish → last client receipt, events sent one after another) / deliveries; "
                                "the _schedstat figure uses /proc/<pid>/task/*/schedstat (ns resolution)",
            "fanout_latency": "client receipt time − wall clock just before the publishing statement "
                              "(realtime.publish for pgsse, pg_notify for the baseline)",
            "commit_latency": "client receipt time − wall clock when the writer sent its single-statement "
                              "autocommit INSERT (so it includes the commit itself)",
            "rss_per_connection": "(server VmRSS with N idle streams − VmRSS before any) / N",
            "percentiles": "over all expected deliveries; a delivery that never arrived counts as infinite "
                           "(p99 null = more than 1 % never arrived within the wait)",
        },
        "plan": {k: v for k, v in plan.__dict__.items() if k != "started"},
    }
    out: dict[str, Any] = {"meta": meta, "targets": [], "scenarios": {}}
    pg = infra.Postgres(log)
    started = time.monotonic()
    try:
        log("starting embedded PostgreSQL under .data/bench …")
        uri = await asyncio.to_thread(pg.start)
        meta["postgres"] = pg.version(uri)
        url = await setup_database(uri)
        meta["database"] = url.rsplit("/", 1)[1].split("?")[0]
        if "streams" in only:
            streams: dict[str, Any] = {}
            for kind in args.kinds.split(","):
                log(f"streams: {kind}")
                port = infra.free_port()
                if kind == "nchan" and infra.nchan_missing():
                    streams[kind] = {"skipped": infra.nchan_missing()}
                    log(f"  nchan skipped: {infra.nchan_missing()}")
                    continue
                server = stream_server(kind, url, port).start()
                try:
                    streams[kind] = await scenarios.stream_suite(kind, server, url, plan, log)
                except Exception as exc:
                    streams[kind] = {"error": repr(exc), "trace": traceback.format_exc()[-2000:]}
                    log(f"  {kind} failed: {exc!r}")
                finally:
                    streams.setdefault(kind, {})["server_exit"] = await asyncio.to_thread(server.stop)
                await asyncio.sleep(1.0)
            out["scenarios"]["streams"] = streams
            out["ratios"] = {"streams": scenarios.stream_ratios(streams)}
        suites: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = [
            ("aggregates", "aggregates", lambda: scenarios.aggregates_suite(url, plan, log)),
            ("writer", "writer cost (pgbench)", lambda: scenarios.writer_suite(pg, url, plan, log)),
            # issue 22: its own primary + standby pair (bench/replicas.py)
            ("replicas", "read replicas", replicas.run),
            ("dashboards", "dashboards: polling every 5 s vs pgsse (database cost and staleness)",
             lambda: dashboards.suite(pg, url, plan.quick, log)),
            ("mercure", "mercure: Mercure subscribers vs /events streams, POST vs SQL publish",
             lambda: mercure.suite(url, plan.quick, log)),
        ]
        for name, title, suite in suites:
            if name in only:
                log(title)
                out["scenarios"][name] = await guarded(name, suite)
    finally:
        meta["runtime_s"] = round(time.monotonic() - started, 1)
        await asyncio.to_thread(pg.stop)
    out["targets"] = report.targets(out)
    try:
        out["plots"] = report.plots(out, infra.RESULTS)
    except Exception as exc:  # a plot must not lose the figures
        out["plots"] = {"error": repr(exc)}
    board = out["scenarios"].get("dashboards")
    if isinstance(board, dict) and board.get("cases"):
        try:
            board["plot"] = dashboards.plot(board, infra.RESULTS / "dashboards.png")
        except Exception as exc:  # a plot must not lose the figures
            board["plot"] = {"error": repr(exc)}
        print(f"\ndashboards ({os.cpu_count()} cores):\n{dashboards.table(board)}")
    path = infra.RESULTS / "report.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(report.table(out))
    if "latency" in out["scenarios"].get("replicas", {}):
        print("\n" + replicas.table(out["scenarios"]["replicas"]))
    ratios = {**out.get("ratios", {}),
              "aggregates": out["scenarios"].get("aggregates", {}).get("ratios")}
    print(f"\nratios (same run, {os.cpu_count()} cores): {json.dumps(ratios, indent=1)}")
    print(f"\nreport: {path.relative_to(infra.ROOT)}  ({meta['runtime_s']} s)")
    return 0


async def guarded(name: str, suite: Callable[[], Awaitable[Any]]) -> Any:
    """One scenario's figures, or its error: a failed scenario must not lose the others."""
    try:
        return await suite()
    except Exception as exc:
        log(f"  {name} failed: {exc!r}")
        return {"error": repr(exc), "trace": traceback.format_exc()[-2000:]}


def stream_server(kind: str, url: str, port: int) -> infra.Server:
    """pgsse (WORKERS=1, core 0), pgsse-w2 (WORKERS=2 on both cores, sharing core 1 with the
    client and PostgreSQL: the machine has two), nginx+nchan (one worker, core 0), or the
    broadcaster + sse-starlette baseline (core 0)."""
    if kind == "pgsse":
        return infra.pgsse_server("pgsse-streams", url, port)
    if kind == "pgsse-w2":
        return infra.pgsse_server("pgsse-w2-streams", url, port,
                                  cores={infra.SERVER_CORE, infra.CLIENT_CORE}, WORKERS="2")
    if kind == "nchan":
        return infra.nchan_server("nchan-streams", port)
    return infra.baseline_server("baseline-streams", url, port)


async def setup_database(uri: str) -> str:
    import asyncpg

    admin = await asyncpg.connect(uri, timeout=10)
    try:
        for (name,) in await admin.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_%'"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        name = "bench_" + time.strftime("%Y%m%d_%H%M%S")
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = infra.with_database(uri, name)
    env = dict(os.environ, DATABASE_URL=url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgsse", "migrate", cwd=infra.ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"migrate failed: {output.decode(errors='replace')}")
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("""
            CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
            CREATE TABLE bench_plain (id bigserial PRIMARY KEY, seq bigint NOT NULL, payload text);
            CREATE TABLE bench_watched (id bigserial PRIMARY KEY, seq bigint NOT NULL, payload text);
            SELECT realtime.watch('bench_watched', 'bench');
            -- the baseline's capture: what tutorials show, a row trigger calling pg_notify
            CREATE TABLE bench_notified (id bigserial PRIMARY KEY, seq bigint NOT NULL, payload text);
            CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('bench', row_to_json(NEW)::text);
                RETURN NULL;
            END $$;
            CREATE TRIGGER bench_notify AFTER INSERT ON bench_notified
                FOR EACH ROW EXECUTE FUNCTION bench_notify();
        """)
    finally:
        await conn.close()
    return url


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N, shorter runs (≈ 3 min)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the server during extra fan-out rounds at the largest N")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--ns", help="override the client counts, e.g. 1000,5000")
    parser.add_argument("--kinds", default="pgsse,pgsse-w2,nchan,baseline",
                        help="stream servers, side by side in this order (default: %(default)s)")
    args = parser.parse_args()
    install_uvloop()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
