"""Mercure JWTs: Mercure's rules, not pgsse's (``exp`` optional, ``aud``/``iss`` checked only
when configured, ``typ: at+jwt`` accepted), and the selectors a token grants.

- 0.x: claim ``mercure`` = ``{"publish": [selectors], "subscribe": [selectors]}``.
- 1.0 (RFC 9068 access token with RFC 9396 details): claim ``authorization_details`` = a list
  of ``{"type": "https://mercure.rocks/authorization-detail", "actions": ["publish" |
  "subscribe"], "topics": [{"match": T} | {"match_urlpattern": P}]}``.

Tokens come from ``Authorization: Bearer``, the ``mercureAuthorization`` cookie or the
``authorization`` query parameter. Keys: ``MERCURE_PUBLISHER_JWT_KEY`` /
``MERCURE_SUBSCRIBER_JWT_KEY`` (HS256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt
from starlette.requests import HTTPConnection

from ..auth.keys import ASYMMETRIC_ALGORITHMS, Jwks
from ..auth.tokens import bearer
from ..errors import Unauthorized
from . import selectors as sel

MAX_TOKEN_BYTES = 8192
DETAIL_TYPE = "https://mercure.rocks/authorization-detail"


@dataclass(frozen=True)
class Grant:
    publish: tuple[sel.Selector, ...] = ()
    subscribe: tuple[sel.Selector, ...] = ()
    expires_at: float | None = None
    subject: str | None = None


def token_from(conn: HTTPConnection) -> str | None:
    return (bearer(conn) or conn.cookies.get("mercureAuthorization")
            or conn.query_params.get("authorization"))


class MercureTokens:
    def __init__(self, key: str | None, audience: tuple[str, ...], issuer: tuple[str, ...],
                 jwks: Jwks | None = None) -> None:
        self.key = key
        self.audience = audience
        self.issuer = issuer
        self.jwks = jwks  # AUTH_JWKS_URL's keys verify asymmetric Mercure tokens too

    def _keys(self, token: str) -> tuple[list[Any], str]:
        """The keys a token may verify with: its algorithm decides (HS256 only the
        configured secret, an asymmetric one only a JWKS key of its type, none never)."""
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthorized(f"invalid Mercure token: {exc}", code="invalid_token") from exc
        alg = header.get("alg")
        if alg == "HS256" and self.key is not None:
            return [self.key], alg
        if isinstance(alg, str) and alg in ASYMMETRIC_ALGORITHMS and self.jwks is not None:
            kid = header.get("kid")
            found = self.jwks.candidates(kid if isinstance(kid, str) else None, alg)
            if found:
                return [key.key for key in found], alg
        raise Unauthorized("no Mercure key verifies this token", code="invalid_token")

    def verify(self, token: str) -> Grant:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized("token too large", code="invalid_token")
        keys, alg = self._keys(token)
        try:
            claims = _decode(token, keys, alg, self.audience, self.issuer)
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:
            raise Unauthorized(f"invalid Mercure token: {exc}", code="invalid_token") from exc
        if not isinstance(claims, dict):
            raise Unauthorized("invalid Mercure token", code="invalid_token")
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        sub = claims.get("sub")
        try:
            publish, subscribe = _selectors(claims)
        except (sel.SelectorError, TypeError, AttributeError) as exc:
            raise Unauthorized(f"invalid Mercure claims: {exc}", code="invalid_token") from exc
        return Grant(publish, subscribe, expires_at, sub if isinstance(sub, str) else None)


def _decode(token: str, keys: list[Any], alg: str, audience: tuple[str, ...],
            issuer: tuple[str, ...]) -> Any:
    error: Exception | None = None
    for key in keys:
        try:
            return jwt.decode(token, key, algorithms=[alg],
                              options={"require": [], "verify_aud": bool(audience),
                                       "verify_iss": bool(issuer)},
                              audience=list(audience) or None, issuer=list(issuer) or None,
                              leeway=5)
        except jwt.InvalidSignatureError as exc:
            error = exc
    raise jwt.InvalidSignatureError("bad signature") from error


def _selectors(claims: dict[str, Any]) -> tuple[tuple[sel.Selector, ...], tuple[sel.Selector, ...]]:
    publish: list[sel.Selector] = []
    subscribe: list[sel.Selector] = []
    legacy = claims.get("mercure")
    if isinstance(legacy, dict):
        for name, out in (("publish", publish), ("subscribe", subscribe)):
            values = legacy.get(name)
            if isinstance(values, list):
                out.extend(sel.legacy(v) for v in values if isinstance(v, str))
    details = claims.get("authorization_details")
    if isinstance(details, list):
        for detail in details:
            if not isinstance(detail, dict) or detail.get("type", DETAIL_TYPE) != DETAIL_TYPE:
                continue
            actions = detail.get("actions")
            topics = detail.get("topics")
            if not isinstance(actions, list) or not isinstance(topics, list):
                continue
            found: list[sel.Selector] = []
            for topic in topics:
                if isinstance(topic, dict) and isinstance(topic.get("match"), str):
                    found.append(sel.exact(topic["match"]))
                elif isinstance(topic, dict) and isinstance(topic.get("match_urlpattern"), str):
                    found.append(sel.urlpattern(topic["match_urlpattern"]))
                elif isinstance(topic, str):
                    found.append(sel.exact(topic))
            if "publish" in actions:
                publish.extend(found)
            if "subscribe" in actions:
                subscribe.extend(found)
    return tuple(publish), tuple(subscribe)
