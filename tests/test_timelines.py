"""Failover without phantoms, in-process (``timelines.py``, ``Hub.skip``, the feed's hook):
a feed whose cursor sits inside a range the new primary skipped resets the live streams that
got events the new history lacks, and only those; one at the range's start just moves on."""

from __future__ import annotations

from typing import Any

from pgsse.feed import EventDecoder, Listener
from pgsse.hub import Hub
from pgsse.queries import query
from pgsse.settings import Settings

from tests.test_feed import EventsTable, Socket, change, subscription

SKIP = 1_000_000_000


class FailedOver(EventsTable):
    """The new primary's events and its ``realtime.timelines`` skipped ranges."""

    def __init__(self, rows: list[dict[str, Any]], ranges: list[tuple[int, int]]) -> None:
        super().__init__(rows)
        self.ranges = ranges

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if sql == query("skipped_ranges"):
            return [{"skipped_from": a, "skipped_through": b} for a, b in self.ranges
                    if b > a and b > args[0]]
        return await super().fetch(sql, *args)


def live(hub: Hub, *topics: str) -> Socket:
    sub = subscription(*topics)
    sub.cursor = hub.subscribe(sub)
    socket = Socket()
    sub.go_live(socket)
    return socket


async def test_a_feed_past_the_new_history_resets_the_streams_that_got_phantoms() -> None:
    hub = Hub(position=5)
    orders, other = live(hub, "orders"), live(hub, "other")
    feed = Listener(Settings(), "postgresql://unused", hub, EventDecoder(1024))
    feed.cursor = 5
    # Events 6 and 7 came from the old primary; the new one never had them.
    await feed.catch_up(EventsTable([change(6), change(7)]))  # type: ignore[arg-type]
    assert orders.ids() == [6, 7]
    new_primary = FailedOver([change(5 + SKIP + 1)], [(5, 5 + SKIP)])
    await feed.catch_up(new_primary)  # type: ignore[arg-type]
    frames = orders.data.decode().split("\n\n")
    assert frames[2] == f'id: {5 + SKIP}\nevent: reset\ndata: {{"reason": "unknown_position"}}'
    assert orders.ids() == [6, 7, 5 + SKIP, 5 + SKIP + 1]
    assert other.data == b"", "a stream that got no phantom lost nothing: no reset"
    assert feed.cursor == hub.position == 5 + SKIP + 1


async def test_a_feed_at_the_skipped_range_moves_past_it_and_is_caught_up() -> None:
    hub = Hub(position=5)
    orders = live(hub, "orders")
    feed = Listener(Settings(), "postgresql://unused", hub, EventDecoder(1024))
    feed.cursor = 5
    feed._advance_head(5 + SKIP)  # the new primary's head, past the skip
    await feed.catch_up(FailedOver([], [(5, 5 + SKIP)]))  # type: ignore[arg-type]
    assert feed.cursor == hub.position == 5 + SKIP
    assert feed.behind_since is None, "not behind: nothing was numbered in the range"
    assert orders.data == b""
