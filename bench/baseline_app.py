"""The baseline: what a Python user builds from the tutorials, for side-by-side numbers.

- ``GET /events``: ``broadcaster`` (Postgres backend: one LISTEN connection, an
  ``asyncio.Queue`` per subscriber) feeding an sse-starlette ``EventSourceResponse`` async
  generator per client, yielding a dict per event (the documented pattern). The bench feeds
  it with ``SELECT pg_notify('bench', …)`` or a row trigger calling ``pg_notify``.
- ``GET /aggregates/orders_by_status``: runs the query on every request and answers with
  ``Cache-Control: max-age=5`` (the approach in our users' apps today).

Run: ``DATABASE_URL=… PORT=… python -m bench.baseline_app`` (uvicorn, uvloop + httptools
when installed, exactly as pgsse's own server is configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import AsyncIterator

import asyncpg
import uvicorn
from broadcaster import Broadcast
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DATABASE_URL = os.environ["DATABASE_URL"]
CHANNEL = os.environ.get("BASELINE_CHANNEL", "bench")
PING = float(os.environ.get("BASELINE_PING", "15"))

ORDERS_BY_STATUS_SQL = """
SELECT status, count(*)::int AS orders, sum(total)::float8 AS revenue
FROM demo.orders WHERE ($1::int IS NULL OR store_id = $1::int)
GROUP BY status ORDER BY status
"""

broadcast = Broadcast(DATABASE_URL)
pool: asyncpg.Pool | None = None


async def events(request: Request) -> Response:
    async def stream() -> AsyncIterator[dict[str, str]]:
        async with broadcast.subscribe(channel=CHANNEL) as subscriber:
            async for event in subscriber:  # type: ignore[union-attr]
                if event is None:
                    break
                yield {"event": "message", "data": event.message}

    return EventSourceResponse(stream(), ping=PING)


async def orders_by_status(request: Request) -> Response:
    raw = request.query_params.get("store_id")
    store_id = int(raw) if raw else None
    assert pool is not None
    rows = await pool.fetch(ORDERS_BY_STATUS_SQL, store_id)
    return JSONResponse({"data": [dict(row) for row in rows]},
                        headers={"Cache-Control": "max-age=5"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _anchor(ready: asyncio.Event) -> None:
    # broadcaster 0.3.1 races when many clients subscribe to a channel nobody holds yet:
    # each awaits LISTEN on the one connection (asyncpg: "another operation is in
    # progress") and its cleanup then raises KeyError. One subscription held for the
    # process's life (drained here) keeps the channel registered; it costs one more queue
    # put per event.
    async with broadcast.subscribe(channel=CHANNEL) as subscriber:
        ready.set()
        async for _ in subscriber:  # type: ignore[union-attr]
            pass


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global pool
    await broadcast.connect()
    ready = asyncio.Event()
    anchor = asyncio.create_task(_anchor(ready))
    await ready.wait()
    pool = await asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=10)
    try:
        yield
    finally:
        anchor.cancel()
        await pool.close()
        await broadcast.disconnect()


app = Starlette(routes=[
    Route("/events", events),
    Route("/aggregates/orders_by_status", orders_by_status),
    Route("/healthz", healthz),
], lifespan=lifespan)


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ["PORT"]),
                log_level=os.environ.get("LOG_LEVEL", "warning"), backlog=4096,
                access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
