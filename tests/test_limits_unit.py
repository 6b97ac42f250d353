"""``pgsse.limits`` in-process, with a controlled clock: streams per client, the aggregate
token bucket (burst, refill, Retry-After) and the bounded client table."""

from __future__ import annotations

import pytest
from pgsse import limits, metrics
from pgsse.errors import TooManyRequests
from pgsse.limits import Limits


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(limits, "time", clock)
    return clock


def rejected(limit: str) -> float:
    value = metrics.REGISTRY.get_sample_value("pgsse_rejected_requests_total", {"limit": limit})
    return value or 0.0


def allowed(limit: Limits, client: str) -> bool:
    try:
        limit.check_rate(client)
    except TooManyRequests:
        return False
    return True


def test_streams_are_counted_per_client_and_given_back() -> None:
    lim = Limits(streams_per_client=2, requests_per_second=1)
    before = rejected("client_connections")
    for _ in range(2):
        lim.check_stream("alice")
        lim.opened("alice")
    with pytest.raises(TooManyRequests) as caught:
        lim.check_stream("alice")
    response = caught.value.response()
    assert response.status_code == 429 and response.headers["retry-after"] == "5"
    assert b"at most 2 open streams per client" in response.body
    assert rejected("client_connections") == before + 1
    lim.check_stream("bob")  # another client has its own count
    lim.closed("alice")
    lim.check_stream("alice")  # a closed stream gives its slot back
    lim.closed("alice")
    assert lim.open == {}, "a client with no stream is forgotten"
    lim.closed("alice")  # an extra close never goes negative
    assert lim.open == {}
    lim.opened("alice")
    assert lim.open == {"alice": 1}


def test_a_burst_of_twice_the_rate_then_the_rate(clock: Clock) -> None:
    lim = Limits(streams_per_client=1, requests_per_second=5)
    before = rejected("aggregate_rate")
    assert [allowed(lim, "a") for _ in range(11)] == [True] * 10 + [False]
    assert rejected("aggregate_rate") == before + 1
    clock.now += 0.1
    assert not allowed(lim, "a"), "half a token"
    clock.now += 0.1
    assert allowed(lim, "a") and not allowed(lim, "a"), "one token per 0.2 s"
    clock.now += 60
    assert sum(allowed(lim, "a") for _ in range(20)) == 10, "refills up to the burst, no more"
    assert allowed(lim, "b"), "each client has its own bucket"


def test_refused_requests_take_no_token(clock: Clock) -> None:
    lim = Limits(streams_per_client=1, requests_per_second=1)
    assert [allowed(lim, "a") for _ in range(2)] == [True, True]
    for _ in range(9):
        clock.now += 0.1
        assert not allowed(lim, "a")
    clock.now += 0.1
    assert allowed(lim, "a"), "a second after emptying, hammering or not"


def test_the_rate_error_says_when_to_come_back(clock: Clock) -> None:
    lim = Limits(streams_per_client=1, requests_per_second=0.5)
    assert lim.burst == 1.0, "at least one request"
    lim.check_rate("a")
    with pytest.raises(TooManyRequests) as caught:
        lim.check_rate("a")
    assert caught.value.headers == {"Retry-After": "1"}
    assert caught.value.body()["error"]["code"] == "too_many_requests"


def test_the_client_table_is_bounded_and_keeps_active_limits(
        clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_TRACKED_CLIENTS", 10)
    lim = Limits(streams_per_client=1, requests_per_second=1)
    for _ in range(2):
        lim.check_rate("busy")  # its bucket is empty
    for i in range(9):
        lim.check_rate(f"idle-{i}")
    clock.now += 5  # the idle ones refill (2 s); busy keeps using its bucket
    for _ in range(5):
        clock.now += 0.5
        allowed(lim, "busy")
    assert not allowed(lim, "busy")
    lim.check_rate("newcomer")  # the 11th client: the refilled ones are forgotten
    assert len(lim._buckets) <= 10
    assert set(lim._buckets) == {"busy", "newcomer"}
    assert not allowed(lim, "busy"), "forgetting idle clients did not reset an active one"


def test_a_flood_of_active_clients_still_bounds_memory(
        clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_TRACKED_CLIENTS", 10)
    lim = Limits(streams_per_client=1, requests_per_second=1)
    for i in range(50):
        lim.check_rate(f"c{i}")
        assert len(lim._buckets) <= 10
