"""Auth, tenant scoping, CORS and limits against a real pgsse process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from tests.support import ROOT, read_sse, read_sse_resuming

Start = Callable[..., Any]
KEYS = "first-key-0123456789abcdef0123456789,second-key-0123456789abcdef012345"
FIRST, SECOND = KEYS.split(",")


def token(topics: Any = ("*",), key: str = FIRST, ttl: float = 300, **claims: Any) -> str:
    body: dict[str, Any] = {"exp": int(time.time() + ttl), **claims}
    if topics is not None:
        body["topics"] = list(topics)
    return jwt.encode(body, key, algorithm="HS256")


@pytest.fixture
def secured(start_server: Start) -> Any:
    return start_server({"AUTH_SECRET": KEYS})


def status(server: Any, path: str, **kwargs: Any) -> int:
    return httpx.get(server.url + path, timeout=5, **kwargs).status_code


async def test_tokens_from_header_cookie_and_query(secured: Any) -> None:
    good = token(["orders"])
    for kwargs in ({"headers": {"Authorization": f"Bearer {good}"}},
                   {"headers": {"Cookie": f"access_token={good}"}},
                   {"params": {"topic": "orders/42", "access_token": good}}):
        kwargs.setdefault("params", {"topic": "orders/42"})
        stream = await read_sse(secured.url + "/events", timeout=1.5, **kwargs)
        assert stream.status == 200, kwargs
    assert status(secured, "/events?topic=orders") == 401


def test_invalid_tokens_are_401_with_json(secured: Any) -> None:
    now = int(time.time())
    bad = {
        "expired": token(ttl=-10),
        "no_exp": jwt.encode({"topics": ["*"]}, FIRST, algorithm="HS256"),
        "wrong_key": token(key="not-the-key-0123456789abcdef0123456"),
        "alg_none": jwt.encode({"topics": ["*"], "exp": now + 60}, None, algorithm="none"),
        "not_before": token(nbf=now + 600),
        "garbage": "not.a.token",
        "oversized": token(pad="x" * 20000),
        "topics_not_list": jwt.encode({"topics": "orders", "exp": now + 60}, FIRST, algorithm="HS256"),
    }
    for name, value in bad.items():
        response = httpx.get(secured.url + "/events?topic=orders",
                             headers={"Authorization": f"Bearer {value}"}, timeout=5)
        assert response.status_code in (400, 401), name
        assert response.json()["error"]["code"], name
        assert response.status_code == 401 or name == "oversized", name


def test_grants_are_segment_prefixes(secured: Any) -> None:
    def code(grants: list[str], topic: str) -> int:
        return httpx.get(secured.url + "/events", params={"topic": topic},
                         headers={"Authorization": f"Bearer {token(grants)}"}, timeout=2).status_code

    assert code(["orders/4"], "orders/42") == 403
    assert code([], "orders") == 403
    forbidden = httpx.get(secured.url + "/events?topic=orders",
                          headers={"Authorization": f"Bearer {token(None)}"}, timeout=2)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"


async def test_granted_streams_open_and_rotation_verifies_old_key(secured: Any) -> None:
    for key in (FIRST, SECOND):
        stream = await read_sse(secured.url + "/events?topic=orders/42/lines", timeout=1,
                                headers={"Authorization": f"Bearer {token(['orders'], key=key)}"})
        assert stream.status == 200


def test_stats_needs_star_and_readyz_reports_auth(secured: Any, server: Any) -> None:
    assert status(secured, "/stats") == 401
    assert status(secured, "/stats", headers={"Authorization": f"Bearer {token(['orders'])}"}) == 403
    assert status(secured, "/stats", headers={"Authorization": f"Bearer {token(['*'])}"}) == 200
    assert "warnings" not in httpx.get(secured.url + "/readyz").json()
    assert httpx.get(server.url + "/readyz").json()["warnings"] == ["auth_disabled"]


async def test_replay_is_authorised_like_live(secured: Any, conn: asyncpg.Connection) -> None:
    start = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
    for topic in ("orders/1", "orders/2", "orders/1"):
        await conn.execute("SELECT realtime.publish($1, 'x', jsonb_build_object('t', $1::text))", topic)
    await asyncio.sleep(0.5)
    stream, _ = await read_sse_resuming(
        secured.url + "/events", params={"topic": "orders/1", "access_token": token(["orders/1"])},
        last_id=str(start), until=lambda s: len(s.events) >= 2, timeout=5)
    assert [e.json()["t"] for e in stream.events] == ["orders/1", "orders/1"]


async def test_expiring_token_ends_stream_and_resume_loses_nothing(
        secured: Any, conn: asyncpg.Connection) -> None:
    start = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
    task = asyncio.create_task(read_sse(
        secured.url + "/events", params={"topic": "exp"}, timeout=10,
        headers={"Authorization": f"Bearer {token(['exp'], ttl=2)}", "Last-Event-ID": str(start)}))
    await asyncio.sleep(0.3)
    for i in range(3):
        await conn.execute("SELECT realtime.publish('exp', 'n', jsonb_build_object('i', $1::int))", i)
    first = await task
    assert first.ended and first.events[-1].event == "auth_expired"
    for i in range(3, 6):
        await conn.execute("SELECT realtime.publish('exp', 'n', jsonb_build_object('i', $1::int))", i)
    second = await read_sse(secured.url + "/events", params={"topic": "exp"}, timeout=5,
                            headers={"Authorization": f"Bearer {token(['exp'])}",
                                     "Last-Event-ID": first.last_id or str(start)},
                            until=lambda s: len(s.events) >= 3)
    got = [e.json()["i"] for e in first.events + second.events if e.event == "n"]
    assert got == list(range(6))


async def test_tenant_scoped_aggregates(start_server: Start, conn: asyncpg.Connection,
                                       tmp_path: Path) -> None:
    await conn.execute("CREATE TABLE bills (store_id int, amount int)")
    await conn.execute("INSERT INTO bills VALUES (1, 10), (1, 5), (2, 100)")
    await conn.execute("SELECT realtime.watch('bills')")
    await conn.execute("GRANT SELECT ON bills TO pgsse_reader")
    # Row-level security reads the caller's claims, as PostgREST does.
    await conn.execute("ALTER TABLE bills ENABLE ROW LEVEL SECURITY")
    await conn.execute("CREATE POLICY tenant ON bills FOR SELECT TO pgsse_reader USING "
                       "(store_id = (current_setting('request.jwt.claims', true)::jsonb ->> 'store_id')::int)")
    directory = tmp_path / "agg"
    directory.mkdir()
    (directory / "bill_total.sql").write_text(
        "-- Bill total of the caller's store.\n-- param store_id: int from claim store_id\n"
        "SELECT :store_id AS store, sum(amount) AS total FROM bills WHERE store_id = :store_id\n")
    (directory / "bills_rls.sql").write_text(
        "-- Bills visible to the caller (row-level security).\n"
        "SELECT store_id, amount FROM bills ORDER BY amount\n")
    server = start_server({"AUTH_SECRET": KEYS, "AGGREGATES_DIR": str(directory)})
    grant = ["aggregates"]
    one = {"Authorization": f"Bearer {token(grant, store_id=1)}"}
    two = {"Authorization": f"Bearer {token(grant, store_id=2)}"}
    r1 = httpx.get(server.url + "/aggregates/bill_total", headers=one)
    r2 = httpx.get(server.url + "/aggregates/bill_total", headers=two)
    assert r1.json()["data"] == [{"store": 1, "total": 15}]
    assert r2.json()["data"] == [{"store": 2, "total": 100}]
    assert r1.headers["etag"] != r2.headers["etag"]
    assert r1.headers["cache-control"].startswith("private")
    assert "Authorization" in r1.headers["vary"]
    assert httpx.get(server.url + "/aggregates/bill_total?store_id=2", headers=one).status_code == 403
    assert httpx.get(server.url + "/aggregates/bill_total",
                     headers={**two, "If-None-Match": r1.headers["etag"]}).status_code == 200
    rls1 = httpx.get(server.url + "/aggregates/bills_rls", headers=one).json()["data"]
    rls2 = httpx.get(server.url + "/aggregates/bills_rls", headers=two).json()["data"]
    assert rls1 == [{"store_id": 1, "amount": 5}, {"store_id": 1, "amount": 10}]
    assert rls2 == [{"store_id": 2, "amount": 100}]
    no_grant = {"Authorization": f"Bearer {token(['orders'], store_id=1)}"}
    assert httpx.get(server.url + "/aggregates/bill_total", headers=no_grant).status_code == 403


def test_token_command_signs_with_the_first_key() -> None:
    env = {"AUTH_SECRET": KEYS, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "service", "token", "--topics", "orders/42",
                             "--ttl", "60", "--claim", "store_id=7"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), FIRST, algorithms=["HS256"])
    assert claims["topics"] == ["orders/42"] and claims["store_id"] == 7
    assert 50 < claims["exp"] - time.time() <= 60


def hold_stream(server: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


def test_per_client_stream_limit_is_429(start_server: Start) -> None:
    server = start_server({"MAX_CONNECTIONS_PER_CLIENT": "2", "MAX_CONNECTIONS": "3"})
    opened = [hold_stream(server) for _ in range(2)]
    third = httpx.get(server.url + "/events?topic=a", timeout=5)
    assert third.status_code == 429 and "retry-after" in third.headers
    assert third.json()["error"]["code"] == "too_many_requests"
    for sock in opened:
        sock.close()
    text = httpx.get(server.url + "/metrics").text
    assert 'pgsse_rejected_requests_total{limit="client_connections"}' in text


def test_process_full_answers_200_with_retry(start_server: Start) -> None:
    server = start_server({"MAX_CONNECTIONS": "1"})
    held = hold_stream(server)
    full = httpx.get(server.url + "/events?topic=a", timeout=5)
    assert full.status_code == 200 and full.text.startswith("retry: ")
    assert full.headers["content-type"].startswith("text/event-stream")
    held.close()


def test_cors_allow_list(start_server: Start) -> None:
    server = start_server({"CORS_ORIGINS": "http://good.example"})
    good = httpx.get(server.url + "/healthz", headers={"Origin": "http://good.example"})
    assert good.headers["access-control-allow-origin"] == "http://good.example"
    assert good.headers["access-control-allow-credentials"] == "true"
    evil = httpx.get(server.url + "/healthz", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in evil.headers
    preflight = httpx.options(server.url + "/events?topic=a", headers={
        "Origin": "http://good.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id"})
    assert preflight.status_code == 200


def test_security_headers_and_no_secrets_in_logs(secured: Any) -> None:
    secret = token(["*"])
    httpx.get(secured.url + "/stats", params={"access_token": secret})
    httpx.get(secured.url + "/stats", cookies={"access_token": secret})
    response = httpx.get(secured.url + "/stats", headers={"Authorization": f"Bearer {secret}"})
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    time.sleep(0.3)
    assert secret not in secured.logs()


def test_aggregate_rate_limit_and_request_size_limits(start_server: Start) -> None:
    server = start_server({"DEMO": "1", "DEMO_RATE": "0.0001", "AGGREGATE_RATE_PER_SECOND": "5"})
    codes = [httpx.get(server.url + "/aggregates/orders_by_status").status_code for _ in range(30)]
    assert codes[0] == 200 and 429 in codes
    limited = next(r for r in (httpx.get(server.url + "/aggregates/orders_by_status") for _ in range(5))
                   if r.status_code == 429)
    assert limited.headers["retry-after"] and limited.json()["error"]["code"] == "too_many_requests"
    long_query = httpx.get(server.url + "/events", params={"topic": "a" * 9000})
    assert long_query.status_code == 400 and long_query.json()["error"]["code"] == "request_too_large"
    many = httpx.get(server.url + "/events", params=[("topic", f"t{i}") for i in range(33)])
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_topics"
    text = httpx.get(server.url + "/metrics").text
    for limit in ("aggregate_rate", "request_size"):
        assert f'pgsse_rejected_requests_total{{limit="{limit}"}}' in text


def test_audience_and_issuer_are_checked_when_configured(start_server: Start) -> None:
    server = start_server({"AUTH_SECRET": KEYS, "AUTH_AUDIENCE": "dash", "AUTH_ISSUER": "shop"})

    def code(**claims: Any) -> int:
        return httpx.get(server.url + "/stats", timeout=5,
                         headers={"Authorization": f"Bearer {token(['*'], **claims)}"}).status_code

    assert code(aud="dash", iss="shop") == 200
    assert code(aud="other", iss="shop") == 401
    assert code(aud="dash", iss="other") == 401
    assert code() == 401
    httpx.get(server.url + "/events", params=[("topic", f"t{i}") for i in range(33)])
    assert 'pgsse_rejected_requests_total{limit="topics_per_stream"}' in httpx.get(server.url + "/metrics").text
