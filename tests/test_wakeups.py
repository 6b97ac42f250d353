"""A wake-up that lands while the work it asks for is already under way is not lost.

The listener reads events and then waits for a NOTIFY (or its safety poll); the sequencer
numbers changes and then waits for a writer's NOTIFY (or its idle poll). A notification that
arrives during the read or the numbering, too late for that statement's snapshot, must make
the loop go round again at once. Both tests put one exactly there, on a real PostgreSQL, with
the polls stretched to 60 s: with the wake-up lost, the event waits a whole poll.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pgsse import feed
from pgsse.feed import EventDecoder, Listener, Sequencer
from pgsse.hub import Hub
from pgsse.queries import query
from pgsse.settings import Settings

from tests.support import eventually

LONG_POLL = 60.0


async def test_a_notify_during_the_listeners_read_is_not_lost(
        database: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed, "SAFETY_POLL_SECONDS", LONG_POLL)
    hub = Hub()
    listener = Listener(Settings(), database, hub, EventDecoder(8000))
    real_catch_up = listener.catch_up
    reads = 0

    async def catch_up(c: asyncpg.Connection) -> None:
        nonlocal reads
        await real_catch_up(c)
        reads += 1
        if reads == 2:
            # The read is done (nothing new in its snapshot); now an event is committed and
            # sequenced, and its NOTIFY reaches the listener before the loop goes on.
            await conn.execute("SELECT realtime.publish('orders/1', 'x', '{}')")
            await conn.fetchval(query("sequence"), 100)
            head = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
            await eventually(lambda: listener.head >= head, 5, 0.005, "its NOTIFY (the new head)")

    monkeypatch.setattr(listener, "catch_up", catch_up)
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.wait_for(listener.started.wait(), 10)
        # The second read: after the listener has gone round once. (Waited for: published
        # before the first read clears its wake-up, the event's NOTIFY is rightly absorbed by
        # that read, there is no second one, and the test hung on a CPU-loaded machine.)
        await eventually(lambda: reads >= 1, what="the listener's first read")
        await conn.execute("SELECT realtime.publish('orders/1', 'x', '{}')")
        await conn.fetchval(query("sequence"), 100)
        await eventually(lambda: hub.position >= 2,
                         what="the event whose NOTIFY came during a read, without waiting a poll")
        assert reads >= 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_writers_notify_while_the_sequencer_numbers_is_not_lost(
        database: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed, "IDLE_POLL_SECONDS", LONG_POLL)
    monkeypatch.setattr(feed, "SAFETY_POLL_SECONDS", LONG_POLL)
    sequencer = Sequencer(Settings(wakeup="auto"), database)
    armed = False
    fired = False
    batches = 0
    wakeups = 0
    on_wakeup = sequencer._on_wakeup

    def counted(*args: Any) -> None:
        nonlocal wakeups
        wakeups += 1
        on_wakeup(*args)

    monkeypatch.setattr(sequencer, "_on_wakeup", counted)

    class Spy:
        """The sequencer's own connection, with a writer committing right after a batch."""

        def __init__(self, real: asyncpg.Connection) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        async def execute(self, sql: str, *args: Any) -> Any:
            nonlocal armed
            result = await self.real.execute(sql, *args)
            if sql == query("set_wake_writers") and args == (True,) and batches:
                armed = True  # found idle: from now on writers NOTIFY
            return result

        async def fetchval(self, sql: str, *args: Any) -> Any:
            nonlocal batches, fired
            result = await self.real.fetchval(sql, *args)
            if sql != query("sequence"):
                return result
            batches += 1
            if armed and not fired:
                fired = True
                # Committed after this batch's snapshot: the writer sees the flag and
                # sends its wake-up, which arrives before the sequencer waits.
                before = wakeups
                await writer.execute("SELECT realtime.publish('orders/1', 'x', '{}')")
                await eventually(lambda: wakeups > before, 5, 0.005, "the writer's NOTIFY")
            return result

    real_dedicated = feed.dedicated

    @contextlib.asynccontextmanager
    async def dedicated(url: str, name: str) -> AsyncIterator[Any]:
        async with real_dedicated(url, name) as real:
            yield Spy(real)

    monkeypatch.setattr(feed, "dedicated", dedicated)
    writer = await asyncpg.connect(database)  # the test's own connection polls meanwhile
    stop = asyncio.Event()
    task = asyncio.create_task(sequencer.run(stop))
    try:
        await eventually(lambda: conn.fetchval("SELECT last_position >= 1 FROM realtime.sequencer"),
                         what="the change whose wake-up came during a batch, without waiting a poll")
        assert fired
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await writer.close()
