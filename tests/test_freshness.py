"""``min_position`` and resumes past this process's position (``freshness.py``), in-process."""

from __future__ import annotations

import asyncio
import time

import pytest
from pgsse.errors import BadRequest, Unavailable
from pgsse.freshness import Freshness
from pgsse.hub import Hub


async def test_absent_or_reached_answers_at_once() -> None:
    fresh = Freshness(Hub(position=7), 5.0)
    started = time.monotonic()
    await fresh.require(None)
    await fresh.require("")
    await fresh.require("7")
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("raw", ["x", "-1", "1.5", "٣", "9223372036854775808", "1" * 20])
async def test_a_bad_min_position_is_a_400(raw: str) -> None:
    with pytest.raises(BadRequest) as caught:
        await Freshness(Hub(position=7), 5.0).require(raw)
    assert caught.value.param == "min_position"


async def test_waits_for_the_feed_then_answers() -> None:
    hub = Hub(position=7)
    fresh = Freshness(hub, 5.0)
    waiting = asyncio.create_task(fresh.require("9"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    hub.position = 9
    fresh.on_events([])  # the feed's batch callback wakes the waiter
    await asyncio.wait_for(waiting, 1.0)


async def test_behind_past_the_wait_is_a_503_with_retry_after() -> None:
    fresh = Freshness(Hub(position=7), 0.2)
    with pytest.raises(Unavailable) as caught:
        await fresh.require("8")
    body = caught.value.body()["error"]
    assert caught.value.status == 503 and body["code"] == "behind" and body["position"] == 7
    assert caught.value.headers["Retry-After"] == "1"


async def test_a_resume_waits_only_for_positions_the_primary_has() -> None:
    hub = Hub(position=7)
    fresh = Freshness(hub, 5.0, primary_head=lambda: 8)
    started = time.monotonic()
    assert not await fresh.reach(9), "beyond the primary's head: reset at once"
    assert time.monotonic() - started < 0.5
    waiting = asyncio.create_task(fresh.reach(8))
    await asyncio.sleep(0.05)
    hub.position = 8
    fresh.on_events([])
    assert await asyncio.wait_for(waiting, 1.0)
