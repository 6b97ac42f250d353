"""The exception tree, and its one mapping to JSON error responses.

    PgsseError                 500 internal_error (never raised for bad input)
    ├── BadRequest             400 bad_request, invalid_topic, invalid_parameter, …
    ├── Unauthorized           401 unauthorized (missing, invalid or expired token)
    ├── Forbidden              403 forbidden (token valid, topic not granted)
    ├── NotFound               404 not_found
    ├── TooManyRequests        429 too_many_requests (carries Retry-After)
    └── Unavailable            503 unavailable (database down, draining)

Every error body is ``{"error": {"code", "message", "param"?}}``.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class PgsseError(Exception):
    """Base class; an unexpected failure inside the service."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}
        self.details = details or {}

    def body(self) -> dict[str, dict[str, Any]]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        error.update(self.details)
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BadRequest(PgsseError):
    """The request's parameters, headers or body are malformed or out of range."""

    status = 400
    code = "bad_request"


class Unauthorized(PgsseError):
    """Auth is on and no valid, unexpired token was presented."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, **kwargs: object) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="pgsse"'})
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class Forbidden(PgsseError):
    """The token is valid but does not grant what was asked."""

    status = 403
    code = "forbidden"


class NotFound(PgsseError):
    """No such route or aggregate."""

    status = 404
    code = "not_found"


class TooManyRequests(PgsseError):
    """A per-client limit was exceeded; ``Retry-After`` says when to come back."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int = 1, **kwargs: object) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kwargs)  # type: ignore[arg-type]


class Unavailable(PgsseError):
    """The database is unreachable or the process is draining."""

    status = 503
    code = "unavailable"
