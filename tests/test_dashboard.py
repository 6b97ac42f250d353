"""The demo dashboard, built on the JS client, in headless Chromium (Playwright) against a
real pgsse: live updates, the invalidation map, pause when hidden, offline, no console errors."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from tests.support import eventually, stats

Start = Callable[..., Any]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


class Browser:
    """One page of the dashboard, with every request and console error recorded."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.requests: Counter[str] = Counter()
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("request", self._request)

    def _request(self, request: Any) -> None:
        path = urlsplit(request.url).path
        self.requests[path] += 1

    def aggregate(self, name: str) -> int:
        return self.requests[f"/aggregates/{name}"]


async def launch(playwright_api: Any, p: Any) -> Any:
    from tests.tools import require_tool

    chromium = require_tool("chromium")
    return await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)


def stream_count(server: Any) -> int:
    return int(httpx.get(server.url + "/stats", timeout=5).json()["clients"])


async def wait_until(predicate: Callable[[], Any], page: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await page.wait_for_timeout(50)


async def settled(server: Any, conn: asyncpg.Connection) -> None:
    """The demo's own changes (its products, at install) have reached the service, so what
    the page sees next is the test's doing alone."""
    async def arrived() -> bool:
        head = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
        return bool(head) and stats(server)["position"] >= head
    await eventually(arrived, what="the demo's install events at the service")


async def test_dashboard_live_map_and_export(start_server: Start, conn: asyncpg.Connection, tmp_path: Any) -> None:
    from tests.tools import require_tool

    require_tool("chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    server = start_server({"DEMO": "1", "DEMO_RATE": "0.0001"})
    await settled(server, conn)
    async with playwright_api.async_playwright() as p:
        browser = await launch(playwright_api, p)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            b = Browser(page)
            await page.goto(server.url + "/", timeout=15000)
            await page.wait_for_selector("#status[data-state=open]", timeout=10000)
            assert await page.is_visible("#auth-banner"), "auth is off: the banner says so"
            await page.wait_for_selector("#top-products li .fill", timeout=10000)
            await page.wait_for_selector("#payouts tbody tr", timeout=10000)
            assert b.requests["/client/index.js"] == 1 and b.requests["/client/tanstack-query.js"] == 1
            # Export CSV carries the current store and filter.
            href = await page.get_attribute("#export-csv", "href") or ""
            query = parse_qs(urlsplit(href).query)
            assert urlsplit(href).path == "/aggregates/recent_orders"
            assert query["format"] == ["csv"] and query["store_id"] == ["2"] and query["status"] == ["pending"]

            # A mapped named event refetches payout_summary; top_products (unmapped) is left alone.
            top, payouts = b.aggregate("top_products"), b.aggregate("payout_summary")
            await conn.execute("SELECT realtime.publish('payouts/2', 'payout.status.changed', "
                               "'{\"id\": 41, \"status\": \"paid\"}')")
            await wait_until(lambda: b.aggregate("payout_summary") > payouts, page, 10, "payout refetch")
            await page.wait_for_selector(".toast:has-text('Payout paid')", timeout=5000)
            await conn.execute("SELECT realtime.publish('payouts/2', 'payout.status.changed', "
                               "'{\"id\": 42, \"status\": \"failed\"}')")
            await wait_until(lambda: b.aggregate("payout_summary") > payouts + 1, page, 10, "second refetch")
            assert b.aggregate("top_products") == top, "an unmapped query was refetched"
            # Another store's event does not reach this store's view.
            await conn.execute("SELECT realtime.publish('payouts/3', 'payout.status.changed', '{\"status\": \"paid\"}')")

            # A new pending order appears live (aggregate.invalidated → 200 with the new row).
            row = await conn.fetchrow("INSERT INTO demo.orders (store_id, product_id, quantity, total) "
                                      "VALUES (2, 2, 3, 30) RETURNING id")
            await page.wait_for_selector(f"#orders tbody tr[data-id='{row['id']}']", timeout=10000)
            await page.wait_for_selector("#events li[data-type='orders.insert']", timeout=5000)
            types = await page.eval_on_selector_all("#events li", "els => els.map(e => e.dataset.type)")
            assert types.count("payout.status.changed") == 2, types
            await page.wait_for_function("document.querySelector('#last-event').textContent.includes('s ago')")
            # Switching store: new topics on the same single stream.
            await page.select_option("#store", "3")
            await page.wait_for_function(
                "document.querySelector('#export-csv').href.includes('store_id=3')", timeout=5000)
            await page.wait_for_selector("#status[data-state=open]", timeout=10000)
            await wait_until(lambda: stream_count(server) == 1, page, 10, "one stream")
            await page.screenshot(path=str(tmp_path / "dashboard.png"))
            assert b.errors == []
        finally:
            await browser.close()


async def test_dashboard_pauses_when_hidden_and_stays_calm_offline(start_server: Start,
                                                                   conn: asyncpg.Connection) -> None:
    from tests.tools import require_tool

    require_tool("chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    server = start_server({"DEMO": "1", "DEMO_RATE": "0.0001"})
    async with playwright_api.async_playwright() as p:
        browser = await launch(playwright_api, p)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            b = Browser(page)
            await page.goto(server.url + "/?pause=400", timeout=15000)
            await page.wait_for_selector("#status[data-state=open]", timeout=10000)
            await wait_until(lambda: stream_count(server) == 1, page, 10, "the stream")
            streams = b.requests["/events"]

            # Hidden past the pause: the stream closes; visible again: one reconnect, nothing missed.
            await page.evaluate("""() => {
                Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'});
                document.dispatchEvent(new Event('visibilitychange'));
            }""")
            await page.wait_for_selector("#status[data-state=paused]", timeout=5000)
            await wait_until(lambda: stream_count(server) == 0, page, 10, "the server's stream count to drop")
            row = await conn.fetchrow("INSERT INTO demo.orders (store_id, product_id, quantity, total) "
                                      "VALUES (2, 5, 1, 12) RETURNING id")
            await page.evaluate("""() => {
                Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'visible'});
                document.dispatchEvent(new Event('visibilitychange'));
            }""")
            await page.wait_for_selector("#status[data-state=open]", timeout=5000)
            await page.wait_for_selector("#events li[data-type='orders.insert']", timeout=10000)
            await page.wait_for_selector(f"#orders tbody tr[data-id='{row['id']}']", timeout=10000)
            assert b.requests["/events"] == streams + 1
            assert stream_count(server) == 1

            # Offline: the stream closes and no request is made until the network returns.
            await context.set_offline(True)
            await page.wait_for_selector("#status[data-state=offline]", timeout=5000)
            before = sum(b.requests.values())
            await page.wait_for_timeout(1500)  # the observation window for a request storm
            assert sum(b.requests.values()) == before, b.requests
            await context.set_offline(False)
            await page.wait_for_selector("#status[data-state=open]", timeout=5000)
            assert b.requests["/events"] == streams + 2
            assert b.errors == []
        finally:
            await browser.close()
