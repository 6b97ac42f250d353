"""Chaos scenarios on the service's database role (issue 19): the role made read-only, and
history pruned under a short role ``statement_timeout``.

Both change the role ``pgsse_chaos`` (cluster-wide) and put it back in ``finally``; role
settings apply to new sessions, so each fault ends the service's sessions to take effect.
"""

from __future__ import annotations

import asyncio
import time

from .chaos_faults import head_status
from .chaos_guards import Writers, _guard
from .chaos_infra import (
    SERVICE_ROLE,
    last_position,
    publish_end,
    service_on_fresh_db,
    terminate_backends,
    truth_of,
    wait_clients,
    wait_sequenced,
    wait_until,
)
from .chaos_scenarios import (
    Baseline,
    Result,
    Run,
    finish,
    live_clients,
    loss_failures,
    publish_series,
    run_clients,
    tally_clients,
)

LOSS_EVENTS = ('"sequencer_lost"', '"sequencer_error"', '"sequencer_blocked"')


def sequencer_losses(service: object) -> int:
    """Sequencer connections given up, from the service's log (older versions have no
    metric for it)."""
    text = service.log_path.read_text(errors="replace")  # type: ignore[attr-defined]
    return sum(text.count(f'"event": {name}') for name in LOSS_EVENTS)


def most_attempts(first: float, most: float, window: float) -> int:
    """Reconnects a jittered doubling backoff (0.5–1.5 × the delay) allows in ``window`` s."""
    attempts, elapsed, delay = 1, 0.0, first
    while elapsed + delay * 0.5 <= window:
        elapsed += delay * 0.5
        attempts += 1
        delay = min(delay * 2, most)
    return attempts


async def read_only_role(run: Run) -> Result:
    seconds = 8 if run.quick else 20

    async def fault(service: object, conn: object, result: Result) -> None:
        import asyncpg

        assert isinstance(conn, asyncpg.Connection)
        port: int = service.port  # type: ignore[attr-defined]
        metric = service.metric  # type: ignore[attr-defined]
        await conn.execute(f"ALTER ROLE {SERVICE_ROLE} SET default_transaction_read_only = on")
        try:
            await terminate_backends(conn)
            t0 = time.monotonic()
            first_503: float | None = None
            ok_after = probes = 0
            feed0 = seq0 = 0.0
            while time.monotonic() - t0 < seconds:  # /readyz every 100 ms, like a kubelet
                status, _ = await head_status(port, "/readyz", timeout=2)
                if status == 503 and first_503 is None:
                    first_503 = time.monotonic() - t0
                    feed0 = await metric("pgsse_feed_reconnects_total")
                    seq0 = sequencer_losses(service)
                elif first_503 is not None:
                    probes += 1
                    ok_after += status == 200
                await asyncio.sleep(0.1)
            window = time.monotonic() - t0 - (first_503 or 0.0)
            result.figures.update(
                first_503_s=None if first_503 is None else round(first_503, 2),
                readyz_200_while_read_only=f"{ok_after}/{probes}",
                feed_reconnects_read_only=await metric("pgsse_feed_reconnects_total") - feed0,
                sequencer_reconnects_read_only=sequencer_losses(service) - seq0,
                reconnect_bounds=(most_attempts(0.1, 5.0, window) + 1,
                                  most_attempts(0.5, 5.0, window) + 1))
        finally:
            await conn.execute(f"ALTER ROLE {SERVICE_ROLE} RESET default_transaction_read_only")

    result = await _guard(run, "read_only_role", f"20 clients, 4 writers x 50 ev/s; the "
                          f"service's role read-only for {seconds} s (sessions ended)", fault)
    failures = [] if result.passed else result.verdict.split("; ")
    figures = result.figures
    if figures.get("first_503_s") is None or figures["first_503_s"] > 5:
        failures.append(f"/readyz not 503 within 5 s (first: {figures.get('first_503_s')})")
    if not str(figures.get("readyz_200_while_read_only", "")).startswith("0/"):
        failures.append(f"/readyz 200 while read-only: {figures.get('readyz_200_while_read_only')}")
    feed_bound, seq_bound = figures.get("reconnect_bounds", (0, 0))
    if figures.get("feed_reconnects_read_only", 0) > feed_bound:
        failures.append(f"listener reconnects {figures['feed_reconnects_read_only']} > {feed_bound}")
    if figures.get("sequencer_reconnects_read_only", 0) > seq_bound:
        failures.append("sequencer reconnects "
                        f"{figures['sequencer_reconnects_read_only']} > {seq_bound}")
    return result.judge(failures)


async def prune_role_timeout(run: Run) -> Result:
    retained = 100_000 if run.quick else 300_000
    n_clients = 10
    result = Result("prune_role_timeout", f"{retained:,} events past retention, role "
                    f"statement_timeout 100 ms; {n_clients} clients, 1 writer x 20 ev/s")
    topic = "chaos_prune_timeout"
    async with service_on_fresh_db(run.pg, result.scenario) as (service, conn):
        try:
            for start in range(1, retained + 1, 50_000):
                await publish_series(conn, "chaos_old", min(50_000, retained - start + 1),
                                     start=start)
            head = await last_position(conn)
            await wait_sequenced(conn, head, 60)
            head = await last_position(conn)
            # Past retention (24 h) by a checkpoint dated two days back.
            await conn.execute("INSERT INTO realtime.checkpoints VALUES ($1, now() - interval "
                               "'2 days') ON CONFLICT (position) DO UPDATE SET at = EXCLUDED.at",
                               head)

            async def registered() -> bool:
                value = await conn.fetchval("SELECT min(position) FROM realtime.readers")
                return value is not None and value >= head
            await wait_until(registered, 20, 0.1)
            result.mark("role timeout 100 ms")
            await conn.execute(f"ALTER ROLE {SERVICE_ROLE} SET statement_timeout = '100ms'")
            ended = sequencer_losses(service)
            await terminate_backends(conn)
            # The sequencer notices its ended session (one loss, ours) before counting starts.
            await wait_until(lambda: sequencer_losses(service) > ended, 10, 0.05)
            await service.wait_ready(30)
            base = Baseline(service)
            seq0 = sequencer_losses(service)
            clients = await live_clients(service, conn, topic, n_clients)
            tasks = await run_clients(clients, 150)
            await wait_clients(service, n_clients)
            writers = Writers(run.pg, service.database, topic, count=1, rate=20).start()
            t0 = time.monotonic()
            try:
                async def pruned() -> bool:
                    value = await conn.fetchval("SELECT pruned_through FROM realtime.sequencer")
                    return int(value) >= head
                done = await wait_until(pruned, 90, 0.2)
            finally:
                await writers.finish()
            result.figures.update(
                pruned_s=round(time.monotonic() - t0, 1) if done else None,
                prune_timeouts=await service.metric("pgsse_history_prune_timeouts_total"),
                sequencer_reconnects=sequencer_losses(service) - seq0,
                committed_while_pruning=writers.committed)
            await publish_end(conn, topic, clients)
            await finish(tasks, 45)
            truth = await truth_of(conn, topic)
            tally_clients(result, clients, truth)
            await base.deltas(result)
        finally:
            await conn.execute(f"ALTER ROLE {SERVICE_ROLE} RESET statement_timeout")
    failures = loss_failures(result, clients, resets_ok=False)
    if result.figures["pruned_s"] is None:
        failures.append(f"{retained:,} events not pruned within 90 s")
    if result.figures["sequencer_reconnects"]:
        failures.append(f"the sequencer lost its connection "
                        f"{result.figures['sequencer_reconnects']:.0f} times")
    return result.judge(failures)
