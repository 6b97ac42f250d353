"""The demo: a commerce schema with data, and a writer that keeps it moving."""

from __future__ import annotations

import asyncio
import logging
import random

import asyncpg

from .queries import Lock, query
from .settings import SQL_DIR

log = logging.getLogger("pgsse.demo")

NEXT_STATUS = {"pending": "paid", "paid": "shipped", "shipped": "delivered"}


async def install(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, orders: int = 2000) -> None:
    """Create the demo schema (idempotent) and seed orders when there are none; under the
    migration lock, since every worker of ``WORKERS=N`` installs it at start."""
    async with conn.transaction():
        await conn.execute(query("take_lock"), Lock.MIGRATE)
        await conn.execute((SQL_DIR / "demo" / "schema.sql").read_text())
        if not await conn.fetchval(query("demo_has_orders")):
            # The seed is history, not news: keep it out of the event log.
            await conn.execute("ALTER TABLE demo.orders DISABLE TRIGGER pgsse_capture_insert")
            await conn.execute(query("demo_seed_orders"), orders)
            await conn.execute("ALTER TABLE demo.orders ENABLE TRIGGER pgsse_capture_insert")
            await conn.execute("ANALYZE demo.orders")
    log.info("demo installed", extra={"event": "demo_installed"})


class Writer:
    """Creates orders, advances their statuses and pays stores out, ``rate`` times a second."""

    def __init__(self, url: str, rate: float) -> None:
        self.url = url
        self.rate = rate

    async def run(self, stop: asyncio.Event) -> None:
        conn: asyncpg.Connection | None = None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=random.expovariate(self.rate))
                break
            except TimeoutError:
                pass
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.url, timeout=5)
                await self.step(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("demo writer error", extra={"event": "demo_writer_error", "error": repr(exc)})
                conn = None
                await asyncio.sleep(1)
        if conn is not None:
            await conn.close()
        log.info("demo writer stopped", extra={"event": "demo_writer_stopped"})

    async def step(self, conn: asyncpg.Connection) -> None:
        roll = random.random()
        if roll < 0.5:
            await conn.execute(query("demo_new_order"), random.randint(1, 30),
                               random.randint(1, 5))
        elif roll < 0.95:
            row = await conn.fetchrow(query("demo_open_order"), random.randint(1, 3),
                                      random.randint(0, 5))
            if row is not None:
                status = "cancelled" if random.random() < 0.05 else NEXT_STATUS[row["status"]]
                await conn.execute(query("demo_set_status"), row["id"], status)
        else:
            store = random.randint(1, 3)
            async with conn.transaction():
                payout_id = await conn.fetchval(query("demo_new_payout"), store,
                                                round(random.uniform(50, 500), 2))
                await conn.execute(query("demo_pay_payout"), payout_id)
                await conn.execute(query("demo_publish_payout"), f"payouts/{store}", payout_id,
                                   store)
