"""``GET /openapi.json``: the HTTP surface, described for clients and fuzzers."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import __version__

ERROR = {"$ref": "#/components/schemas/Error"}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def spec(aggregates: Any = None, allows: Any = None) -> dict[str, Any]:
    errors = {str(code): _json(text, ERROR) for code, text in
              ((400, "Bad request"), (401, "Missing or invalid token"), (403, "Not granted"))}
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json("Serving")}}},
        "/readyz": {"get": {"summary": "Readiness (database, change feed, draining)",
                            "responses": {"200": _json("Ready"), "503": _json("Not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Exposition text",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/stats": {"get": {"summary": "Clients, topics, position, lag, cache",
                           "responses": {"200": _json("Stats"), **errors}}},
        "/events": {"get": {
            "summary": "Server-Sent Events stream of the given topics",
            "parameters": [
                {"name": "topic", "in": "query", "required": True, "style": "form", "explode": True,
                 "schema": {"type": "array", "minItems": 1, "maxItems": 32,
                            "items": {"type": "string", "maxLength": 256,
                                      "pattern": "^[A-Za-z0-9_.:@%-]+(/[A-Za-z0-9_.:@%-]+)*$"}}},
                {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                {"name": "lastEventId", "in": "query", "schema": {"type": "string"}},
                {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                {"name": "access_token", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {"200": {"description": "text/event-stream",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          "429": _json("Too many streams for this client", ERROR), **errors},
        }},
    }
    if aggregates is not None:
        paths.update(aggregates.openapi_paths(errors, allows))
    return {
        "openapi": "3.0.3",
        "info": {"title": "pgsse", "version": __version__,
                 "description": "PostgreSQL changes over Server-Sent Events, and cached aggregates."},
        "paths": paths,
        "components": {"schemas": {"Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                                     "properties": {"code": {"type": "string"},
                                                    "message": {"type": "string"},
                                                    "param": {"type": "string"}}}}}}},
    }


class OpenApi:
    """``/openapi.json``. With auth on it needs a token, and lists only the aggregates the
    token grants (their names and parameters are the caller's business only)."""

    def __init__(self, aggregates: Any, auth: Any) -> None:
        self.aggregates = aggregates
        self.auth = auth

    async def endpoint(self, request: Request) -> Response:
        principal = await self.auth.identify(request)
        document = spec(self.aggregates, principal.allows)
        root = request.scope.get("root_path", "")
        if root:  # mounted under a prefix (pgsse.App): the paths are relative to it
            document["servers"] = [{"url": root}]
        return JSONResponse(document)
