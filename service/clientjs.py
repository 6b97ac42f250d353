"""The browser client's ES modules, served as they are in ``clients/js/src``.

``GET /client/<file>`` answers each ``.js`` / ``.d.ts`` file of the npm package ``pgsse``;
``GET /client.js`` is a one-line module re-exporting ``./client/index.js`` (so the
relative imports inside resolve under ``/client/``). Both carry a weak ETag of the bytes
(304 on ``If-None-Match``), ``Cache-Control: no-cache`` (the URLs are not versioned) and
``Access-Control-Allow-Origin: *`` so a page on any origin can ``import`` them.

One source of truth: a checkout serves ``clients/js/src`` itself; an installed wheel
carries the same files as the package data ``pgsse.client`` (see pyproject.toml).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .caching import if_none_match, weak_etag
from .errors import NotFound

CHECKOUT_SOURCE = Path(__file__).resolve().parent.parent / "clients" / "js" / "src"
ENTRY = b'export * from "./client/index.js";\n'
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".d.ts": "application/typescript; charset=utf-8"}


def source() -> Traversable:
    """Where the client's files are: the checkout's ``clients/js/src``, else the wheel's data."""
    if CHECKOUT_SOURCE.is_dir():
        return CHECKOUT_SOURCE
    return resources.files("pgsse").joinpath("client")


def media_type(name: str) -> str | None:
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    for suffix in (".d.ts", ".js"):
        if name.endswith(suffix):
            return MEDIA_TYPES[suffix]
    return None


class ClientFiles:
    """The files, read once and kept with their ETags (re-read when a checkout's file changes)."""

    def __init__(self, root: Traversable | None = None) -> None:
        self.root = root
        self._cache: dict[str, tuple[float, bytes, str]] = {}

    def get(self, name: str) -> tuple[bytes, str] | None:
        if media_type(name) is None:
            return None
        root = self.root or source()
        file = root.joinpath(name)
        if not file.is_file():
            return None
        stamp = file.stat().st_mtime if isinstance(file, Path) else 0.0
        cached = self._cache.get(name)
        if cached is None or cached[0] != stamp:
            body = file.read_bytes()
            cached = (stamp, body, weak_etag("client", name, body))
            self._cache[name] = cached
        return cached[1], cached[2]


def _respond(request: Request, body: bytes, etag: str, content_type: str,
             extra: dict[str, str] | None = None) -> Response:
    headers = {"ETag": etag, "Cache-Control": "no-cache", "Access-Control-Allow-Origin": "*",
               **(extra or {})}
    if if_none_match(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, headers=headers, media_type=content_type)


def routes(files: ClientFiles | None = None) -> list[Route]:
    store = files or ClientFiles()
    entry_etag = weak_etag("client.js", ENTRY)

    async def entry(request: Request) -> Response:
        return _respond(request, ENTRY, entry_etag, MEDIA_TYPES[".js"],
                        {"X-TypeScript-Types": "./client/index.d.ts"})

    async def client_file(request: Request) -> Response:
        name = request.path_params["name"]
        found = store.get(name)
        if found is None:
            raise NotFound("no such client file")
        body, etag = found
        media = media_type(name)
        assert media is not None
        return _respond(request, body, etag, media)

    return [
        Route("/client.js", entry, methods=["GET", "HEAD"]),
        Route("/client/{name}", client_file, methods=["GET", "HEAD"]),
    ]
