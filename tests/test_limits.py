"""Limits, each with a clear error and a ``pgsse_rejected_requests_total`` count: streams per
process (200 + ``retry:``, contract §3) and per client (429 + Retry-After), topics per
stream, query-string and header sizes, aggregate requests per client per second."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

Start = Callable[..., Any]
KEY = "limits-key-0123456789abcdef0123456789"


def bearer(sub: str | None = None) -> dict[str, str]:
    claims: dict[str, Any] = {"topics": ["*"], "exp": int(time.time()) + 300}
    if sub is not None:
        claims["sub"] = sub
    return {"Authorization": "Bearer " + jwt.encode(claims, KEY, algorithm="HS256")}


def hold_stream(server: Any, headers: dict[str, str] | None = None) -> socket.socket:
    """An open /events stream on a raw socket (held until closed)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"GET /events?topic=a HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head[:300]
    return sock


def rejected(server: Any, limit: str) -> float:
    """The value of ``pgsse_rejected_requests_total{limit=…}`` (0 when absent)."""
    prefix = f'pgsse_rejected_requests_total{{limit="{limit}"}} '
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def test_per_client_stream_limit_is_429_before_the_stream(start_server: Start) -> None:
    server = start_server({"MAX_CONNECTIONS_PER_CLIENT": "2", "MAX_CONNECTIONS": "10"})
    opened = [hold_stream(server) for _ in range(2)]
    third = httpx.get(server.url + "/events?topic=a", timeout=5)
    assert third.status_code == 429
    assert third.headers["content-type"] == "application/json"
    assert int(third.headers["retry-after"]) > 0
    assert third.json()["error"]["code"] == "too_many_requests"
    assert rejected(server, "client_connections") == 1
    for sock in opened:
        sock.close()
    # Closed streams give their slots back.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with httpx.stream("GET", server.url + "/events?topic=a", timeout=5) as again:
            if again.status_code == 200:
                break
        time.sleep(0.1)
    assert again.status_code == 200


def test_per_client_limit_counts_each_token_subject(start_server: Start) -> None:
    server = start_server({"AUTH_SECRET": KEY, "MAX_CONNECTIONS_PER_CLIENT": "1"})
    alice = hold_stream(server, bearer("alice"))
    again = httpx.get(server.url + "/events?topic=a", headers=bearer("alice"), timeout=5)
    assert again.status_code == 429 and "retry-after" in again.headers
    bob = hold_stream(server, bearer("bob"))  # same address, another subject: its own limit
    alice.close()
    bob.close()


def test_process_full_answers_200_with_retry_and_closes(start_server: Start) -> None:
    server = start_server({"MAX_CONNECTIONS": "1"})
    held = hold_stream(server)
    full = httpx.get(server.url + "/events?topic=a", timeout=5)  # returns: the body ended
    assert full.status_code == 200
    assert full.headers["content-type"].startswith("text/event-stream")
    assert full.text.startswith("retry: ") and "data:" not in full.text
    assert 1000 <= int(full.text.split()[1]) <= 5000
    assert rejected(server, "process_connections") == 1
    held.close()


def test_topics_per_stream(server: Any) -> None:
    many = httpx.get(server.url + "/events", params=[("topic", f"t{i}") for i in range(33)], timeout=5)
    assert many.status_code == 400
    assert many.json()["error"] == {"code": "too_many_topics", "param": "topic",
                                    "message": "at most 32 topics per stream"}
    assert rejected(server, "topics_per_stream") == 1
    with httpx.stream("GET", server.url + "/events", params=[("topic", f"t{i}") for i in range(32)],
                      timeout=5) as ok:
        assert ok.status_code == 200


def test_query_string_and_header_sizes(server: Any) -> None:
    long_query = httpx.get(server.url + "/events", params={"topic": "a" * 9000}, timeout=5)
    assert long_query.status_code == 400
    assert long_query.json()["error"]["code"] == "request_too_large"
    big_header = httpx.get(server.url + "/healthz", headers={"X-Junk": "x" * 17000}, timeout=5)
    assert big_header.status_code == 400
    assert big_header.json()["error"]["code"] == "request_too_large"
    many_headers = httpx.get(server.url + "/healthz", timeout=5,
                             headers=[(f"X-H{i}", "y" * 40) for i in range(400)])
    assert many_headers.status_code == 400
    assert rejected(server, "request_size") == 3
    assert httpx.get(server.url + "/healthz", headers={"X-Fine": "x" * 4000}, timeout=5).status_code == 200


def test_aggregate_rate_per_client(start_server: Start) -> None:
    server = start_server({"AGGREGATE_RATE_PER_SECOND": "5"})
    url = server.url + "/aggregates/event_types"
    started = time.monotonic()
    with httpx.Client(timeout=5) as client:
        codes = [client.get(url).status_code for _ in range(30)]
        elapsed = time.monotonic() - started
        limited = client.get(url)
    assert codes[0] == 200 and 429 in codes
    assert set(codes) == {200, 429}
    # A burst of twice the rate, then the rate.
    assert 10 <= codes.count(200) <= 10 + 5 * elapsed + 1
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "too_many_requests"
    assert rejected(server, "aggregate_rate") >= 1
    # The bucket refills at the configured rate: a token every 0.2 s (refused requests take
    # none), so a request is served again well within a second.
    emptied = time.monotonic()
    with httpx.Client(timeout=5) as client:
        while client.get(url).status_code != 200:
            assert time.monotonic() - emptied < 1.0, "the bucket did not refill"
            time.sleep(0.02)
