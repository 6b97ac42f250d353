"""Read replicas (contract section 9) against a real primary + hot standby pair
(``tests/replication.py``): the feed, history and aggregates come from the standby, fresh to
a client's position, ready only while the standby keeps up, and safe across failover."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pgsse import db

from tests.replication import ReplicaPair, build_pair
from tests.support import ROOT, ServerProcess, eventually, open_stream, read_sse

pytestmark = pytest.mark.timeout(240)

SCHEMA = """
CREATE TABLE items (id bigserial PRIMARY KEY, writer int NOT NULL, n int NOT NULL);
SELECT realtime.watch('items');
"""


@pytest.fixture
def pair() -> Iterator[ReplicaPair]:
    # Under the project's .data/, not pytest's tmp dir: pytest narrows /tmp/pytest-of-<user>
    # back to 0700 whenever a session starts, and the servers run as another OS user.
    base = ROOT / ".data" / "test" / f"replicas-{uuid.uuid4().hex[:10]}"
    try:
        built = build_pair(base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise

    async def prepare() -> None:
        conn = await asyncpg.connect(built.primary.url())
        try:
            await db.migrate(conn)
            await conn.execute(SCHEMA)
        finally:
            await conn.close()

    try:
        asyncio.run(prepare())
        yield built
    finally:
        built.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        try:
            server.stop()
        except RuntimeError:
            pass


def start(servers: list[ServerProcess], tmp_path: Path, url: str,
          read_url: str | None = None, **env: str) -> ServerProcess:
    extra = {"WAKEUP": "auto", **env}
    if read_url is not None:
        extra["READ_DATABASE_URL"] = read_url
    server = ServerProcess(url, extra, tmp_path)
    servers.append(server)
    return server.start()


async def standby_position(pair: ReplicaPair) -> int:
    conn = await asyncpg.connect(pair.standby.url())
    try:
        return int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM realtime.events"))
    finally:
        await conn.close()


async def primary_head(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT last_position FROM realtime.sequencer WHERE id = 1"))


async def on_standby(pair: ReplicaPair, sql: str) -> Any:
    conn = await asyncpg.connect(pair.standby.url())
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def write(url: str, writer: int, count: int, pace: float = 0.0) -> None:
    conn = await asyncpg.connect(url)
    try:
        for n in range(count):
            await conn.execute("INSERT INTO items (writer, n) VALUES ($1, $2)", writer, n)
            if pace:
                await asyncio.sleep(pace)
    finally:
        await conn.close()


def rows_of(events: list[Any]) -> list[tuple[int, int]]:
    return [(e.json()["row"]["writer"], e.json()["row"]["n"]) for e in events
            if e.event == "items.insert"]


# -- delivery ------------------------------------------------------------------------------


async def test_a_replica_delivers_through_the_standby_exactly_once_in_order(
        pair: ReplicaPair, servers: list[ServerProcess], tmp_path: Path) -> None:
    replica = start(servers, tmp_path, pair.primary.url(), pair.standby.url(),
                    STREAM_MAX_SECONDS="1")
    direct = start(servers, tmp_path, pair.primary.url())
    writers, each = 4, 40
    total = writers * each
    # A resuming client (the stream ends every second and resumes from its last id).
    stream = await open_stream(replica.url + "/events", resuming=True, params={"topic": "items"},
                               until=lambda s: len(rows_of(s.events)) >= total, timeout=90)
    # Paced over ~3 s: the 1 s streams end and resume while writers keep committing.
    await asyncio.gather(*(write(pair.primary.url(), w, each, 0.07) for w in range(writers)))
    got, reconnects = await stream
    rows = rows_of(got.events)
    assert sorted(rows) == [(w, n) for w in range(writers) for n in range(each)], "exactly once"
    for w in range(writers):
        assert [n for writer, n in rows if writer == w] == list(range(each)), "in commit order"
    ids = [int(e.id) for e in got.events if e.event == "items.insert"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert reconnects >= 1, "the client resumed at least once"

    # Same positions and bytes as a process reading the primary.
    same = await read_sse(direct.url + "/events", params={"topic": "items", "last_event_id": "0"},
                          until=lambda s: len(s.events) >= total, timeout=30)
    assert [(e.id, e.event, e.data) for e in same.events] == \
        [(e.id, e.event, e.data) for e in got.events if e.event == "items.insert"]
    # ... and the same ETags for the same aggregate.
    async with httpx.AsyncClient(timeout=10) as client:
        a = await client.get(replica.url + "/aggregates/event_types")
        b = await client.get(direct.url + "/aggregates/event_types")
    assert a.status_code == b.status_code == 200
    assert a.headers["etag"] == b.headers["etag"]
    assert a.json()["data"] == b.json()["data"]

    # The replica's feed is the standby's: with replay paused, it does not see a new event
    # (the primary-reading process does), and it gets it once replay resumes.
    await on_standby(pair, "SELECT pg_wal_replay_pause()")
    live_replica = await open_stream(replica.url + "/events", params={"topic": "items"},
                                     max_events=1, timeout=30)
    live_direct = await open_stream(direct.url + "/events", params={"topic": "items"},
                                    max_events=1, timeout=30)
    await write(pair.primary.url(), 9, 1)
    seen = await live_direct
    assert rows_of(seen.events) == [(9, 0)]
    await asyncio.sleep(0.5)  # a negative check: the standby-reading replica must NOT have it
    assert not live_replica.done(), "a standby-reading replica delivered an event not replayed"
    await on_standby(pair, "SELECT pg_wal_replay_resume()")
    late = await live_replica
    assert [(e.id, e.data) for e in late.events] == [(e.id, e.data) for e in seen.events]


async def test_a_resume_from_a_replica_that_was_ahead_waits_for_the_standby_instead_of_reset(
        pair: ReplicaPair, servers: list[ServerProcess], tmp_path: Path) -> None:
    replica = start(servers, tmp_path, pair.primary.url(), pair.standby.url())
    direct = start(servers, tmp_path, pair.primary.url())
    await on_standby(pair, "SELECT pg_wal_replay_pause()")
    ahead = await open_stream(direct.url + "/events", params={"topic": "items"}, max_events=1,
                              timeout=30)
    await write(pair.primary.url(), 1, 1)
    position = int((await ahead).events[0].id)
    # The replica knows the primary's head (its report), not the event (replay is paused).
    await eventually(lambda: httpx.get(replica.url + "/stats", timeout=5).json()["head"] >= position,
                     timeout=10, what="the replica learned the primary's head")
    # The client moves to the replica that is behind, resuming from what it already has.
    moved = await open_stream(replica.url + "/events",
                              params={"topic": "items", "last_event_id": str(position)},
                              until=lambda s: bool(rows_of(s.events)), timeout=30)
    await asyncio.sleep(0.3)
    await on_standby(pair, "SELECT pg_wal_replay_resume()")
    await write(pair.primary.url(), 2, 1)
    got = await moved
    assert [e.event for e in got.events] == ["items.insert"], got.events
    assert rows_of(got.events) == [(2, 0)]


# -- no reads on the primary ---------------------------------------------------------------

# What the feed, history and aggregates run (sql/queries/feed.sql, aggregates.sql); the
# sequencer's and pruning's own statements (allowed on the primary) contain none of these.
FEED_OR_HISTORY = ("payload_v3", "pgsse_reader", "SELECT last_position, pruned_through",
                   "SELECT tbl, position FROM realtime.table_versions", "FROM realtime.watches",
                   "skipped_through > skipped_from", "$1 > skipped_from")


async def test_the_primary_runs_no_feed_history_or_aggregate_statement_for_a_replica(
        pair: ReplicaPair, servers: list[ServerProcess], tmp_path: Path) -> None:
    replica = start(servers, tmp_path, pair.primary.url(), pair.standby.url())
    primary = await asyncpg.connect(pair.primary.url())
    try:
        await primary.execute("SELECT pg_stat_statements_reset()")
        stream = await open_stream(replica.url + "/events", params={"topic": "items"},
                                   until=lambda s: len(rows_of(s.events)) >= 20, timeout=30)
        await write(pair.primary.url(), 1, 20)
        live = await stream
        first = int(live.events[0].id)
        # History: a replay from 0, one event whole, aggregates (several parameters).
        replay = await read_sse(replica.url + "/events",
                                params={"topic": "items", "last_event_id": "0"},
                                until=lambda s: len(s.events) >= 20, timeout=30)
        assert len(rows_of(replay.events)) == 20
        async with httpx.AsyncClient(timeout=10) as client:
            one = await client.get(f"{replica.url}/events/{first}")
            assert one.status_code == 200, one.text
            for fields in ("type", "events", "type,last_position"):
                got = await client.get(replica.url + "/aggregates/event_types",
                                       params={"fields": fields})
                assert got.status_code == 200, got.text
        await asyncio.sleep(2.5)  # let a reader report to the primary (it must stay lean)
        rows = await primary.fetch("SELECT query, calls FROM pg_stat_statements "
                                   "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'app')")
    finally:
        await primary.close()
    offending = [(r["query"], r["calls"]) for r in rows
                 if any(mark in r["query"] for mark in FEED_OR_HISTORY)]
    assert offending == [], "feed/history/aggregate statements ran on the primary"
    standby_rows = await on_standby(
        pair, "SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%payload_v3%'")
    assert standby_rows > 0, "the standby served the feed and history"


# -- freshness -----------------------------------------------------------------------------


async def test_min_position_waits_for_the_standby_then_answers(
        pair: ReplicaPair, servers: list[ServerProcess], tmp_path: Path) -> None:
    replica = start(servers, tmp_path, pair.primary.url(), pair.standby.url(),
                    MIN_POSITION_WAIT="1s")
    url = replica.url + "/aggregates/event_types"
    primary = await asyncpg.connect(pair.primary.url())
    try:
        await on_standby(pair, "SELECT pg_wal_replay_pause()")
        await primary.execute("INSERT INTO items (writer, n) VALUES (1, 1)")
        wanted = await eventually(lambda: primary_head(primary), what="the event numbered")
    finally:
        await primary.close()
    async with httpx.AsyncClient(timeout=10) as client:
        behind = await client.get(url, params={"min_position": str(wanted)})
        assert behind.status_code == 503, behind.text
        assert behind.json()["error"]["code"] == "behind"
        assert int(behind.headers["retry-after"]) >= 1
        waiting = asyncio.create_task(client.get(url, params={"min_position": str(wanted)}))
        await asyncio.sleep(0.2)
        await on_standby(pair, "SELECT pg_wal_replay_resume()")
        fresh = await waiting
        assert fresh.status_code == 200, fresh.text
        assert fresh.json()["meta"]["position"] >= wanted
        assert {"type": "items.insert", "events": 1, "last_position": wanted} in fresh.json()["data"]
        # Already there: answers at once; nonsense is a 400.
        again = await client.get(url, params={"min_position": "0"})
        assert again.status_code == 200
        bad = await client.get(url, params={"min_position": "x1"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_position"


async def test_min_position_on_a_primary_reading_process(
        pair: ReplicaPair, servers: list[ServerProcess], tmp_path: Path) -> None:
    direct = start(servers, tmp_path, pair.primary.url(), MIN_POSITION_WAIT="300ms")
    async with httpx.AsyncClient(timeout=10) as client:
        far = await client.get(direct.url + "/aggregates/event_types",
                               params={"min_position": "999999"})
        assert far.status_code == 503 and far.json()["error"]["code"] == "behind"
        assert "retry-after" in far.headers


# -- readiness -----------------------------------------------------------------------------


def readyz(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(server.url + "/readyz", timeout=5)
    return response.status_code, response.json()


async def test_readyz_follows_the_standby_and_nothing_is_lost(
        pair: ReplicaPair, servers: list[ServerProcess], tmp_path: Path) -> None:
    replica = start(servers, tmp_path, pair.primary.url(), pair.standby.url(),
                    READY_MAX_LAG="1s", STREAM_MAX_SECONDS="2")
    assert readyz(replica)[1]["checks"]["replica"] == "ok"
    stream = await open_stream(replica.url + "/events", resuming=True, params={"topic": "items"},
                               until=lambda s: len(rows_of(s.events)) >= 30, timeout=120)
    await write(pair.primary.url(), 1, 10)

    pair.standby.stop()
    status, body = await eventually(lambda: (lambda r: r if r[0] == 503 else None)(readyz(replica)),
                                    timeout=10, what="503 while the standby is down")
    assert body["checks"]["replica"] != "ok"
    await write(pair.primary.url(), 2, 10)  # committed while the standby is away
    pair.standby.start()
    await eventually(lambda: readyz(replica)[0] == 200, timeout=5, interval=0.1,
                     what="ready within 5 s of the standby's return")

    # Replay paused: the standby falls behind the primary's head → 503 after READY_MAX_LAG.
    await on_standby(pair, "SELECT pg_wal_replay_pause()")
    await write(pair.primary.url(), 3, 5)
    status, body = await eventually(lambda: (lambda r: r if r[0] == 503 else None)(readyz(replica)),
                                    timeout=15, what="503 while the standby lags")
    assert body["checks"]["replica"].startswith("behind")
    await on_standby(pair, "SELECT pg_wal_replay_resume()")
    await eventually(lambda: readyz(replica)[0] == 200, timeout=5, interval=0.1,
                     what="ready within 5 s once replay resumes")
    await write(pair.primary.url(), 4, 5)
    got, _ = await stream
    assert sorted(rows_of(got.events)) == sorted(
        [(1, n) for n in range(10)] + [(2, n) for n in range(10)] + [(3, n) for n in range(5)]
        + [(4, n) for n in range(5)])


async def test_a_standby_down_at_start_up_delays_readiness_not_sequencing(
        pair: ReplicaPair, servers: list[ServerProcess], tmp_path: Path) -> None:
    pair.standby.stop()
    replica = ServerProcess(pair.primary.url(), {"READ_DATABASE_URL": pair.standby.url()},
                            tmp_path)
    servers.append(replica)
    replica.start(wait_ready=False)
    primary = await asyncpg.connect(pair.primary.url())
    try:
        await primary.execute("INSERT INTO items (writer, n) VALUES (1, 0)")
        # This process is the only one: its sequencer must number the change meanwhile.
        await eventually(lambda: primary_head(primary), timeout=20,
                         what="the change numbered while the standby is down")
    finally:
        await primary.close()
    assert await asyncio.to_thread(lambda: _status(replica)) == 503
    pair.standby.start()
    await asyncio.to_thread(replica.wait_ready, 30)


def _status(server: ServerProcess) -> int:
    try:
        return httpx.get(server.url + "/readyz", timeout=5).status_code
    except httpx.HTTPError:
        return 0


# -- failover ------------------------------------------------------------------------------


async def test_failover_resets_phantoms_and_never_reuses_a_position(
        pair: ReplicaPair, servers: list[ServerProcess], tmp_path: Path) -> None:
    old = start(servers, tmp_path, pair.primary.url())
    shared_stream = await open_stream(old.url + "/events", params={"topic": "items"},
                                      until=lambda s: len(rows_of(s.events)) >= 3, timeout=30)
    await write(pair.primary.url(), 1, 3)
    shared = int((await shared_stream).events[-1].id)
    await eventually(lambda: _at_least(standby_position(pair), shared), timeout=15,
                     what="the standby has the shared events")

    # Two events the standby never receives: it is away while they commit and are numbered,
    # and a client of the old primary gets them.
    pair.standby.stop()
    phantom_stream = await open_stream(old.url + "/events",
                                       params={"topic": "items", "last_event_id": str(shared)},
                                       until=lambda s: len(rows_of(s.events)) >= 2, timeout=30)
    await write(pair.primary.url(), 2, 2)
    phantoms = [int(e.id) for e in (await phantom_stream).events]
    assert len(phantoms) == 2 and phantoms[0] > shared
    old.stop()
    pair.primary.stop("immediate")  # the old primary is lost with them

    pair.standby.start()
    pair.standby.promote()
    await eventually(lambda: _promoted(pair), timeout=30, what="the standby promoted")
    new = start(servers, tmp_path, pair.standby.url())

    def has_new(s: Any) -> bool:
        return bool(rows_of(s.events))

    # Resumes from a phantom and from the last shared position, then a new event.
    phantom_resume = await open_stream(
        new.url + "/events", params={"topic": "items", "last_event_id": str(phantoms[-1])},
        until=has_new, timeout=30)
    shared_resume = await open_stream(
        new.url + "/events", params={"topic": "items", "last_event_id": str(shared)},
        until=has_new, timeout=30)
    await write(pair.standby.url(), 3, 1)
    after_phantom = await phantom_resume
    first = after_phantom.events[0]
    assert first.event == "reset", after_phantom.events
    assert first.json() == {"reason": "unknown_position"}
    fresh = [e for e in after_phantom.events if e.event == "items.insert"]
    assert rows_of(fresh) == [(3, 0)]
    assert int(fresh[0].id) > max(phantoms), "a position of the old primary was reused"

    from_shared = await shared_resume
    assert [e.event for e in from_shared.events] == ["items.insert"], from_shared.events
    assert rows_of(from_shared.events) == [(3, 0)]
    assert from_shared.events[0].id == fresh[0].id
    # A resume from the first phantom too (inside the skipped range, below the new head).
    inside = await read_sse(new.url + "/events",
                            params={"topic": "items", "last_event_id": str(phantoms[0])},
                            max_events=1, timeout=30)
    assert inside.events[0].event == "reset"


async def _at_least(value: Any, wanted: int) -> bool:
    return bool(await value >= wanted)


async def _promoted(pair: ReplicaPair) -> bool:
    try:
        return not await on_standby(pair, "SELECT pg_is_in_recovery()")
    except (OSError, asyncpg.PostgresError):
        return False


# -- deploy --------------------------------------------------------------------------------


def test_compose_replicas_profile_has_a_standby_and_two_standby_reading_replicas() -> None:
    import yaml

    services = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]
    standby, replica, edge = (services.get(name, {}) for name in
                              ("postgres-standby", "pgsse-replica", "nginx-replicas"))
    assert {"replicas"} == set(standby.get("profiles", [])) == set(replica.get("profiles", [])) \
        == set(edge.get("profiles", []))
    assert "pg_basebackup" in " ".join(standby["command"]) and "-R" in " ".join(standby["command"])
    env = replica["environment"]
    assert "@postgres:" in env["DATABASE_URL"] and "@postgres-standby:" in env["READ_DATABASE_URL"]
    assert replica["deploy"]["replicas"] == 2
    upstream = next(v for v in edge["volumes"] if v.endswith(":/etc/nginx/pgsse-upstream.conf:ro"))
    conf = (ROOT / "deploy" / upstream.split(":")[0]).resolve().read_text()
    assert "server pgsse-replica:8000" in conf
    assert any("allow-replication.sh" in v for v in services["postgres"]["volumes"])
