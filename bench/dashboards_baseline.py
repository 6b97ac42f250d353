"""The polling dashboards' backend: the demo's five aggregates, each request running its SQL.

What the seed teams' apps did before pgsse: a JSON route per dashboard number that runs the
query on every request (no ETag, no cache). It runs pgsse's own aggregate files (the same
statements, wrapped the same way, as ``pgsse_reader``) so that the only difference from pgsse
is what triggers a query. ``meta.position`` is read in the query's snapshot (repeatable read),
so the dashboards' staleness is measured the same way on both sides.

Run: ``DATABASE_URL=… PORT=… python -m bench.dashboards_baseline``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import uvicorn
from pgsse import catalog
from pgsse.settings import Settings
from pgsse.sqlfiles import coerce
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DATABASE_URL = os.environ["DATABASE_URL"]
state: dict[str, Any] = {}


async def aggregate(request: Request) -> Response:
    item: catalog.Aggregate | None = state["items"].get(request.path_params["name"])
    if item is None:
        return JSONResponse({"error": "no such aggregate"}, status_code=404)
    spec = item.spec
    args: list[Any] = []
    for name in spec.order:
        param = spec.param(name)
        assert param is not None
        raw = request.query_params.get(name)
        args.append(coerce(param.type, raw) if raw is not None else param.default)
    args.append([])
    if spec.paged:
        args += [50, 0]
    pool: asyncpg.Pool = state["pool"]
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        position = await conn.fetchval("SELECT coalesce(max(position), 0) FROM realtime.events")
        await conn.execute("SET LOCAL ROLE pgsse_reader")
        row = await conn.fetchrow(item.query, *args)
    data = (row[0] if row else None) or "[]"
    body = f'{{"data":{data},"meta":{{"position":{position}}}}}'
    return Response(body, media_type="application/json",
                    headers={"Cache-Control": "no-cache"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings = Settings(demo=True)
    state["items"] = {spec.name: catalog.Aggregate(spec) for spec in catalog.load_files(settings)}
    state["pool"] = await asyncpg.create_pool(DATABASE_URL, min_size=2, max_size=10)
    try:
        yield
    finally:
        await state["pool"].close()


app = Starlette(routes=[Route("/aggregates/{name}", aggregate), Route("/healthz", healthz)],
                lifespan=lifespan)


def main() -> None:
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning",
                loop="auto", http="auto")


if __name__ == "__main__":
    main()
