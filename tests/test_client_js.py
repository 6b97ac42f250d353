"""The browser client (clients/js, npm package ``pgsse``): its node unit tests, the copy the
service serves (no drift, ETag/304, CORS), the version, the wheel's copy, the types, and live
runs of the real client (node) against a real pgsse — restarts, tokens, resets, nginx 502s."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import ROOT, ServerProcess, free_port
from tests.tools import require_tool

JS = ROOT / "clients" / "js"
SRC = JS / "src"
Start = Callable[..., Any]


def node_modules() -> Path:
    """The JS dev dependencies (`make test` installs them); their absence is a failure."""
    require_tool("npm")
    path = JS / "node_modules" / "eventsource-parser"
    if not path.is_dir():
        pytest.fail("clients/js/node_modules is missing: run `make test` (or npm --prefix clients/js ci)")
    return JS / "node_modules"


def test_node_unit_tests() -> None:
    node = require_tool("node")
    node_modules()
    tests = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    assert len(tests) >= 5, tests
    result = subprocess.run([node, "--test", *tests], cwd=JS, capture_output=True, text=True, timeout=120)
    summary = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", result.stdout, re.M))
    assert result.returncode == 0 and summary.get("fail") == "0", result.stdout[-6000:] + result.stderr[-2000:]
    assert int(summary["pass"]) >= 45, summary


def test_typescript_declarations_type_check() -> None:
    node = require_tool("node")
    tsc = node_modules() / "typescript" / "bin" / "tsc"
    result = subprocess.run([node, str(tsc), "-p", "test/tsconfig.json"], cwd=JS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # And the checker is really checking: a wrong use of the API is an error.
    bad = JS / "test" / "types-bad.ts"
    config = JS / "test" / "tsconfig.bad.json"
    bad.write_text('import { createClient } from "pgsse";\ncreateClient({ url: 42 });\n')
    config.write_text(json.dumps({"extends": "./tsconfig.json", "files": ["types-bad.ts"]}))
    try:
        result = subprocess.run([node, str(tsc), "-p", str(config)], cwd=JS,
                                capture_output=True, text=True, timeout=120)
    finally:
        bad.unlink()
        config.unlink()
    assert result.returncode != 0 and "types-bad.ts(2," in result.stdout, result.stdout + result.stderr


def test_package_json_version_and_exports() -> None:
    from pgsse import __version__

    package = json.loads((JS / "package.json").read_text())
    assert package["name"] == "pgsse" and package["type"] == "module"
    assert package["version"] == __version__
    assert set(package["exports"]) >= {".", "./tanstack-query", "./react"}
    for entry in ("." , "./tanstack-query", "./react"):
        for kind in ("types", "default"):
            assert (JS / package["exports"][entry][kind]).is_file(), (entry, kind)
    assert not package.get("dependencies"), "no runtime dependencies"
    assert set(package["devDependencies"]) >= {"eventsource-parser", "typescript"}
    assert f'export const VERSION = "{__version__}";' in (SRC / "index.js").read_text()


def source_files() -> list[Path]:
    files = sorted(p for p in SRC.iterdir() if p.name.endswith((".js", ".d.ts")))
    assert {"index.js", "index.d.ts", "tanstack-query.js", "react.js"} <= {p.name for p in files}
    return files


def test_served_client_is_the_source(server: Any) -> None:
    """Every file of clients/js/src is served byte for byte (no drift), with ETag, 304 and CORS."""
    with httpx.Client(base_url=server.url, timeout=5) as http:
        for path in source_files():
            response = http.get(f"/client/{path.name}", headers={"Origin": "http://elsewhere.example"})
            assert response.status_code == 200, path.name
            assert response.content == path.read_bytes(), f"/client/{path.name} drifted from {path}"
            kind = "text/javascript" if path.name.endswith(".js") and not path.name.endswith(".d.ts") \
                else "application/typescript"
            assert response.headers["content-type"].startswith(kind), path.name
            assert response.headers["access-control-allow-origin"] == "*"
            etag = response.headers["etag"]
            assert etag.startswith('W/"')
            again = http.get(f"/client/{path.name}", headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
            assert http.get(f"/client/{path.name}", headers={"If-None-Match": 'W/"other"'}).status_code == 200
        entry = http.get("/client.js")
        assert entry.status_code == 200 and entry.headers["content-type"].startswith("text/javascript")
        assert entry.headers["access-control-allow-origin"] == "*"
        # The entry point re-exports index.js, so index.js's relative imports resolve under /client/.
        target = re.search(rb'from "\./client/([\w.-]+)"', entry.content)
        assert target and (SRC / target.group(1).decode()).is_file()
        assert http.get("/client.js", headers={"If-None-Match": entry.headers["etag"]}).status_code == 304
        assert http.head("/client/index.js").status_code == 200
        for bad in ("nope.js", "..%2Fpackage.json", "%2E%2E%2F%2E%2E%2Fpyproject.toml", "index.ts",
                    ".hidden.js", "package.json"):
            response = http.get(f"/client/{bad}")
            assert response.status_code == 404, bad
            assert response.json()["error"]["code"] == "not_found"


def test_wheel_ships_the_client(tmp_path: Path) -> None:
    """An installed wheel (no checkout beside it) serves the same bytes from package data."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=180)
    wheel = next(tmp_path.glob("pgsse-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    for path in source_files():
        assert f"pgsse/client/{path.name}" in names, path.name
    probe = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "import pgsse.clientjs as c;"
        "files = c.ClientFiles();"
        "print(json.dumps({'root': str(c.source()), 'file': c.__file__,"
        " 'index': files.get('index.js')[0].decode()}))"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["file"].startswith(str(site)), found["file"]
    assert found["root"].startswith(str(site)), found["root"]
    assert found["index"] == (SRC / "index.js").read_text()


# --- live: the real client (node) against a real pgsse ------------------------------------

class LiveClient:
    """clients/js/test/live/harness.js in a subprocess: its JSON lines collected by a thread."""

    def __init__(self, config: dict[str, Any]) -> None:
        node = require_tool("node")
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([node, str(JS / "test" / "live" / "harness.js"), json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait(lambda r: any(x["kind"] == "ready" for x in r), 10, "harness ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock:
                self.records.append(json.loads(line))

    def snapshot(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.records if kind is None or r["kind"] == kind]

    def wait(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate(self.snapshot())
            if result:
                return result
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; last records: {self.snapshot()[-15:]}")

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.snapshot("event") if type_ is None or r["type"] == type_]

    def status(self) -> str | None:
        statuses = self.snapshot("status")
        return statuses[-1]["status"] if statuses else None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"close": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def live_client() -> Iterator[Callable[[dict[str, Any]], LiveClient]]:
    clients: list[LiveClient] = []

    def start(config: dict[str, Any]) -> LiveClient:
        node_modules()
        client = LiveClient(config)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()


FAST = {"initialMs": 100, "maxMs": 1000, "minMs": 20}


async def publish(conn: asyncpg.Connection, topic: str, type_: str, data: Any) -> None:
    await conn.execute("SELECT realtime.publish($1, $2, $3::jsonb)", topic, type_, json.dumps(data))


async def test_live_restart_sigkill_loses_nothing(database: str, conn: asyncpg.Connection,
                                                  live_client: Callable[..., LiveClient], tmp_path: Path) -> None:
    """Publish 1..5, SIGKILL the service, publish 6..10 while it is down, restart: the client
    receives 1..10 exactly once, in order."""
    env = {"RETRY_MS": "200"}
    first = ServerProcess(database, env, tmp_path).start()
    second = ServerProcess(database, env, tmp_path, port=first.port)
    try:
        client = live_client({"client": {"url": first.url, "backoff": FAST}, "subscriptions": [["live"]]})
        client.wait(lambda r: client.status() == "open", 10, "open")
        for n in range(1, 6):
            await publish(conn, f"live/{n % 2}", "tick", {"n": n})
        client.wait(lambda r: len(client.events("tick")) == 5, 10, "1..5")
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        for n in range(6, 11):
            await publish(conn, f"live/{n % 2}", "tick", {"n": n})
        client.wait(lambda r: client.status() == "backoff", 10, "backoff while down")
        second.start()
        client.wait(lambda r: len(client.events("tick")) >= 10, 20, "6..10 after the restart")
        time.sleep(0.3)  # room for a duplicate to show up, if there were one
        ticks = client.events("tick")
        assert [e["data"]["n"] for e in ticks] == list(range(1, 11))
        ids = [int(e["id"]) for e in ticks]
        assert ids == sorted(set(ids))
        assert all(e["topic"] == f"live/{e['data']['n'] % 2}" for e in ticks), "envelope topics"
    finally:
        second.stop()
        if first._log and not first._log.closed:
            first._log.close()


async def test_live_five_subscriptions_one_connection(server: Any, conn: asyncpg.Connection,
                                                      live_client: Callable[..., LiveClient]) -> None:
    subs = [["orders/1"], ["orders/1"], ["orders"], ["payouts/1", "orders/2"], ["aggregates/x"]]
    client = live_client({"client": {"url": server.url}, "subscriptions": subs})
    client.wait(lambda r: client.status() == "open", 10, "open")
    await publish(conn, "orders/1", "order.placed", {"n": 1})
    await publish(conn, "orders/2", "order.placed", {"n": 2})
    client.wait(lambda r: len(client.events()) >= 5, 10, "events")
    stats = httpx.get(server.url + "/stats", timeout=5).json()
    assert stats["clients"] == 1
    by_sub = sorted((e["sub"], e["data"]["n"]) for e in client.events())
    assert by_sub == [(0, 1), (1, 1), (2, 1), (2, 2), (3, 2)]


async def test_live_token_expiries_lose_nothing(start_server: Start, conn: asyncpg.Connection,
                                                live_client: Callable[..., LiveClient]) -> None:
    """3 s tokens across three expiries: getToken is called each time and nothing is lost."""
    secret = "client-js-key-0123456789abcdef0123"
    server = start_server({"AUTH_SECRET": secret})
    client = live_client({"client": {"url": server.url, "backoff": FAST}, "subscriptions": [["tok"]],
                          "secret": secret, "ttl": 3, "tokenTopics": ["tok"]})
    client.wait(lambda r: client.status() == "open", 10, "open")
    n = 0
    deadline = time.monotonic() + 25
    while len(client.snapshot("token")) < 4 and time.monotonic() < deadline:
        n += 1
        await publish(conn, "tok", "tick", {"n": n})
        await asyncio.sleep(0.25)
    n += 1
    await publish(conn, "tok", "tick", {"n": n})
    client.wait(lambda r: len(client.events("tick")) >= n, 10, "every tick")
    assert len(client.snapshot("token")) >= 4, "a fresh token for each of three expiries"
    assert [e["data"]["n"] for e in client.events("tick")] == list(range(1, n + 1))
    assert any(r.get("code") == "auth_expired" for r in client.snapshot("error"))


async def test_live_403_reaches_only_the_refused_subscription(start_server: Start, conn: asyncpg.Connection,
                                                             live_client: Callable[..., LiveClient]) -> None:
    secret = "client-js-key-0123456789abcdef0123"
    server = start_server({"AUTH_SECRET": secret})
    client = live_client({"client": {"url": server.url}, "subscriptions": [["mine"], ["theirs"]],
                          "secret": secret, "ttl": 300, "tokenTopics": ["mine"]})
    refused = client.wait(lambda r: client.snapshot("suberror"), 10, "the 403")
    assert refused == [{**refused[0], "sub": 1, "status": 403, "topics": ["theirs"]}]
    client.wait(lambda r: client.status() == "open", 10, "the granted topic streams")
    await publish(conn, "mine", "tick", {"n": 1})
    event = client.wait(lambda r: client.events("tick"), 10, "event on the granted topic")[0]
    assert event["sub"] == 0


async def test_live_reset_after_prune(server: Any, conn: asyncpg.Connection,
                                      live_client: Callable[..., LiveClient]) -> None:
    for n in range(3):
        await publish(conn, "pr", "tick", {"n": n})
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/stats", timeout=5).json()["position"] < 3:  # numbered and read
        assert time.monotonic() < deadline, "events not sequenced"
        await asyncio.sleep(0.02)
    await conn.execute("SELECT realtime.prune('0')")
    client = live_client({"client": {"url": server.url, "since": 1}, "subscriptions": [["pr"]]})
    reset = client.wait(lambda r: client.events("reset"), 10, "reset")[0]
    assert reset["data"] == {"reason": "history_expired"} and reset["topic"] is None
    await publish(conn, "pr", "tick", {"n": 99})
    tick = client.wait(lambda r: client.events("tick"), 10, "live after the reset")[0]
    assert int(tick["id"]) > int(reset["id"])


async def test_live_nginx_502_backoff_and_recovery(database: str, conn: asyncpg.Connection,
                                                   live_client: Callable[..., LiveClient],
                                                   tmp_path: Path) -> None:
    """pgsse behind the repo's nginx config, upstream stopped → real 502s; every wait lies in
    the jitter envelope and the client is back within maxMs + 1 s of the upstream's return."""
    from tests.test_deploy import nginx_command, nginx_config

    nginx = require_tool("nginx")
    env = {"RETRY_MS": "150"}
    upstream = ServerProcess(database, env, tmp_path).start()
    listen = free_port()
    proc = subprocess.Popen(nginx_command(nginx, tmp_path, nginx_config(tmp_path, upstream.port, listen)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backoff = {"initialMs": 200, "maxMs": 1500, "minMs": 50}
    try:
        base = f"http://127.0.0.1:{listen}"
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        client = live_client({"client": {"url": base, "backoff": backoff}, "subscriptions": [["via"]]})
        client.wait(lambda r: client.status() == "open", 10, "open through nginx")
        upstream.stop()
        client.wait(lambda r: sum(1 for x in client.snapshot("status")
                                  if x["status"] == "backoff" and (x["error"] or {}).get("status") == 502) >= 4,
                    20, "four 502s in a row")
        for record in client.snapshot("status"):
            if record["status"] != "backoff":
                continue
            ceiling = min(backoff["maxMs"], backoff["initialMs"] * 2 ** (record["attempt"] - 1))
            low = max(backoff["minMs"], record["floorMs"])
            assert low <= record["delayMs"] <= max(record["floorMs"], ceiling), record
        delays = [x["delayMs"] for x in client.snapshot("status") if x["status"] == "backoff"]
        assert len(set(delays)) > 1, f"jittered, not fixed: {delays}"
        returned = time.monotonic()
        upstream = ServerProcess(database, env, tmp_path, port=upstream.port).start()
        ready = time.monotonic()
        client.wait(lambda r: client.status() == "open", 15, "open again")
        back = time.monotonic()
        # Back within maxMs + 1 s of the upstream being ready. An attempt that reached it while
        # it was starting got 200 + retry: 1000-5000 (not ready yet), a floor for the next delay.
        floors = [x["floorMs"] for x in client.snapshot("status") if x["status"] == "backoff"]
        allowed = (max(backoff["maxMs"], floors[-1] if floors else 0) + 1000) / 1000
        assert back - ready <= allowed + (ready - returned), (back - ready, floors[-3:])
        await publish(conn, "via", "hello", {"through": "nginx"})
        client.wait(lambda r: client.events("hello"), 10, "events flow again")
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.stop()
