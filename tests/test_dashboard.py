"""The demo dashboard in headless Chromium: events arrive live, the status says so."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

Start = Callable[..., Any]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


async def test_dashboard_shows_live_events(start_server: Start, conn: asyncpg.Connection,
                                           tmp_path: Any) -> None:
    from tests.tools import require_tool

    chromium = require_tool("chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    server = start_server({"DEMO": "1", "DEMO_RATE": "0.0001"})
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(server.url + "/", timeout=15000)
            await page.wait_for_selector("#status[data-state=open]", timeout=10000)
            assert await page.is_visible("#auth-banner"), "auth is off: the banner says so"
            await conn.execute(
                "INSERT INTO demo.orders (store_id, product_id, quantity, total) VALUES (2, 2, 3, 30)")
            await conn.execute(
                "SELECT realtime.publish('payouts/2', 'payout.status.changed', '{\"status\": \"paid\"}')")
            await page.wait_for_selector("#events li:nth-child(2)", timeout=10000)
            types = await page.eval_on_selector_all("#events li", "els => els.map(e => e.dataset.type)")
            assert "orders.insert" in types and "payout.status.changed" in types
            await asyncio.sleep(1.2)
            assert "s ago" in (await page.text_content("#last-event") or "")
            await page.screenshot(path=str(tmp_path / "dashboard.png"))
            assert errors == []
        finally:
            await browser.close()
