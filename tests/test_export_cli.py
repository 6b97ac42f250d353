"""``pgsse export`` against a real pgsse: progress on a real pty, ``--resume``, exit codes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pexpect
import pytest

from tests.support import ROOT, free_port
from tests.test_export import make_export_dir

Start = Callable[..., Any]

# Slow for its first 20,000 rows (a pause every 1,000), so a test can interrupt it mid-way.
SLOW = """-- public.big, slowly at first.
-- export: order by id
SELECT id, label, public.pause_at(id) AS one FROM public.big
"""
# STABLE (a white lie) so that the planner may read public.big in key order from its index
# and call it row by row; a volatile call would make it sort everything before the first row.
PAUSE = """
CREATE FUNCTION public.pause_at(id bigint) RETURNS int STABLE LANGUAGE plpgsql AS $$
BEGIN
    IF id % 1000 = 0 AND id <= 20000 THEN PERFORM pg_sleep(0.08); END IF;
    RETURN 1;
END $$
"""


@pytest.fixture
async def cli_server(start_server: Start, conn: asyncpg.Connection, tmp_path: Path) -> Any:
    directory = await make_export_dir(conn, tmp_path, 100_000)
    await conn.execute(PAUSE)
    (directory / "slow.sql").write_text(SLOW)
    return start_server({"AGGREGATES_DIR": str(directory)})


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgsse", "export", *args]


def spawn(shell: str) -> pexpect.spawn:
    """A shell line on a real pty (stderr is the terminal; stdout as the line redirects it)."""
    return pexpect.spawn("/bin/sh", ["-c", shell], cwd=str(ROOT), env=dict(os.environ),
                         encoding="utf-8", timeout=30, dimensions=(24, 120))


def full_export(server: Any, name: str, fmt: str) -> bytes:
    response = httpx.get(f"{server.url}/aggregates/{name}", params={"format": fmt},
                         headers={"Accept-Encoding": "identity"}, timeout=60)
    assert response.status_code == 200
    if fmt == "ndjson":  # the CLI keeps the trailer line out of the file
        return response.content[:response.content.rstrip(b"\n").rfind(b"\n") + 1]
    return response.content


def test_progress_on_a_terminal_and_rows_on_stdout(cli_server: Any, tmp_path: Path) -> None:
    out = tmp_path / "big.csv"
    line = " ".join(map(shlex.quote, command("big", "--format", "csv", "--url", cli_server.url)))
    child = spawn(f"exec {line} > {shlex.quote(str(out))}")
    child.expect(r"big: +\d+%\|.*\| ?[\d.]+k?/100k")  # a bar: the total came from X-Total-Count
    child.expect(r"exported 100000 rows, [\d.]+ MB of big at position \d+ in [\d.]+ s")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert out.read_bytes() == full_export(cli_server, "big", "csv")


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_interrupted_then_resumed_equals_a_full_export(
        cli_server: Any, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"slow.{fmt}"
    args = command("slow", "--format", fmt, "--url", cli_server.url, "--resume", str(out))
    child = spawn(" ".join(map(shlex.quote, ["exec", *args])))
    child.expect(r"slow: ([1-9][\d.]*k?) rows")  # rows are arriving
    child.kill(signal.SIGINT)
    child.expect(r"interrupted; run again to continue")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    partial = out.read_bytes()
    assert 0 < len(partial) < 0.5 * len(full := full_export(cli_server, "slow", fmt))

    child = spawn(" ".join(map(shlex.quote, ["exec", *args])))
    child.expect(r"resuming .* after (\d+) rows")
    done = int(child.match.group(1))
    assert done > 0
    child.expect(rf"exported {100_000 - done} rows")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert out.read_bytes() == full


def test_resume_drops_a_cut_last_line(cli_server: Any, tmp_path: Path) -> None:
    full = full_export(cli_server, "big", "ndjson")
    out = tmp_path / "big.ndjson"
    out.write_bytes(full[:len(full) // 3])  # cut mid-line, as a killed process leaves it
    result = subprocess.run(command("big", "--format", "ndjson", "--url", cli_server.url,
                                    "--resume", str(out)), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == full


def test_exit_codes_and_messages(cli_server: Any, tmp_path: Path) -> None:
    def run(*args: str, url: str = cli_server.url) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command(*args, "--url", url), cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    missing = run("nope")
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr and missing.stdout == ""
    bad = run("recent", "--param", "store_id=x")
    assert bad.returncode == 2 and "store_id" in bad.stderr
    assert run("recent", "--param", "oops").returncode == 2
    assert run("big", "--format", "xml").returncode == 2  # argparse refuses it
    down = run("big", url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "connection" in down.stderr
    broken = run("broken")
    assert broken.returncode == 1
    assert "the export failed after" in broken.stderr and "division by zero" in broken.stderr
    assert broken.stdout.startswith("id,x\n") and "#pgsse" not in broken.stdout
    unordered = tmp_path / "unordered.csv"
    unordered.write_text("id,label\r\n1,item 1\r\n")
    cannot = run("unordered", "--resume", str(unordered))
    assert cannot.returncode == 2 and "cannot be resumed" in cannot.stderr
