"""End to end: PostgreSQL → pgsse (a real uvicorn process) → SSE clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import (
    SseStream,
    eventually,
    metric,
    open_stream,
    read_sse,
    read_sse_resuming,
    stats,
)

Start = Callable[..., Any]


async def make_items(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "CREATE TABLE items (id bigserial PRIMARY KEY, k text NOT NULL, writer int, seq int, pad text)")
    await conn.execute("SELECT realtime.watch('items', 'items', 'k')")


async def head(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT last_position FROM realtime.sequencer"))


def positions(stream: SseStream) -> list[int]:
    return [int(e.id) for e in stream.events if e.id is not None and e.event != "reset"]


async def run_writers(database: str, target_rows: int, writers: int = 8,
                      rollback_rate: float = 0.05) -> None:
    pool = await asyncpg.create_pool(database, min_size=writers, max_size=writers)
    assert pool is not None
    keys = ["a", "b", "c", "d"]
    committed = 0

    async def writer(n: int) -> None:
        nonlocal committed
        seq = 0
        async with pool.acquire() as c:
            while committed < target_rows:
                tr = c.transaction()
                await tr.start()
                rows = random.randint(1, 5)
                for _ in range(rows):
                    seq += 1
                    await c.execute("INSERT INTO items (k, writer, seq) VALUES ($1, $2, $3)",
                                    random.choice(keys), n, seq)
                await asyncio.sleep(random.uniform(0, 0.02))
                if random.random() < rollback_rate:
                    await tr.rollback()
                else:
                    await tr.commit()
                    committed += rows

    await asyncio.gather(*(writer(n) for n in range(writers)))
    await pool.close()


def subscribed(row_key: str, topics: list[str]) -> bool:
    topic = f"items/{row_key}"
    return any(topic == t or topic.startswith(t + "/") for t in topics)


async def check_exactly_once(conn: asyncpg.Connection, clients: dict[str, list[str]],
                             streams: dict[str, SseStream]) -> None:
    rows = await conn.fetch("SELECT id, k, writer, seq FROM items ORDER BY id")
    for name, topics in clients.items():
        stream = streams[name]
        got = [(int(e.id), e.json()["row"]) for e in stream.events if e.event == "items.insert"]
        pos = [p for p, _ in got]
        assert pos == sorted(pos) and len(set(pos)) == len(pos), f"{name}: out of order or duplicated"
        ids = [row["id"] for _, row in got]
        expected = [r["id"] for r in rows if subscribed(r["k"], topics)]
        assert len(ids) == len(set(ids)), f"{name}: a row was delivered twice"
        assert sorted(ids) == expected, f"{name}: {len(ids)} delivered, {len(expected)} expected"
        # Each writer commits its transactions one after another: commit order = seq order.
        by_writer: dict[int, list[int]] = {}
        for _, row in got:
            by_writer.setdefault(row["writer"], []).append(row["seq"])
        for writer, seqs in by_writer.items():
            assert seqs == sorted(seqs), f"{name}: writer {writer}'s commits out of order"


CLIENTS = {"all": ["items"], "ab": ["items", "items/a"], "bc": ["items/b", "items/c"]}


async def stream_while(url: str, start_position: int, done: asyncio.Event,
                       expected: Callable[[], int | None], topics: list[str]) -> SseStream:
    def finished(s: SseStream) -> bool:
        want = expected()
        return want is not None and len(s.events) >= want

    params = [("topic", t) for t in topics]
    # Reconnects with Last-Event-ID as a browser would (a client that falls behind is
    # disconnected by design and must lose nothing when it resumes).
    stream, _ = await read_sse_resuming(url + "/events", params=params, until=finished,
                                        timeout=120, last_id=str(start_position))
    return stream


async def exactly_once_scenario(server: Any, conn: asyncpg.Connection, database: str,
                                target: int, chaos: Callable[[asyncio.Event], Any] | None = None) -> None:
    await make_items(conn)
    # Every change so far numbered: the readers start from a final head.
    await eventually(lambda: conn.fetchval("SELECT count(*) = 0 FROM realtime.inbox"))
    start = await head(conn)
    expected: dict[str, int | None] = {name: None for name in CLIENTS}
    done = asyncio.Event()
    readers = {name: asyncio.create_task(stream_while(
        server.url, start, done, lambda n=name: expected[n], topics))
        for name, topics in CLIENTS.items()}
    chaos_task = asyncio.create_task(chaos(done)) if chaos else None
    await run_writers(database, target)
    done.set()
    if chaos_task:
        await chaos_task
    rows = await conn.fetch("SELECT k FROM items")
    assert len(rows) >= target
    for name, topics in CLIENTS.items():
        expected[name] = sum(1 for r in rows if subscribed(r["k"], topics))
    streams = {name: await task for name, task in readers.items()}
    await check_exactly_once(conn, CLIENTS, streams)


@pytest.mark.timeout(240)
async def test_concurrent_writers_exactly_once_in_commit_order(server: Any, conn: asyncpg.Connection,
                                                               database: str) -> None:
    await exactly_once_scenario(server, conn, database, 20_000)


@pytest.mark.timeout(240)
async def test_nothing_lost_while_feed_backends_are_killed(server: Any, conn: asyncpg.Connection,
                                                           database: str) -> None:
    kills = 0

    async def chaos(done: asyncio.Event) -> None:
        nonlocal kills
        killer = await asyncpg.connect(database)
        while not done.is_set():
            await asyncio.sleep(1.0)
            kills += await killer.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name IN ('pgsse-listener', 'pgsse-sequencer')")
        await killer.close()

    await exactly_once_scenario(server, conn, database, 6_000, chaos)
    assert kills >= 2
    metrics = httpx.get(server.url + "/metrics").text
    reconnects = [line for line in metrics.splitlines() if line.startswith("pgsse_feed_reconnects_total")]
    assert reconnects and float(reconnects[0].split()[-1]) >= 1


async def publish(conn: asyncpg.Connection, topic: str, n: int, type_: str = "tick",
                  start: int = 0) -> None:
    for i in range(start, start + n):
        await conn.execute("SELECT realtime.publish($1, $2, jsonb_build_object('i', $3::int))",
                           topic, type_, i)


async def wait_head(conn: asyncpg.Connection, at_least: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await head(conn)
        if value >= at_least:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"head stayed below {at_least}")


async def test_stream_format_headers_and_prefix_rules(server: Any, conn: asyncpg.Connection) -> None:
    url = server.url + "/events"

    def marked(s: SseStream) -> bool:
        return any(e.event == "marker" for e in s.events)

    whole_task = await open_stream(url, params={"topic": "orders"}, timeout=5, until=marked)
    narrow_task = await open_stream(url, params={"topic": "orders/4"}, timeout=5, until=marked)
    await conn.execute("SELECT realtime.publish('orders/42', 'order.created', '{\"id\": 42}')")
    await conn.execute("SELECT realtime.publish('orders/42/lines', 'line.added', '{\"n\": 1}')")
    await conn.execute("SELECT realtime.publish('orders', 'orders.reset', '[1, \"two\"]')")
    await conn.execute("SELECT realtime.publish('ordersx', 'nope', '{}')")
    # Published last: once a stream has its marker, anything it should have had came before.
    await conn.execute("SELECT realtime.publish('orders/4', 'marker', '{}')")
    whole = await whole_task
    narrow = await narrow_task
    assert whole.status == 200
    assert whole.headers["content-type"].startswith("text/event-stream")
    assert whole.headers["cache-control"] == "no-store"
    assert whole.headers["x-accel-buffering"] == "no"
    assert whole.retries and whole.retries[0] > 0
    assert [e.event for e in whole.events] == ["order.created", "line.added", "orders.reset",
                                               "marker"], "ordersx is not below orders"
    assert whole.events[0].json() == {"id": 42} and whole.events[2].json() == [1, "two"]
    ids = positions(whole)
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [e.event for e in narrow.events] == ["marker"], "orders/4 must not receive orders/42"


@pytest.mark.parametrize("query,param", [
    ("", "topic"),
    ("topic=", "topic"),
    ("topic=a//b", "topic"),
    ("topic=a%20b", "topic"),
    ("topic=" + "a" * 257, "topic"),
    ("&".join(f"topic=t{i}" for i in range(33)), "topic"),
    ("topic=a&last_event_id=abc", "last_event_id"),
    ("topic=a&last_event_id=-1", "last_event_id"),
    ("topic=a&lastEventId=9223372036854775808", "lastEventId"),
    ("topic=a&last_event_id=1e3", "last_event_id"),
])
def test_bad_requests_get_400_json(server: Any, query: str, param: str) -> None:
    response = httpx.get(f"{server.url}/events?{query}", timeout=5)
    assert response.status_code == 400
    body = response.json()["error"]
    assert body["code"] and body["message"] and body.get("param") == param


def test_bad_last_event_id_header_gets_400(server: Any) -> None:
    for value in ["x1", "١٢".encode(), "18446744073709551616", "12x"]:
        response = httpx.get(server.url + "/events?topic=a", headers={"Last-Event-ID": value}, timeout=5)
        assert response.status_code == 400, value


@pytest.mark.parametrize("memory", ["8388608", "0"], ids=["from-memory", "from-history"])
async def test_resume_after_disconnect_no_gap_no_duplicate(start_server: Start, conn: asyncpg.Connection,
                                                           memory: str) -> None:
    server = start_server({"REPLAY_MEMORY_BYTES": memory})
    start = await head(conn)
    await publish(conn, "resume/x", 50)
    # Both connections must find their events already sequenced and read, so that each is
    # a resumption (counted below) rather than a plain live subscription.
    await eventually(lambda: stats(server)["position"] >= start + 50, what="first 50 read")
    first = await read_sse(server.url + "/events", timeout=10,
                           params={"topic": "resume", "last_event_id": str(start)},
                           until=lambda s: len(s.events) >= 20)
    assert len(first.events) >= 20
    await publish(conn, "resume/x", 50, start=50)
    await publish(conn, "other", 10)
    await eventually(lambda: stats(server)["position"] >= start + 110, what="all 110 read")
    # A browser reconnects with the Last-Event-ID header; an empty query value is ignored.
    second = await read_sse(server.url + "/events", timeout=10,
                            params={"topic": "resume", "last_event_id": ""},
                            headers={"Last-Event-ID": first.last_id or ""},
                            until=lambda s: len(first.events) + len(s.events) >= 100)
    got = [e.json()["i"] for e in first.events + second.events]
    assert got == list(range(100))
    source = "memory" if memory != "0" else "history"
    text = httpx.get(server.url + "/metrics").text
    assert f'pgsse_replays_total{{source="{source}"}} 2.0' in text


async def test_resume_across_service_restart(start_server: Start, conn: asyncpg.Connection) -> None:
    server = start_server()
    start = await head(conn)
    await publish(conn, "restart", 10)
    first = await read_sse(server.url + "/events", params={"topic": "restart", "last_event_id": str(start)},
                           until=lambda s: len(s.events) >= 10, timeout=10)
    assert server.stop() in (0, -signal.SIGTERM)
    await publish(conn, "restart", 10, start=10)  # written while no service runs
    server = start_server()
    second = await read_sse(server.url + "/events", headers={"Last-Event-ID": first.last_id or ""},
                            params={"topic": "restart"}, until=lambda s: len(s.events) >= 10, timeout=10)
    assert [e.json()["i"] for e in first.events + second.events] == list(range(20))


async def test_reset_when_history_expired_or_position_unknown(server: Any, conn: asyncpg.Connection) -> None:
    await publish(conn, "old", 5)
    now = await wait_head(conn, 5)
    # A reset starts over from what the service has read: let it read up to the head first.
    await eventually(lambda: stats(server)["position"] >= now, what="the service at the head")
    await conn.execute("SELECT realtime.prune('0 seconds')")
    expired = await read_sse(server.url + "/events", params={"topic": "old", "last_event_id": "1"},
                             until=lambda s: len(s.events) >= 1, timeout=5)
    assert expired.events[0].event == "reset"
    assert expired.events[0].json() == {"reason": "history_expired"}
    assert int(expired.events[0].id or -1) >= now
    future = await read_sse(server.url + "/events", params={"topic": "old", "last_event_id": str(now + 1000)},
                            until=lambda s: len(s.events) >= 1, timeout=5)
    assert future.events[0].event == "reset" and future.events[0].json()["reason"] == "unknown_position"
    # Live delivery continues after a reset.
    task = await open_stream(server.url + "/events", params={"topic": "old", "last_event_id": "1"},
                             until=lambda s: len(s.events) >= 2, timeout=5)
    await publish(conn, "old", 1, start=99)
    after = await task
    assert [e.event for e in after.events] == ["reset", "tick"]
    assert int(after.events[1].id or 0) > int(after.events[0].id or 0)


async def test_from_zero_replays_everything_retained(server: Any, conn: asyncpg.Connection) -> None:
    await publish(conn, "zero", 5)
    stream = await read_sse(server.url + "/events", params={"topic": "zero", "last_event_id": "0"},
                            until=lambda s: len(s.events) >= 5, timeout=5)
    assert [e.json()["i"] for e in stream.events] == [0, 1, 2, 3, 4]


async def test_large_payload_and_truncation(start_server: Start, conn: asyncpg.Connection) -> None:
    server = start_server({"MAX_EVENT_BYTES": "50000"})
    await conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    await conn.execute("SELECT realtime.watch('docs')")
    task = await open_stream(server.url + "/events", params={"topic": "docs"},
                             until=lambda s: len(s.events) >= 2, timeout=10)
    await conn.execute("INSERT INTO docs VALUES (1, $1)", "x" * 20_000)   # > NOTIFY's 8000 bytes
    await conn.execute("INSERT INTO docs VALUES (2, $1)", "y" * 100_000)  # > MAX_EVENT_BYTES
    stream = await task
    assert stream.events[0].json()["row"]["body"] == "x" * 20_000
    slim = stream.events[1].json()
    assert slim["truncated"] is True and slim["row"] is None and slim["old"] is None
    assert slim["key"] == {"id": 2} and slim["op"] == "insert" and slim["topic"] == "docs"


async def test_heartbeat_comments(start_server: Start) -> None:
    server = start_server({"HEARTBEAT_SECONDS": "0.5"})
    stream = await read_sse(server.url + "/events", params={"topic": "quiet"},
                            until=lambda s: s.comments >= 2, timeout=5)
    assert stream.comments >= 2


async def test_stream_max_seconds_ends_with_retry(start_server: Start) -> None:
    server = start_server({"STREAM_MAX_SECONDS": "1"})
    began = time.monotonic()
    stream = await read_sse(server.url + "/events", params={"topic": "x"}, timeout=10)
    assert stream.ended and time.monotonic() - began < 5
    assert len(stream.retries) >= 2, "ends with a fresh retry: so the browser reconnects"


async def test_sigterm_ends_streams_promptly(start_server: Start) -> None:
    server = start_server()
    tasks = await asyncio.gather(*(open_stream(server.url + "/events", params={"topic": "t"},
                                               timeout=15) for _ in range(5)))
    began = time.monotonic()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    streams = await asyncio.gather(*tasks)
    assert time.monotonic() - began < 4
    for stream in streams:
        assert stream.ended
        assert len(stream.retries) == 2 and stream.retries[1] <= 3000
    assert await asyncio.to_thread(server.proc.wait, 10) in (0, -signal.SIGTERM)


async def test_slow_client_is_dropped_and_loses_nothing(start_server: Start, conn: asyncpg.Connection) -> None:
    server = start_server({"CLIENT_BUFFER_BYTES": "65536", "SLOW_CLIENT_SECONDS": "1"})
    start = await head(conn)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /events?topic=flood HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(10)
    received = b""
    while b"retry: " not in received:  # the stream is subscribed: what follows is delivered
        chunk = await asyncio.to_thread(sock.recv, 4096)
        assert chunk, received
        received += chunk
    pad = "z" * 4000
    for i in range(0, 2000, 50):  # ~8 MB, far beyond socket buffers and the 64 kB bound
        await conn.execute(
            "SELECT realtime.publish('flood', 'blob', jsonb_build_object('i', g, 'pad', $1::text)) "
            "FROM generate_series($2::int, $2::int + 49) g", pad, i)
    await wait_head(conn, start + 2000)
    await eventually(lambda: metric(server, "pgsse_slow_clients_dropped_total") >= 1,
                     what="a slow client dropped")
    # The server aborted the connection: draining the socket reaches EOF or a reset.
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    sock.close()
    last_ids = [int(line[4:]) for line in received.split(b"\n") if line.startswith(b"id: ")]
    last = last_ids[-1] if last_ids else start
    rest = await read_sse(server.url + "/events", params={"topic": "flood", "last_event_id": str(last)},
                          until=lambda s: len(s.events) >= start + 2000 - last, timeout=20)
    got = [int(e.id or 0) for e in rest.events]
    assert got == list(range(last + 1, start + 2001))
    stats = httpx.get(server.url + "/stats").json()
    assert stats["clients"] == 0
    assert json.loads(json.dumps(stats))["position"] >= start + 2000


@pytest.mark.parametrize("mode", ["poll", "notify", "auto"])
async def test_every_wakeup_mode_delivers(start_server: Start, conn: asyncpg.Connection,
                                          mode: str) -> None:
    # Start from the opposite of what the mode must set, so the check below can fail.
    await conn.execute("UPDATE realtime.sequencer SET wake_writers = $1", mode == "poll")
    server = start_server({"WAKEUP": mode})
    task = await open_stream(server.url + "/events", params={"topic": "mode"},
                             until=lambda s: len(s.events) >= 30, timeout=10)
    start = await head(conn)
    await publish(conn, "mode", 10)
    # Sequenced means the sequencer leads, and it sets the flag before sequencing anything.
    await wait_head(conn, start + 10)
    flag = "SELECT wake_writers FROM realtime.sequencer"
    if mode == "auto":
        # Polls while changes come, then once idle asks writers to wake it.
        await eventually(lambda: conn.fetchval(flag), what="an idle auto sequencer's wake_writers")
    else:
        assert await conn.fetchval(flag) is (mode == "notify")
    await publish(conn, "mode", 20, start=10)
    stream = await task
    assert [e.json()["i"] for e in stream.events] == list(range(30))
