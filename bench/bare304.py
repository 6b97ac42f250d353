"""The yardstick for the aggregate 304 path: a bare Starlette route answering 304 with the
same headers, on the same uvicorn (httptools, uvloop, our protocol class) as pgsse.

``python -m bench.bare304`` (``PORT``, ``HOST``). The ratio pgsse ÷ this is what ``make
bench`` reports: everything pgsse adds (request id, CORS, limits, auth, ETag checks,
metrics) on top of the server's own floor.
"""

from __future__ import annotations

import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ETAG = 'W/"bare"'
HEADERS = {"ETag": ETAG, "Cache-Control": "public, max-age=5, stale-while-revalidate=30",
           "Vary": "Accept-Encoding"}


async def not_modified(request: Request) -> Response:
    return Response(status_code=304, headers=HEADERS)


def main() -> None:
    from pgsse import protocol

    app = Starlette(routes=[Route("/aggregates/{name}", not_modified),
                            Route("/healthz", lambda r: Response("ok"))])
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"),
                port=int(os.environ.get("PORT", "8001")), log_config=None, access_log=False,
                server_header=False, backlog=4096, **protocol.uvicorn_kwargs(10.0))


if __name__ == "__main__":
    main()
