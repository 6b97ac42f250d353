"""Test support: a real pgsse process on 127.0.0.1 and a small SSE client with timeouts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m pgsse serve`` in a subprocess, with its logs in a file."""

    def __init__(self, database_url: str, env: dict[str, str] | None = None,
                 log_dir: Path | None = None, port: int | None = None) -> None:
        self.database_url = database_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}
        self.log_path = (log_dir or Path("/tmp")) / f"pgsse-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSSE_", "AUTH_"))}
        env.update({
            "DATABASE_URL": self.database_url, "HOST": "127.0.0.1", "PORT": str(self.port),
            "LOG_FORMAT": "json", "LOG_LEVEL": "info", "HEARTBEAT_SECONDS": "15",
            "SHUTDOWN_GRACE_SECONDS": "5",
        })
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgsse", "serve"], cwd=ROOT, env=env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgsse exited {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"pgsse not ready in {timeout}s:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            if self.proc.returncode not in (0, -signal.SIGTERM):
                raise RuntimeError(f"pgsse died with {self.proc.returncode}:\n{self.logs()[-2000:]}")
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self._log.close()
        return code


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: str
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SseStream:
    """Collected frames of one SSE response, parsed as a browser's EventSource would."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[SseEvent] = field(default_factory=list)
    comments: int = 0
    retries: list[int] = field(default_factory=list)
    ended: bool = False
    last_id: str | None = None
    error: str | None = None


def parse_frames(buffer: str, stream: SseStream) -> str:
    """Consume complete frames from ``buffer``; return the unconsumed tail."""
    while "\n\n" in buffer:
        frame, buffer = buffer.split("\n\n", 1)
        fields: dict[str, str] = {}
        data_lines: list[str] = []
        for line in frame.split("\n"):
            if line.startswith(":"):
                stream.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data_lines.append(value)
            elif name == "retry" and value.isdigit():
                stream.retries.append(int(value))
            elif name in ("id", "event"):
                fields[name] = value
        if data_lines:
            event = SseEvent(fields.get("id"), fields.get("event", "message"), "\n".join(data_lines))
            if event.id is not None:
                stream.last_id = event.id
            stream.events.append(event)
    return buffer


async def read_sse(
    url: str, *, params: Any = None, headers: dict[str, str] | None = None,
    until: Any = None, timeout: float = 10.0, max_events: int | None = None,
    opened: asyncio.Event | None = None,
) -> SseStream:
    """Read one SSE response until ``until(stream)`` is true, it ends, or ``timeout``.

    ``opened`` is set when the stream's opening ``retry:`` arrives: the server sends it just
    after subscribing the stream to the hub, so every event committed after that is
    delivered (see ``open_stream``)."""
    stream = SseStream()
    buffer = ""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, read=timeout)) as client:
        try:
            async with asyncio.timeout(timeout):
                async with client.stream("GET", url, params=params, headers=headers) as response:
                    stream.status = response.status_code
                    stream.headers = dict(response.headers)
                    if response.status_code != 200:
                        await response.aread()
                        stream.events.append(SseEvent(None, "http_error", response.text))
                        stream.ended = True
                        return stream
                    async for chunk in response.aiter_text():
                        buffer = parse_frames(buffer + chunk, stream)
                        if opened is not None and stream.retries:
                            opened.set()
                        if until is not None and until(stream):
                            return stream
                        if max_events is not None and len(stream.events) >= max_events:
                            return stream
                    stream.ended = True
        except TimeoutError:
            pass
        except httpx.HTTPError as exc:
            stream.error = repr(exc)
            stream.ended = True
    return stream


async def read_sse_resuming(
    url: str, *, params: Any = None, until: Any = None, timeout: float = 30.0,
    last_id: str | None = None, opened: asyncio.Event | None = None,
) -> tuple[SseStream, int]:
    """Like a browser's EventSource: reconnect with ``Last-Event-ID`` whenever the stream
    ends, until ``until(total)`` holds or ``timeout``. Returns all events and the reconnects.
    ``opened`` is set when the first connection's ``retry:`` arrives (see ``read_sse``)."""
    total = SseStream()
    reconnects = -1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reconnects += 1
        headers = {"Last-Event-ID": last_id} if last_id is not None else None

        def done(part: SseStream) -> bool:
            merged = SseStream(events=total.events + part.events)
            return until is not None and until(merged)

        part = await read_sse(url, params=params, headers=headers, until=done,
                              timeout=max(0.1, deadline - time.monotonic()), opened=opened)
        total.status = part.status
        total.headers = part.headers
        total.events.extend(part.events)
        total.retries.extend(part.retries)
        total.comments += part.comments
        if part.last_id is not None:
            last_id = part.last_id
        total.last_id = last_id
        if part.error is not None:
            total.error = part.error  # a network error: a browser retries, and so do we
        if part.status not in (0, 200) or (until is not None and until(total)):
            break
        await asyncio.sleep(0.05)
    return total, reconnects


async def open_stream(url: str, *, resuming: bool = False, open_timeout: float = 10.0,
                      **kwargs: Any) -> asyncio.Task[Any]:
    """Start reading an SSE stream in a task; return the task once the stream is open.

    "Open" is the stream's opening ``retry:``: the server subscribes the stream to the hub
    before sending it, so an event committed after this returns is delivered. The task
    returns what ``read_sse`` (or, with ``resuming``, ``read_sse_resuming``) returns."""
    opened = asyncio.Event()
    reader = read_sse_resuming if resuming else read_sse
    task: asyncio.Task[Any] = asyncio.create_task(reader(url, opened=opened, **kwargs))
    waiter = asyncio.create_task(opened.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=open_timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not opened.is_set():
        if task.done():
            raise AssertionError(f"the stream ended before it opened: {task.result()!r}")
        task.cancel()
        raise AssertionError(f"the stream did not open within {open_timeout}s")
    return task


async def eventually(predicate: Any, timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Poll ``predicate()`` (sync or async) until it returns a truthy value; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


def stats(server: ServerProcess, headers: dict[str, str] | None = None) -> Any:
    """The server's ``/stats`` JSON."""
    return httpx.get(server.url + "/stats", headers=headers, timeout=5).json()


def metric(server: ServerProcess, sample: str) -> float:
    """The value of one ``/metrics`` sample, e.g. ``pgsse_feed_up`` or
    ``pgsse_replays_total{source="memory"}`` (0 when absent); with ``WORKERS=N``, the sum
    over the ``worker`` label."""
    total = 0.0
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        name, _, value = line.rpartition(" ")
        name = re.sub(r',?worker="\d+"', "", name).replace("{,", "{").replace("{}", "")
        if name == sample:
            total += float(value)
    return total


def log_records(server: ServerProcess) -> list[dict[str, Any]]:
    """The server's JSON log lines, parsed (a line still being written is left out)."""
    text = server.logs()
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]
