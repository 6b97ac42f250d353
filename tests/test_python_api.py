"""The Python API (contract section 10): ``pgsse.publish`` with every supported driver,
``pgsse.App`` mounted in a FastAPI app served by a plain uvicorn, ``pgsse.Client`` and
``pgsse tail``. Each README recipe of the "Python" section is one of these tests."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import asyncpg
import httpx
import pgsse
import pytest

from tests.support import ROOT, ServerProcess, eventually, free_port, open_stream
from tests.test_capture import events as sequenced_events

# --- pgsse.publish: every driver, in the caller's transaction ---------------------------


def _sqlalchemy_url(url: str, driver: str) -> Any:
    from sqlalchemy import make_url

    return make_url(url).set(drivername=f"postgresql+{driver}")


async def _asyncpg(url: str, topic: str, commit: bool) -> None:
    conn = await asyncpg.connect(url)
    try:
        tx = conn.transaction()
        await tx.start()
        await pgsse.publish(conn, topic, "t", {"driver": "asyncpg"})
        await (tx.commit() if commit else tx.rollback())
    finally:
        await conn.close()


async def _asyncpg_pool(url: str, topic: str, commit: bool) -> None:
    async with asyncpg.create_pool(url, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await pgsse.publish(conn, topic, "t", {"driver": "asyncpg pool"})
        await (tx.commit() if commit else tx.rollback())


async def _psycopg(url: str, topic: str, commit: bool) -> None:
    import psycopg

    def work() -> None:
        with psycopg.connect(url) as conn:  # not autocommit: a transaction begins on use
            pgsse.publish(conn, topic, "t", {"driver": "psycopg"})
            conn.commit() if commit else conn.rollback()

    await asyncio.to_thread(work)


async def _psycopg_async(url: str, topic: str, commit: bool) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url) as conn:
        await pgsse.publish(conn, topic, "t", {"driver": "psycopg async"})
        await (conn.commit() if commit else conn.rollback())


async def _sqlalchemy_connection(url: str, topic: str, commit: bool) -> None:
    from sqlalchemy import create_engine

    def work() -> None:
        engine = create_engine(_sqlalchemy_url(url, "psycopg"))
        with engine.connect() as conn:
            pgsse.publish(conn, topic, "t", {"driver": "sqlalchemy"})
            conn.commit() if commit else conn.rollback()
        engine.dispose()

    await asyncio.to_thread(work)


async def _sqlalchemy_session(url: str, topic: str, commit: bool) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    def work() -> None:
        engine = create_engine(_sqlalchemy_url(url, "psycopg"))
        with Session(engine) as session:
            pgsse.publish(session, topic, "t", {"driver": "sqlalchemy session"})
            session.commit() if commit else session.rollback()
        engine.dispose()

    await asyncio.to_thread(work)


async def _sqlalchemy_async_connection(url: str, topic: str, commit: bool) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(_sqlalchemy_url(url, "asyncpg"))
    async with engine.connect() as conn:
        await pgsse.publish(conn, topic, "t", {"driver": "sqlalchemy async"})
        await (conn.commit() if commit else conn.rollback())
    await engine.dispose()


async def _sqlalchemy_async_session(url: str, topic: str, commit: bool) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(_sqlalchemy_url(url, "psycopg"))  # psycopg's async side
    async with AsyncSession(engine) as session:
        await pgsse.publish(session, topic, "t", {"driver": "sqlalchemy async session"})
        await (session.commit() if commit else session.rollback())
    await engine.dispose()


async def _django_style(url: str, topic: str, commit: bool) -> None:
    """The README's Django recipe without Django: ``transaction.atomic()`` is a transaction
    on the request's connection, ``connection.cursor()`` a DB-API cursor on it."""
    import psycopg

    def work() -> None:
        with psycopg.connect(url) as conn:
            try:
                with conn.transaction(), conn.cursor() as cursor:  # transaction.atomic()
                    cursor.execute("SELECT realtime.publish(%s, %s, %s::jsonb)",
                                   [topic, "t", json.dumps({"driver": "django"})])
                    if not commit:
                        raise LookupError("the view failed after publishing")
            except LookupError:
                pass

    await asyncio.to_thread(work)


DRIVERS: dict[str, Callable[[str, str, bool], Awaitable[None]]] = {
    "asyncpg": _asyncpg, "asyncpg_pool": _asyncpg_pool, "psycopg": _psycopg,
    "psycopg_async": _psycopg_async, "sqlalchemy_connection": _sqlalchemy_connection,
    "sqlalchemy_session": _sqlalchemy_session,
    "sqlalchemy_async_connection": _sqlalchemy_async_connection,
    "sqlalchemy_async_session": _sqlalchemy_async_session, "django_sql": _django_style,
}


@pytest.mark.parametrize("driver", sorted(DRIVERS))
async def test_each_driver_publishes_once_on_commit_and_never_on_rollback(
        driver: str, database: str, conn: asyncpg.Connection) -> None:
    run = DRIVERS[driver]
    await run(database, "rolled/back", False)
    await run(database, "committed", True)
    got = await sequenced_events(conn)
    assert [(e["topics"], e["type"]) for e in got] == [(["committed"], "t")], got
    assert got[0]["data"]["driver"]


async def test_publish_validates_before_any_sql(conn: asyncpg.Connection) -> None:
    bad: list[tuple[Any, Any, Any]] = [
        ("", "t", {}), ("a//b", "t", {}), ("a b", "t", {}), ("x" * 257, "t", {}), (None, "t", {}),
        ("ok", "", {}), ("ok", "reset", {}), ("ok", "auth_expired", {}),
        ("ok", "aggregate.invalidated", {}), ("ok", "x" * 65, {}), ("ok", "new line\n", {}),
        ("ok", "t", float("nan")), ("ok", "t", {1j}), ("ok", "t", "nul \x00"),
        ("ok", "t", "\ud800"),
    ]
    async with conn.transaction():
        for topic, type_, data in bad:
            with pytest.raises(ValueError):
                await pgsse.publish(conn, topic, type_, data)
        # Nothing reached the server: the transaction is not aborted and goes on.
        await pgsse.publish(conn, "ok", "fine.type:v1-2", {"escaped": "\\u0000", "n": [1, None]})
    got = await sequenced_events(conn)
    assert [(e["topics"], e["data"]) for e in got] == [(["ok"], {"escaped": "\\u0000", "n": [1, None]})]
    with pytest.raises(TypeError, match="asyncpg Connection"):
        pgsse.publish(object(), "ok", "t", {})  # type: ignore[call-overload]


def test_import_pgsse_loads_no_driver_and_no_framework() -> None:
    code = ("import sys, pgsse; pgsse.publish; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'asyncpg', 'psycopg', 'sqlalchemy', 'starlette', 'httpx', 'uvicorn'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_publishing_with_psycopg_loads_no_other_driver(database: str) -> None:
    code = ("import sys, psycopg, pgsse\n"
            f"with psycopg.connect({database!r}) as conn:\n"
            "    pgsse.publish(conn, 'only', 'psycopg', {})\n"
            "    conn.rollback()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'asyncpg', 'sqlalchemy', 'starlette', 'httpx', 'uvicorn'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


async def test_worker_function_publishes_in_its_transaction(database: str,
                                                            conn: asyncpg.Connection) -> None:
    """The README's Celery/RQ-style recipe: a task opens a connection, writes and publishes
    in one transaction; a task that fails after publishing publishes nothing."""
    import psycopg

    await conn.execute("CREATE TABLE rounds (id int PRIMARY KEY, final boolean NOT NULL DEFAULT false)")
    await conn.execute("INSERT INTO rounds VALUES (1), (2)")

    def finalize_round(round_id: int, fail: bool = False) -> None:  # @app.task in a real worker
        with psycopg.connect(database) as db, db.transaction():
            db.execute("UPDATE rounds SET final = true WHERE id = %s", (round_id,))
            pgsse.publish(db, f"squads/{round_id}", "squad_update", {"round": round_id})
            if fail:
                raise RuntimeError("scoring failed")

    await asyncio.to_thread(finalize_round, 1)
    with pytest.raises(RuntimeError):
        await asyncio.to_thread(finalize_round, 2, True)
    got = await sequenced_events(conn)
    assert [(e["topics"], e["data"]) for e in got] == [(["squads/1"], {"round": 1})]
    assert await conn.fetchval("SELECT array_agg(id) FROM rounds WHERE final") == [1]


def test_app_settings_are_the_environment_variables_in_lower_case(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pgsse.asgi import settings_from
    from pgsse.settings import ConfigError

    monkeypatch.setenv("HEARTBEAT_SECONDS", "7")
    settings = settings_from({"database_url": "postgresql://x/y", "history_retention": "2h",
                              "auth_secret": ["k1", "k2"], "cors_origins": "https://a.example",
                              "demo": False, "retry_ms": 500})
    assert (settings.database_url, settings.history_retention_seconds, settings.auth_secret,
            settings.cors_origins, settings.retry_ms, settings.heartbeat_seconds) == (
        "postgresql://x/y", 7200.0, ("k1", "k2"), ("https://a.example",), 500, 7.0)
    with pytest.raises(TypeError, match="histroy_retention"):
        settings_from({"database_url": "postgresql://x/y", "histroy_retention": "2h"})
    with pytest.raises(ConfigError, match="HISTORY_RETENTION.*PORT"):
        settings_from({"database_url": "postgresql://x/y", "history_retention": "soon",
                       "port": "http"})
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        settings_from({})


# --- pgsse.App mounted at /realtime in a FastAPI app, under a plain uvicorn ---------------


class HostProcess(ServerProcess):
    """``uvicorn tests.python_host:app``: FastAPI with pgsse mounted at /realtime, served by
    uvicorn's own HTTP protocol (none of pgsse's). ``url`` is the mount's, ``base`` the host's."""

    def __init__(self, database_url: str, env: dict[str, str] | None = None,
                 log_dir: Path | None = None, http: str | None = None,
                 target: str = "tests.python_host:app") -> None:
        super().__init__(database_url, {"RETRY_MS": "300", **(env or {})}, log_dir)
        self.http = ["--http", http] if http else []
        self.target = target
        self.base = self.url
        if target.endswith(":app"):
            self.url = self.base + "/realtime"

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> HostProcess:
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSSE_", "AUTH_"))}
        env.update({"DATABASE_URL": self.database_url, "LOG_FORMAT": "json", **self.extra_env})
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", self.target, "--host", "127.0.0.1",
             "--port", str(self.port), "--no-access-log", *self.http],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def restart(self) -> float:
        """SIGTERM, wait for the exit (streams open), start again; the seconds the exit took."""
        started = time.monotonic()
        code = self.stop(signal.SIGTERM, timeout=20)
        took = time.monotonic() - started
        assert code in (0, -signal.SIGTERM), f"exit {code} after {took:.1f}s:\n{self.logs()[-2000:]}"
        self.start()
        return took


@pytest.fixture
def host(database: str, tmp_path: Path) -> Any:
    hosts: list[HostProcess] = []

    async def start(env: dict[str, str] | None = None, http: str | None = None,
                    target: str = "tests.python_host:app") -> HostProcess:
        conn = await asyncpg.connect(database)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS bills (id int PRIMARY KEY, status text)")
            await conn.execute("INSERT INTO bills SELECT g, 'open' FROM generate_series(1, 10) g "
                               "ON CONFLICT DO NOTHING")
        finally:
            await conn.close()
        hosts.append(HostProcess(database, env, tmp_path, http, target))
        return await asyncio.to_thread(hosts[-1].start)

    yield start
    for one in hosts:
        one.stop()


async def collect(client: pgsse.Client, count: int, into: list[pgsse.Event]) -> None:
    async for event in client:
        into.append(event)
        if len(into) >= count:
            return


async def test_fastapi_request_that_commits_publishes_once_and_one_that_rolls_back_nothing(
        host: Any, conn: asyncpg.Connection) -> None:
    app = await host()
    stream = await open_stream(app.url + "/events", params={"topic": "bills"},
                               until=lambda s: any(e.id and '"id":3' in e.data for e in s.events),
                               timeout=20)
    async with httpx.AsyncClient(base_url=app.base, timeout=10) as http:
        assert (await http.post("/bills/1/pay")).status_code == 200
        assert (await http.post("/bills/2/pay", params={"fail": "true"})).status_code == 409
        assert (await http.post("/bills/3/pay")).status_code == 200
    got = await stream
    assert [(e.event, e.json()) for e in got.events] == [
        ("bill.status.changed", {"id": 1, "status": "paid"}),
        ("bill.status.changed", {"id": 3, "status": "paid"})]
    assert await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM bills WHERE status = 'paid'") == [1, 3]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if (name in ("href", "src") and value and tag in ("link", "script", "a")
                    and not value.startswith("data:")):
                self.links.append(value)


async def test_every_endpoint_works_under_the_prefix(host: Any, conn: asyncpg.Connection) -> None:
    app = await host({"DEMO": "1"})
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(app.base + "/")).json() == {"app": "host"}  # the host's own
        for path in ("/healthz", "/readyz", "/stats", "/openapi.json", "/metrics"):
            assert (await http.get(app.url + path)).status_code == 200, path
        assert (await http.get(app.url + "/openapi.json")).json()["servers"] == [{"url": "/realtime"}]
        listed = (await http.get(app.url + "/aggregates")).json()["aggregates"]
        assert "event_types" in {a["name"] for a in listed}
        first = await http.get(app.url + "/aggregates/event_types")
        assert first.status_code == 200 and first.headers["etag"].startswith('W/"')
        again = await http.get(app.url + "/aggregates/event_types",
                               headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304
        missing = await http.get(app.url + "/aggregates/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert (await http.get(app.url + "/events")).json()["error"]["code"] == "invalid_topic"
        slash = await http.get(app.url + "/healthz/")
        assert slash.status_code == 307 and slash.headers["location"] == "/realtime/healthz"

        # client.js, and what it imports, resolved as a browser resolves them.
        entry_url = app.url + "/client.js"
        entry = await http.get(entry_url)
        assert entry.status_code == 200
        for spec in re.findall(r'from "([^"]+)"', entry.text):
            module = await http.get(urljoin(entry_url, spec))
            assert module.status_code == 200 and "javascript" in module.headers["content-type"], spec

        # The dashboard (DEMO=1): every stylesheet, script and module it loads, and the
        # URLs its script requests, resolve under the prefix.
        page_url = app.url + "/"
        page = await http.get(page_url)
        assert page.status_code == 200
        parser = _Links()
        parser.feed(page.text)
        assert parser.links
        for link in parser.links:
            target = urljoin(page_url, link)
            assert target.startswith(app.url + "/"), link
            assert (await http.get(target)).status_code == 200, target
        script_url = urljoin(page_url, next(x for x in parser.links if x.endswith(".js")))
        script = (await http.get(script_url)).text
        for spec in re.findall(r'from "([^"]+)"', script):
            target = urljoin(script_url, spec)
            assert (await http.get(target)).status_code == 200, target
        assert 'fetch("/' not in script and 'url: ""' not in script

    # A stream under the prefix: replay from 0, then live.
    await pgsse.publish(conn, "prefixed", "tick", {"n": 1})
    reader = await open_stream(app.url + "/events", params={"topic": "prefixed", "last_event_id": "0"},
                               until=lambda s: len(s.events) >= 2, timeout=20)
    await pgsse.publish(conn, "prefixed", "tick", {"n": 2})
    got = await reader
    assert got.status == 200 and got.headers["content-type"].startswith("text/event-stream")
    assert [e.json() for e in got.events] == [{"n": 1}, {"n": 2}]


async def test_client_gets_200_events_exactly_once_in_order_across_two_host_restarts(
        host: Any, conn: asyncpg.Connection) -> None:
    app = await host()
    client = pgsse.Client(app.url, ["ticks"], last_event_id=0, max_backoff=1.0)
    got: list[pgsse.Event] = []
    consumer = asyncio.create_task(collect(client, 200, got))
    exits = []
    try:
        for part in range(3):
            for n in range(part * 70, min(200, part * 70 + 70)):
                async with conn.transaction():
                    await pgsse.publish(conn, f"ticks/{n % 7}", "tick", {"n": n})
            if part < 2:
                await eventually(lambda part=part: len(got) >= part * 70 + 70, timeout=30,
                                 what=f"{part * 70 + 70} events before restart {part + 1}")
                exits.append(await asyncio.to_thread(app.restart))
        await asyncio.wait_for(consumer, 60)
    finally:
        consumer.cancel()
    assert [e.data["n"] for e in got] == list(range(200))
    assert [e.topic for e in got] == [f"ticks/{n % 7}" for n in range(200)]
    ids = [e.id for e in got]
    assert all(isinstance(i, int) for i in ids) and ids == sorted(set(ids))  # type: ignore[type-var]
    assert client.connections >= 3 and client.last_event_id == ids[-1]
    assert max(exits) < 10, f"the host took {exits} s to stop with a stream open"

    # A prune past a client's position: it gets reset, then what follows.
    await conn.execute("SELECT realtime.prune('0')")
    late = pgsse.Client(app.url, ["ticks"], last_event_id=ids[100])
    after: list[pgsse.Event] = []
    reader = asyncio.create_task(collect(late, 2, after))
    await eventually(lambda: after, timeout=20, what="the reset")
    await pgsse.publish(conn, "ticks/x", "tick", {"n": 200})
    await asyncio.wait_for(reader, 20)
    assert (after[0].type, after[0].topic, after[0].data) == ("reset", None, {"reason": "history_expired"})
    assert (after[1].type, after[1].data) == ("tick", {"n": 200}) and after[1].id > after[0].id  # type: ignore[operator]

    # pgsse tail prints the same events, one JSON line each.
    out = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "pgsse", "tail", "ticks/x", "reset-only", "--url", app.url,
        "--from", str(after[0].id), "--count", "1"], cwd=ROOT, capture_output=True, text=True,
        timeout=30)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"id": after[1].id, "type": "tick", "topic": "ticks/x", "data": {"n": 200}}]


async def test_a_host_uvicorn_with_pgsse_protocol_gets_the_header_timeout_and_direct_writes(
        host: Any, conn: asyncpg.Connection) -> None:
    """``--http pgsse.protocol:HttpProtocol`` in the host's uvicorn: a request whose headers
    never complete is closed after ``HEADER_TIMEOUT`` (a plain uvicorn keeps it), and live
    events still reach a mounted stream (written by the hub to the socket itself)."""
    app = await host({"HEADER_TIMEOUT": "1"}, http="pgsse.protocol:HttpProtocol")
    reader = await open_stream(app.url + "/events", params={"topic": "direct"},
                               until=lambda s: len(s.events) >= 2, timeout=20)
    for n in (1, 2):
        await pgsse.publish(conn, "direct", "tick", {"n": n})
    assert [e.json() for e in (await reader).events] == [{"n": 1}, {"n": 2}]

    def held_seconds() -> float | None:
        with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
            sock.sendall(b"GET /realtime/healthz HTTP/1.1\r\nHost: x\r\n")  # never ends
            started = time.monotonic()
            sock.settimeout(8)
            try:
                return time.monotonic() - started if sock.recv(1) == b"" else None
            except TimeoutError:
                return None
            except ConnectionResetError:
                return time.monotonic() - started

    held = await asyncio.to_thread(held_seconds)
    assert held is not None and held < 6, f"a header-incomplete connection held {held} s"


# --- pgsse.Client: tokens, refusals -------------------------------------------------------

SECRET = "python-api-test-secret-0123456789abcdef"


async def test_client_token_callable_is_asked_again_after_401_and_auth_expired(
        start_server: Any, conn: asyncpg.Connection) -> None:
    from pgsse.auth import mint

    server = await asyncio.to_thread(start_server, {"AUTH_SECRET": SECRET, "RETRY_MS": "200"})
    issued: list[str] = []

    async def token() -> str:  # async on purpose; a plain function works the same
        issued.append("bad" if not issued else "short" if len(issued) == 1 else "long")
        if issued[-1] == "bad":
            return "not-a-jwt"  # the service answers 401: the client asks again at once
        return mint(SECRET, ["secured"], 2 if issued[-1] == "short" else 300)

    client = pgsse.Client(server.url, "secured", token=token, last_event_id=0, max_backoff=1.0)
    got: list[pgsse.Event] = []
    consumer = asyncio.create_task(collect(client, 10, got))
    try:
        for n in range(5):
            await pgsse.publish(conn, "secured", "tick", {"n": n})
        await eventually(lambda: len(got) >= 5, timeout=20, what="the first five")
        # The 2 s token expires mid-stream (auth_expired): a fresh one, then the rest.
        await eventually(lambda: len(issued) >= 3, timeout=20, what="a token after auth_expired")
        for n in range(5, 10):
            await pgsse.publish(conn, "secured", "tick", {"n": n})
        await asyncio.wait_for(consumer, 30)
    finally:
        consumer.cancel()
    assert [e.data["n"] for e in got] == list(range(10))
    assert issued[:3] == ["bad", "short", "long"] and client.connections >= 2
    assert "auth_expired" not in {e.type for e in got}


async def test_client_raises_on_refusals_a_retry_cannot_fix(start_server: Any) -> None:
    from pgsse.auth import mint

    server = await asyncio.to_thread(start_server, {"AUTH_SECRET": SECRET})
    with pytest.raises(pgsse.ClientError) as refused:
        async for _ in pgsse.Client(server.url, "theirs", token=mint(SECRET, ["mine"], 60)):
            pass
    assert (refused.value.status, refused.value.code) == (403, "forbidden")
    with pytest.raises(pgsse.ClientError) as unauthorized:
        async for _ in pgsse.Client(server.url, "mine", token="not-a-jwt"):
            pass
    assert unauthorized.value.status == 401
    with pytest.raises(ValueError):
        pgsse.Client(server.url, ["bad topic"])
    out = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "pgsse", "tail", "theirs", "--url", server.url,
        "--token", mint(SECRET, ["mine"], 60)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "403 forbidden" in out.stderr and out.stdout == ""


async def test_an_app_served_alone_runs_its_own_lifespan_and_stops_on_sigterm(
        host: Any, conn: asyncpg.Connection) -> None:
    app = await host(target="tests.python_host:rt")  # uvicorn serving the pgsse.App itself
    reader = await open_stream(app.url + "/events", params={"topic": "alone"},
                               until=lambda s: len(s.events) >= 1, timeout=20)
    await pgsse.publish(conn, "alone", "tick", {"n": 1})
    assert [e.json() for e in (await reader).events] == [{"n": 1}]
    stream = await open_stream(app.url + "/events", params={"topic": "alone"}, timeout=30)
    took = await asyncio.to_thread(app.restart)  # with that stream open
    assert took < 10
    ended = await stream
    assert ended.ended and len(ended.retries) == 2  # the opening retry:, then the draining one


# --- pgsse.Client against a scripted SSE server: retry:, backoff, duplicates ------------


async def test_client_honours_retry_backs_off_and_never_yields_an_id_twice() -> None:
    """A scripted server: the stream ends after ``retry: 700``; the next connection must come
    no sooner, with ``Last-Event-ID``; two 503s back off; a replay from before the client's
    id is not yielded again; an event without ``id:`` (an invalidation) has ``id`` None."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    seen: list[tuple[float, str | None]] = []

    def frame(id_: int | None, type_: str, topic: str | None, data: Any) -> str:
        head = f"id: {id_}\n" if id_ is not None else ""
        return head + f"event: {type_}\ndata: " + json.dumps({"topic": topic, "data": data}) + "\n\n"

    async def events(request: Request) -> Response:
        seen.append((time.monotonic(), request.headers.get("last-event-id")))
        assert request.query_params.getlist("topic") == ["a"] and request.query_params["envelope"] == "1"
        n = len(seen)
        if n == 1:
            body = "retry: 700\n\n" + frame(1, "tick", "a/1", 1)
        elif n in (2, 3):
            return JSONResponse({"error": {"code": "unavailable", "message": "x"}}, status_code=503)
        else:  # replays id 1 (a misbehaving replica) before 2, then an invalidation
            body = ("retry: 50\n\n" + frame(1, "tick", "a/1", 1) + frame(2, "tick", "a/2", 2)
                    + frame(None, "aggregate.invalidated", "aggregates/x", {"aggregate": "x"}))
        return Response(body, media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/events", events)]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, what="the scripted server")
        client = pgsse.Client(f"http://127.0.0.1:{port}", "a", max_backoff=5)
        got: list[pgsse.Event] = []
        await asyncio.wait_for(collect(client, 3, got), 30)
        await client.aclose()
    finally:
        server.should_exit = True
        await serving
    assert [(e.id, e.type, e.topic, e.data) for e in got] == [
        (1, "tick", "a/1", 1), (2, "tick", "a/2", 2),
        (None, "aggregate.invalidated", "aggregates/x", {"aggregate": "x"})]
    assert [last for _, last in seen] == [None, "1", "1", "1"]
    gaps = [b - a for (a, _), (b, _) in zip(seen, seen[1:], strict=False)]
    assert gaps[0] >= 0.65, f"reconnected {gaps[0]:.2f} s after retry: 700"
    assert gaps[2] >= 0.35, f"the second failure waited only {gaps[2]:.2f} s (no backoff)"


async def test_plain_uvicorn_host_drops_a_slow_client_which_then_loses_nothing(
        host: Any, conn: asyncpg.Connection) -> None:
    """The bounded-memory guarantee without pgsse's protocol: a mounted stream whose client
    does not read is dropped after SLOW_CLIENT_SECONDS, and resuming from the last id it
    read it gets every event after it, once."""
    from tests.support import metric
    from tests.test_stream import head, wait_head

    app = await host({"CLIENT_BUFFER_BYTES": "65536", "SLOW_CLIENT_SECONDS": "1"})
    start = await head(conn)
    sock = socket.create_connection(("127.0.0.1", app.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /realtime/events?topic=flood HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(10)
    received = b""
    while b"retry: " not in received:
        chunk = await asyncio.to_thread(sock.recv, 4096)
        assert chunk, received
        received += chunk
    pad = "z" * 4000
    for i in range(0, 2000, 50):  # ~8 MB, far beyond socket buffers and the 64 kB bound
        await conn.execute(
            "SELECT realtime.publish('flood', 'blob', jsonb_build_object('i', g, 'pad', $1::text)) "
            "FROM generate_series($2::int, $2::int + 49) g", pad, i)
    await wait_head(conn, start + 2000, timeout=30)
    await eventually(lambda: metric(app, "pgsse_slow_clients_dropped_total") >= 1, timeout=30,
                     what="a slow client dropped")
    # Not drained: uvicorn closes a dropped stream gracefully, so the kernel's send queue
    # (megabytes) still trickles to a reader with a 4 kB window for about 100 s (measured).
    # A client resumes from the last event it read.
    sock.close()
    frames = received.split(b"\n\n")[:-1]  # complete frames only
    ids = [int(line[4:]) for frame in frames for line in frame.split(b"\n") if line.startswith(b"id: ")]
    last = ids[-1] if ids else start
    assert ids == list(range(start + 1, last + 1))
    client = pgsse.Client(app.url, "flood", last_event_id=last)
    rest: list[pgsse.Event] = []
    await asyncio.wait_for(collect(client, start + 2000 - last, rest), 30)
    await client.aclose()
    assert [e.id for e in rest] == list(range(last + 1, start + 2001))
    await eventually(lambda: httpx.get(app.url + "/stats").json()["clients"] == 0,
                     what="no stream left")


@pytest.mark.parametrize(("path", "root", "expected"), [
    ("/events", "", "/events"),
    ("/realtime/events", "/realtime", "/events"),
    ("/realtime/aggregates/x", "/realtime", "/aggregates/x"),
    ("/realtimes/events", "/realtime", "/realtimes/events"),  # not below the prefix
    ("/events", "/realtime", "/events"),  # a proxy that strips the prefix itself
    ("/realtime", "/realtime", ""),
])
def test_route_path_is_the_path_below_the_mount(path: str, root: str, expected: str) -> None:
    from pgsse.middleware import route_path

    assert route_path({"path": path, "root_path": root}) == expected


async def test_dashboard_in_chromium_under_the_prefix(host: Any, conn: asyncpg.Connection) -> None:
    """The demo dashboard served by a mounted pgsse.App, in a real browser: every request it
    makes stays under /realtime, its stream opens, a new order appears live."""
    from tests.test_dashboard import Browser, launch, stream_count, wait_until
    from tests.tools import require_tool

    require_tool("chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    app = await host({"DEMO": "1", "DEMO_RATE": "0.0001"})
    async with playwright_api.async_playwright() as p:
        browser = await launch(playwright_api, p)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            b = Browser(page)
            await page.goto(app.url + "/", timeout=15000)
            await page.wait_for_selector("#status[data-state=open]", timeout=15000)
            await page.wait_for_selector("#orders tbody tr", timeout=10000)
            row = await conn.fetchrow("INSERT INTO demo.orders (store_id, product_id, quantity, total) "
                                      "SELECT store_id, id, 3, 30 FROM demo.products "
                                      "WHERE store_id = (SELECT store_id FROM demo.products ORDER BY id "
                                      "LIMIT 1) ORDER BY id LIMIT 1 RETURNING id, store_id")
            await page.select_option("#store", str(row["store_id"]))
            await page.wait_for_selector(f"#orders tbody tr[data-id='{row['id']}']", timeout=15000)
            href = await page.eval_on_selector("#export-csv", "a => a.href")
            assert href.startswith(app.url + "/aggregates/recent_orders?"), href
            await wait_until(lambda: stream_count(app) == 1, page, 10, "one stream")
            outside = [path for path in b.requests if not path.startswith("/realtime/")]
            assert outside == [], outside
            assert b.requests["/realtime/client/index.js"] == 1
            assert b.errors == []
        finally:
            await browser.close()
