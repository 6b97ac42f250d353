"""What a verified token yields (``Principal``), where a token is read from, and ``mint``.

``exp`` is required and time claims are RFC 7519 NumericDates, whichever key signed the
token: the stream's end (``auth_expired``) depends on ``exp``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from starlette.requests import HTTPConnection

from ..errors import Forbidden, Unauthorized
from ..topics import covers

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


def bearer(conn: HTTPConnection) -> str | None:
    """The ``Authorization: Bearer`` token; None without the header, 401 for another scheme."""
    header = conn.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    raise Unauthorized("Authorization header must be 'Bearer <token>'")


def token_from(conn: HTTPConnection) -> str | None:
    header = bearer(conn)
    if header:
        return header
    cookie = conn.cookies.get("access_token")
    if cookie:
        return cookie
    query = conn.query_params.get("access_token")
    return query or None


def numeric_date(value: Any) -> bool:
    """A JSON number (not a string, not a boolean), finite, from 0 to ``MAX_EXPIRES_AT``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= MAX_EXPIRES_AT


def check_times(claims: dict[str, Any]) -> float:
    """``exp`` (returned), ``nbf`` and ``iat`` as NumericDates; expiry and not-before now.

    PyJWT takes numeric strings ("1700000000") and any integer, and raises on odd values, so
    these are checked here rather than by it."""
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
    return float(exp)


def mint(secret: Any, topics: list[str], ttl: float, extra: dict[str, Any] | None = None,
         algorithm: str = "HS256", kid: str | None = None) -> str:
    """A signed token granting ``topics`` for ``ttl`` seconds (``pgsse token``): HS256 with a
    shared secret, or ``algorithm`` with a private key (``keys.algorithm_for``)."""
    now = int(time.time())
    claims: dict[str, Any] = {"topics": topics, "iat": now, "exp": now + int(ttl)}
    claims.update(extra or {})
    return jwt.encode(claims, secret, algorithm=algorithm,
                      headers={"kid": kid} if kid is not None else None)


def load_signing_key(pem: bytes, alg: str | None) -> tuple[Any, str]:
    """A private key PEM and an optional ``--alg`` → (key, algorithm). RSA signs RS*/PS*
    (RS256 unless told); an EC key ES256 or ES384 by its curve; Ed25519 EdDSA."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        allowed = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        allowed = ["ES256"]
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        allowed = ["ES384"]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        allowed = ["EdDSA"]
    else:
        raise ValueError("not an RSA, EC P-256/P-384 or Ed25519 private key")
    if alg is not None and alg not in allowed:
        raise ValueError(f"this key signs {', '.join(allowed)}, not {alg}")
    return key, alg or allowed[0]
