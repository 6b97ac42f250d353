"""Attacks on the promises (issue #14), each against a real PostgreSQL and a real server:
no silent gap when history is pruned under a listener or a replay, bulk transactions keep
fast readers, dropped sockets are really gone, readiness is steady and honest, strict
claims, header timeouts, SSE-safe names, and sequencing that does not degrade.

The heavy versions of these live in ``make chaos`` (bench/chaos.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import jwt
import pytest

Start = Callable[..., Any]
ID = re.compile(rb"^id: (\d+)$", re.M)


# --- helpers ------------------------------------------------------------------------------

class RawStream:
    """An SSE client on a raw socket: it reads only when asked, like a stalled browser."""

    def __init__(self, port: int, query: str, rcvbuf: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET /events?{query} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        self.raw = b""
        self.closed = False

    def read(self, seconds: float, until: Callable[[RawStream], bool] | None = None) -> None:
        deadline = time.monotonic() + seconds
        while not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                chunk = None
            except ConnectionResetError:
                chunk = b""
            if chunk == b"":
                self.closed = True
            elif chunk:
                self.raw += chunk
            if until is not None and until(self):
                return

    @property
    def body(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.raw else b""

    def frames(self) -> list[tuple[str, int | None]]:
        """(event type, id) of every complete frame, chunk markers removed."""
        text = re.sub(rb"\r\n[0-9a-f]+\r\n", b"", b"\r\n" + self.body)
        out = []
        for frame in text.split(b"\n\n")[:-1]:
            kind, position = "message", None
            for line in frame.split(b"\n"):
                if line.startswith(b"event: "):
                    kind = line[7:].decode()
                elif line.startswith(b"id: "):
                    position = int(line[4:])
            if b"data: " in frame or position is not None:
                out.append((kind, position))
        return out

    def ids(self) -> list[int]:
        return [int(m) for m in ID.findall(self.body)]

    def close(self) -> None:
        self.sock.close()


def check_no_silent_gap(frames: list[tuple[str, int | None]], first: int, last: int) -> int:
    """Every position from ``first`` to ``last`` once, in order, except after a ``reset``
    (which carries the position delivery continues from). Returns the number of resets."""
    expected = first
    resets = 0
    for kind, position in frames:
        if position is None:
            continue
        if kind == "reset":
            resets += 1
            assert position >= expected - 1, f"reset went backwards to {position}"
            expected = position + 1
            continue
        assert position == expected, f"expected {expected}, got {position} (silent gap or dup)"
        expected += 1
    assert expected == last + 1, f"stopped at {expected - 1}, wanted {last}"
    return resets


async def head(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT last_position FROM realtime.sequencer"))


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stats(server: Any) -> dict[str, Any]:
    return httpx.get(server.url + "/stats", timeout=5).json()  # type: ignore[no-any-return]


def metric(server: Any, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def own_role(conn: asyncpg.Connection, database: str) -> tuple[str, str]:
    """A login role for the service alone (logins can then be refused to it only)."""
    role = "svc_" + uuid.uuid4().hex[:8]
    await conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
    parts = urlsplit(database)
    host = parts.hostname or ""
    netloc = f"{role}@{host}" + (f":{parts.port}" if parts.port else "")
    return role, urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def refuse_logins(conn: asyncpg.Connection, role: str, application: str = "pgsse-%") -> None:
    await conn.execute(f"ALTER ROLE {role} NOLOGIN")
    await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE usename = $1 AND application_name LIKE $2", role, application)


# --- 1. no silent gap ---------------------------------------------------------------------

async def test_prune_while_the_listener_is_away_resets_live_clients(
        start_server: Start, conn: asyncpg.Connection, database: str) -> None:
    role, url = await own_role(conn, database)
    server = start_server(url=url)
    start = await head(conn)
    clients = [RawStream(server.port, "topic=gap") for _ in range(5)]
    await wait_for(lambda: stats(server)["clients"] == 5, 10, "5 live streams")
    await refuse_logins(conn, role, "pgsse-listener")
    await wait_for(lambda: metric(server, "pgsse_feed_up") == 0, 10, "the listener to be away")
    for i in range(200):
        await conn.execute("SELECT realtime.publish('gap', 'tick', jsonb_build_object('i', $1::int))", i)
    sequenced = await wait_for(lambda: _at_least(conn, start + 200), 10, "200 sequenced")
    await conn.execute("SELECT realtime.prune('0')")
    await conn.execute("SELECT realtime.publish('gap', 'after', '{}')")
    await conn.execute(f"ALTER ROLE {role} LOGIN")
    last = sequenced + 1
    for client in clients:
        client.read(15, until=lambda c: last in c.ids())
        frames = client.frames()
        assert ("reset", sequenced) in frames, f"no reset: {frames[:5]}…"
        assert check_no_silent_gap(frames, start + 1, last) == 1
        client.close()


async def _at_least(conn: asyncpg.Connection, value: int) -> int | None:
    current = await head(conn)
    return current if current >= value else None


async def test_prune_during_a_history_replay_is_a_reset_not_a_gap(
        start_server: Start, conn: asyncpg.Connection) -> None:
    server = start_server({"REPLAY_MEMORY_BYTES": "0"})
    start = await head(conn)
    await conn.execute("SELECT realtime.publish('replay', 'tick', jsonb_build_object('i', g, "
                       "'pad', repeat('r', 200))) FROM generate_series(1, 20000) g")
    end = await wait_for(lambda: _at_least(conn, start + 20000), 20, "20,000 sequenced")
    await wait_for(lambda: stats(server)["position"] >= end, 10, "the server to read them")
    # A reader that stalls after its first bytes: the replay is mid-way when prune runs.
    client = RawStream(server.port, f"topic=replay&last_event_id={start}", rcvbuf=8192)
    client.read(5, until=lambda c: len(c.ids()) >= 20)
    assert client.ids() and client.ids()[-1] < end, "the replay must still be in progress"
    await conn.execute("SELECT realtime.prune('0')")
    await conn.execute("SELECT realtime.publish('replay', 'after', '{}')")
    client.read(30, until=lambda c: end + 1 in c.ids())
    resets = check_no_silent_gap(client.frames(), start + 1, end + 1)
    assert resets == 1, "the pruned part was announced with a reset"
    client.close()


# --- 2. bulk writes keep their readers ---------------------------------------------------

@pytest.mark.parametrize("events,size", [(10_000, 1000), (5, 250_000)])
async def test_a_bulk_transaction_keeps_every_fast_reader(
        start_server: Start, conn: asyncpg.Connection, events: int, size: int) -> None:
    server = start_server()
    start = await head(conn)
    readers = 20
    clients = [await _async_stream(server.port, "topic=bulk") for _ in range(readers)]
    await wait_for(lambda: stats(server)["clients"] == readers, 10, "live readers")
    await conn.execute(
        "SELECT realtime.publish('bulk', 'row', jsonb_build_object('i', g, 'pad', repeat('b', $1))) "
        "FROM generate_series(1, $2) g", size, events)
    end = start + events
    results = await asyncio.gather(*(_read_until(reader, end, 60) for reader in clients))
    for ids in results:
        assert ids == list(range(start + 1, end + 1)), "each event exactly once, in order"
    assert metric(server, "pgsse_slow_clients_dropped_total") == 0



async def _async_stream(port: int, query: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(f"GET /events?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _read_until(pair: tuple[asyncio.StreamReader, asyncio.StreamWriter], end: int,
                      seconds: float) -> list[int]:
    reader, writer = pair
    buffer = b""
    ids: list[int] = []
    try:
        async with asyncio.timeout(seconds):
            while not ids or ids[-1] < end:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    break
                buffer += chunk
                cut = buffer.rfind(b"\n\n")
                if cut >= 0:
                    ids.extend(int(m) for m in ID.findall(buffer[:cut]))
                    buffer = buffer[cut:]
    except TimeoutError:
        pass
    writer.close()
    return ids


# --- 3. closed means gone ----------------------------------------------------------------

def fds(pid: int) -> int:
    """Sockets the process holds (its database connections vary; count TCP peers only)."""
    return len(tcp_peers(pid))


def tcp_peers(pid: int) -> list[str]:
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = []
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] != "0A":  # not the listening socket
                peers.append(fields[2])
    return peers


async def test_readers_that_never_read_are_dropped_and_their_sockets_freed(
        start_server: Start, conn: asyncpg.Connection) -> None:
    server = start_server({"SLOW_CLIENT_SECONDS": "1", "MAX_CONNECTIONS_PER_CLIENT": "30"})
    assert server.proc is not None
    baseline = fds(server.proc.pid)
    start = await head(conn)
    stuck = [RawStream(server.port, "topic=zombie", rcvbuf=4096) for _ in range(20)]
    await wait_for(lambda: stats(server)["clients"] == 20, 10, "20 streams")
    await conn.execute("SELECT realtime.publish('zombie', 'blob', jsonb_build_object('i', g, "
                       "'pad', repeat('z', 4000))) FROM generate_series(1, 2000) g")
    await wait_for(lambda: metric(server, "pgsse_slow_clients_dropped_total") >= 20, 20,
                   "20 slow drops")
    try:
        await wait_for(lambda: fds(server.proc.pid) <= baseline, 10, "client sockets all closed")
    except AssertionError:
        print(server.logs()[-5000:], tcp_peers(server.proc.pid), stats(server))
        raise
    await wait_for(lambda: not queued_sockets(server.port), 10, "kernel send queues freed")
    assert stats(server)["clients"] == 0
    assert metric(server, "pgsse_connected_clients") == 0
    # Still unread on our side: the server aborted without waiting for us.
    # The per-address limit counts what is really open: a new stream is admitted.
    again = RawStream(server.port, f"topic=zombie&last_event_id={start}")
    again.read(20, until=lambda c: start + 2000 in c.ids())
    assert again.ids() == list(range(start + 1, start + 2001)), "resumed without loss"
    for client in stuck + [again]:
        client.close()


def queued_sockets(port: int) -> list[str]:
    """Server-side TCP sockets on ``port`` still holding unsent bytes (FIN-WAIT with a
    send queue: what a graceful close leaves for a peer that never reads)."""
    held = []
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            tx_queue = int(fields[4].split(":")[0], 16)
            if local_port == port and fields[3] != "0A" and tx_queue > 0:
                held.append(f"state {fields[3]} tx {tx_queue}")
    return held


# --- 5. readiness -------------------------------------------------------------------------

async def test_readiness_is_steady_under_load_and_honest_in_an_outage(
        start_server: Start, conn: asyncpg.Connection, database: str) -> None:
    role, url = await own_role(conn, database)
    server = start_server(url=url)
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            await conn.execute("SELECT realtime.publish('ready', 'tick', '{}')")
            await asyncio.sleep(0.01)

    task = asyncio.create_task(writer())
    bad = []
    probes = 0
    async with httpx.AsyncClient(timeout=5) as client:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            response = await client.get(server.url + "/readyz")
            probes += 1
            if response.status_code != 200:
                bad.append(response.text)
            await asyncio.sleep(0.05)
        stop.set()
        await task
        assert probes > 50 and not bad, f"{len(bad)} of {probes} probes failed: {bad[:3]}"
        await refuse_logins(conn, role)
        began = time.monotonic()
        await wait_for(lambda: httpx.get(server.url + "/readyz").status_code == 503, 5,
                       "503 in an outage")
        assert time.monotonic() - began < 5
        assert httpx.get(server.url + "/healthz").status_code == 200, "liveness only"
        await conn.execute(f"ALTER ROLE {role} LOGIN")
        await wait_for(lambda: httpx.get(server.url + "/readyz").status_code == 200, 5,
                       "200 after recovery")


# --- 6. strict claims ---------------------------------------------------------------------

KEY = "faults-key-0123456789abcdef0123456789"


def raw_token(claims_json: str) -> str:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(claims_json.encode())
    signature = hmac.new(KEY.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64(signature)


def test_time_claims_must_be_numbers_in_range(start_server: Start) -> None:
    server = start_server({"AUTH_SECRET": KEY})
    later = int(time.time()) + 300
    shapes = {
        "exp as a numeric string": f'{{"topics":["*"],"exp":"{later}"}}',
        "exp with 400 digits": '{"topics":["*"],"exp":' + "9" * 400 + "}",
        "exp overflowing a float": '{"topics":["*"],"exp":1e400}',
        "nbf as a string": f'{{"topics":["*"],"exp":{later},"nbf":"0"}}',
        "iat as a string": f'{{"topics":["*"],"exp":{later},"iat":"0"}}',
        "exp negative": '{"topics":["*"],"exp":-5}',
        "exp a boolean": '{"topics":["*"],"exp":true}',
    }
    for name, claims in shapes.items():
        token = raw_token(claims)
        for path in ("/events?topic=a", "/aggregates/event_types", "/stats", "/openapi.json"):
            response = httpx.get(server.url + path, headers={"Authorization": f"Bearer {token}"},
                                 timeout=5)
            assert response.status_code == 401, (name, path, response.status_code, response.text)
            assert response.json()["error"]["code"] == "invalid_token", (name, response.text)
    good = jwt.encode({"topics": ["*"], "exp": later}, KEY, algorithm="HS256")
    assert httpx.get(server.url + "/stats", headers={"Authorization": f"Bearer {good}"}).status_code == 200


# --- 7. header timeout --------------------------------------------------------------------

async def test_connections_without_complete_headers_are_closed(start_server: Start) -> None:
    server = start_server({"HEADER_TIMEOUT": "2"})
    slow = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    began = time.monotonic()
    response = httpx.get(server.url + "/healthz", timeout=5)
    assert response.status_code == 200 and time.monotonic() - began < 2
    for sock in slow:
        sock.sendall(b"X-Slow: 1\r\n")  # one header line, never the end of the headers
    closed = 0
    for sock in slow:
        sock.settimeout(max(0.1, began + 6 - time.monotonic()))
        try:
            if sock.recv(1) == b"":
                closed += 1
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
        sock.close()
    assert closed == len(slow), f"{len(slow) - closed} of {len(slow)} still open after 6 s"


# --- 8. SSE-safe names --------------------------------------------------------------------

async def test_a_table_name_cannot_forge_sse_fields(start_server: Start,
                                                    conn: asyncpg.Connection) -> None:
    evil = 'x\nid: 7\nevent: bogus\ndata: {"forged":1}'
    quoted = '"' + evil.replace('"', '""') + '"'
    await conn.execute(f"CREATE TABLE {quoted} (id int PRIMARY KEY)")
    with pytest.raises(asyncpg.InvalidParameterValueError, match="control characters"):
        await conn.execute("SELECT realtime.watch($1::regclass, 'evil')", quoted)
    # Watched under a safe name, then renamed: the stream still writes no forged field.
    await conn.execute("CREATE TABLE renamed (id int PRIMARY KEY)")
    await conn.execute("SELECT realtime.watch('renamed', 'evil')")
    await conn.execute(f"DROP TABLE {quoted}")
    await conn.execute(f"ALTER TABLE renamed RENAME TO {quoted}")
    server = start_server()
    start = await head(conn)
    client = RawStream(server.port, "topic=evil")
    await wait_for(lambda: stats(server)["clients"] == 1, 10, "live")
    await conn.execute(f"INSERT INTO {quoted} VALUES (1)")
    client.read(10, until=lambda c: b"data: " in c.body and b"\n\n" in c.body.split(b"data: ", 1)[1])
    assert client.ids() == [start + 1], client.body
    assert b"\nevent: bogus" not in client.body and b'\ndata: {"forged"' not in client.body
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await conn.execute("SELECT realtime.publish('a', E'x\\nid: 9', '{}')")
    client.close()


# --- 9. leaks -----------------------------------------------------------------------------

async def test_openapi_needs_a_token_redirects_are_relative_and_big_events_can_be_fetched(
        start_server: Start, conn: asyncpg.Connection) -> None:
    server = start_server({"AUTH_SECRET": KEY, "MAX_EVENT_BYTES": "2048"})
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    narrow = jwt.encode({"topics": ["big"], "exp": int(time.time()) + 300}, KEY, algorithm="HS256")
    wide = jwt.encode({"topics": ["*"], "exp": int(time.time()) + 300}, KEY, algorithm="HS256")
    auth = {"Authorization": f"Bearer {narrow}"}
    spec = httpx.get(server.url + "/openapi.json", headers=auth).json()
    assert not any(p.startswith("/aggregates/event_types") for p in spec["paths"])
    spec = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {wide}"}).json()
    assert any(p.startswith("/aggregates/event_types") for p in spec["paths"])
    redirect = httpx.get(server.url + "/healthz/?a=1", headers={"Host": "evil.example"})
    assert redirect.status_code == 307 and redirect.headers["location"] == "/healthz?a=1"

    start = await head(conn)
    client = RawStream(server.port, "topic=big", headers=auth)
    await wait_for(lambda: stats_with(server, wide)["clients"] == 1, 10, "live")
    await conn.execute("SELECT realtime.publish('big', 'huge', jsonb_build_object('pad', repeat('h', 5000)))")
    client.read(10, until=lambda c: bool(c.ids()))
    data = json.loads(client.body.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert data["truncated"] is True and data["position"] == start + 1
    assert data["topic"] == "big" and data["bytes"] > 5000
    whole = httpx.get(server.url + data["href"], headers=auth)
    assert whole.status_code == 200 and len(whole.json()["data"]["pad"]) == 5000
    other = jwt.encode({"topics": ["other"], "exp": int(time.time()) + 300}, KEY, algorithm="HS256")
    assert httpx.get(server.url + data["href"],
                     headers={"Authorization": f"Bearer {other}"}).status_code == 404
    assert httpx.get(server.url + "/events/x1", headers=auth).status_code == 400
    client.close()


def stats_with(server: Any, token: str) -> dict[str, Any]:
    return httpx.get(server.url + "/stats",  # type: ignore[no-any-return]
                     headers={"Authorization": f"Bearer {token}"}, timeout=5).json()


# --- 10. sequencing that does not degrade -------------------------------------------------

async def test_a_burst_after_an_idle_inbox_is_sequenced_quickly(
        start_server: Start, conn: asyncpg.Connection) -> None:
    server = start_server()
    start = await head(conn)
    # Idle: the sequencer has run (and planned) its batch against an empty inbox many times.
    await wait_for(lambda: metric(server, "pgsse_sequencer_leader") == 1, 10, "a leader")
    await wait_for(lambda: conn.fetchval("SELECT wake_writers FROM realtime.sequencer"), 10,
                   "the sequencer to have found the inbox idle")
    await conn.execute("SELECT realtime.publish('burst', 'tick', jsonb_build_object('i', g)) "
                       "FROM generate_series(1, 30000) g")
    began = time.monotonic()
    await wait_for(lambda: _at_least(conn, start + 30000), 10, "30,000 sequenced")
    assert time.monotonic() - began < 3


# --- 4. every cache bounded in real bytes -------------------------------------------------

def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_flood_of_unique_parameters_keeps_memory_bounded(start_server: Start, tmp_path: Any) -> None:
    folder = tmp_path / "aggregates"
    folder.mkdir()
    (folder / "echo.sql").write_text(
        "-- Echo one text parameter.\n-- param q: text = x\n-- cache: no-cache\nSELECT :q AS q\n")
    server = start_server({"AGGREGATES_DIR": str(folder), "AGGREGATE_RATE_PER_SECOND": "1000000",
                           "AGGREGATE_CACHE_BYTES": "1000000"})
    assert server.proc is not None
    statuses: dict[int, int] = {}
    client_error = ""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i in range(200):  # warm-up: allocator arenas, prepared statements
            client.get("/aggregates/echo", params={"q": f"warm{i}"})
        before = rss_kb(server.proc.pid)
        for i in range(2500):
            for length in (7000, 1000):
                value = f"{i:06d}" + "v" * (length - 6)
                status = client.get("/aggregates/echo", params={"q": value}).status_code
                statuses[status] = statuses.get(status, 0) + 1
                if status == 400 and length == 1000:
                    client_error = client.get("/aggregates/echo", params={"q": value}).text
        grown_mb = (rss_kb(server.proc.pid) - before) / 1024
        cache = client.get("/stats").json()["cache"]
    assert statuses == {200: 2500, 400: 2500}, (statuses, client_error)
    assert cache["bytes"] <= 1_000_000
    assert grown_mb < 20, f"RSS grew {grown_mb:.1f} MB for 5,000 unique-parameter requests"


async def test_automatic_pruning_never_removes_what_a_live_reader_has_not_read(
        conn: asyncpg.Connection) -> None:
    for i in range(10):
        await conn.execute("SELECT realtime.publish('keep', 'tick', jsonb_build_object('i', $1::int))", i)
    while await conn.fetchval("SELECT realtime.sequence_v2()"):
        pass
    top = await head(conn)
    await conn.execute("INSERT INTO realtime.readers (name, position) VALUES ('slow-replica', $1)",
                       top - 6)
    await conn.execute("INSERT INTO realtime.readers (name, position, seen_at) "
                       "VALUES ('gone-replica', 0, now() - interval '1 hour')")
    await conn.execute("SELECT realtime.prune_retained('0 seconds')")
    assert await conn.fetchval("SELECT pruned_through FROM realtime.sequencer") == top - 6
    assert await conn.fetchval("SELECT min(position) FROM realtime.events") == top - 5
    await conn.execute("UPDATE realtime.readers SET position = $1 WHERE name = 'slow-replica'", top)
    await conn.execute("SELECT realtime.prune_retained('0 seconds')")
    assert await conn.fetchval("SELECT count(*) FROM realtime.events") == 0


def test_a_client_that_leaves_is_noticed_at_once(start_server: Start) -> None:
    server = start_server()
    streams = [RawStream(server.port, "topic=leave") for _ in range(10)]
    for stream in streams:
        stream.read(5, until=lambda c: b"retry:" in c.body)
    assert stats(server)["clients"] == 10
    for stream in streams[:6]:
        stream.close()
    deadline = time.monotonic() + 5
    while stats(server)["clients"] != 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats(server)["clients"] == 4, "closed connections are unsubscribed"
    for stream in streams[6:]:
        stream.close()
