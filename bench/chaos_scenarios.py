"""The chaos scenarios. Each takes a ``Run`` (PostgreSQL, mode) and returns a ``Result``.

Every scenario starts its own service on a fresh database, applies one fault or hostile
load through the public contract only, and judges the outcome by what clients received
against what PostgreSQL committed (``chaos_infra.check``). Every loop is bounded in count
and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from .chaos_infra import (
    DATA,
    WRITTEN_AT,
    Postgres,
    Service,
    SseClient,
    Tally,
    check,
    last_position,
    publish_end,
    service_on_fresh_db,
    truth_of,
    wait_clients,
    wait_sequenced,
    wait_until,
)

MB = 1024 * 1024


@dataclass
class Run:
    pg: Postgres
    quick: bool


@dataclass
class Result:
    scenario: str
    load: str = ""
    lost: int | None = 0
    duplicated: int | None = 0
    reordered: int | None = 0
    resets: int | None = 0
    dropped: int | None = 0
    rss_delta_mb: float | None = None
    fd_delta: int | None = None
    passed: bool = False
    verdict: str = ""
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    # (seconds since ``started``, label): when the fault began, ended, … (the plot marks them)
    marks: list[tuple[float, str]] = field(default_factory=list)
    timeline: dict[str, Any] = field(default_factory=dict)

    def mark(self, label: str) -> None:
        self.marks.append((round(time.time() - self.started, 2), label))

    def no_stream(self) -> Result:
        """For scenarios without an event stream to judge: those columns print ``-``."""
        self.lost = self.duplicated = self.reordered = self.resets = self.dropped = None
        return self

    def take(self, tally: Tally) -> None:
        self.lost = (self.lost or 0) + tally.lost
        self.duplicated = (self.duplicated or 0) + tally.duplicated
        self.reordered = (self.reordered or 0) + tally.reordered
        self.resets = (self.resets or 0) + tally.resets
        self.figures["corrupt"] = self.figures.get("corrupt", 0) + tally.corrupt
        self.figures["excused_by_reset"] = self.figures.get("excused_by_reset", 0) + tally.excused

    def judge(self, failures: list[str]) -> Result:
        self.passed = not failures
        self.verdict = "; ".join(failures) if failures else "ok"
        return self


class Baseline:
    """RSS and fds of the service before a load, for the deltas."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.rss = service.rss()
        self.fds = service.fds()

    async def deltas(self, result: Result, quiet: float = 3.0) -> None:
        """Fill the deltas once the fd count has stopped changing (at most ``quiet`` s)."""
        service = self.service
        last = [service.fds()]

        def stable() -> bool:
            now = service.fds()
            same = now == last[0]
            last[0] = now
            return same and now <= self.fds + 2

        await wait_until(stable, quiet, 0.25)
        result.rss_delta_mb = round((service.rss() - self.rss) / MB, 1)
        result.fd_delta = service.fds() - self.fds


def timeline(started: float, clients: list[SseClient], step: float = 0.25) -> dict[str, Any]:
    """Per ``step`` seconds since ``started``: events delivered (all clients) and their lag
    (arrival − the change's write time) at p50 and max; drops and resets as times."""
    delivered: dict[int, int] = {}
    lags: dict[int, list[float]] = {}
    resets: list[float] = []
    for client in clients:
        for item, at in zip(client.items, client.arrivals, strict=False):
            slot = int((at - started) / step)
            if item[0] == "r":
                resets.append(round(at - started, 2))
                continue
            delivered[slot] = delivered.get(slot, 0) + 1
            written = WRITTEN_AT.get(item[1]) if item[1] is not None else None
            if written is not None:
                lags.setdefault(slot, []).append(at - written)
    slots = sorted(set(delivered) | set(lags))

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "step_s": step,
        "t": [round(slot * step, 2) for slot in slots],
        "events_per_s": [round(delivered.get(slot, 0) / step) for slot in slots],
        "lag_p50_ms": [pct(lags[slot], 0.5) if slot in lags else None for slot in slots],
        "lag_max_ms": [pct(lags[slot], 1.0) if slot in lags else None for slot in slots],
        "drops": sorted(round(t - started, 2) for c in clients for t in c.drop_times),
        "resets": sorted(resets),
    }


def tally_clients(result: Result, clients: list[SseClient],
                  truth: list[tuple[int, tuple[int, int]]]) -> Tally:
    total = Tally()
    for client in clients:
        after = int(client.start_id) if client.start_id else 0
        total.add(check(client.items, truth, after))
    result.take(total)
    result.timeline = timeline(result.started, clients)
    result.dropped = sum(1 for c in clients if c.drops)
    result.figures["drops_total"] = sum(c.drops for c in clients)
    result.figures["clients_finished"] = sum(1 for c in clients if c.done)
    result.figures["forged_frames"] = sum(len(c.forged) for c in clients)
    stuck = [c for c in clients if not c.done]
    if stuck:  # what an unfinished client saw, to tell a stalled stream from a slow reader
        result.figures["unfinished_examples"] = [
            {"connects": c.connects, "drops": c.drops, "events": len(c.items) - c.resets,
             "resets": c.resets, "last_id": c.last_id, "error": c.error} for c in stuck[:3]]
    return total


def loss_failures(result: Result, clients: list[SseClient], *, resets_ok: bool,
                  drops_ok: bool = True) -> list[str]:
    failures = []
    if result.lost:
        failures.append(f"{result.lost} events lost silently")
    if result.duplicated:
        failures.append(f"{result.duplicated} duplicated")
    if result.reordered:
        failures.append(f"{result.reordered} reordered")
    if result.figures.get("corrupt"):
        failures.append(f"{result.figures['corrupt']} corrupt events")
    if not resets_ok and result.resets:
        failures.append(f"{result.resets} resets with nothing pruned")
    if not drops_ok and result.dropped:
        failures.append(f"{result.dropped} clients dropped")
    unfinished = len(clients) - result.figures.get("clients_finished", 0)
    if unfinished:
        failures.append(f"{unfinished} clients never got the end marker")
    return failures


async def publish_series(conn: asyncpg.Connection, topic: str, count: int, start: int = 1,
                         pad: int = 0, w: int = 0) -> None:
    """``count`` events in one transaction, data ``{"w", "n", "pad"}``, n from ``start``."""
    await conn.execute(
        "SELECT realtime.publish($1, 'chaos.x', jsonb_build_object('w', $4::int, 'n', g, "
        "'pad', repeat('x', $3))) FROM generate_series($2::int, $2::int + $5::int - 1) g",
        topic, start, pad, w, count)


async def live_clients(service: Service, conn: asyncpg.Connection, topic: str,
                       count: int) -> list[SseClient]:
    """Clients that were already at the head: they resume from it (a drop before their first
    event then costs nothing), as a browser that has seen the latest id does."""
    head = str(await last_position(conn))
    return [SseClient(service.port, topic, last_id=head) for _ in range(count)]


async def run_clients(clients: list[SseClient], timeout: float) -> list[asyncio.Task[SseClient]]:
    return [asyncio.create_task(c.run(timeout)) for c in clients]


async def finish(tasks: list[asyncio.Task[SseClient]], timeout: float) -> None:
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- 1. prune while the listener is away -----------------------------------------------


async def prune_listener_away(run: Run) -> Result:
    n_clients, n_events = (50, 1000) if run.quick else (100, 1000)
    result = Result("prune_listener_away", f"{n_clients} live clients, {n_events} events "
                    "published and pruned while the listener is refused")
    topic = "chaos_prune_away"
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        base = Baseline(service)
        clients = await live_clients(service, conn, topic, n_clients)
        tasks = await run_clients(clients, 90)
        await wait_clients(service, n_clients)
        result.mark("listener refused")
        killed = await run.pg.refuse_logins(True, terminate="pgsse-listener")
        result.figures["listener_backends_terminated"] = killed
        head = await last_position(conn)
        await publish_series(conn, topic, n_events)
        sequenced = await wait_sequenced(conn, head + n_events, 20)
        truth = await truth_of(conn, topic)
        result.mark("prune('0')")
        pruned = await conn.fetchval("SELECT realtime.prune('0')")
        result.figures.update(sequenced=sequenced, pruned=pruned)
        result.mark("logins back")
        await run.pg.refuse_logins(False, terminate=None)
        ready = await wait_until(lambda: _ready(service), 30, 0.1)
        result.figures["ready_after_restore"] = bool(ready)
        await publish_end(conn, topic, clients)
        await finish(tasks, 45)
        tally_clients(result, clients, truth)
        await base.deltas(result)
    failures = loss_failures(result, clients, resets_ok=True)
    if not result.figures.get("sequenced"):
        failures.append("events never sequenced with the listener away")
    return result.judge(failures)


async def _ready(service: Service) -> bool:
    try:
        return (await service.get("/readyz", timeout=2)).status == 200
    except (OSError, TimeoutError, ValueError):
        return False


# --- 2. prune mid-replay ------------------------------------------------------------------


async def prune_mid_replay(run: Run) -> Result:
    n_clients, n_events = 20, 30_000
    result = Result("prune_mid_replay", f"{n_clients} clients resume from 0 over "
                    f"{n_events:,} retained 0.5 KB events while prune('0') runs")
    topic = "chaos_replay"
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        base = Baseline(service)
        head = await last_position(conn)
        for start in range(1, n_events + 1, 5000):
            await publish_series(conn, topic, 5000, start=start, pad=500)
        await wait_sequenced(conn, head + n_events, 30)
        truth = await truth_of(conn, topic)
        clients = [SseClient(service.port, topic, last_id="0") for _ in range(n_clients)]
        tasks = await run_clients(clients, 120)
        # Prune once the replays are under way (~16 MB of history: past the in-memory
        # window, so replay reads PostgreSQL in batches).
        await wait_until(lambda: any(len(c.items) >= 1000 for c in clients), 20, 0.005)
        received_at_prune = sum(len(c.items) for c in clients)
        result.mark("prune('0')")
        pruned = await conn.fetchval("SELECT realtime.prune('0')")
        result.figures.update(pruned=pruned, received_when_pruned=received_at_prune)
        await publish_end(conn, topic, clients)
        await finish(tasks, 45)
        tally_clients(result, clients, truth)
        await base.deltas(result)
    return result.judge(loss_failures(result, clients, resets_ok=True))


# --- 3. bulk transactions -------------------------------------------------------------------


async def bulk(run: Run) -> Result:
    n_clients = 20
    result = Result("bulk_transaction", f"{n_clients} fast clients; 1 tx of 10,000 x 1 KB, "
                    "then 1 tx of 5 x 250 KB")
    topic = "chaos_bulk"
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        base = Baseline(service)
        dropped0 = await service.metric("pgsse_slow_clients_dropped_total")
        clients = await live_clients(service, conn, topic, n_clients)
        tasks = await run_clients(clients, 90)
        await wait_clients(service, n_clients)
        result.mark("10,000-event tx")
        await publish_series(conn, topic, 10_000, pad=1000)
        result.mark("5 x 250 KB tx")
        await publish_series(conn, topic, 5, start=10_001, pad=250_000, w=1)
        await publish_end(conn, topic, clients)
        await finish(tasks, 45)
        truth = await truth_of(conn, topic)
        tally_clients(result, clients, truth)
        result.figures["slow_dropped_metric"] = (
            await service.metric("pgsse_slow_clients_dropped_total") - dropped0)
        await base.deltas(result)
    failures = loss_failures(result, clients, resets_ok=False, drops_ok=False)
    if len(truth) != 10_005:
        failures.append(f"{len(truth)} events committed, expected 10,005")
    return result.judge(failures)


# --- 4. zombie sockets ----------------------------------------------------------------------


async def zombies(run: Run) -> Result:
    n_zombies = 50
    result = Result("zombie_sockets", f"{n_zombies} clients stop reading (SO_RCVBUF 4 KB) "
                    "while 25 x 4 KB transactions flow at 1 MB/s")
    topic = "chaos_zombie"
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    # Slow = behind for SLOW_CLIENT_SECONDS (where the service has that setting): 5 s keeps
    # what each zombie must replay on resuming small.
    async with service_on_fresh_db(run.pg, result.scenario, {"SLOW_CLIENT_SECONDS": "5"}) as (
            service, conn):
        base = Baseline(service)
        dropped0 = await service.metric("pgsse_slow_clients_dropped_total")
        canary = (await live_clients(service, conn, topic, 1))[0]
        canary_task = asyncio.create_task(canary.run(180))
        zombie_ids: list[str | None] = []
        try:
            for _ in range(n_zombies):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", service.port))
                await loop.sock_sendall(sock, (f"GET /events?topic={topic} HTTP/1.1\r\n"
                                               f"Host: 127.0.0.1\r\n\r\n").encode())
                socks.append(sock)
            await wait_clients(service, n_zombies + 1)
            fds_with_zombies = service.fds()
            # A zombie reads nothing, ever; it last saw the head it connected at.
            head = await last_position(conn)
            zombie_ids = [str(head)] * n_zombies
            await publish_series(conn, topic, 1, pad=10)
            # Flow events until every zombie has been dropped as slow (bounded).
            n = 2
            started = time.monotonic()
            dropped = 0.0
            # Small transactions (25 x 4 KB) at 1 MB/s, so a drop comes from a reader that
            # stays behind, not from one batch larger than a client's buffer.
            for i in range(400):  # at most 40 s
                await publish_series(conn, topic, 25, start=n, pad=4000)
                n += 25
                if i % 5 == 4:
                    dropped = await service.metric("pgsse_slow_clients_dropped_total") - dropped0
                    if dropped >= n_zombies:
                        break
                await asyncio.sleep(max(0.0, started + (i + 1) * 0.1 - time.monotonic()))
            drop_time = time.monotonic()
            result.figures.update(events_to_drop=n - 1, slow_dropped_metric=dropped,
                                  fds_with_zombies=fds_with_zombies - base.fds,
                                  mb_published=round((n - 1) * 4 / 1024, 1))
            # Within 10 s: fds back near baseline, no connected clients but the canary, and
            # the sockets really gone (no orphan still holding the zombie's send queue).
            async def freed() -> bool:
                clients = await service.metric("pgsse_connected_clients")
                return (service.fds() <= base.fds + 3 and clients <= 1
                        and server_sockets(service.port)[0] <= 3)
            ok = await wait_until(freed, 10, 0.2)
            result.figures["freed_within_10s"] = bool(ok)
            result.figures["freed_after_s"] = round(time.monotonic() - drop_time, 1) if ok else None
            result.figures["fds_over_baseline_10s_after"] = service.fds() - base.fds
            (result.figures["server_sockets_10s_after"], result.figures["send_queue_mb_10s_after"],
             result.figures["server_socket_states_10s_after"]) = server_sockets(service.port)
            result.figures["connected_clients_10s_after"] = await service.metric(
                "pgsse_connected_clients")
        finally:
            for sock in socks:
                sock.close()
        # They come back with their last id and must lose nothing.
        end = await publish_end(conn, topic, [canary])
        resumed = [SseClient(service.port, topic, last_id=i) for i in zombie_ids if i]
        for client in resumed:
            if end is not None:
                client.end_at(end)
        await finish(await run_clients(resumed, 60), 70)
        await finish([canary_task], 60)
        truth = await truth_of(conn, topic)
        tally_clients(result, resumed + [canary], truth)
        result.dropped = int(result.figures["slow_dropped_metric"])
        await base.deltas(result)
    failures = loss_failures(result, resumed + [canary], resets_ok=False)
    if len(resumed) != n_zombies:
        failures.append(f"only {len(resumed)} zombies read a first id")
    if result.figures["slow_dropped_metric"] < n_zombies:
        failures.append(f"only {result.figures['slow_dropped_metric']:.0f} of {n_zombies} "
                        "dropped as slow")
    if not result.figures["freed_within_10s"]:
        failures.append(f"10 s after the drops: fds +{result.figures['fds_over_baseline_10s_after']}"
                        f", connected_clients {result.figures['connected_clients_10s_after']:.0f}"
                        f", server sockets {result.figures['server_sockets_10s_after']} holding "
                        f"{result.figures['send_queue_mb_10s_after']} MB of send queue")
    return result.judge(failures)


def server_sockets(port: int) -> tuple[int, float, dict[str, int]]:
    """Server-side TCP sockets of the port not yet gone (TIME-WAIT aside), and their send
    queues in MB (``ss``): a socket closed gracefully lingers (FIN-WAIT-1, kernel memory)
    while a peer that never reads holds it, even after the process released its fd."""
    import subprocess

    out = subprocess.run(["ss", "-tnH", "state", "connected", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    count, queued = 0, 0
    states: dict[str, int] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] != "TIME-WAIT" and fields[2].isdigit():
            count += 1
            queued += int(fields[2])
            states[fields[0]] = states.get(fields[0], 0) + 1
    return count, round(queued / MB, 1), states


async def _read_first_id(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str | None:
    buf = b""
    try:
        async with asyncio.timeout(10):
            while b"\nid: " not in buf or not buf.split(b"\nid: ", 1)[1].count(b"\n"):
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    return None
                buf += data
    except TimeoutError:
        return None
    return buf.split(b"\nid: ", 1)[1].split(b"\n", 1)[0].decode()


# --- process and slot starvation (issue 20) -----------------------------------------------

EXPORT_FILES = {
    "chaos_endless.sql": "-- Two million generated rows.\n"
                         "SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 2000000) g\n",
    "chaos_small.sql": "-- Ten rows.\nSELECT g AS id FROM generate_series(1, 10) g\n",
}


async def stuck_exporters(run: Run) -> Result:
    """Four clients (four addresses) start a big export and never read; a fifth reader must
    be served within EXPORT_IDLE_SECONDS plus a margin, and the stuck sockets freed."""
    idle = 3.0
    result = Result("stuck_exporters", f"4 exports never read (SO_RCVBUF 4 KB); a 5th export "
                    f"polled; EXPORT_IDLE_SECONDS={idle:g}").no_stream()
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    with tempfile.TemporaryDirectory() as directory:
        for name, sql in EXPORT_FILES.items():
            (Path(directory) / name).write_text(sql)
        env = {"AGGREGATES_DIR": directory, "EXPORT_IDLE_SECONDS": f"{idle}s"}
        async with service_on_fresh_db(run.pg, result.scenario, env) as (service, _conn):
            base = Baseline(service)
            try:
                for i in range(4):
                    sock = socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    sock.bind((f"127.0.0.{i + 2}", 0))
                    sock.setblocking(False)
                    await loop.sock_connect(sock, ("127.0.0.1", service.port))
                    await loop.sock_sendall(sock, b"GET /aggregates/chaos_endless?format=csv "
                                            b"HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    socks.append(sock)

                async def status() -> int:
                    try:
                        return (await service.get("/aggregates/chaos_small?format=csv")).status
                    except (OSError, TimeoutError):
                        return 0

                async def full() -> bool:
                    return await status() == 429
                blocked = await wait_until(full, 20, 0.1)
                began = time.monotonic()

                async def served() -> bool:
                    return await status() == 200
                ok = await wait_until(served, idle + 15, 0.2)
                result.figures.update(
                    slots_taken=bool(blocked),
                    fifth_served_after_s=round(time.monotonic() - began, 1) if ok else None,
                    idle_metric=await service.metric(
                        'pgsse_export_streams_total{aggregate="chaos_endless",outcome="idle"}'))
            finally:
                for sock in socks:
                    sock.close()
            await base.deltas(result)
    failures = []
    if not result.figures["slots_taken"]:
        failures.append("the four stuck exports never filled the slots")
    after = result.figures["fifth_served_after_s"]
    if after is None or after > idle + 10:
        failures.append(f"a fifth export was not served within {idle + 10:g} s ({after})")
    return result.judge(failures)


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def frozen_worker(run: Run) -> Result:
    """WORKERS=2, one SIGSTOPped: /healthz answered meanwhile, and the worker replaced within
    WORKER_TIMEOUT plus a margin."""
    timeout = 3.0
    result = Result("frozen_worker", f"WORKERS=2, one SIGSTOPped; WORKER_TIMEOUT={timeout:g}s"
                    ).no_stream()
    env = {"WORKERS": "2", "WORKER_TIMEOUT": f"{timeout}s"}
    async with service_on_fresh_db(run.pg, result.scenario, env) as (service, _conn):
        await wait_until(lambda: len(_children(service.pid)) == 2, 30, 0.1)

        async def both_up() -> bool:
            feeds = [v for k, v in (await service.metrics()).items() if k.startswith("pgsse_feed_up")]
            return sum(feeds) == 2
        await wait_until(both_up, 30, 0.2)
        victim = min(_children(service.pid))
        os.kill(victim, signal.SIGSTOP)
        began = time.monotonic()
        answered = asked = 0
        try:
            while time.monotonic() - began < timeout + 15:
                asked += 1
                try:
                    answered += (await service.get("/healthz", timeout=1)).status == 200
                except (OSError, TimeoutError):
                    pass
                now = _children(service.pid)
                if not _running(victim) and len(now) == 2:
                    break
            replaced_after = time.monotonic() - began if not _running(victim) else None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        ok = 0
        for _ in range(20):
            try:
                ok += (await service.get("/healthz", timeout=5)).status == 200
            except (OSError, TimeoutError):
                pass
        result.figures.update(
            replaced_after_s=None if replaced_after is None else round(replaced_after, 1),
            healthz_answered_while_frozen=f"{answered}/{asked}", healthz_after=f"{ok}/20",
            replaced_metric=await service.metric('pgsse_worker_replaced_total{reason="hung"}'))
    failures = []
    if replaced_after is None or replaced_after > timeout + 10:
        failures.append(f"the frozen worker was not replaced within {timeout + 10:g} s")
    if ok != 20:
        failures.append(f"after the replacement only {ok}/20 /healthz answered")
    return result.judge(failures)


async def sigterm_frozen_worker(run: Run) -> Result:
    """WORKERS=2, one SIGSTOPped, then SIGTERM: the group ends within SHUTDOWN_GRACE_SECONDS
    plus a margin, leaving no worker behind."""
    grace = 3.0
    result = Result("sigterm_frozen_worker", f"WORKERS=2, one SIGSTOPped, then SIGTERM; "
                    f"SHUTDOWN_GRACE_SECONDS={grace:g}").no_stream()
    env = {"WORKERS": "2", "WORKER_TIMEOUT": "10m", "SHUTDOWN_GRACE_SECONDS": f"{grace}s"}
    async with service_on_fresh_db(run.pg, result.scenario, env) as (service, _conn):
        await wait_until(lambda: len(_children(service.pid)) == 2, 30, 0.1)
        workers = _children(service.pid)
        assert service.proc is not None
        proc = service.proc
        try:
            os.kill(min(workers), signal.SIGSTOP)
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            ended = await wait_until(lambda: proc.poll() is not None, grace + 15, 0.1)
            exited_after = time.monotonic() - began if ended else None
            await wait_until(lambda: not any(_running(p) for p in workers), 2, 0.1)
            left = [p for p in workers if _running(p)]
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        result.figures.update(
            exited_after_s=None if exited_after is None else round(exited_after, 1),
            workers_left=len(left))
    failures = []
    if exited_after is None or exited_after > grace + 5:
        failures.append(f"the supervisor did not exit within {grace + 5:g} s of SIGTERM")
    if left:
        failures.append(f"{len(left)} worker(s) outlived the supervisor")
    return result.judge(failures)
# --- slow-aggregate storm (issue 20) -------------------------------------------------------

STORM_SLOW_SQL = """-- Slow on purpose (chaos suite: the slow-aggregate storm).
-- param n: int
SELECT :n AS n FROM pg_sleep({seconds})
"""
STORM_FAST_SQL = """-- Fast (chaos suite: the slow-aggregate storm); k makes each request a query.
-- param k: int
SELECT :k AS k, count(*) AS events FROM realtime.events
"""


async def slow_aggregate_storm(run: Run) -> Result:
    """One client's burst of slow aggregate requests, with distinct parameters (no single
    flight), beside everyone else: ``/readyz``, ``GET /events/{position}``, a fast aggregate and
    clients resuming from history must each answer within 1 s throughout; the storm gets 200s
    or 503 ``busy`` (with ``Retry-After``), nothing else."""
    storm, seconds, n_clients, n_events = (50, 2, 5, 500) if run.quick else (100, 5, 10, 2000)
    result = Result("slow_aggregate_storm", f"{storm} concurrent {seconds} s aggregate requests "
                    f"(distinct params) beside /readyz, /events/{{p}}, a fast aggregate and "
                    f"{n_clients} clients resuming from history")
    topic = "chaos_storm"
    agg_dir = DATA / "aggregates_storm"
    agg_dir.mkdir(parents=True, exist_ok=True)
    (agg_dir / "chaos_slow.sql").write_text(STORM_SLOW_SQL.format(seconds=seconds))
    (agg_dir / "chaos_fast.sql").write_text(STORM_FAST_SQL)
    env = {"AGGREGATES_DIR": str(agg_dir), "REPLAY_MEMORY_BYTES": "0"}  # resumes read PostgreSQL
    async with service_on_fresh_db(run.pg, result.scenario, env) as (service, conn):
        base = Baseline(service)
        head = await last_position(conn)
        await publish_series(conn, topic, n_events)
        await wait_sequenced(conn, head + n_events, 30)
        truth = await truth_of(conn, topic)
        first = truth[0][0]
        statuses: dict[str, int] = {}

        async def one(i: int) -> None:
            try:
                answer = await service.get(f"/aggregates/chaos_slow?n={i}", timeout=120)
                key = str(answer.status)
                if answer.status == 503:
                    key += " " + str(json.loads(answer.body)["error"]["code"])
                    key += "" if "retry-after" in answer.headers else " (no Retry-After)"
                if key not in ("200", "503 busy"):
                    result.figures.setdefault("other_answers", []).append(answer.body[:300].decode())
            except (OSError, TimeoutError, ValueError) as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1

        started = time.monotonic()
        result.mark("storm")
        tasks = [asyncio.create_task(one(i)) for i in range(storm)]
        in_flight = await wait_until(
            lambda: _stats_in_flight(service, storm // 5), 20, 0.05)
        result.figures["storm_in_flight_seen"] = bool(in_flight)
        clients = [SseClient(service.port, topic, last_id=str(first - 1)) for _ in range(n_clients)]
        clients_started = time.monotonic()
        client_tasks = await run_clients(clients, 90)
        worst: dict[str, float] = {}

        async def first_events() -> None:
            if await wait_until(lambda: all(c.items for c in clients), 60, 0.01):
                worst["resume_first_event"] = time.monotonic() - clients_started
        first_events_task = asyncio.create_task(first_events())
        probe_errors: list[str] = []
        rounds = 0
        probe_until = started + 3 * seconds + 30
        while not all(t.done() for t in tasks) and time.monotonic() < probe_until:
            rounds += 1
            await asyncio.sleep(0.05)  # pacing: a probe every ~50 ms, not a busy loop
            for name, path in (("readyz", "/readyz"), ("event_lookup", f"/events/{first}"),
                               ("fast_aggregate", f"/aggregates/chaos_fast?k={rounds}")):
                t0 = time.monotonic()
                try:
                    answer = await service.get(path, timeout=30)
                    if answer.status != 200:
                        probe_errors.append(f"{name} {answer.status}")
                except (OSError, TimeoutError, ValueError) as exc:
                    probe_errors.append(f"{name} {type(exc).__name__}")
                worst[name] = max(worst.get(name, 0.0), time.monotonic() - t0)
        await asyncio.gather(*tasks)
        await first_events_task
        if "resume_first_event" not in worst:
            probe_errors.append("a resuming client got no event within 60 s")
        result.figures.update(storm_seconds=round(time.monotonic() - started, 1),
                              storm_statuses=statuses, probe_rounds=rounds,
                              worst_seconds={k: round(v, 3) for k, v in worst.items()},
                              probe_errors=probe_errors[:5])
        await publish_end(conn, topic, clients)
        await finish(client_tasks, 45)
        tally_clients(result, clients, truth)
        await base.deltas(result)
    failures = loss_failures(result, clients, resets_ok=False)
    slow = {k: round(v, 2) for k, v in worst.items() if v > 1.0}
    if slow:
        failures.append(f"waited behind the storm (> 1 s): {slow}")
    if probe_errors:
        failures.append(f"probes failed: {probe_errors[:3]}")
    other = {k: v for k, v in statuses.items() if k not in ("200", "503 busy")}
    if other:
        failures.append(f"storm answers other than 200 / 503 busy + Retry-After: {other}")
    return result.judge(failures)


async def _stats_in_flight(service: Service, at_least: int) -> bool:
    try:
        return int((await service.stats())["cache"]["in_flight"]) >= at_least
    except (OSError, TimeoutError, ValueError, KeyError):
        return False
