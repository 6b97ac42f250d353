"""Auth, tenant scoping, CORS and limits against a real pgsse process."""

from __future__ import annotations

import json
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

from tests.support import ROOT, eventually, log_records, open_stream, read_sse, read_sse_resuming

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


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def test_tokens_from_header_cookie_and_query(secured: Any) -> None:
    good = token(["orders"])
    for kwargs in ({"headers": bearer(good)},
                   {"headers": {"Cookie": f"access_token={good}"}},
                   {"params": {"topic": "orders/42", "access_token": good}}):
        kwargs.setdefault("params", {"topic": "orders/42"})
        stream = await read_sse(secured.url + "/events", timeout=5,
                                until=lambda s: bool(s.retries), **kwargs)
        assert stream.status == 200, kwargs
        assert stream.retries, kwargs  # the stream opened
    missing = httpx.get(secured.url + "/events?topic=orders", timeout=5)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer")


def test_invalid_tokens_are_401_with_json(secured: Any) -> None:
    now = int(time.time())
    bad = {
        "expired": token(ttl=-10),
        "no_exp": jwt.encode({"topics": ["*"]}, FIRST, algorithm="HS256"),
        "exp_not_a_number": jwt.encode({"topics": ["*"], "exp": str(now + 60)}, FIRST, algorithm="HS256"),
        "wrong_key": token(key="not-the-key-0123456789abcdef0123456"),
        "alg_none": jwt.encode({"topics": ["*"], "exp": now + 60}, None, algorithm="none"),
        "alg_hs512": jwt.encode({"topics": ["*"], "exp": now + 60}, FIRST * 2, algorithm="HS512"),
        "not_before": token(nbf=now + 600),
        "garbage": "not.a.token",
        "not_base64": "@@@.@@@.@@@",
        "payload_array": jwt.api_jws.encode(b"[1,2]", FIRST, algorithm="HS256"),
        "oversized": token(pad="x" * 9000),
        # A string is a space-separated list since contract section 8; an object is not.
        "topics_not_list": jwt.encode({"topics": {"orders": True}, "exp": now + 60}, FIRST, algorithm="HS256"),
        "topics_not_strings": jwt.encode({"topics": [1], "exp": now + 60}, FIRST, algorithm="HS256"),
    }
    for name, value in bad.items():
        # The same answer whichever way the token comes.
        for how in ({"headers": bearer(value)}, {"cookies": {"access_token": value}},
                    {"params": {"topic": "orders", "access_token": value}}):
            how.setdefault("params", {"topic": "orders"})
            response = httpx.get(secured.url + "/events", timeout=5, **how)  # type: ignore[arg-type]
            if name == "oversized" and "access_token" in how["params"]:
                assert response.status_code == 400, name  # the query-string limit comes first
                continue
            assert response.status_code == 401, (name, how, response.text)
            error = response.json()["error"]
            assert set(error) == {"code", "message"}, name
            assert error["code"] in ("unauthorized", "invalid_token", "token_expired"), name
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer\tx", "Token abc", "bearer"):
        response = httpx.get(secured.url + "/stats", headers={"Authorization": header}, timeout=5)
        assert response.status_code == 401 and response.json()["error"]["code"], header


def test_nbf_in_the_past_is_fine_and_exp_must_be_in_range(secured: Any) -> None:
    now = int(time.time())
    assert status(secured, "/stats", headers=bearer(token(nbf=now - 5))) == 200
    assert status(secured, "/stats", headers=bearer(token(nbf=now + 60))) == 401
    year_5000 = jwt.encode({"topics": ["*"], "exp": 95_617_584_000}, FIRST, algorithm="HS256")
    assert status(secured, "/stats", headers=bearer(year_5000)) == 200
    # RFC 7519 NumericDate, in range: a 400-digit exp is refused (it once caused a 500).
    far = jwt.encode({"topics": ["*"], "exp": 10**400}, FIRST, algorithm="HS256")
    assert status(secured, "/stats", headers=bearer(far)) == 401


def test_grants_are_segment_prefixes(secured: Any) -> None:
    def code(grants: list[str] | None, *topics: str) -> int:
        # A granted stream is endless: its status line is the answer.
        with httpx.stream("GET", secured.url + "/events", params=[("topic", t) for t in topics],
                          headers=bearer(token(grants)), timeout=5) as response:
            return response.status_code

    assert code(["orders"], "orders/42") == 200
    assert code(["orders"], "orders/42/lines", "orders") == 200
    assert code(["*"], "anything/at/all") == 200
    assert code(["orders/4"], "orders/42") == 403
    assert code(["orders/42"], "orders") == 403  # a grant does not reach up
    assert code(["orders"], "orders/42", "customers/1") == 403  # every topic must be granted
    assert code([], "orders") == 403
    assert code(["ord"], "orders") == 403
    forbidden = httpx.get(secured.url + "/events?topic=orders", headers=bearer(token(None)), timeout=5)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"] == {"code": "forbidden", "param": "topic",
                                         "message": "token does not grant topic 'orders'",
                                         "topics": ["orders"]}
    several = httpx.get(secured.url + "/events?topic=orders/1&topic=bills&topic=orders/2",
                        headers=bearer(token(["orders/1"])), timeout=5)
    assert several.status_code == 403
    assert several.json()["error"]["topics"] == ["bills", "orders/2"], "every denied topic named"


async def test_granted_streams_open_and_rotation_verifies_old_key(secured: Any) -> None:
    for key in (FIRST, SECOND):
        stream = await read_sse(secured.url + "/events?topic=orders/42/lines", timeout=5,
                                headers=bearer(token(["orders"], key=key)),
                                until=lambda s: bool(s.retries))
        assert stream.status == 200 and stream.retries


def test_stats_needs_star_and_readyz_reports_auth(secured: Any, server: Any) -> None:
    assert status(secured, "/stats") == 401
    assert status(secured, "/stats", headers=bearer(token(["orders"]))) == 403
    assert status(secured, "/stats", headers=bearer(token(["*"]))) == 200
    assert "warnings" not in httpx.get(secured.url + "/readyz", timeout=5).json()
    assert "auth_disabled" not in secured.logs()
    # Without AUTH_SECRET: open, and it says so.
    assert httpx.get(server.url + "/readyz", timeout=5).json()["warnings"] == ["auth_disabled"]
    assert status(server, "/stats") == 200
    warnings = [json.loads(line) for line in server.logs().splitlines()
                if line.startswith("{") and '"auth_disabled"' in line]
    assert warnings and warnings[0]["level"] == "warning"
    assert "AUTH_SECRET" in warnings[0]["message"]


async def test_replay_is_authorised_like_live(secured: Any, conn: asyncpg.Connection) -> None:
    start = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
    for topic in ("orders/1", "orders/2", "orders/1"):
        await conn.execute("SELECT realtime.publish($1, 'x', jsonb_build_object('t', $1::text))", topic)
    # Numbered: the stream below replays them from history.
    await eventually(lambda: conn.fetchval(
        "SELECT last_position >= $1 + 3 FROM realtime.sequencer", start))
    stream, _ = await read_sse_resuming(
        secured.url + "/events", params={"topic": "orders/1", "access_token": token(["orders/1"])},
        last_id=str(start), until=lambda s: len(s.events) >= 2, timeout=5)
    assert [e.json()["t"] for e in stream.events] == ["orders/1", "orders/1"]
    # Asking to replay more than the token grants is refused before anything is sent.
    wider = httpx.get(secured.url + "/events", timeout=5, headers={"Last-Event-ID": str(start)},
                      params={"topic": "orders", "access_token": token(["orders/1"])})
    assert wider.status_code == 403 and "orders/2" not in wider.text


async def test_expiring_token_ends_stream_and_resume_loses_nothing(
        secured: Any, conn: asyncpg.Connection) -> None:
    start = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
    task = await open_stream(
        secured.url + "/events", params={"topic": "exp"}, timeout=10,
        headers={"Authorization": f"Bearer {token(['exp'], ttl=3)}", "Last-Event-ID": str(start)})
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
    result = subprocess.run([sys.executable, "-m", "pgsse", "token", "--topics", "orders/42",
                             "--ttl", "60", "--claim", "store_id=7"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), FIRST, algorithms=["HS256"])
    assert claims["topics"] == ["orders/42"] and claims["store_id"] == 7
    assert 50 < claims["exp"] - time.time() <= 60


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


async def test_tokens_are_never_logged(secured: Any) -> None:
    secret = token(["*"])
    ids: list[str] = []

    def rid() -> dict[str, str]:
        ids.append(f"secret-probe-{len(ids)}")
        return {"X-Request-ID": ids[-1]}

    for request in ({"params": {"access_token": secret}}, {"cookies": {"access_token": secret}},
                    {"headers": bearer(secret)}):
        with httpx.Client(timeout=5, **request) as client:  # type: ignore[arg-type]
            assert client.get(secured.url + "/stats", headers=rid()).status_code == 200
            assert client.get(secured.url + "/events?topic=x%20y", headers=rid()).status_code == 400
    # However the parameter's name is spelled on the wire.
    for name in ("access%5Ftoken", "%61ccess_token", "ACCESS_TOKEN"):
        httpx.get(f"{secured.url}/stats?{name}={secret}&x=1", headers=rid(), timeout=5)
    httpx.get(f"{secured.url}/stats?access_token={secret[:40]}%20{secret[40:]}", headers=rid(),
              timeout=5)
    httpx.get(secured.url + "/stats", headers={**bearer(secret + "x"), **rid()}, timeout=5)  # a bad one
    # The anchor: every one of those requests has its access log line...
    logged = await eventually(
        lambda: (found := {r.get("request_id"): r for r in log_records(secured)
                           if r["event"] == "http_request"}) and set(ids) <= set(found) and found,
        what="an access log line for every request")
    assert all(logged[i]["route"] in ("/stats", "/events") for i in ids)
    assert "[redacted]" in logged["secret-probe-0"]["query"]
    # ...and no line carries the token, nor a piece of it.
    logs = secured.logs()
    signature = secret.rsplit(".", 1)[1]
    assert signature not in logs and secret[40:] not in logs
