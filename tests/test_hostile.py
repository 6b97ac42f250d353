"""Hostile input over every endpoint: only 2xx/3xx/4xx, never a 5xx, never a hang.

One server (auth on, demo aggregates) serves the whole module. Valid tokens are part of
the mix so that requests get past authentication into parameter parsing, the resume path
and the aggregate queries (claims included); every request has a hard timeout.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import ServerProcess, read_sse

KEY = "hostile-secret-0123456789abcdef0123"
PATHS = ["/events", "/aggregates", "/aggregates/orders_by_status", "/aggregates/recent_orders",
         "/aggregates/daily_sales", "/aggregates/event_types", "/aggregates/nope",
         "/aggregates/..%2fetc", "/stats", "/readyz", "/healthz", "/openapi.json", "/metrics",
         "/", "/static/dashboard.js", "/static/..%2f..%2fetc%2fpasswd", "/events/x", "//events"]
NAMES = ["topic", "last_event_id", "lastEventId", "access_token", "store_id", "since", "page",
         "limit", "fields", "status", "x"]
NASTY = ["", "0", "-1", "9223372036854775807", "9223372036854775808", "١٢", "1e9", " 5",
         "' OR 1=1 --", "1; DROP TABLE orders", "a//b", "/a", "a/", "%00", "*", "orders/42",
         "9" * 400, "true", "2024-02-30", "NaN", "Infinity", ":store_id", "$1", "\\", "é"]
nasty = st.one_of(st.text(max_size=300), st.sampled_from(NASTY))
# Header values: printable ASCII as text; as raw bytes, all that HTTP/1.1 can carry
# (tab, space, visible ASCII, and the 0x80-0xff "obs-text" a server must cope with).
header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
    st.binary(max_size=100).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127)),
)
claim_values = st.one_of(st.sampled_from(NASTY), st.integers(), st.floats(allow_nan=False),
                         st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def token(**claims: Any) -> str:
    return jwt.encode({"topics": ["*"], "exp": int(time.time()) + 3600, **claims}, KEY,
                      algorithm="HS256")


valid_tokens = st.builds(lambda store, sub: token(store_id=store, sub=sub),
                         claim_values, st.text(max_size=20))
auth_headers = st.one_of(
    st.none(), header_values, valid_tokens.map(lambda t: "Bearer " + t),
    st.sampled_from(["Bearer", "Bearer a.b.c", "Basic eA==", "Bearer " + "x" * 9000,
                     "Bearer eyJhbGciOiJub25lIn0.eyJ0b3BpY3MiOlsiKiJdLCJleHAiOjk5OTk5OTk5OTl9."]))


@pytest.fixture(scope="module")
def hostile_server(pg_url: str, template_url: str, tmp_path_factory: Any) -> Iterator[ServerProcess]:
    name = "hostile_db"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    asyncio.run(run(f"CREATE DATABASE {name} TEMPLATE pgsse_template"))
    url = template_url.replace("/pgsse_template", f"/{name}")
    server = ServerProcess(url, {"AUTH_SECRET": KEY, "DEMO": "1", "DEMO_RATE": "0.0001",
                                 "AGGREGATE_RATE_PER_SECOND": "100000",
                                 "MAX_CONNECTIONS_PER_CLIENT": "100000"},
                           tmp_path_factory.mktemp("hostile")).start()
    yield server
    server.stop()
    logs = server.logs()
    assert '"event": "http_request"' in logs, "the anchor: this server's requests are logged here"
    assert "unhandled_error" not in logs
    asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def raw(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.url, response.status_code, response.text[:300])
    if (response.status_code >= 400 and response.request.method != "HEAD"
            and response.headers.get("content-type", "").startswith("application/json")):
        error = response.json()["error"]
        assert error["code"] and error["message"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), params=st.lists(st.tuples(st.sampled_from(NAMES), nasty), max_size=6),
       last_event_id=st.one_of(st.none(), header_values, st.sampled_from(NASTY[:8])),
       auth=auth_headers, cookie=st.one_of(st.none(), header_values, valid_tokens),
       method=st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "OPTIONS"]))
def test_no_input_causes_a_5xx_or_a_hang(hostile_server: ServerProcess, path: str,
                                         params: list[tuple[str, str]], last_event_id: Any,
                                         auth: Any, cookie: Any, method: str) -> None:
    headers: dict[str, bytes] = {}
    for name, value in (("Last-Event-ID", last_event_id), ("Authorization", auth),
                        ("Cookie", None if cookie is None else "access_token=" + raw(cookie))):
        if value is not None:
            # Any bytes but CR, LF and NUL; HTTP itself trims surrounding blanks.
            headers[name] = raw(value).encode("utf-8", "surrogateescape").strip(b" \t")
    clean = [(k, v.replace("\x00", "")) for k, v in params]
    with httpx.Client(timeout=httpx.Timeout(5.0)) as client, client.stream(
            method, hostile_server.url + path, params=clean, headers=headers) as response:
        # A 200 event stream is endless by design: its status and headers are the answer.
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
        check(response)


BAD_POSITIONS = ["abc", "-1", "+1", "١٢", "1.5", "0x10", "1e3", "9223372036854775808",
                 "99999999999999999999999", "1 2", "²"]


@pytest.mark.parametrize("value", BAD_POSITIONS)
def test_bad_last_event_id_is_400(hostile_server: ServerProcess, value: str) -> None:
    auth = {"Authorization": "Bearer " + token()}
    for how in ({"headers": {**auth, "Last-Event-ID": value.encode()}},
                {"headers": auth, "params": {"topic": "a", "last_event_id": value}},
                {"headers": auth, "params": {"topic": "a", "lastEventId": value}}):
        how.setdefault("params", {"topic": "a"})
        response = httpx.get(hostile_server.url + "/events", timeout=5, **how)  # type: ignore[arg-type]
        assert response.status_code == 400, (value, how)
        assert response.json()["error"]["code"] == "invalid_last_event_id"


async def test_edge_positions_resume_or_reset(hostile_server: ServerProcess) -> None:
    auth = {"Authorization": "Bearer " + token()}
    beyond = await read_sse(hostile_server.url + "/events", params={"topic": "a"}, timeout=5,
                            headers={**auth, "Last-Event-ID": "9223372036854775807"}, max_events=1)
    assert beyond.status == 200
    assert beyond.events[0].event == "reset"
    assert beyond.events[0].json() == {"reason": "unknown_position"}
    for absent in ({"Last-Event-ID": ""}, {}):  # an empty value counts as absent
        stream = await read_sse(hostile_server.url + "/events", params={"topic": "a", "last_event_id": ""},
                                headers={**auth, **absent}, timeout=3)
        assert stream.status == 200 and stream.retries and not stream.events


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /healthz?" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: \xff\xfe\r\n"
    b"Authorization: Bearer \xe9\xe9\r\nCookie: access_token=\x80\r\n\r\n",
    b"GET /events?topic=%ff%fe&last_event_id=%c0%80 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://evil.example/healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    b"\r\n\r\n\r\n",
])
def test_malformed_http_is_answered_or_closed(hostile_server: ServerProcess, request_bytes: bytes) -> None:
    with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=5) as sock:
        sock.sendall(request_bytes)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    if answer:  # closing without a word is fine; a 5xx is not
        status = answer.split(b"\r\n", 1)[0].split(b" ")
        assert status[0].startswith(b"HTTP/1.") and not status[1].startswith(b"5"), answer[:300]
    assert httpx.get(hostile_server.url + "/healthz", timeout=5).status_code == 200


def test_security_headers_on_html_json_errors_and_streams(hostile_server: ServerProcess) -> None:
    base = {"x-content-type-options": "nosniff", "x-frame-options": "DENY",
            "referrer-policy": "no-referrer"}
    auth = {"Authorization": "Bearer " + token(store_id=1)}
    html = httpx.get(hostile_server.url + "/", timeout=5)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    csp = html.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp
    responses = [html, httpx.get(hostile_server.url + "/readyz", timeout=5),
                 httpx.get(hostile_server.url + "/stats", timeout=5),
                 httpx.get(hostile_server.url + "/aggregates/nope", headers=auth, timeout=5),
                 httpx.get(hostile_server.url + "/aggregates/orders_by_status", headers=auth, timeout=5)]
    with httpx.stream("GET", hostile_server.url + "/events?topic=a", headers=auth, timeout=5) as stream:
        responses.append(stream)
    assert [r.status_code for r in responses] == [200, 200, 401, 404, 200, 200]
    for response in responses:
        for name, value in base.items():
            assert response.headers.get(name) == value, (response.url, name)
        assert response.headers["x-request-id"]
    for response in responses[1:]:
        assert "content-security-policy" not in response.headers or response is html


def test_request_id_is_echoed_only_when_safe(hostile_server: ServerProcess) -> None:
    ok = httpx.get(hostile_server.url + "/healthz", headers={"X-Request-ID": "abc-123"}, timeout=5)
    assert ok.headers["x-request-id"] == "abc-123"
    for evil in ("<script>", "a" * 500, "x y", "é"):
        response = httpx.get(hostile_server.url + "/healthz", timeout=5,
                             headers={"X-Request-ID": evil.encode()})
        assert response.headers["x-request-id"] != evil and response.headers["x-request-id"].isalnum()


def test_schemathesis_against_openapi(hostile_server: ServerProcess) -> None:
    """Schemathesis generates requests from /openapi.json (with a valid token, so they get
    past auth). /events is left to the hypothesis test above: its 200 never ends."""
    pytest.importorskip("schemathesis")
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", hostile_server.url + "/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "40",
         "--header", f"Authorization: Bearer {token(store_id=1)}",
         "--exclude-path", "/events", "--request-timeout", "5", "--workers", "4",
         "--max-response-time", "5", "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=120)
    output = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    tested = json.dumps(output)
    # The token gets past authentication everywhere (no operation answers only 401). A 403
    # is right where a generated store_id is not the token's store (a claim-bound parameter),
    # and random generation can miss store 1 for an operation altogether.
    assert "passed" in tested and "401 Unauthorized" not in tested, output
