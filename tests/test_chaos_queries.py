"""The chaos suite judges loss against what PostgreSQL committed: its SQL must follow the
schema (a migration that moves events elsewhere must not leave ``make chaos`` unable to read
them). Run here against the current migrations, on a real database."""

from __future__ import annotations

import asyncio

import asyncpg
from pgsse.queries import query

from bench import chaos_infra


async def test_the_chaos_truth_reads_what_was_published_on_its_topic(
        database: str, conn: asyncpg.Connection) -> None:
    for n in (1, 2):
        await conn.execute("SELECT realtime.publish('chaos/a', 'chaos.x', "
                           "jsonb_build_object('w', 3, 'n', $1::int))", n)
    await conn.execute("""SELECT realtime.publish('chaos/b', 'chaos.x', '{"n": 9}')""")
    await conn.execute("""SELECT realtime.publish('chaos/a/below', 'chaos.x', '{"n": 8}')""")
    await conn.fetchval(query("sequence"), 100)
    assert await chaos_infra.truth_of(conn, "chaos/a") == [(1, (3, 1)), (2, (3, 2))]
    assert await chaos_infra.inbox_empty(conn)

    sequencer = await asyncpg.connect(database)  # numbers the end marker meanwhile
    stop = asyncio.Event()

    async def sequence() -> None:
        while not stop.is_set():
            await sequencer.fetchval(query("sequence"), 100)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(sequence())
    try:
        assert await chaos_infra.publish_end(conn, "chaos/a") == 5
    finally:
        stop.set()
        await task
        await sequencer.close()
    assert await chaos_infra.truth_of(conn, "chaos/a") == [(1, (3, 1)), (2, (3, 2))], \
        "the end marker is not part of the truth"
