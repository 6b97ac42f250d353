"""The demo: a commerce schema with data, and a writer that keeps it moving."""

from __future__ import annotations

import asyncio
import logging
import random

import asyncpg

from .settings import SQL_DIR

log = logging.getLogger("pgsse.demo")

SEED_ORDERS_SQL = """
INSERT INTO demo.orders (store_id, product_id, quantity, total, status, created_at, updated_at)
SELECT p.store_id, p.id, q, p.price * q,
       (ARRAY['pending','paid','shipped','delivered','cancelled'])[1 + (g % 5)],
       now() - (g % 90) * interval '1 day' - (g % 1440) * interval '1 minute',
       now() - (g % 90) * interval '1 day'
FROM generate_series(1, $1::int) AS g
CROSS JOIN LATERAL (SELECT 1 + (g * 7) % 4 AS q) qty
JOIN demo.products p ON p.id = 1 + (g * 13) % 30
"""

NEXT_STATUS = {"pending": "paid", "paid": "shipped", "shipped": "delivered"}


async def install(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, orders: int = 2000) -> None:
    """Create the demo schema (idempotent) and seed orders when there are none."""
    await conn.execute((SQL_DIR / "demo" / "schema.sql").read_text())
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM demo.orders)"):
        async with conn.transaction():
            # The seed is history, not news: keep it out of the event log.
            await conn.execute("ALTER TABLE demo.orders DISABLE TRIGGER pgsse_capture_insert")
            await conn.execute(SEED_ORDERS_SQL, orders)
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
            await conn.execute(
                "INSERT INTO demo.orders (store_id, product_id, quantity, total) "
                "SELECT store_id, id, $2::int, price * $2::int FROM demo.products WHERE id = $1",
                random.randint(1, 30), random.randint(1, 5))
        elif roll < 0.95:
            row = await conn.fetchrow(
                "SELECT id, status FROM demo.orders WHERE status IN ('pending','paid','shipped') "
                "AND store_id = $1 ORDER BY created_at DESC LIMIT 1 OFFSET $2",
                random.randint(1, 3), random.randint(0, 5))
            if row is not None:
                status = "cancelled" if random.random() < 0.05 else NEXT_STATUS[row["status"]]
                await conn.execute(
                    "UPDATE demo.orders SET status = $2, updated_at = now() WHERE id = $1",
                    row["id"], status)
        else:
            store = random.randint(1, 3)
            async with conn.transaction():
                payout_id = await conn.fetchval(
                    "INSERT INTO demo.payouts (store_id, amount) VALUES ($1, $2) RETURNING id",
                    store, round(random.uniform(50, 500), 2))
                await conn.execute(
                    "UPDATE demo.payouts SET status = 'paid' WHERE id = $1", payout_id)
                await conn.execute(
                    "SELECT realtime.publish($1, 'payout.status.changed', "
                    "jsonb_build_object('payout_id', $2::bigint, 'store_id', $3::int, 'status', 'paid'))",
                    f"payouts/{store}", payout_id, store)
