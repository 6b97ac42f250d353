"""The JS client in real Chromium tabs against a real pgsse (contract §11): the tabs of one
origin share one stream (Web Locks elect the holder, BroadcastChannel carries the events), each
tab still gets exactly its own events in order, a closed holder is replaced within 5 s from the
last id, and a page restored from the back/forward cache resumes from its last id.

Pages come from a plain HTTP server on another port (a dashboard on its own origin, the service
allowing it in CORS_ORIGINS); the client is the service's own /client.js."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from tests.support import eventually, free_port, stats
from tests.test_dashboard import CHROMIUM_ARGS

Start = Callable[..., Any]

PAGE = """<!doctype html><html><head><title>tab</title></head><body><script type="module">
import { createClient } from "%(service)s/client.js";
const params = new URLSearchParams(location.search);
window.received = [];
window.pageshows = [];
window.statuses = [];
window.fetches = [];
addEventListener("pageshow", (e) => window.pageshows.push(e.persisted));
const rt = createClient({ url: "%(service)s", shareTabs: params.get("share") !== "0",
  backoff: { initialMs: 200, maxMs: 1000, minMs: 50 },
  fetch: (url, init) => { window.fetches.push(String(url)); return fetch(url, init); } });
rt.on("status", (s) => window.statuses.push(s));
rt.subscribe(params.getAll("topic"), (e) => window.received.push({ id: e.id, type: e.type, topic: e.topic, n: e.data.n }));
window.rt = rt;
</script></body></html>"""
AWAY = "<!doctype html><html><body>elsewhere</body></html>"


@pytest.fixture
def pages() -> Iterator[Callable[[str], str]]:
    """``pages(service_url)`` → the origin of a plain HTTP server serving /tab.html and /away.html."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(service: str) -> str:
        bodies = {"/tab.html": (PAGE % {"service": service}).encode(), "/away.html": AWAY.encode()}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = bodies.get(self.path.split("?")[0])
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield serve
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """One Chromium, back/forward cache allowed (Playwright disables it by default)."""
    from tests.tools import require_tool

    chromium = require_tool("chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS,
                                           ignore_default_args=["--disable-back-forward-cache"])
        try:
            yield await launched.new_context()
        finally:
            await launched.close()


async def publish(conn: asyncpg.Connection, topic: str, n: int, pad: int = 0) -> None:
    data = {"n": n, "pad": "x" * pad} if pad else {"n": n}
    await conn.execute("SELECT realtime.publish($1, 'tick', $2::jsonb)", topic, json.dumps(data))


async def received(page: Any) -> list[dict[str, Any]]:
    return list(await page.evaluate("window.received"))


async def role(page: Any) -> str:
    return str(await page.evaluate("window.rt.role"))


async def events_urls(page: Any) -> list[str]:
    return list(await page.evaluate("window.fetches.filter((u) => u.includes('/events?'))"))


def own(ns: range, tab: int, tabs: int) -> list[int]:
    return [n for n in ns if n % tabs == tab]


async def open_tabs(context: Any, origin: str, count: int) -> list[Any]:
    tabs = []
    for i in range(count):
        page = await context.new_page()
        await page.goto(f"{origin}/tab.html?topic=tabs/{i}", timeout=15000)
        await page.wait_for_function("window.rt !== undefined", timeout=10000)
        tabs.append(page)
    return tabs


async def one_stream_for(server: Any, tabs: list[Any], topics: int) -> None:
    """One /events stream carries every tab's topic, and every tab says it is open."""
    seen: list[Any] = []

    async def ready() -> bool:
        figures = stats(server)
        statuses = [await t.evaluate("window.rt.status") for t in tabs]
        seen[:] = [figures["clients"], figures["topics"], statuses]
        return figures["clients"] == 1 and figures["topics"] == topics and statuses == ["open"] * len(tabs)
    try:
        await eventually(ready, timeout=15, what="one stream for every tab (with all their topics), open in each")
    except AssertionError as error:
        raise AssertionError(f"{error}: streams, topics, statuses = {seen}") from None


async def test_three_tabs_share_one_stream_and_each_gets_its_own_events_in_order(
        start_server: Start, conn: asyncpg.Connection, pages: Callable[[str], str], browser: Any) -> None:
    port = free_port()
    service = f"http://127.0.0.1:{port}"
    origin = pages(service)
    server = start_server({"CORS_ORIGINS": origin}, port=port)
    tabs = await open_tabs(browser, origin, 3)
    await one_stream_for(server, tabs, 3)
    assert sorted([await role(t) for t in tabs]) == ["follower", "follower", "holder"]
    for n in range(100):
        await publish(conn, f"tabs/{n % 3}", n)
    for i, tab in enumerate(tabs):
        async def complete(tab: Any = tab, i: int = i) -> bool:
            return len(await received(tab)) >= len(own(range(100), i, 3))
        await eventually(complete, timeout=15, what=f"tab {i}'s events")
    await asyncio.sleep(0.3)  # room for a duplicate or a stray event to show up, were there one
    for i, tab in enumerate(tabs):
        got = await received(tab)
        assert [e["n"] for e in got] == own(range(100), i, 3), f"tab {i}"
        assert all(e["topic"] == f"tabs/{i}" for e in got)
        ids = [int(e["id"]) for e in got]
        assert ids == sorted(set(ids))
    assert stats(server)["clients"] == 1


async def test_closing_the_holding_tab_hands_the_stream_over_within_5s_losing_nothing(
        start_server: Start, conn: asyncpg.Connection, pages: Callable[[str], str], browser: Any) -> None:
    port = free_port()
    service = f"http://127.0.0.1:{port}"
    origin = pages(service)
    server = start_server({"CORS_ORIGINS": origin}, port=port)
    tabs = await open_tabs(browser, origin, 3)
    await one_stream_for(server, tabs, 3)
    roles = [await role(t) for t in tabs]
    holder = tabs[roles.index("holder")]
    rest = [t for t in tabs if t is not holder]
    index = {id(t): i for i, t in enumerate(tabs)}
    for n in range(30):
        await publish(conn, f"tabs/{n % 3}", n)
    # Keep publishing while the holder closes: some of these land while no tab holds a stream.
    closed_at = time.monotonic()
    close = asyncio.ensure_future(holder.close(run_before_unload=False))
    for n in range(30, 60):
        await publish(conn, f"tabs/{n % 3}", n)
        await asyncio.sleep(0.02)
    await close

    async def taken_over() -> bool:
        return "holder" in [await role(t) for t in rest] and stats(server)["clients"] == 1
    await eventually(taken_over, timeout=10, what="another tab holds the stream")
    handover = time.monotonic() - closed_at
    print(f"hand-over: {handover:.2f} s from close to another tab holding one stream")
    assert handover < 5.0, f"hand-over took {handover:.1f}s"
    for n in range(60, 90):
        await publish(conn, f"tabs/{n % 3}", n)
    for tab in rest:
        i = index[id(tab)]

        async def complete(tab: Any = tab, i: int = i) -> bool:
            return len(await received(tab)) >= len(own(range(90), i, 3))
        await eventually(complete, timeout=15, what=f"tab {i}'s events across the hand-over")
    await asyncio.sleep(0.3)
    for tab in rest:
        i = index[id(tab)]
        assert [e["n"] for e in await received(tab)] == own(range(90), i, 3), f"tab {i}"
    roles = [await role(t) for t in rest]
    new_holder = rest[roles.index("holder")]
    resumed = [u for u in await events_urls(new_holder) if "last_event_id=" in u]
    assert resumed, "the new holder resumed from the last id"


async def test_back_forward_cache_restore_resumes_from_the_last_id(
        start_server: Start, conn: asyncpg.Connection, pages: Callable[[str], str], browser: Any) -> None:
    port = free_port()
    service = f"http://127.0.0.1:{port}"
    origin = pages(service)
    server = start_server({"CORS_ORIGINS": origin}, port=port)
    tab = (await open_tabs(browser, origin, 1))[0]
    await one_stream_for(server, [tab], 1)
    for n in range(10):
        await publish(conn, "tabs/0", n)
    async def first_ten() -> bool:
        return len(await received(tab)) == 10
    await eventually(first_ten, what="the first 10 events")
    await tab.goto(f"{origin}/away.html")
    await eventually(lambda: stats(server)["clients"] == 0, what="the stream closed on pagehide")
    # A busy dashboard: events keep coming while the page sits in the cache, 1.2 MB of them
    # (a stream left open would have Chromium evict the page: NetworkExceedsBufferLimit).
    for n in range(10, 40):
        await publish(conn, "tabs/0", n, pad=40_000)
    # A restore from the cache fires pageshow, not load: wait for the commit, then for pageshow.
    await tab.go_back(wait_until="commit")
    await tab.wait_for_function("window.pageshows && window.pageshows.length >= 2", timeout=10000)
    assert await tab.evaluate("window.pageshows") == [False, True], "restored from the back/forward cache"

    async def all_forty() -> bool:
        return len(await received(tab)) >= 40
    await eventually(all_forty, timeout=10, what="the events published while away")
    for n in range(40, 45):
        await publish(conn, "tabs/0", n)

    async def all_45() -> bool:
        return len(await received(tab)) >= 45
    await eventually(all_45, timeout=10, what="live events after the restore")
    await asyncio.sleep(0.3)
    assert [e["n"] for e in await received(tab)] == list(range(45))
    last_urls = await events_urls(tab)
    assert "last_event_id=" in last_urls[-1], last_urls


async def test_a_tab_back_from_the_cache_catches_up_through_the_tab_that_took_over(
        start_server: Start, conn: asyncpg.Connection, pages: Callable[[str], str], browser: Any) -> None:
    """The holding tab goes into the back/forward cache: the other tab takes over; back, the first
    tab rejoins as a follower and the new holder replays from its last id: each tab still gets
    its own events exactly once, in order."""
    port = free_port()
    service = f"http://127.0.0.1:{port}"
    origin = pages(service)
    server = start_server({"CORS_ORIGINS": origin}, port=port)
    tabs = await open_tabs(browser, origin, 2)
    await one_stream_for(server, tabs, 2)
    roles = [await role(t) for t in tabs]
    away, stays = (tabs[0], tabs[1]) if roles[0] == "holder" else (tabs[1], tabs[0])
    mine = {id(t): i for i, t in enumerate(tabs)}
    for n in range(10):
        await publish(conn, f"tabs/{n % 2}", n)

    async def first_ten() -> bool:
        return all([len(await received(t)) == 5 for t in tabs])
    await eventually(first_ten, what="the first 10 events")
    left_at = await away.evaluate("window.rt.lastEventId")
    await away.goto(f"{origin}/away.html")

    async def taken_over() -> bool:
        return await role(stays) == "holder" and stats(server)["clients"] == 1 and stats(server)["topics"] == 1
    await eventually(taken_over, what="the other tab holds the stream, with its own topic only")
    for n in range(10, 30):
        await publish(conn, f"tabs/{n % 2}", n)
    await away.go_back(wait_until="commit")
    await away.wait_for_function("window.pageshows && window.pageshows.length >= 2", timeout=10000)
    assert await away.evaluate("window.pageshows") == [False, True], "restored from the back/forward cache"
    assert await role(away) == "follower"
    for n in range(30, 40):
        await publish(conn, f"tabs/{n % 2}", n)
    for tab in tabs:
        async def complete(tab: Any = tab) -> bool:
            return len(await received(tab)) >= 20
        await eventually(complete, timeout=10, what=f"tab {mine[id(tab)]}'s 20 events")
    await asyncio.sleep(0.3)
    for tab in tabs:
        i = mine[id(tab)]
        assert [e["n"] for e in await received(tab)] == own(range(40), i, 2), f"tab {i}"
    assert stats(server)["clients"] == 1
    # The holder took over from that id, and went back to it for the returning tab.
    resumed = [u for u in await events_urls(stays) if f"last_event_id={left_at}" in u]
    assert len(resumed) == 2, await events_urls(stays)


async def test_a_crashed_holding_tab_is_replaced_within_5s(
        start_server: Start, conn: asyncpg.Connection, pages: Callable[[str], str], browser: Any) -> None:
    """The holder's renderer crashes (no pagehide, no goodbye): the browser releases its locks,
    another tab holds the stream within 5 s, drops the dead tab's topic and loses nothing."""
    port = free_port()
    service = f"http://127.0.0.1:{port}"
    origin = pages(service)
    server = start_server({"CORS_ORIGINS": origin}, port=port)
    tabs = await open_tabs(browser, origin, 2)
    await one_stream_for(server, tabs, 2)
    roles = [await role(t) for t in tabs]
    holder, other = (tabs[0], tabs[1]) if roles[0] == "holder" else (tabs[1], tabs[0])
    i = 1 if other is tabs[1] else 0
    for n in range(10):
        await publish(conn, f"tabs/{n % 2}", n)

    async def first() -> bool:
        return len(await received(other)) == 5
    await eventually(first, what="the first events")
    cdp = await browser.new_cdp_session(holder)
    crashed_at = time.monotonic()
    # The answer never comes (the renderer is gone): do not wait for it.
    crash = asyncio.ensure_future(cdp.send("Page.crash"))
    for n in range(10, 20):
        await publish(conn, f"tabs/{n % 2}", n)

    async def taken_over() -> bool:
        figures = stats(server)
        return await role(other) == "holder" and figures["clients"] == 1 and figures["topics"] == 1
    await eventually(taken_over, timeout=10, what="the other tab holds the stream, with its own topic only")
    assert time.monotonic() - crashed_at < 5.0

    async def complete() -> bool:
        return len(await received(other)) >= 10
    await eventually(complete, what="the events across the crash")
    await asyncio.sleep(0.3)
    assert [e["n"] for e in await received(other)] == own(range(20), i, 2)
    crash.cancel()
