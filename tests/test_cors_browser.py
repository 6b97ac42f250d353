"""CORS: an explicit origin allow-list, credentials only for listed origins; in a real
browser an EventSource ``withCredentials`` (the token in a cookie) works from an allowed
origin only."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from tests.support import free_port
from tests.test_dashboard import CHROMIUM_ARGS

Start = Callable[..., Any]

KEY = "cors-key-0123456789abcdef0123456789ab"
PAGE = """<!doctype html><html><body><div id="result">pending</div><script>
const result = document.getElementById("result");
const es = new EventSource("%s/events?topic=cors", {withCredentials: true});
es.onopen = () => { result.textContent = "open"; };
es.addEventListener("hello", (e) => { result.textContent = "event:" + JSON.parse(e.data).n; es.close(); });
es.onerror = () => { result.textContent = "error"; es.close(); };
</script></body></html>"""


def test_cors_allow_list(start_server: Start) -> None:
    good_origin = "http://good.example"
    server = start_server({"CORS_ORIGINS": f"{good_origin},http://other.example"})
    good = httpx.get(server.url + "/healthz", headers={"Origin": good_origin}, timeout=5)
    assert good.headers["access-control-allow-origin"] == good_origin
    assert good.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in good.headers["vary"]
    for evil in ("http://evil.example", "http://good.example.evil.example", "null",
                 "https://good.example", "http://good.example:8080"):
        response = httpx.get(server.url + "/healthz", timeout=5,
                             headers={"Origin": evil, "Cookie": "access_token=x"})
        # (Starlette sends Allow-Credentials always; without Allow-Origin it grants nothing.)
        assert "access-control-allow-origin" not in response.headers, evil
    preflight = httpx.options(server.url + "/events?topic=a", timeout=5, headers={
        "Origin": good_origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id, authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == good_origin
    allowed_headers = preflight.headers["access-control-allow-headers"].lower()
    assert "last-event-id" in allowed_headers and "authorization" in allowed_headers
    denied = httpx.options(server.url + "/events?topic=a", timeout=5, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert denied.status_code >= 400 and "access-control-allow-origin" not in denied.headers
    # Errors from /events carry CORS headers too, so a page can read why it was refused.
    refused = httpx.get(server.url + "/events?topic=bad topic", headers={"Origin": good_origin}, timeout=5)
    assert refused.status_code == 400
    assert refused.headers["access-control-allow-origin"] == good_origin


def test_no_cors_headers_without_an_allow_list(server: Any) -> None:
    response = httpx.get(server.url + "/healthz", headers={"Origin": "http://a.example"}, timeout=5)
    assert not [h for h in response.headers if h.startswith("access-control-")]


@pytest.fixture
def origin_server() -> Iterator[Callable[[str], str]]:
    servers: list[http.server.HTTPServer] = []

    def serve(target: str) -> str:
        body = (PAGE % target).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        port = free_port()
        httpd = http.server.HTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{port}"

    yield serve
    for httpd in servers:
        httpd.shutdown()


async def test_event_source_with_credentials_from_allowed_origin_only(
        start_server: Start, origin_server: Callable[[str], str], conn: asyncpg.Connection) -> None:
    from tests.tools import require_tool

    chromium = require_tool("chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    # Three origins on 127.0.0.1 (different ports): the service, an allowed page, another page.
    target_port = free_port()
    target = f"http://127.0.0.1:{target_port}"
    allowed = origin_server(target)
    denied = origin_server(target)
    start_server({"CORS_ORIGINS": allowed, "AUTH_SECRET": KEY}, port=target_port)
    secret = jwt.encode({"topics": ["cors"], "exp": int(time.time()) + 300}, KEY, algorithm="HS256")
    results = {}
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            # Cookies belong to the host, not the port: both pages' requests would carry it.
            await context.add_cookies([{"name": "access_token", "value": secret, "domain": "127.0.0.1",
                                        "path": "/", "httpOnly": True, "sameSite": "Lax"}])
            for name, origin in (("allowed", allowed), ("denied", denied)):
                page = await context.new_page()
                await page.goto(origin + "/", timeout=10000)
                await page.wait_for_selector("#result:not(:text('pending'))", timeout=10000)
                if await page.text_content("#result") == "open":
                    await conn.execute("SELECT realtime.publish('cors', 'hello', '{\"n\": 1}')")
                    await page.wait_for_selector("#result:not(:text('open'))", timeout=10000)
                results[name] = await page.text_content("#result")
                await page.close()
        finally:
            await browser.close()
    assert results == {"allowed": "event:1", "denied": "error"}
