"""CORS in a real browser: an EventSource withCredentials works from an allowed origin only."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import free_port
from tests.test_dashboard import CHROMIUM_ARGS

Start = Callable[..., Any]

PAGE = """<!doctype html><html><body><div id="result">pending</div><script>
const es = new EventSource("%s/events?topic=cors", {withCredentials: true});
es.onopen = () => { document.getElementById("result").textContent = "open"; es.close(); };
es.onerror = () => { document.getElementById("result").textContent = "error"; es.close(); };
</script></body></html>"""


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
        start_server: Start, origin_server: Callable[[str], str]) -> None:
    from tests.tools import require_tool

    chromium = require_tool("chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    # Two origins (different ports); only the first is allowed.
    target_port = free_port()
    target = f"http://127.0.0.1:{target_port}"
    allowed = origin_server(target)
    denied = origin_server(target)
    start_server({"CORS_ORIGINS": allowed}, port=target_port)
    results = {}
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for name, origin in (("allowed", allowed), ("denied", denied)):
                page = await browser.new_page()
                await page.goto(origin + "/", timeout=10000)
                await page.wait_for_selector("#result:not(:text('pending'))", timeout=10000)
                results[name] = await page.text_content("#result")
                await page.close()
        finally:
            await browser.close()
    assert results == {"allowed": "open", "denied": "error"}
