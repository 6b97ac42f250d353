"""Chaos scenario 11: faults that already pass, kept as regression guards — a backend kill
storm, refused logins, a PostgreSQL restart, connection churn.

Writers publish ``{"w": writer, "n": k}`` one event per transaction as the superuser (so
refusing the service's role never stops them); what counts as committed is read back from
``realtime.events`` afterwards, so a commit whose outcome a writer could not learn (the
restart) is judged by what PostgreSQL kept.
"""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg

from .chaos_infra import (
    Postgres,
    publish_end,
    service_on_fresh_db,
    terminate_backends,
    truth_of,
    wait_clients,
    wait_until,
)
from .chaos_scenarios import (
    Baseline,
    Result,
    Run,
    finish,
    live_clients,
    loss_failures,
    run_clients,
    tally_clients,
)


class Writers:
    """``count`` writers at ``rate`` events/s each until stopped, reconnecting on errors."""

    def __init__(self, pg: Postgres, database: str, topic: str, count: int = 4,
                 rate: float = 50.0) -> None:
        self.pg, self.database, self.topic = pg, database, topic
        self.count, self.rate = count, rate
        self.stop = asyncio.Event()
        self.committed = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> Writers:
        self.tasks = [asyncio.create_task(self._write(w)) for w in range(1, self.count + 1)]
        return self

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _write(self, w: int) -> None:
        conn: asyncpg.Connection | None = None
        n = 0
        t0 = time.monotonic()
        for _ in range(1_000_000):  # bounded; ends when stopped
            if self.stop.is_set():
                break
            try:
                if conn is None or conn.is_closed():
                    conn = await self.pg.admin(self.database)
                n += 1
                await conn.execute("SELECT realtime.publish($1, 'chaos.x', jsonb_build_object("
                                   "'w', $2::int, 'n', $3::int))", self.topic, w, n)
                self.committed += 1
            except Exception as exc:  # noqa: BLE001 - a writer outlives any database fault
                self.errors += 1
                kind = type(exc).__name__
                self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
                if conn is not None:
                    conn.terminate()
                conn = None
                if self.stop.is_set():
                    break
                await asyncio.sleep(0.2)
                continue
            delay = t0 + n / self.rate - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                except TimeoutError:
                    pass
        if conn is not None:
            conn.terminate()


async def _guard(run: Run, name: str, load: str, fault: object, n_clients: int = 20) -> Result:
    """Clients and writers around ``fault(service, conn, result)``; then the loss check."""
    result = Result(name, load)
    topic = "chaos_" + name
    async with service_on_fresh_db(run.pg, name) as (service, conn):
        base = Baseline(service)
        clients = await live_clients(service, conn, topic, n_clients)
        tasks = await run_clients(clients, 120)
        await wait_clients(service, n_clients)
        database = service.database
        writers = Writers(run.pg, database, topic).start()
        reconnects0 = await service.metric("pgsse_feed_reconnects_total")
        try:
            result.mark("fault")
            await fault(service, conn, result)  # type: ignore[operator]
            result.mark("fault over")
            committed_at_fault = writers.committed
            # Writes go on after the fault (bounded): what was written meanwhile must arrive.
            await wait_until(lambda: writers.committed >= committed_at_fault + 100, 15, 0.1)
        finally:
            await writers.finish()
        if conn.is_closed():
            conn = await run.pg.admin(database)
        ready = await wait_until(lambda: _ready(service), 30, 0.1)
        await publish_end(conn, topic, clients)
        await finish(tasks, 45)
        truth = await truth_of(conn, topic)
        await conn.close()
        tally_clients(result, clients, truth)
        result.figures.update(committed=len(truth), writer_errors=writers.error_kinds,
                              committed_after_fault=writers.committed - committed_at_fault,
                              feed_reconnects=await service.metric(
                                  "pgsse_feed_reconnects_total") - reconnects0,
                              ready_after=bool(ready))
        await base.deltas(result)
    failures = loss_failures(result, clients, resets_ok=False)
    # The fault must have hit: the change feed reconnected, and writes went on after it.
    if not result.figures["feed_reconnects"]:
        failures.append("fault had no effect: the change feed never reconnected")
    if result.figures["committed_after_fault"] < 100:
        failures.append(f"only {result.figures['committed_after_fault']} commits after the fault")
    if not result.figures["ready_after"]:
        failures.append("/readyz not 200 within 30 s after the fault")
    return result.judge(failures)


async def _ready(service: object) -> bool:
    from .chaos_faults import head_status

    status, _ = await head_status(service.port, "/readyz", timeout=2)  # type: ignore[attr-defined]
    return status == 200


async def kill_storm(run: Run) -> Result:
    seconds = 10 if run.quick else 20

    async def fault(service: object, conn: asyncpg.Connection, result: Result) -> None:
        kills = 0
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            kills += await terminate_backends(conn)
            await asyncio.sleep(0.25)
        result.figures["backends_killed"] = kills

    return await _guard(run, "backend_kill_storm", f"20 clients, 4 writers x 50 ev/s; the "
                        f"service's backends terminated every 250 ms for {seconds} s", fault)


async def refused_logins(run: Run) -> Result:
    seconds = 10 if run.quick else 20

    async def fault(service: object, conn: asyncpg.Connection, result: Result) -> None:
        result.figures["backends_killed"] = await run.pg.refuse_logins(True)
        await asyncio.sleep(seconds)  # the outage's length is the fault
        await run.pg.refuse_logins(False, terminate=None)

    return await _guard(run, "refused_logins", f"20 clients, 4 writers x 50 ev/s; the "
                        f"service's logins refused for {seconds} s", fault)


async def postgres_restart(run: Run) -> Result:
    if not run.pg.embedded:
        return Result("postgres_restart", "skipped: PostgreSQL is external").judge([]).no_stream()

    async def fault(service: object, conn: asyncpg.Connection, result: Result) -> None:
        await asyncio.sleep(3)  # writes flowing before the restart
        t0 = time.monotonic()
        await conn.close()
        await run.pg.stop_server()
        await asyncio.sleep(3)  # down for 3 s
        await run.pg.start_server()
        result.figures["restart_s"] = round(time.monotonic() - t0, 1)

    return await _guard(run, "postgres_restart", "20 clients, 4 writers x 50 ev/s; "
                        "PostgreSQL stopped (fast), down 3 s, started", fault)


async def churn(run: Run) -> Result:
    seconds, workers = (10, 40) if run.quick else (20, 50)
    result = Result("connection_churn", f"{workers} loops opening short streams for "
                    f"{seconds} s; 1 canary, 1 writer x 20 ev/s")
    topic = "chaos_churn"
    opened = [0]
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        base = Baseline(service)
        canary = (await live_clients(service, conn, topic, 1))[0]
        canary_task = asyncio.create_task(canary.run(seconds + 60))
        await wait_clients(service, 1)
        database = service.database
        writers = Writers(run.pg, database, topic, count=1, rate=20).start()
        stop = time.monotonic() + seconds
        try:
            await asyncio.gather(*(_churner(service.port, topic, stop, opened)
                                   for _ in range(workers)))
        finally:
            await writers.finish()

        async def settled() -> bool:
            return await service.metric("pgsse_connected_clients") <= 1
        result.figures["clients_back_to_1"] = bool(await wait_until(settled, 10, 0.2))
        await publish_end(conn, topic, [canary])
        await finish([canary_task], 30)
        truth = await truth_of(conn, topic)
        tally_clients(result, [canary], truth)
        result.figures.update(streams_opened=opened[0], committed=len(truth))
        await base.deltas(result)
    failures = loss_failures(result, [canary], resets_ok=False)
    if not result.figures["clients_back_to_1"]:
        failures.append("pgsse_connected_clients not back to 1 within 10 s")
    if result.fd_delta is not None and result.fd_delta > 5:
        failures.append(f"fds +{result.fd_delta} after the churn")
    return result.judge(failures)


async def _churner(port: int, topic: str, stop: float, opened: list[int]) -> None:
    request = (f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").encode()
    for i in range(100_000):  # bounded; ends at ``stop``
        if time.monotonic() >= stop:
            return
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened[0] += 1
            writer.write(request)
            async with asyncio.timeout(random.uniform(0.05, 0.5)):
                await reader.readuntil(b"\r\n\r\n")
                await reader.read(4096)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if writer is not None:
                if i % 2:
                    writer.transport.abort()  # half vanish (RST), half close politely
                else:
                    writer.close()
