"""The hub in isolation (no server, no database): matching, one encoding shared by all, the
live → catching-up hand-over when a socket fills, gaps, heartbeats and bounds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pgsse.hub import (
    HEARTBEAT,
    CloseReason,
    Event,
    Hub,
    Subscription,
    SubState,
    Transient,
)
from pgsse.topics import covers, is_valid, prefixes


def event(position: int, *topics: str, size: int = 0) -> Event:
    data = b'{"p":%d%s}' % (position, b',"pad":"' + b"x" * size + b'"' if size else b"")
    return Event.build(position, topics, "t", data, 0.0, None)


class Socket:
    """An ASGI ``send`` like uvicorn's: completes at once while ``full`` is False, else
    suspends before writing (uvicorn waits for the transport to drain first)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.full = False

    async def __call__(self, message: Any) -> None:
        if self.full:
            await asyncio.get_running_loop().create_future()  # never resolves
        self.bodies.append(message["body"])

    @property
    def data(self) -> bytes:
        return b"".join(self.bodies)

    def ids(self) -> list[int]:
        return [int(line[4:]) for line in self.data.split(b"\n") if line.startswith(b"id: ")]


def live(hub: Hub, *topics: str, envelope: bool = False, ends_at: float = 1e18,
         chunk: int = 64 * 1024) -> tuple[Subscription, Socket]:
    sub = Subscription(tuple(topics), 0, ends_at, envelope=envelope, chunk_bytes=chunk)
    sub.cursor = hub.subscribe(sub)
    socket = Socket()
    sub.go_live(socket)
    return sub, socket


def test_topic_rules() -> None:
    assert prefixes("a/b/c") == ["a", "a/b", "a/b/c"]
    assert covers("orders", "orders/42/lines") and covers("*", "x")
    assert not covers("orders/4", "orders/42") and not covers("orders", "ordersx")
    assert is_valid("orders/42") and is_valid("a.b:c@d%20-e_f")
    for bad in ("", "a//b", "/a", "a/", "a b", "a" * 257, "ü"):
        assert not is_valid(bad)


async def test_same_bytes_to_every_subscriber_once_each() -> None:
    hub = Hub()
    pairs = [live(hub, "orders"), live(hub, "orders", "orders/42"), live(hub, "orders/42/lines"),
             live(hub, "orders/4")]
    e = event(1, "orders/42/lines")
    hub.fanout([e])
    assert [len(socket.bodies) for _, socket in pairs] == [1, 1, 1, 0]
    assert all(socket.bodies[0] is e.frame for _, socket in pairs[:3]), "encoded once, shared"
    assert e.frame == b'id: 1\nevent: t\ndata: {"p":1}\n\n'


async def test_event_with_two_topics_is_delivered_once_and_enveloped_with_the_matching_one() -> None:
    hub = Hub()
    _, plain = live(hub, "items/a", "items/b")
    _, wrapped = live(hub, "items/a", envelope=True)
    hub.fanout([event(1, "items/b", "items/a")])
    assert plain.ids() == [1]
    data = json.loads(wrapped.data.split(b"data: ")[1])
    assert data == {"topic": "items/a", "data": {"p": 1}}


async def test_positions_at_or_below_cursor_are_skipped_and_a_batch_is_one_write() -> None:
    hub = Hub()
    sub, socket = live(hub, "x")
    sub.cursor = 5
    hub.fanout([event(4, "x"), event(5, "x"), event(6, "x"), event(7, "x")])
    assert socket.bodies == [event(6, "x").frame + event(7, "x").frame]
    assert hub.position == 7


async def test_a_full_socket_hands_the_stream_back_at_the_last_position_written() -> None:
    hub = Hub()
    sub, socket = live(hub, "x", chunk=200)
    hub.fanout([event(1, "x"), event(2, "x")])
    socket.full = True
    hub.fanout([event(i, "x", size=150) for i in range(3, 9)])
    assert sub.state is SubState.CATCHING_UP and sub.wakeup.is_set()
    assert sub.cursor == 2, "positions 3.. were never written"
    assert sub.reason is None, "a full socket is not a slow client"
    hub.fanout([event(9, "x")])  # the hub holds no copy while it catches up
    got = hub.read_recent(sub.cursor, hub.position, sub, 1 << 20)
    assert got is not None
    frames, upto = got
    assert upto == 9 and b"".join(frames).count(b"id: ") == 7


async def test_gap_resets_live_streams_and_clears_the_window() -> None:
    hub = Hub()
    hub.fanout([event(1, "x")])
    sub, socket = live(hub, "x", envelope=True)
    hub.gap(10)
    assert hub.position == 10 and not hub.recent
    assert socket.ids() == [10] and b"event: reset" in socket.data
    body = json.loads(socket.data.split(b"data: ")[1])
    assert body == {"topic": None, "data": {"reason": "history_expired"}}
    hub.fanout([event(11, "x")])
    assert socket.ids() == [10, 11]


async def test_sweep_heartbeats_quiet_streams_ends_old_and_long_behind_ones() -> None:
    hub = Hub()
    quiet, socket = live(hub, "x")
    old, _ = live(hub, "y", ends_at=0)
    behind, _ = live(hub, "z")
    behind.fall_behind(0)
    behind.behind_since -= 100
    quiet.last_write = 0
    hub.sweep(heartbeat_seconds=1, slow_seconds=30)
    assert socket.bodies == [HEARTBEAT]
    assert old.reason is CloseReason.MAX_AGE and behind.reason is CloseReason.SLOW
    for sub in (quiet, old, behind):
        hub.unsubscribe(sub)
    assert len(hub) == 0 and hub.topic_count() == 0


async def test_transients_reach_live_streams_now_and_others_once_live() -> None:
    hub = Hub()
    _, socket = live(hub, "aggregates")
    waiting = Subscription(("aggregates",), 0, 1e18)
    hub.subscribe(waiting)
    for _ in range(3):
        hub.publish_transient(Transient("aggregates/sales", "aggregate.invalidated",
                                        b'{"aggregate":"sales"}'))
    assert socket.data.count(b"event: aggregate.invalidated") == 3
    later = Socket()
    waiting.go_live(later)
    assert later.data.count(b"event: aggregate.invalidated") == 1, "coalesced while not live"


async def test_replay_window_is_contiguous_and_bounded_by_what_it_holds() -> None:
    hub = Hub(recent_bytes=20_000)
    hub.fanout([event(i, "a" if i % 2 else "b") for i in range(1, 51)])
    reader = Subscription(("a",), 0, 1e18)
    got = hub.read_recent(44, 50, reader, 1 << 20)
    assert got == ([event(i, "a").frame for i in (45, 47, 49)], 50)
    assert hub.read_recent(0, 50, reader, 1 << 20) is None, "evicted: must come from history"
    assert hub.recent_bytes <= 20_000
    assert hub.recent_bytes == sum(e.size for e in hub.recent)
    assert all(e.size > 3 * len(e.frame) for e in hub.recent), "accounts objects, not just bytes"


def test_frames_never_carry_a_cr_or_lf_inside_a_field() -> None:
    forged = Event.build(7, ["x"], "x\nid: 99\ndata: {}", b'{"a":\n1}', 0.0, None)
    lines = forged.frame.split(b"\n")
    assert [line for line in lines if line.startswith(b"id: ")] == [b"id: 7"]
    assert forged.frame.count(b"\n\n") == 1 and forged.frame.endswith(b"\n\n")
    assert b"\r" not in forged.frame


async def test_a_truncate_reaches_streams_below_its_topic_once_and_only_those() -> None:
    """Issue #19: a table's TRUNCATE (type ``<table>.truncate``) is addressed to its topic and
    every topic below it, live and from the shared log; an unsubscribed stream leaves no
    trace in the index."""
    hub = Hub()
    keyed, keyed_socket = live(hub, "big/7", "big/7/lines")
    deep, deep_socket = live(hub, "big/7/lines/3")
    bare, bare_socket = live(hub, "big")
    other, other_socket = live(hub, "bigger", "other/big")
    gone, _ = live(hub, "big/9")
    hub.unsubscribe(gone)
    truncate = Event.build(1, ("big",), "big.truncate", b'{"op":"truncate"}', 0.0, "public.big")
    insert = Event.build(2, ("big",), "big.insert", b'{"op":"insert"}', 0.0, "public.big")
    custom = Event.build(3, ("big",), "x.truncate", b"{}", 0.0, None)  # publish(): no table
    hub.fanout([truncate, insert, custom])
    assert keyed_socket.ids() == [1] and deep_socket.ids() == [1]
    assert bare_socket.ids() == [1, 2, 3] and other_socket.ids() == []
    assert gone not in hub._below.get("big", set()) and "big/9" not in hub._index
    reader = Subscription(("big/7",), 0, 1e18)
    got = hub.read_recent(0, 3, reader, 1 << 20)
    assert got is not None and [f.split(b"\n")[0] for f in got[0]] == [b"id: 1"]
    hub.unsubscribe(keyed)
    hub.unsubscribe(deep)
    assert set(hub._below) == {"other"}
