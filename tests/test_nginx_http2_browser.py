"""deploy/nginx/pgsse-tls.conf: TLS + HTTP/2 in front of a real pgsse, in real Chromium. One
page's 10 plain EventSources on one origin all stream at once over HTTP/2; over HTTP/1.1 (the
same file without ``http2``) the browser holds 6 and the other 4 wait. When no upstream answers,
a browser EventSource gets a 200 with a ``retry:`` (and keeps retrying) rather than a 502 (which
stops it for good)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import eventually, free_port, stats
from tests.test_dashboard import CHROMIUM_ARGS
from tests.test_deploy import nginx_command
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
TLS_CONF = ROOT / "deploy" / "nginx" / "pgsse-tls.conf"
Start = Callable[..., Any]


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (openssl CLI)."""
    openssl = require_tool("openssl")
    cert, key = tmp_path / "pgsse.crt", tmp_path / "pgsse.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


def tls_config(tmp_path: Path, upstream_port: int, https_port: int, http_port: int, *, http2: bool = True) -> Path:
    """deploy/nginx/pgsse-tls.conf under a throw-away main config: upstream on 127.0.0.1, the
    test's certificate, loopback ports, cache, pid, logs and temp dirs in tmp_path; ``http2=False``
    drops HTTP/2 from the TLS listener (the HTTP/1.1 comparison)."""
    cert, key = self_signed(tmp_path)
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "pgsse-upstream.conf").write_text(
        f"upstream pgsse {{ server 127.0.0.1:{upstream_port}; keepalive 8; }}\n")
    site = TLS_CONF.read_text()
    listen = f"listen 127.0.0.1:{https_port} ssl http2;" if http2 else f"listen 127.0.0.1:{https_port} ssl;"
    for old, new in [("/etc/nginx/pgsse-upstream.conf", str(tmp_path / "pgsse-upstream.conf")),
                     ("/var/cache/nginx/pgsse", str(tmp_path / "cache")),
                     ("/etc/nginx/tls/pgsse.crt", str(cert)), ("/etc/nginx/tls/pgsse.key", str(key)),
                     ("listen 443 ssl http2;", listen), ("listen 80;", f"listen 127.0.0.1:{http_port};")]:
        assert old in site, old
        site = site.replace(old, new)
    (tmp_path / "site.conf").write_text(site)
    main = tmp_path / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    main.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n"
        f"  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;\n"
        f"  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;\n"
        f"  include {tmp_path}/site.conf;\n}}\n")
    return main


@pytest.fixture
def tls_nginx(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``tls_nginx(upstream_port, http2=True)`` → the https:// base of a running nginx."""
    nginx = require_tool("nginx")
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream_port: int, *, http2: bool = True) -> str:
        port = free_port()
        config = tls_config(tmp_path, upstream_port, port, free_port(), http2=http2)
        procs.append(subprocess.Popen(nginx_command(nginx, tmp_path, config),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        base = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(base + "/healthz", verify=False, timeout=1)
                return base
            except httpx.HTTPError:
                assert procs[-1].poll() is None, (tmp_path / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    chromium = require_tool("chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(ignore_https_errors=True)
            yield await context.new_page()
        finally:
            await browser.close()


def test_tls_config_is_valid(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    config = tls_config(tmp_path, 8000, free_port(), free_port())
    result = subprocess.run(nginx_command(nginx, tmp_path, config, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_tls_config_streams_unbuffered_over_http2() -> None:
    """The settings the issue asks for, so an edit that drops one is caught without nginx."""
    text = TLS_CONF.read_text()
    assert "listen 443 ssl http2;" in text
    events = text.split("location = /events {", 1)[1].split("\n    }", 1)[0]
    for directive in ("proxy_buffering off;", "proxy_cache off;", "gzip off;", "proxy_read_timeout 2h;",
                      "error_page 502 504 = @pgsse_retry;"):
        assert directive in events, directive
    assert 'return 200 "retry: $pgsse_retry_ms\\n\\n";' in text


SOURCES = """(count) => {
  window.opened = 0; window.got = []; window.sources = [];
  for (let i = 0; i < count; i++) {
    const es = new EventSource(`/events?topic=h2/${i}`);
    es.onopen = () => { window.opened += 1; };
    es.addEventListener("ping", () => window.got.push(i));
    window.sources.push(es);
  }
}"""


@pytest.mark.parametrize(("http2", "streaming"), [(True, 10), (False, 6)], ids=["http2", "http1.1"])
async def test_ten_event_sources_through_nginx(
        start_server: Start, conn: asyncpg.Connection, tls_nginx: Callable[..., str], page: Any,
        http2: bool, streaming: int) -> None:
    server = start_server()
    base = tls_nginx(server.port, http2=http2)
    await page.goto(base + "/healthz")
    protocol = await page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
    assert protocol == ("h2" if http2 else "http/1.1")
    await page.evaluate(SOURCES, 10)

    async def opened() -> bool:
        return await page.evaluate("window.opened") >= streaming and stats(server)["clients"] >= streaming
    await eventually(opened, timeout=15, what=f"{streaming} open EventSources")
    for i in range(10):
        await conn.execute("SELECT realtime.publish($1, 'ping', '{}')", f"h2/{i}")

    async def streamed() -> bool:
        return len(await page.evaluate("window.got")) >= streaming
    await eventually(streamed, timeout=15, what=f"events on {streaming} EventSources")
    if not http2:
        # The other 4 wait for a connection that never frees up. (A bounded look: 1.5 s.)
        await page.wait_for_timeout(1500)
        states = await page.evaluate("window.sources.map((es) => es.readyState)")
        assert sorted(states) == [0] * 4 + [1] * 6, states
    assert sorted(await page.evaluate("window.got")) == sorted(await page.evaluate(
        "window.sources.map((es, i) => es.readyState === 1 ? i : -1).filter((i) => i >= 0)"))
    assert len(await page.evaluate("window.got")) == streaming
    assert stats(server)["clients"] == streaming


async def test_no_upstream_answers_200_with_retry_so_an_event_source_keeps_trying(
        start_server: Start, conn: asyncpg.Connection, tls_nginx: Callable[..., str], page: Any) -> None:
    port = free_port()  # nothing listens here yet: nginx gets "connection refused" (a 502)
    base = tls_nginx(port)
    down = httpx.get(base + "/events?topic=x", verify=False, timeout=5)
    assert down.status_code == 200 and down.headers["content-type"].startswith("text/event-stream")
    assert down.headers["cache-control"] == "no-store"
    retry = int(down.text.removeprefix("retry: ").strip())
    assert 1000 <= retry <= 4000 and down.text.endswith("\n\n"), down.text
    await page.goto(base + "/")  # a 502 page of the origin (nothing upstream)
    await page.evaluate("""() => {
      window.errors = 0; window.events = [];
      const es = new EventSource('/events?topic=deploy');
      window.es = es;
      es.onerror = () => { window.errors += 1; };
      es.addEventListener('ping', (e) => window.events.push(e.data));
    }""")
    await page.wait_for_function("window.errors >= 1", timeout=10000)
    assert await page.evaluate("window.es.readyState") == 0, "still reconnecting (a 502 would close it: 2)"
    server = start_server(port=port)  # the deploy is over
    await eventually(lambda: stats(server)["clients"] == 1, timeout=15, what="the EventSource back")
    await conn.execute("SELECT realtime.publish('deploy', 'ping', '{\"n\": 1}')")
    await page.wait_for_function("window.events.length === 1", timeout=10000)
    await asyncio.sleep(0)
