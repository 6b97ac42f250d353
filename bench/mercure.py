"""Mercure on pgsse: the same engine, the same cost?

One pgsse with ``MERCURE=1``, side by side in one run:

1. fan-out: N ``/events?topic=bench`` streams receive events published with
   ``realtime.publish``; then N Mercure subscribers (``/.well-known/mercure?topic=bench``,
   anonymous) receive updates published with ``POST /.well-known/mercure``, the same JSON as
   data. Server CPU per delivery (utime+stime of the server over the round / deliveries) and
   latency, as in the streams scenario; the ratio Mercure ÷ ``/events`` (target ≤ 1.2).
2. publish throughput: committed updates per second, ``POST /.well-known/mercure`` over
   keep-alive connections vs ``SELECT realtime.publish(…)`` from SQL, same concurrency.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any
from urllib.parse import urlencode

import asyncpg
import jwt

from . import infra
from .loadclient import StreamPool, Tracker
from .scenarios import PAD, Publisher, confirm, fanout_round

KEY = "bench-mercure-key-0123456789abcdef"
TOKEN = jwt.encode({"mercure": {"publish": ["*"]}}, KEY)


class MercurePublisher(Publisher):
    """``POST /.well-known/mercure`` on one keep-alive connection, data = the bench JSON."""

    def __init__(self, port: int) -> None:
        super().__init__(str(port), "mercure")
        self.port = port
        self.stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def open(self) -> None:
        self.stream = await asyncio.open_connection("127.0.0.1", self.port)

    async def close(self) -> None:
        if self.stream is not None:
            self.stream[1].close()

    async def post(self, data: str) -> None:
        assert self.stream is not None
        reader, writer = self.stream
        body = urlencode({"topic": "bench", "data": data}).encode()
        writer.write(b"POST /.well-known/mercure HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer %s\r\nContent-Type: application/x-www-form-urlencoded"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (TOKEN.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        if head[9:12] != b"200":
            raise RuntimeError(f"publish answered {head[:60]!r}")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if length:
            await reader.readexactly(int(length.group(1)))

    async def publish(self, seq: int) -> float:
        t = time.time()
        await self.post(json.dumps({"ts": t, "pad": PAD, "seq": seq}))
        return t


async def fanout(port: int, server: infra.Server, url: str, clients: int, events: int,
                 kind: str, log: Any) -> dict[str, Any]:
    path = "/events?topic=bench" if kind == "events" else "/.well-known/mercure?topic=bench"
    pool = StreamPool(port, path, Tracker())
    pub: Publisher = Publisher(url, "pgsse") if kind == "events" else MercurePublisher(port)
    await pub.open()
    try:
        ramp = await pool.ramp(clients, step=500, deadline=time.monotonic() + 60)
        await infra.settle(server.pid, limit=10)
        got = await confirm(pool, pub, timeout=30)
        res = await fanout_round(pool, pub, server, events, timeout=30.0)
        res.update(ramp=ramp, confirmed_subscribed=got)
        log(f"  mercure bench: {kind} fan-out to {res['clients']}: "
            f"{res['cpu_per_delivery_us']} µs/delivery, p50 {res['latency']['p50_ms']} ms")
        return res
    finally:
        await pool.close()
        await pub.close()


async def publish_rate(port: int, url: str, seconds: float, concurrency: int = 8
                       ) -> dict[str, Any]:
    async def http_worker(stop: float) -> int:
        pub = MercurePublisher(port)
        await pub.open()
        n = 0
        try:
            while time.monotonic() < stop:
                await pub.post(json.dumps({"n": n, "pad": PAD}))
                n += 1
        finally:
            await pub.close()
        return n

    async def sql_worker(stop: float) -> int:
        conn = await asyncpg.connect(url, timeout=10)
        n = 0
        try:
            while time.monotonic() < stop:
                await conn.execute("SELECT realtime.publish('bench2', 'bench', $1::jsonb)",
                                   json.dumps({"n": n, "pad": PAD}))
                n += 1
        finally:
            await conn.close()
        return n

    out: dict[str, Any] = {"concurrency": concurrency, "seconds": seconds}
    for name, worker in (("mercure_post", http_worker), ("sql_publish", sql_worker)):
        stop = time.monotonic() + seconds
        counts = await asyncio.gather(*(worker(stop) for _ in range(concurrency)))
        out[f"{name}_per_s"] = round(sum(counts) / seconds, 1)
    return out


async def suite(url: str, quick: bool, log: Any) -> dict[str, Any]:
    clients = 1000 if quick else 3000
    events = 8 if quick else 20
    port = infra.free_port()
    server = infra.pgsse_server("pgsse-mercure", url, port, MERCURE="1", MERCURE_ANONYMOUS="1",
                                MERCURE_PUBLISHER_JWT_KEY=KEY).start()
    out: dict[str, Any] = {"clients": clients, "events": events}
    try:
        await server.wait_ready()
        for kind in ("events", "mercure"):
            out[kind] = await fanout(port, server, url, clients, events, kind, log)
        a, b = out["events"]["cpu_per_delivery_us"], out["mercure"]["cpu_per_delivery_us"]
        out["cpu_ratio_mercure_vs_events"] = round(b / a, 2) if a and b else None
        out["publish"] = await publish_rate(port, url, 3.0 if quick else 10.0)
        log(f"  mercure bench: CPU ratio {out['cpu_ratio_mercure_vs_events']}, publish "
            f"{out['publish']}")
    finally:
        server.stop()
    return out
