"""``WORKERS=N``: N ``pgsse serve`` processes behind one port, one per core.

The supervisor (the process started as ``pgsse serve``) binds N listening sockets to the same
address with ``SO_REUSEPORT``, so the kernel spreads new connections evenly over them (one
socket shared by N event loops would let whichever loop wakes first accept a whole burst),
and starts one worker per socket: ``python -m pgsse serve`` with the socket inherited and
``PGSSE_WORKER_*`` in its environment. Each worker is a whole pgsse: its own pool, change
feed, hub, limits and caches; the sequencer stays one per database (the workers, like
replicas, elect it with an advisory lock).

- **SIGTERM / SIGINT** to the supervisor are passed on as SIGTERM: every worker drains its
  streams (each ends with a short jittered ``retry:``) and exits; then the supervisor exits
  too, the way a single process does (killed by SIGTERM, or status 130 after Ctrl-C). A
  second signal forces the workers out; a worker still there ``SHUTDOWN_GRACE_SECONDS``
  after the first is killed (SIGKILL), whatever it is doing (stopped, hung). A worker notices
  a supervisor that died (SIGKILL) through ``PR_SET_PDEATHSIG`` and drains as on SIGTERM.
- **Liveness**: each worker's event loop writes a byte to a pipe (its heartbeat) every
  ``WORKER_TIMEOUT``/5 (at most 1 s). A worker silent for ``WORKER_TIMEOUT`` (a stopped
  process, a blocked loop; before its first beat: ``STARTUP_ALLOWANCE``) is killed with
  SIGKILL and started again like a worker that died, logged (``worker_hung``) and counted
  (``pgsse_worker_replaced_total{reason="hung"}``). The supervisor never blocks: it waits on
  the pipes with a short timeout and reaps children without waiting.
- **A worker that dies** is started again on the same socket (connections the kernel queued
  on it meanwhile are served then), at most ``MAX_RESTARTS`` a minute; a worker exiting
  with status 2 (a start-up failure: a broken aggregate file, a failing migration) stops the
  group with status 2.
- **Metrics**: every worker serves its own series, labelled ``worker="<index>"``, on a Unix
  socket in a private directory; ``/metrics`` on whichever worker a scrape reaches merges
  every worker's series (``metrics.exposition``), so one scrape sees the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from . import metrics
from .settings import Settings

log = logging.getLogger("pgsse.workers")

ENV_INDEX = "PGSSE_WORKER_INDEX"
ENV_COUNT = "PGSSE_WORKER_COUNT"
ENV_DIR = "PGSSE_WORKER_DIR"
ENV_FD = "PGSSE_WORKER_FD"
ENV_PARENT = "PGSSE_WORKER_PARENT"
ENV_HEARTBEAT = "PGSSE_WORKER_HEARTBEAT_FD"
STARTUP_ALLOWANCE = 60.0    # seconds a new worker may take to its first heartbeat
TICK = 0.2                  # the supervisor's longest wait between checks
MAX_RESTARTS = 5            # per worker per minute; beyond, the group stops (status 1)
PR_SET_PDEATHSIG = 1
EXIT_STARTUP_FAILED = 2


def index() -> int | None:
    """This process's worker index, or None when it is not one of ``WORKERS=N``."""
    raw = os.environ.get(ENV_INDEX)
    return None if raw is None else int(raw)


def metrics_socket(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.sock"


def supervisor_metrics(directory: Path) -> Path:
    """The supervisor's own counters, as exposition text every worker's scrape includes."""
    return directory / "supervisor.prom"


def beat_interval(timeout: float) -> float:
    return min(1.0, timeout / 5)


@dataclass(frozen=True)
class Worker:
    """This process as worker ``index`` of ``count`` (from ``PGSSE_WORKER_*``)."""

    index: int
    count: int
    directory: Path
    fd: int
    parent: int
    heartbeat_fd: int = -1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Worker | None:
        source = os.environ if env is None else env
        if ENV_INDEX not in source:
            return None
        return cls(int(source[ENV_INDEX]), int(source[ENV_COUNT]), Path(source[ENV_DIR]),
                   int(source[ENV_FD]), int(source[ENV_PARENT]),
                   int(source.get(ENV_HEARTBEAT, "-1")))

    def listening_socket(self) -> socket.socket:
        return socket.socket(fileno=self.fd)

    def follow_parent(self) -> None:
        """Get SIGTERM (and so drain) if the supervisor dies, e.g. of SIGKILL."""
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.parent:  # it died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    def join_metrics(self) -> None:
        metrics.join_group(str(self.index), {
            str(i): metrics_socket(self.directory, i) for i in range(self.count) if i != self.index},
            supervisor_metrics(self.directory))

    def start_heartbeat(self, timeout: float) -> None:
        """Beat from the event loop itself, so a blocked loop misses beats as a stopped
        process does."""
        if self.heartbeat_fd < 0:
            return
        interval = beat_interval(timeout)
        os.set_blocking(self.heartbeat_fd, False)
        loop = asyncio.get_running_loop()

        def beat() -> None:
            try:
                os.write(self.heartbeat_fd, b".")
            except BlockingIOError:
                pass  # the supervisor is behind reading: the pipe holds beats enough
            except OSError:
                return  # the supervisor is gone: PR_SET_PDEATHSIG takes it from here
            loop.call_later(interval, beat)

        beat()

    async def serve_metrics(self) -> asyncio.AbstractServer:
        """This worker's own series, for the sibling that answers a scrape."""
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(metrics.own_exposition())
                await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        path = metrics_socket(self.directory, self.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by this worker's predecessor
        return await asyncio.start_unix_server(answer, path=str(path))


def listening_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """``count`` sockets bound to one address with SO_REUSEPORT (port 0: the first one's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Supervisor:
    """Starts, restarts and stops the workers; serves nothing itself."""

    def __init__(self, settings: Settings, database_url: str, backlog: int = 4096) -> None:
        self.settings = settings
        self.database_url = database_url
        self.backlog = backlog
        self.count = settings.workers
        self.procs: dict[int, subprocess.Popen[bytes]] = {}   # pid → process
        self.index_of: dict[int, int] = {}                     # pid → worker index
        self.restarts: dict[int, deque[float]] = {}
        self.signal: int | None = None
        self.exit_code = 0
        self.timeout = settings.worker_timeout_seconds
        self.beats: dict[int, int] = {}                        # pid → heartbeat pipe (read end)
        self.last_beat: dict[int, float] = {}                  # pid → deadline for its next beat
        self.hung: set[int] = set()                            # pids killed for silence
        self.replaced = {"hung": 0, "exited": 0}
        self.kill_at: float | None = None                      # the grace's end, after a signal
        self.selector = selectors.DefaultSelector()

    def run(self) -> None:
        settings = self.settings
        try:
            self.sockets = listening_sockets(settings.host, settings.port, self.count,
                                             self.backlog)
        except OSError as exc:
            print(f"pgsse: cannot listen on {settings.host}:{settings.port}: {exc}",
                  file=sys.stderr)
            raise SystemExit(1) from exc
        self.directory = Path(tempfile.mkdtemp(prefix="pgsse-workers-"))
        self._write_metrics()
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self._spawn(index)
            log.info("workers started", extra={
                "event": "workers_started", "workers": self.count, "pid": os.getpid(),
                "port": self.sockets[0].getsockname()[1]})
            self._wait()
        finally:
            self._stop(signal.SIGTERM)
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(settings.shutdown_grace_seconds + 5)
                if proc.poll() is None:
                    proc.kill()
            for sock in self.sockets:
                sock.close()
            for fd in self.beats.values():
                self.selector.unregister(fd)
                os.close(fd)
            self.selector.close()
            shutil.rmtree(self.directory, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("workers stopped", extra={"event": "workers_stopped", "signal": self.signal})
        if self.exit_code:
            raise SystemExit(self.exit_code)
        if self.signal == signal.SIGINT:
            raise SystemExit(130)
        if self.signal is not None:
            # Like a single uvicorn process: end "killed by SIGTERM" after a clean drain
            # (``pgsse serve`` may catch it first, to stop the embedded PostgreSQL).
            signal.raise_signal(self.signal)
            signal.signal(self.signal, signal.SIG_DFL)
            signal.raise_signal(self.signal)

    def _spawn(self, index: int) -> None:
        settings = self.settings
        beat_read, beat_write = os.pipe()
        env = {**os.environ, "DATABASE_URL": self.database_url,
               ENV_INDEX: str(index), ENV_COUNT: str(self.count), ENV_DIR: str(self.directory),
               ENV_FD: str(self.sockets[index].fileno()), ENV_PARENT: str(os.getpid()),
               ENV_HEARTBEAT: str(beat_write)}
        if settings.demo:
            # One demo writer's worth of changes in all: each worker writes its share.
            env.update(DEMO="1", DEMO_RATE=repr(settings.demo_rate / self.count))
        try:
            proc = subprocess.Popen([sys.executable, "-m", "pgsse", "serve"], env=env,
                                    pass_fds=(self.sockets[index].fileno(), beat_write))
        except BaseException:
            os.close(beat_read)
            raise
        finally:
            os.close(beat_write)
        os.set_blocking(beat_read, False)
        self.selector.register(beat_read, selectors.EVENT_READ, proc.pid)
        self.procs[proc.pid] = proc
        self.index_of[proc.pid] = index
        self.beats[proc.pid] = beat_read
        self.last_beat[proc.pid] = time.monotonic() + max(self.timeout, STARTUP_ALLOWANCE)

    def _write_metrics(self) -> None:
        """Replace the supervisor's counters file (atomically: a scrape may read it now)."""
        family = CounterMetricFamily(
            "pgsse_worker_replaced", "Workers started again by the supervisor (WORKERS > 1), "
            "by reason: hung (no heartbeat for WORKER_TIMEOUT, killed) or exited.",
            labels=["reason"])
        for reason, count in self.replaced.items():
            family.add_metric([reason], count)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collected([family]))
        path = supervisor_metrics(self.directory)
        scratch = path.with_suffix(".tmp")
        scratch.write_bytes(generate_latest(registry))
        os.replace(scratch, path)

    def _wait(self) -> None:
        """Until every worker has exited: read heartbeats, reap and replace workers, kill the
        silent ones, and kill what is left when the shutdown grace ends. Never blocks longer
        than ``TICK`` (a signal only sets state here)."""
        while self.procs:
            for key, _ in self.selector.select(TICK):
                self._read_beats(key.fd, key.data)
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at:
                log.error("workers still running after the grace: killing them", extra={
                    "event": "workers_killed", "workers": sorted(self.procs),
                    "grace_seconds": self.settings.shutdown_grace_seconds})
                self.kill_at = None
                self._stop(signal.SIGKILL)
            if self.signal is None and not self.exit_code:
                for pid, deadline in list(self.last_beat.items()):
                    if now > deadline and pid not in self.hung:
                        self._kill_hung(pid)
            self._reap()

    def _read_beats(self, fd: int, pid: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.last_beat[pid] = time.monotonic() + self.timeout
        else:  # the worker closed its end (it exited): stop watching the pipe
            self.selector.unregister(fd)
            os.close(fd)
            self.beats.pop(pid, None)
            self.last_beat.pop(pid, None)

    def _kill_hung(self, pid: int) -> None:
        log.error("worker sent no heartbeat: killing it, to start it again", extra={
            "event": "worker_hung", "worker": self.index_of.get(pid), "pid": pid,
            "timeout_seconds": self.timeout})
        self.hung.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.procs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.procs.clear()
                return
            if pid == 0:
                return
            self._exited(pid, status)

    def _exited(self, pid: int, status: int) -> None:
        proc = self.procs.pop(pid, None)
        index = self.index_of.pop(pid, None)
        fd = self.beats.pop(pid, None)
        if fd is not None:
            self.selector.unregister(fd)
            os.close(fd)
        self.last_beat.pop(pid, None)
        hung = pid in self.hung
        self.hung.discard(pid)
        if proc is None or index is None:
            return
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if self.signal is not None or self.exit_code:
            return
        if code == EXIT_STARTUP_FAILED:
            log.critical("worker failed to start: stopping every worker", extra={
                "event": "worker_startup_failed", "worker": index})
            self.exit_code = EXIT_STARTUP_FAILED
            self._begin_stop()
            return
        recent = self.restarts.setdefault(index, deque())
        now = time.monotonic()
        while recent and recent[0] < now - 60:
            recent.popleft()
        if len(recent) >= MAX_RESTARTS:
            log.critical("worker keeps dying: stopping every worker", extra={
                "event": "worker_crash_loop", "worker": index, "status": code})
            self.exit_code = 1
            self._begin_stop()
            return
        recent.append(now)
        log.error("worker exited: starting it again", extra={
            "event": "worker_restarted", "worker": index, "status": code, "hung": hung})
        self.replaced["hung" if hung else "exited"] += 1
        self._write_metrics()
        self._spawn(index)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = sig
            log.info("stopping workers", extra={"event": "workers_stopping", "signal": sig})
            self._begin_stop()
        else:
            self._stop(signal.SIGINT)  # uvicorn's "second Ctrl-C": stop waiting for streams

    def _begin_stop(self) -> None:
        """SIGTERM to every worker; SIGKILL to those left when the grace ends."""
        if self.kill_at is None:
            self.kill_at = time.monotonic() + self.settings.shutdown_grace_seconds
        self._stop(signal.SIGTERM)

    def _stop(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)


class _Collected:
    def __init__(self, families: list[CounterMetricFamily]) -> None:
        self.families = families

    def collect(self) -> list[CounterMetricFamily]:
        return self.families
