"""The load client: raw asyncio protocols (uvloop when available), no HTTP library.

``StreamPool`` holds N SSE connections to one server. Each sends a minimal
``GET /events?topic=…`` and scans what it receives for ``"seq": <n>`` (the sequence number
the bench puts in every event's data, for pgsse and the baseline alike), recording the
receipt time of each sequence number once per connection. ``HttpLoad`` drives keep-alive
request/response loops for the aggregate scenario, closed-loop or paced.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

SEQ_RE = re.compile(rb'"seq": ?(\d+)[,}]')


class Tracker:
    """Receipt times per sequence number, and a future per number that completes at ``target``."""

    def __init__(self) -> None:
        self.times: dict[int, list[float]] = {}
        self.target: dict[int, int] = {}
        self.done: dict[int, asyncio.Future[None]] = {}

    def expect(self, seq: int, target: int) -> asyncio.Future[None]:
        self.times[seq] = []
        self.target[seq] = target
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done[seq] = fut
        return fut

    def record(self, seq: int, t: float) -> None:
        times = self.times.get(seq)
        if times is None:
            return
        times.append(t)
        if len(times) >= self.target[seq]:
            fut = self.done[seq]
            if not fut.done():
                fut.set_result(None)

    def forget(self, seqs: list[int] | None = None) -> None:
        for seq in list(self.times) if seqs is None else seqs:
            self.times.pop(seq, None)
            self.target.pop(seq, None)
            fut = self.done.pop(seq, None)
            if fut is not None and not fut.done():
                fut.cancel()


class StreamConn(asyncio.Protocol):
    __slots__ = ("pool", "transport", "head", "ready", "status", "tail", "last", "closed",
                 "bytes")

    def __init__(self, pool: StreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.ready = False
        self.status = 0
        self.tail = b""
        self.last = 0
        self.closed = False
        self.bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.pool.request)

    def data_received(self, data: bytes) -> None:
        t = time.time()
        self.bytes += len(data)
        if not self.ready:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head[9:12]) if self.head[:5] == b"HTTP/" else 0
            data = self.head[end + 4:]
            self.head = b""
            self.ready = True
            self.pool.on_ready(self)
        buf = self.tail + data if self.tail else data
        if b'"seq"' in buf:
            record = self.pool.tracker.record
            for match in SEQ_RE.finditer(buf):
                seq = int(match.group(1))
                if seq > self.last:
                    self.last = seq
                    record(seq, t)
        self.tail = buf[-40:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.on_lost(self)


class StreamPool:
    """N SSE connections to 127.0.0.1:port, opened in ramps."""

    def __init__(self, port: int, path: str, tracker: Tracker | None = None) -> None:
        self.port = port
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        "Accept: text/event-stream\r\n\r\n").encode()
        self.tracker = tracker or Tracker()
        self.conns: list[StreamConn] = []
        self.ready = 0
        self.not_200 = 0
        self.lost = 0
        self.lost_after_ready = 0
        self.connect_errors = 0
        self._ready_event = asyncio.Event()
        self._want_ready = 0

    def on_ready(self, conn: StreamConn) -> None:
        if conn.status != 200:
            self.not_200 += 1
        self.ready += 1
        if self.ready >= self._want_ready:
            self._ready_event.set()

    def on_lost(self, conn: StreamConn) -> None:
        self.lost += 1
        if conn.ready:
            self.lost_after_ready += 1
        else:
            self._want_ready -= 1
            if self.ready >= self._want_ready:
                self._ready_event.set()

    @property
    def alive(self) -> int:
        return sum(1 for c in self.conns if c.ready and not c.closed and c.status == 200)

    async def ramp(self, total: int, step: int = 500, step_timeout: float = 20.0,
                   deadline: float | None = None) -> dict[str, float]:
        """Open connections until ``total`` are open, ``step`` at a time, each step
        waiting for every response head before the next (the listen backlog is 4096)."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for _ in range(100_000):  # bounded; exits when total is reached
            have = len(self.conns)
            if have >= total or (deadline is not None and time.monotonic() > deadline):
                break
            n = min(step, total - have)
            self._want_ready = self.ready + n
            self._ready_event.clear()
            results = await asyncio.gather(
                *(loop.create_connection(lambda: StreamConn(self), "127.0.0.1", self.port)
                  for _ in range(n)), return_exceptions=True)
            ok = 0
            for result in results:
                if isinstance(result, BaseException):
                    self.connect_errors += 1
                else:
                    self.conns.append(result[1])
                    ok += 1
            pending = sum(1 for c in self.conns[len(self.conns) - ok:]
                          if not c.ready and not c.closed)
            self._want_ready = self.ready + pending
            if pending == 0:
                self._ready_event.set()
            try:
                await asyncio.wait_for(self._ready_event.wait(), timeout=step_timeout)
            except TimeoutError:
                pass
            if ok == 0:
                break
        elapsed = time.monotonic() - started
        return {"opened": len(self.conns), "ready": self.alive, "seconds": round(elapsed, 2),
                "connect_errors": self.connect_errors, "not_200": self.not_200}

    async def trim(self, keep: int) -> None:
        """Close connections until ``keep`` remain."""
        drop, self.conns = self.conns[keep:], self.conns[:keep]
        for conn in drop:
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)

    async def close(self) -> None:
        await self.trim(0)


# --- plain HTTP request/response -------------------------------------------------------


class HttpResult:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.split(b"\r\n")
    status = int(lines[0][9:12])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
    return status, headers


async def http_request(port: int, path: str, headers: dict[str, str] | None = None,
                       timeout: float = 5.0) -> HttpResult:
    """One request on a fresh connection (Connection: close), for control calls."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
                         "Connection: close\r\n\r\n".encode())
            data = await reader.read(-1)
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status, hdrs = _parse_head(head)
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        rest = body
        for _ in range(100_000):
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2:]
        body = bytes(out)
    return HttpResult(status, hdrs, body)


class HttpConn(asyncio.Protocol):
    """Keep-alive request loop on one connection; ``load`` decides what and when to send."""

    __slots__ = ("load", "transport", "buf", "need", "head_end", "status", "etag", "sent_at",
                 "chunked", "finished")

    def __init__(self, load: HttpLoad) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1
        self.head_end = -1
        self.status = 0
        self.etag: str | None = None
        self.sent_at = 0.0
        self.chunked = False
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.load.next(self)

    def send(self) -> None:
        assert self.transport is not None
        self.buf.clear()
        self.need = -1
        self.head_end = -1
        self.sent_at = time.perf_counter()
        self.transport.write(self.load.request_for(self))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            self.chunked = b"\r\ntransfer-encoding: chunked" in head
            if not self.chunked:
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    self.need = self.head_end + int(head[i + 17:j if j > 0 else None])
                else:
                    self.need = self.head_end
            if self.load.track_etag:
                i = head.find(b"\r\netag:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    raw = bytes(buf[i + 7:(j if j > 0 else end)]).strip().decode()
                    self.etag = raw  # ETags are case-sensitive: take them from the original
        if self.chunked:
            if not buf.endswith(b"0\r\n\r\n"):
                return
        elif len(buf) < self.need:
            return
        self.load.completed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self)


class HttpLoad:
    """``concurrency`` keep-alive connections sending ``path`` until ``count`` requests or
    ``seconds`` pass; closed-loop (as fast as answers come) or paced at ``rate`` req/s."""

    def __init__(self, port: int, path: str, *, concurrency: int, count: int, seconds: float,
                 conditional: bool = False, rate: float | None = None,
                 fixed_etag: str | None = None, vary: str | None = None,
                 on_response: Callable[[int], None] | None = None) -> None:
        self.port = port
        self.path = path
        self.concurrency = concurrency
        self.count = count
        self.seconds = seconds
        self.conditional = conditional
        self.rate = rate
        self.fixed_etag = fixed_etag
        self.track_etag = conditional and fixed_etag is None
        self.on_response = on_response
        # ``vary="store_id"``: every request asks for a new value (a distinct cache key)
        self.vary = vary
        self._vary_sep = "&" if "?" in path else "?"
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.latencies: list[float] = []
        self.errors = 0
        self._base = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        self._plain = (self._base + "\r\n").encode()
        self._done: asyncio.Future[None] | None = None
        self._active = 0
        self._start = 0.0
        self._stop_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def request_for(self, conn: HttpConn) -> bytes:
        if self.vary is not None:
            return (f"GET {self.path}{self._vary_sep}{self.vary}={self.sent + 1000}"
                    f" HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n").encode()
        etag = self.fixed_etag if self.fixed_etag is not None else conn.etag
        if self.conditional and etag:
            return (self._base + f"If-None-Match: {etag}\r\n\r\n").encode()
        return self._plain

    def next(self, conn: HttpConn) -> None:
        now = time.perf_counter()
        if self.sent >= self.count or now >= self._stop_at:
            self._finish(conn)
            return
        if self.rate is None:
            self.sent += 1
            conn.send()
            return
        slot = self._start + self.sent / self.rate
        self.sent += 1
        assert self._loop is not None
        if slot <= now:
            conn.send()
        else:
            self._loop.call_later(slot - now, conn.send)

    def completed(self, conn: HttpConn) -> None:
        self.statuses[conn.status] = self.statuses.get(conn.status, 0) + 1
        self.latencies.append(time.perf_counter() - conn.sent_at)
        if self.on_response is not None:
            self.on_response(conn.status)
        self.next(conn)

    def lost(self, conn: HttpConn) -> None:
        if not conn.finished:
            self.errors += 1
        self._finish(conn, closed=True)

    def _finish(self, conn: HttpConn, closed: bool = False) -> None:
        if conn.finished:
            return
        conn.finished = True
        if not closed and conn.transport is not None:
            conn.transport.close()
        self._active -= 1
        if self._active <= 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def run(self) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        self._start = time.perf_counter()
        self._stop_at = self._start + self.seconds
        self._active = self.concurrency
        for _ in range(self.concurrency):
            try:
                await loop.create_connection(lambda: HttpConn(self), "127.0.0.1",
                                             self.port)
            except OSError:
                self.errors += 1
                self._active -= 1
        try:
            await asyncio.wait_for(self._done, timeout=self.seconds + 10)
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - self._start
        done = sum(self.statuses.values())
        lat = sorted(self.latencies)
        return {
            "requests": done,
            "seconds": round(elapsed, 3),
            "rps": round(done / elapsed, 1) if elapsed > 0 else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 3) if lat else None,
            "latency_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3)
            if lat else None,
        }


def install_uvloop() -> str:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop " + uvloop.__version__
    except ImportError:
        return "asyncio"
