"""Database access: where PostgreSQL is, connecting with backoff, and migrations.

With ``DATABASE_URL`` unset the service runs an embedded PostgreSQL (embedded.py) whose
data lives under ``.data/`` and survives restarts.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import asyncpg

from .errors import Unavailable
from .queries import Lock, query
from .settings import SQL_DIR

log = logging.getLogger("pgsse.db")

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


async def connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(url, **kwargs)
    return conn


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size,
        # The pool never LISTENs, so the reset query (UNLISTEN *, RESET ALL) is only a
        # round trip on every release; queries use SET LOCAL inside transactions instead.
        reset=None,
    )
    assert pool is not None
    return pool


async def wait_for_pool(url: str, stop: asyncio.Event | None = None, **kwargs: Any) -> asyncpg.Pool:
    """Create the pool, retrying with jittered backoff while the database is down."""
    delay = 0.2
    while True:
        try:
            return await create_pool(url, **kwargs)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            log.warning("database unavailable, retrying", extra={"event": "db_retry", "error": str(exc), "delay": delay})
            if stop is not None and stop.is_set():
                raise
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 5.0)


class MigrationError(RuntimeError):
    """The package ships no migrations (a broken install): nothing would be created; or
    migrations are pending on a read-only database."""


class Database:
    """The connection pools, once there are some: created in the background (retried while
    PostgreSQL is down), and until then every user gets ``Unavailable`` (503).

    Three pools, so that no kind of work waits behind another (issue 20): ``pool`` for the
    service's own reads (history replays, ``/events/{position}``, resume bounds, exports,
    start-up); ``aggregate_pool`` for aggregate queries, whose duration is the SQL author's
    (``admission`` shares it out); ``probe_pool``, one connection, for ``/readyz``, which
    so measures the database and not a queue."""

    def __init__(self, url: str, aggregate_pool_size: int = 8) -> None:
        self.url = url
        self.aggregate_pool_size = aggregate_pool_size
        self._pool: asyncpg.Pool | None = None
        self._aggregate_pool: asyncpg.Pool | None = None
        self._probe_pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Unavailable("the database is not connected yet")
        return self._pool

    @property
    def aggregate_pool(self) -> asyncpg.Pool:
        if self._aggregate_pool is None:
            raise Unavailable("the database is not connected yet")
        return self._aggregate_pool

    @property
    def probe_pool(self) -> asyncpg.Pool:
        if self._probe_pool is None:
            raise Unavailable("the database is not connected yet")
        return self._probe_pool

    @property
    def connected(self) -> bool:
        return self._pool is not None

    async def connect(self, stop: asyncio.Event, **kwargs: Any) -> asyncpg.Pool:
        pool = await wait_for_pool(self.url, stop, **kwargs)
        self._aggregate_pool = await wait_for_pool(self.url, stop, min_size=1,
                                                   max_size=self.aggregate_pool_size)
        self._probe_pool = await wait_for_pool(self.url, stop, min_size=1, max_size=1)
        self._pool = pool  # last: ``connected`` means every pool is there
        return pool

    async def close(self, seconds: float = 3.0) -> None:
        for pool in (self._pool, self._aggregate_pool, self._probe_pool):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=seconds)
                except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    pool.terminate()


def migration_files() -> list[Path]:
    return sorted((SQL_DIR / "migrations").glob("*.sql"))


async def migrate(conn: Connection) -> list[str]:
    """Apply each migration not applied yet, in name order, once, under one advisory lock.

    Applied names are recorded in ``realtime.migrations``. Files are append-only: a
    database migrated by an older pgsse has 001 (idempotent) re-applied once and recorded.
    """
    files = migration_files()
    if not files:
        raise MigrationError(f"no migration files under {SQL_DIR / 'migrations'}: the pgsse "
                             "installation is incomplete (its SQL is package data)")
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute(query("take_lock"), Lock.MIGRATE)
        if await conn.fetchval(query("read_only_session")):
            # issue 19: a read-only node or role (a failover that left DATABASE_URL on a
            # standby) is not a start-up failure when there is nothing to apply: the service
            # starts, and /readyz names the sequencer that cannot number until it can.
            await _check_applied_read_only(conn, files)
            return applied
        await conn.execute(query("migrations_table"))
        done = {row["name"] for row in await conn.fetch(query("applied_migrations"))}
        for path in files:
            if path.name in done:
                continue
            await conn.execute(path.read_text())
            await conn.execute(query("record_migration"), path.name)
            applied.append(path.name)
    return applied


async def _check_applied_read_only(conn: Connection, files: list[Path]) -> None:
    """On a read-only session: every migration must already be applied, else a clear error."""
    applied: set[str] = set()
    if await conn.fetchval(query("migrations_recorded")):
        applied = {row["name"] for row in await conn.fetch(query("applied_migrations"))}
    pending = [path.name for path in files if path.name not in applied]
    if pending:
        raise MigrationError(f"the database is read-only (a standby, or "
                             f"default_transaction_read_only) and migrations are pending: "
                             f"{', '.join(pending)}")
    log.warning("the database is read-only: nothing to migrate, and nothing will be numbered "
                "until it is writable", extra={"event": "database_read_only"})
