"""The hub in isolation: matching, de-duplication, bounds, one encoding shared by all."""

from __future__ import annotations

import asyncio

from pgsse.hub import HEARTBEAT, Event, Hub, Subscription
from pgsse.topics import covers, is_valid, prefixes


def event(position: int, *topics: str) -> Event:
    return Event.build(position, topics, "t", b'{"p":%d}' % position, 0.0, None)


def sub(*topics: str, limit: int = 1 << 20, ends_at: float = 1e18) -> Subscription:
    return Subscription(tuple(topics), 0, limit, ends_at)


def test_topic_rules() -> None:
    assert prefixes("a/b/c") == ["a", "a/b", "a/b/c"]
    assert covers("orders", "orders/42/lines") and covers("*", "x")
    assert not covers("orders/4", "orders/42") and not covers("orders", "ordersx")
    assert is_valid("orders/42") and is_valid("a.b:c@d%20-e_f")
    for bad in ("", "a//b", "/a", "a/", "a b", "a" * 257, "ü"):
        assert not is_valid(bad)


def test_same_bytes_to_every_subscriber_once_each() -> None:
    hub = Hub()
    subs = [sub("orders"), sub("orders", "orders/42"), sub("orders/42/lines"), sub("orders/4")]
    for s in subs:
        hub.subscribe(s)
    e = event(1, "orders/42/lines")
    hub.fanout([e])
    assert [len(s.buffer) for s in subs] == [1, 1, 1, 0]
    assert all(s.buffer[0] is e.frame for s in subs[:3]), "encoded once, shared"
    assert e.frame == b'id: 1\nevent: t\ndata: {"p":1}\n\n'


def test_event_with_two_topics_is_delivered_once() -> None:
    hub = Hub()
    both = sub("items/a", "items/b")
    hub.subscribe(both)
    hub.fanout([event(1, "items/b", "items/a")])
    assert len(both.buffer) == 1


def test_positions_at_or_below_cursor_are_skipped() -> None:
    hub = Hub()
    s = sub("x")
    hub.subscribe(s)
    s.cursor = 5
    hub.fanout([event(4, "x"), event(5, "x"), event(6, "x")])
    assert s.take() == event(6, "x").frame and hub.position == 6


def test_overflow_closes_as_slow_and_frees_the_buffer() -> None:
    hub = Hub()
    s = sub("x", limit=100)
    hub.subscribe(s)
    hub.fanout([event(i, "x") for i in range(1, 20)])
    assert s.closed == "slow" and s.buffer == [] and s.size == 0
    hub.fanout([event(20, "x")])
    assert s.buffer == []


async def test_wait_wakes_on_fanout_and_close() -> None:
    hub = Hub()
    s = sub("x")
    hub.subscribe(s)
    waiter = asyncio.create_task(s.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.fanout([event(1, "x"), event(2, "x")])
    await asyncio.wait_for(waiter, 1)
    assert s.take() == event(1, "x").frame + event(2, "x").frame, "coalesced into one write"
    waiter = asyncio.create_task(s.wait())
    await asyncio.sleep(0)
    hub.close_all("shutdown")
    await asyncio.wait_for(waiter, 1)
    assert s.closed == "shutdown"


def test_sweep_heartbeats_quiet_streams_and_ends_old_ones() -> None:
    hub = Hub()
    quiet = sub("x")
    old = sub("y", ends_at=0)
    hub.subscribe(quiet)
    hub.subscribe(old)
    quiet.last_write = 0
    hub.sweep(heartbeat_seconds=1)
    assert quiet.buffer == [HEARTBEAT] and old.closed == "max_age"
    hub.unsubscribe(quiet)
    hub.unsubscribe(old)
    assert len(hub) == 0 and hub.topic_count() == 0


def test_transient_events_reach_live_subscribers() -> None:
    hub = Hub()
    s = sub("aggregates")
    hub.subscribe(s)
    hub.publish_transient("aggregates/sales", b"event: aggregate.invalidated\ndata: {}\n\n")
    assert len(s.buffer) == 1


def test_recent_events_replay_from_memory_when_contiguous() -> None:
    hub = Hub(recent_bytes=500)
    hub.fanout([event(i, "a" if i % 2 else "b") for i in range(1, 51)])
    frames = hub.replay_from_memory(44, 50, ("a",))
    assert frames == [event(i, "a").frame for i in (45, 47, 49)]
    assert hub.replay_from_memory(0, 50, ("a",)) is None, "evicted: must come from history"
    assert hub.recent_bytes <= 500
