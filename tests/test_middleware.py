"""``pgsse.middleware.RequestContext`` driven as plain ASGI around a tiny app (no server):
request ids, the access log line and its redaction, size limits, security headers, and
HTTP metrics by route template."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pgsse import metrics
from pgsse.middleware import MAX_HEADER_BYTES, MAX_QUERY_BYTES, RequestContext, loggable_query
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

SECRET = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.SIGNATURE-abc123"


async def endpoint(request: Any) -> Response:
    return PlainTextResponse("ok")


ROUTES = [Route("/stats", endpoint), Route("/events/{position}", endpoint)]


class Inner:
    """The wrapped app: records what it saw and answers with ``content_type``."""

    def __init__(self, content_type: bytes = b"application/json") -> None:
        self.content_type = content_type
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(scope)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", self.content_type)]})
        await send({"type": "http.response.body", "body": b"{}"})


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_log() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("pgsse.access")
    handler = Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


async def call(app: Any, path: str = "/stats", query: str = "",
               headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, str], bytes]:
    scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode(),
             "headers": headers or [], "client": ("10.1.2.3", 5555), "root_path": "",
             "scheme": "http", "server": ("127.0.0.1", 8000), "http_version": "1.1"}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], response_headers, body


async def test_a_valid_request_id_is_taken_echoed_and_logged(
        access_log: list[logging.LogRecord]) -> None:
    inner = Inner()
    status, headers, _ = await call(RequestContext(inner, ROUTES),
                                    headers=[(b"x-request-id", b"abc-123.x:y_z")])
    assert status == 200 and headers["x-request-id"] == "abc-123.x:y_z"
    assert inner.calls[0]["state"]["request_id"] == "abc-123.x:y_z"
    (record,) = access_log
    assert record.event == "http_request" and record.request_id == "abc-123.x:y_z"  # type: ignore[attr-defined]
    assert (record.route, record.status, record.method, record.client) == (  # type: ignore[attr-defined]
        "/stats", 200, "GET", "10.1.2.3")


@pytest.mark.parametrize("given", [b"", b"has space", b"x" * 129, b"<script>", "é".encode()])
async def test_a_missing_or_unsafe_request_id_is_replaced(given: bytes) -> None:
    app = RequestContext(Inner(), ROUTES)
    headers = [(b"x-request-id", given)] if given else []
    _, first, _ = await call(app, headers=headers)
    _, second, _ = await call(app, headers=headers)
    assert len(first["x-request-id"]) >= 16 and first["x-request-id"] != second["x-request-id"]
    assert given.decode("latin-1") not in first["x-request-id"] or not given


@pytest.mark.parametrize("query", [
    f"access_token={SECRET}",
    f"topic=a&access_token={SECRET}&x=1",
    f"access%5Ftoken={SECRET}",
    f"%61ccess_token={SECRET}&topic=a%2Fb",
    f"ACCESS_TOKEN={SECRET}",
    f"Access_Token={SECRET}&topic=%20",
    f"access_token+={SECRET}",
    f"access_token={SECRET[:20]}%20{SECRET[20:]}",
    f"access_token=x&access_token={SECRET}",
])
async def test_the_token_is_redacted_however_it_is_spelled(
        access_log: list[logging.LogRecord], query: str) -> None:
    await call(RequestContext(Inner(), ROUTES), query=query)
    (record,) = access_log
    logged = record.query  # type: ignore[attr-defined]
    assert "[redacted]" in logged
    assert "SIGNATURE" not in logged and SECRET[20:] not in logged
    assert "SIGNATURE" not in loggable_query(query)


def test_other_parameters_are_logged_as_sent() -> None:
    assert loggable_query("topic=a%2Fb&access_token=t&x=1") == "topic=a%2Fb&access_token=[redacted]&x=1"
    assert loggable_query("topic=orders&last_event_id=5") == "topic=orders&last_event_id=5"
    assert loggable_query("") == ""


@pytest.mark.parametrize("query,headers", [
    ("topic=" + "a" * MAX_QUERY_BYTES, []),
    ("", [(b"x-junk", b"x" * MAX_HEADER_BYTES)]),
    ("", [(b"x-h%d" % i, b"y" * 40) for i in range(400)]),
])
async def test_oversized_requests_are_400_json_without_reaching_the_app(
        query: str, headers: list[tuple[bytes, bytes]]) -> None:
    inner = Inner()
    before = metrics.REGISTRY.get_sample_value("pgsse_rejected_requests_total",
                                                {"limit": "request_size"}) or 0.0
    status, response_headers, body = await call(RequestContext(inner, ROUTES), query=query,
                                                headers=headers)
    assert status == 400 and inner.calls == []
    assert response_headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert "x-request-id" in response_headers and "x-content-type-options" in response_headers
    assert metrics.REGISTRY.get_sample_value("pgsse_rejected_requests_total",
                                             {"limit": "request_size"}) == before + 1


async def test_requests_just_under_the_limits_pass() -> None:
    inner = Inner()
    status, _, _ = await call(RequestContext(inner, ROUTES), query="q=" + "a" * (MAX_QUERY_BYTES - 2),
                              headers=[(b"x-fine", b"x" * 4000)])
    assert status == 200 and len(inner.calls) == 1


async def test_security_headers_everywhere_and_a_csp_on_html() -> None:
    _, json_headers, _ = await call(RequestContext(Inner(), ROUTES))
    assert json_headers["x-content-type-options"] == "nosniff"
    assert json_headers["referrer-policy"] == "no-referrer"
    assert json_headers["x-frame-options"] == "DENY"
    assert json_headers["cross-origin-resource-policy"] == "same-site"
    assert "content-security-policy" not in json_headers
    _, html, _ = await call(RequestContext(Inner(b"text/html; charset=utf-8"), ROUTES))
    assert "frame-ancestors 'none'" in html["content-security-policy"]
    assert "script-src 'self'" in html["content-security-policy"]


@pytest.mark.parametrize("path,template", [
    ("/events/123", "/events/{position}"), ("/aggregates/sales", "/aggregates/{name}"),
    ("/stats", "/stats"), ("/nope/123", "unmatched"), ("/events", "/events"),
])
async def test_requests_are_counted_by_route_template_never_by_path(
        path: str, template: str, access_log: list[logging.LogRecord]) -> None:
    labels = {"route": template, "method": "GET", "status": "200"}
    before = metrics.REGISTRY.get_sample_value("pgsse_http_requests_total", labels) or 0.0
    await call(RequestContext(Inner(), ROUTES), path=path)
    assert metrics.REGISTRY.get_sample_value("pgsse_http_requests_total", labels) == before + 1
    assert access_log[0].route == template and access_log[0].path == path  # type: ignore[attr-defined]


async def test_other_scopes_pass_through_untouched() -> None:
    seen: list[str] = []

    async def lifespan(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await RequestContext(lifespan, ROUTES)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]
