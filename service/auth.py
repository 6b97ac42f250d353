"""JWT auth (HS256): who is calling, and which topics their token grants.

A token comes from ``Authorization: Bearer``, the ``access_token`` cookie or the
``access_token`` query parameter. ``exp`` is required, ``nbf`` honoured, ``aud``/``iss``
checked when configured. Claim ``topics`` (a JSON array) grants each listed topic and
everything below it; ``*`` grants all; no claim grants nothing. ``AUTH_SECRET`` is a
comma-separated key list: the first signs, every one verifies (key rotation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from starlette.requests import HTTPConnection

from .errors import Forbidden, Unauthorized
from .settings import Settings
from .topics import covers

MAX_TOKEN_BYTES = 8192
# Far enough to mean "never" (year 5138), small enough to be a float.
MAX_EXPIRES_AT = 10**11


@dataclass(frozen=True)
class Principal:
    grants: tuple[str, ...]
    claims: dict[str, Any] = field(default_factory=dict)
    expires_at: float | None = None
    subject: str | None = None

    def allows(self, topic: str) -> bool:
        return any(covers(grant, topic) for grant in self.grants)

    def require(self, topics: list[str] | tuple[str, ...]) -> None:
        denied = [topic for topic in topics if not self.allows(topic)]
        if denied:
            # Every denied topic is named, so a client sharing one connection among several
            # subscriptions can tell exactly which ones to report.
            raise Forbidden(f"token does not grant topic {denied[0]!r}", param="topic",
                            details={"topics": denied})


ANONYMOUS = Principal(grants=("*",))


def token_from(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    cookie = conn.cookies.get("access_token")
    if cookie:
        return cookie
    query = conn.query_params.get("access_token")
    return query or None


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = settings.auth_secret

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, conn: HTTPConnection) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        token = token_from(conn)
        if token is None:
            raise Unauthorized("a token is required")
        return self.verify(token)

    def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized("token too large")
        # Time claims are checked here, not by PyJWT (which takes numeric strings and raises
        # on odd values): RFC 7519 NumericDates only, then expiry and not-before.
        options = {"require": ["exp"], "verify_aud": self.settings.auth_audience is not None,
                   "verify_exp": False, "verify_nbf": False, "verify_iat": False}
        last_error: Exception | None = None
        for key in self.keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=["HS256"], options=options,  # type: ignore[arg-type]
                    audience=self.settings.auth_audience, issuer=self.settings.auth_issuer,
                    leeway=0,
                )
                break
            except jwt.InvalidSignatureError as exc:
                last_error = exc
                continue
            except jwt.ExpiredSignatureError as exc:
                raise Unauthorized("token expired", code="token_expired") from exc
            except jwt.PyJWTError as exc:
                raise Unauthorized(f"invalid token: {exc}", code="invalid_token") from exc
            except (ValueError, TypeError, OverflowError) as exc:
                # PyJWT converts time claims with int(): an infinite or odd value raises
                # here. No token content may cause a 5xx.
                raise Unauthorized("invalid token: malformed time claim",
                                   code="invalid_token") from exc
        else:
            raise Unauthorized("invalid token: bad signature", code="invalid_token") from last_error
        topics = claims.get("topics", [])
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise Unauthorized("invalid token: claim 'topics' must be an array of strings",
                               code="invalid_token")
        # PyJWT also takes numeric strings ("1700000000") and any integer: the stream's end
        # depends on ``exp``, so time claims must be RFC 7519 NumericDates, in range.
        for name in ("exp", "nbf", "iat"):
            if name in claims and not numeric_date(claims[name]):
                raise Unauthorized(f"invalid token: claim {name!r} must be a number of seconds "
                                   f"from 0 to {MAX_EXPIRES_AT}", code="invalid_token")
        exp = claims["exp"]
        now = time.time()
        if exp <= now:
            raise Unauthorized("token expired", code="token_expired")
        if "nbf" in claims and claims["nbf"] > now:
            raise Unauthorized("invalid token: not valid yet (nbf)", code="invalid_token")
        sub = claims.get("sub")
        return Principal(grants=tuple(topics), claims=claims,
                         expires_at=float(exp),
                         subject=str(sub) if sub is not None else None)


def numeric_date(value: Any) -> bool:
    """A JSON number (not a string, not a boolean), finite, from 0 to ``MAX_EXPIRES_AT``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= MAX_EXPIRES_AT


def mint(secret: str, topics: list[str], ttl: float, extra: dict[str, Any] | None = None) -> str:
    """A signed token granting ``topics`` for ``ttl`` seconds (``pgsse token``)."""
    now = int(time.time())
    claims: dict[str, Any] = {"topics": topics, "iat": now, "exp": now + int(ttl)}
    claims.update(extra or {})
    return jwt.encode(claims, secret, algorithm="HS256")
