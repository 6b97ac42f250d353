"""Upgrading in place (issue #9): a database set up by migrations 001 and 002 only (the
inbox-and-move capture), populated and with a writer's transaction still open, is upgraded
by ``pgsse migrate``. Retained history keeps its positions and its exact bytes, pending
changes are numbered after it, and clients resuming with an old ``Last-Event-ID`` continue
without a gap, a duplicate or a ``reset``, through live changes captured the new way."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from pgsse.queries import query
from pgsse.settings import SQL_DIR

from tests.conftest import _with_database
from tests.support import ROOT, eventually, open_stream

Start = Callable[..., Any]
OLD = ("001_realtime.sql", "002_safe_history.sql")


@pytest.fixture
async def old_database(pg_url: str) -> AsyncIterator[str]:
    """A database migrated by hand with 001 and 002 only, recorded as such."""
    name = "up_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = _with_database(pg_url, name)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(query("migrations_table"))
        for file in OLD:
            await conn.execute((SQL_DIR / "migrations" / file).read_text())
            await conn.execute(query("record_migration"), file)
    finally:
        await conn.close()
    yield url
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def migrate(url: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DATABASE_URL=url)
    return subprocess.Popen([sys.executable, "-m", "pgsse", "migrate"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_upgrade_keeps_history_positions_and_resumes(
        old_database: str, start_server: Start) -> None:
    conn = await asyncpg.connect(old_database)
    writer = await asyncpg.connect(old_database)
    try:
        await conn.execute("CREATE TABLE items (id int PRIMARY KEY, shop text, name text, secret text)")
        await conn.execute("SELECT realtime.watch('items', 'items', 'shop', ARRAY['id', 'shop', 'name'])")
        await conn.execute("INSERT INTO items SELECT g, 's' || (g % 3), 'n' || g, 'x' "
                           "FROM generate_series(1, 30) g")
        await conn.execute("UPDATE items SET shop = 'moved' WHERE id = 4")   # a key change
        await conn.execute("DELETE FROM items WHERE id = 5")
        await conn.execute("SELECT realtime.publish('alerts', 'alert.raised', '{\"b\": 1, \"a\": [1, 2]}')")
        while await conn.fetchval("SELECT realtime.sequence_v2()"):
            pass
        # History pruned through 3, as prune() leaves it.
        await conn.execute("DELETE FROM realtime.events WHERE position <= 3")
        await conn.execute("UPDATE realtime.sequencer SET pruned_through = 3")
        before = {r["position"]: (list(r["topics"]), r["type"], r["payload"]) for r in await conn.fetch(
            "SELECT position, topics, type, payload::text AS payload FROM realtime.events")}
        head = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
        assert sorted(before) == list(range(4, head + 1)) and head == 33
        # Committed but not numbered yet (the old sequencer did not run again).
        await conn.execute("INSERT INTO items VALUES (100, 's1', 'pending', 'x')")
        await conn.execute("SELECT realtime.publish('alerts', 'pending.publish', '{}')")
        # A writer whose transaction is open across the upgrade, captured the old way.
        tr = writer.transaction()
        await tr.start()
        await writer.execute("INSERT INTO items VALUES (200, 's2', 'in flight', 'x')")

        upgrade = migrate(old_database)
        # The migration waits for the open writer (it locks the old tables), then goes on.
        await eventually(lambda: conn.fetchval(
            "SELECT count(*) > 0 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT l.granted AND n.nspname IN ('realtime', 'public')"),
            what="the migration waiting for the open writer")
        await tr.commit()
        out, _ = await asyncio.to_thread(upgrade.communicate, timeout=60)
        assert upgrade.returncode == 0, out.decode()
        applied = {r["name"] for r in await conn.fetch("SELECT name FROM realtime.migrations")}
        assert "003_lean_capture.sql" in applied
        again = migrate(old_database)
        out, _ = await asyncio.to_thread(again.communicate, timeout=60)
        assert again.returncode == 0, out.decode()

        # The numbering survived; pending changes come right after it, in insert order.
        assert await conn.fetchval("SELECT last_position FROM realtime.sequencer") == head + 3
        assert await conn.fetchval("SELECT pruned_through FROM realtime.sequencer") == 3
        assert await conn.fetchval("SELECT count(*) FROM realtime.inbox") == 0
        rows = [r for r in await conn.fetch(query("read_events"), 3, 1000) if r["position"]]
        after = {r["position"]: (list(r["topics"]), r["type"], r["payload"]) for r in rows}
        assert {p: after[p] for p in before} == before, "retained events are byte-identical"
        assert [after[p][1] for p in (head + 1, head + 2, head + 3)] == [
            "items.insert", "pending.publish", "items.insert"]
        assert json.loads(after[head + 3][2])["row"] == {"id": 200, "shop": "s2", "name": "in flight"}

        server = start_server(url=old_database)
        # A client that had read up to position 10 before the upgrade, and one that had
        # read everything; both resume and stay open for what is written next.
        old_id = 10
        resumed = await open_stream(server.url + "/events", params={"topic": ["items", "alerts"]},
                                    headers={"Last-Event-ID": str(old_id)}, timeout=30,
                                    until=lambda s: len(s.events) >= head + 3 - old_id + 4)
        current = await open_stream(server.url + "/events", params={"topic": "items"},
                                    headers={"Last-Event-ID": str(head + 3)}, timeout=30,
                                    until=lambda s: len(s.events) >= 3)
        await conn.execute("INSERT INTO items VALUES (300, 's0', 'new', 'x'), (301, 's0', 'new', 'x')")
        await conn.execute("UPDATE items SET shop = 's9' WHERE id = 300")
        await conn.execute("SELECT realtime.publish('alerts', 'after.upgrade', '{}')")
        first, second = await resumed, await current
        ids = [int(e.id) for e in first.events if e.id is not None]
        assert [e.event for e in first.events if e.event == "reset"] == []
        assert ids == list(range(old_id + 1, head + 3 + 5)), "no gap, no duplicate"
        for event in first.events[: head - old_id]:
            assert event.data == before[int(event.id or 0)][2]
        live = [e.json() for e in first.events[-4:]]
        assert [e.get("op") for e in live] == ["insert", "insert", "update", None]
        assert live[2]["old"]["shop"] == "s0" and live[2]["topic"] == "items/s9"
        assert "secret" not in live[0]["row"]
        assert [int(e.id or 0) for e in second.events] == [head + 4, head + 5, head + 6]
    finally:
        await writer.close()
        await conn.close()
