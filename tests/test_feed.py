"""The change feed in-process (no server, no database): the decoder's truncation, the
listener's readiness and catch-up, and ``History`` reads, against an in-memory stand-in for
``realtime.events`` (the real-database behaviour is covered by test_stream and test_faults)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pgsse import feed
from pgsse.feed import EventDecoder, History, Listener
from pgsse.hub import Hub, Subscription
from pgsse.settings import Settings


def change(position: int, topic: str = "orders/1", *, table: str | None = "public.orders",
           row: dict[str, Any] | None = None, op: str = "insert", pad: str = "") -> dict[str, Any]:
    """A ``realtime.events`` row as the feed reads it."""
    if table is None:
        payload = json.dumps({"n": position, "pad": pad}, ensure_ascii=False)
        type_ = "custom"
    else:
        row = row if row is not None else {"id": position, "shop": "s1", "note": pad}
        payload = json.dumps({"topic": topic, "op": op, "table": table,
                              "row": row, "old": None, "ts": "2026-01-01T00:00:00Z"},
                             ensure_ascii=False)  # as jsonb::text: UTF-8, not \u escapes
        type_ = f"{table.split('.')[-1]}.{op}"
    return {"position": position, "topics": [topic], "type": type_, "tbl": table,
            "payload": payload, "created_at": 1.0}


class EventsTable:
    """``realtime.events`` and ``realtime.sequencer`` in memory, answering the feed's reads
    the way its SQL does: rows after a position (up to one, if given), ordered, limited,
    each carrying ``pruned_through``; one row of NULLs when there are none."""

    def __init__(self, rows: list[dict[str, Any]], pruned_through: int = 0) -> None:
        self.rows = rows
        self.pruned_through = pruned_through
        self.executed: list[tuple[Any, ...]] = []

    def _after(self, after: int, until: int | None, limit: int) -> list[dict[str, Any]]:
        rows = [r for r in self.rows if r["position"] > after
                and (until is None or r["position"] <= until)][:limit]
        if not rows:
            return [{"pruned_through": self.pruned_through, "position": None, "topics": None,
                     "type": None, "tbl": None, "payload": None, "created_at": None}]
        return [{"pruned_through": self.pruned_through, **r} for r in rows]

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if not args:  # the decoder's key columns
            return [{"tbl": "public.orders", "key_columns": ["id"]}]
        if len(args) == 3:  # History: (after, until, limit)
            return self._after(args[0], args[1], args[2])
        return self._after(args[0], None, args[1])  # Listener: (cursor, limit)

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        if not args:  # the head and the pruned watermark
            head = max((r["position"] for r in self.rows), default=self.pruned_through)
            return {"last_position": head, "pruned_through": self.pruned_through}
        return next((r for r in self.rows if r["position"] == args[0]), None)

    async def execute(self, sql: str, *args: Any) -> str:
        self.executed.append(args)
        return "INSERT 0 1"


class Database:
    def __init__(self, table: EventsTable) -> None:
        self.pool = table


class Socket:
    """An ASGI ``send`` that always completes at once."""

    def __init__(self) -> None:
        self.data = b""

    async def __call__(self, message: Any) -> None:
        self.data += message["body"]

    def ids(self) -> list[int]:
        return [int(line[4:]) for line in self.data.split(b"\n") if line.startswith(b"id: ")]


def subscription(*topics: str) -> Subscription:
    return Subscription(tuple(topics), 0, 1e18)


# --- EventDecoder --------------------------------------------------------------------------

def test_a_small_event_is_delivered_verbatim() -> None:
    row = change(7)
    event = EventDecoder(1024).decode(row)
    assert event.position == 7 and event.topics == ("orders/1",)
    assert event.frame == b"id: 7\nevent: orders.insert\ndata: %s\n\n" % row["payload"].encode()


def test_an_oversized_change_is_truncated_to_its_key() -> None:
    decoder = EventDecoder(1024)
    decoder.key_columns = {"public.orders": ["id"]}
    row = change(42, pad="x" * 2000)
    event = decoder.decode(row)
    body = json.loads(event.data)
    assert body == {"topic": "orders/1", "op": "insert", "table": "public.orders",
                    "ts": "2026-01-01T00:00:00Z", "row": None, "old": None, "key": {"id": 42},
                    "truncated": True, "position": 42, "bytes": len(row["payload"]),
                    "href": "/events/42"}
    assert len(event.frame) < 1024


def test_a_deleted_rows_key_comes_from_the_row_it_had() -> None:
    decoder = EventDecoder(1024)
    decoder.key_columns = {"public.orders": ["shop", "id"]}
    row = change(5, op="delete", row={"id": 9, "shop": "s2", "note": "y" * 2000})
    body = json.loads(decoder.decode(row).data)
    assert body["op"] == "delete" and body["key"] == {"shop": "s2", "id": 9}


def test_an_oversized_custom_event_keeps_its_topic_and_where_to_fetch_it() -> None:
    row = change(3, "alerts/eu", table=None, pad="z" * 5000)
    body = json.loads(EventDecoder(1024).decode(row).data)
    assert body == {"topic": "alerts/eu", "truncated": True, "position": 3,
                    "bytes": len(row["payload"]), "href": "/events/3"}


def test_the_limit_counts_utf8_bytes_and_is_inclusive() -> None:
    row = change(1, table=None, pad="é" * 400)  # 400 characters, 800 bytes
    size = len(row["payload"].encode())
    assert len(row["payload"]) < size
    assert b"truncated" not in EventDecoder(size).decode(row).data, "at the limit: whole"
    truncated = json.loads(EventDecoder(size - 1).decode(row).data)
    assert truncated["truncated"] is True and truncated["bytes"] == size


# --- Listener ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(feed, "time", clock)
    return clock


def listener(hub: Hub | None = None, lag: float = 5.0) -> Listener:
    settings = Settings(ready_max_lag_seconds=lag)
    return Listener(settings, "postgresql://unused", hub or Hub(), EventDecoder(1024))


def test_caught_up_only_when_connected_reading_and_not_behind_for_long(clock: Clock) -> None:
    feed_ = listener(lag=5.0)
    assert not feed_.caught_up, "not connected yet"
    feed_.connected, feed_.cursor, feed_.last_read = True, 10, clock.now
    assert feed_.caught_up and feed_.lag_seconds == 0.0
    feed_._on_notify(None, 0, "realtime_events", "15")  # NOTIFY: the head moved on
    assert feed_.head == 15 and feed_.caught_up, "behind for a moment is normal"
    clock.now += 4.0
    feed_.last_read = clock.now
    assert feed_.lag_seconds == pytest.approx(4.0) and feed_.caught_up
    clock.now += 2.0
    feed_.last_read = clock.now
    assert feed_.lag_seconds == pytest.approx(6.0) and not feed_.caught_up
    feed_._advance_head(15)
    assert feed_.lag_seconds == 6.0, "still behind until the cursor moves"
    feed_.cursor = 15
    feed_._advance_head(15)
    assert feed_.lag_seconds == 0.0 and feed_.caught_up


def test_not_caught_up_when_reads_stop(clock: Clock) -> None:
    feed_ = listener()
    feed_.connected, feed_.cursor, feed_.last_read = True, 10, clock.now
    clock.now += 5 * feed.SAFETY_POLL_SECONDS + 0.1
    assert feed_.lag_seconds == 0.0 and not feed_.caught_up
    feed_.last_read = clock.now
    assert feed_.caught_up
    feed_.connected = False
    assert not feed_.caught_up


def test_a_notification_without_a_position_only_wakes() -> None:
    feed_ = listener()
    feed_._on_notify(None, 0, "realtime_events", "")
    assert feed_.head == 0 and feed_._wake.is_set()


async def test_catch_up_hands_every_row_to_the_hub_in_order(clock: Clock) -> None:
    hub = Hub(position=0)
    sub = subscription("orders")
    sub.cursor = hub.subscribe(sub)
    socket = Socket()
    sub.go_live(socket)
    table = EventsTable([change(p, f"orders/{p}") for p in range(1, 6)]
                        + [change(6, "other")])
    feed_ = listener(hub)
    feed_.cursor = 0
    batches: list[list[int]] = []
    feed_.on_batch.append(lambda events: batches.append([e.position for e in events]))
    await feed_.catch_up(table)  # type: ignore[arg-type]
    assert feed_.cursor == 6 and hub.position == 6 and feed_.head == 6
    assert batches == [[1, 2, 3, 4, 5, 6]]
    assert socket.ids() == [1, 2, 3, 4, 5], "the live stream got its topics, once, in order"
    assert table.executed and table.executed[0][1] == 6, "registers how far it has read"


async def test_catch_up_reads_in_batches(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed, "BATCH", 2)
    hub = Hub()
    table = EventsTable([change(p) for p in range(1, 6)])
    feed_ = listener(hub)
    feed_.cursor = 0
    batches: list[list[int]] = []
    feed_.on_batch.append(lambda events: batches.append([e.position for e in events]))
    await feed_.catch_up(table)  # type: ignore[arg-type]
    assert batches == [[1, 2], [3, 4], [5]] and feed_.cursor == 5


async def test_a_pruned_gap_resets_live_streams_and_continues_after_it(clock: Clock) -> None:
    hub = Hub(position=3)
    sub = subscription("orders")
    sub.cursor = hub.subscribe(sub)
    socket = Socket()
    sub.go_live(socket)
    table = EventsTable([change(11), change(12)], pruned_through=10)
    feed_ = listener(hub)
    feed_.cursor = 3
    await feed_.catch_up(table)  # type: ignore[arg-type]
    frames = socket.data.decode().split("\n\n")
    assert frames[0] == 'id: 10\nevent: reset\ndata: {"reason": "history_expired"}'
    assert socket.ids() == [10, 11, 12] and feed_.cursor == 12


# --- History -------------------------------------------------------------------------------

def history(table: EventsTable, batch: int = 1000) -> History:
    return History(Database(table), EventDecoder(1024), batch=batch)  # type: ignore[arg-type]


async def test_history_reads_the_subscriptions_topics_in_a_range() -> None:
    table = EventsTable([change(1, "orders/1"), change(2, "bills/1"), change(3, "orders/2/x"),
                         change(4, "ordersx"), change(5, "orders")])
    read = await history(table).read(subscription("orders"), 0, 4)
    assert [int(f.split(b"\n")[0][4:]) for f in read.frames] == [1, 3]
    assert read.upto == 4 and not read.pruned


async def test_history_reports_the_whole_range_read_even_when_nothing_matches() -> None:
    table = EventsTable([change(1, "bills/1")])
    read = await history(table).read(subscription("orders"), 0, 9)
    assert read.frames == [] and read.upto == 9 and not read.pruned


async def test_a_full_batch_stops_at_the_last_row_read() -> None:
    table = EventsTable([change(p) for p in range(1, 8)])
    read = await history(table, batch=3).read(subscription("orders"), 0, 7)
    assert len(read.frames) == 3 and read.upto == 3, "the caller reads on from 3"


async def test_history_says_when_the_asked_positions_are_gone() -> None:
    table = EventsTable([change(6)], pruned_through=5)
    assert (await history(table).read(subscription("orders"), 2, 6)).pruned
    assert not (await history(table).read(subscription("orders"), 5, 6)).pruned


async def test_bounds_and_one_event() -> None:
    table = EventsTable([change(6), change(7)], pruned_through=5)
    assert await history(table).bounds() == (7, 5)
    assert (await history(table).event(7))["type"] == "orders.insert"
    assert await history(table).event(3) is None
