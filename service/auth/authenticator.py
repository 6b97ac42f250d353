"""``Authenticator``: a request's token → ``Principal`` (its claims and granted topics).

An ``HS256`` token verifies against ``AUTH_SECRET`` (every key; the first signs) and never
against a public key; any other algorithm only against a JWKS key of its own type chosen by
``kid``; ``alg: none`` never. ``AUTH_ALGORITHMS`` narrows the accepted list. ``exp`` is
required; ``nbf``/``iat`` honoured; ``aud``/``iss`` checked against ``AUTH_AUDIENCE`` /
``AUTH_ISSUER`` (comma-separated: any matches). Grants are the topics claim plus the
``AUTH_GRANTS`` templates filled from the token. Every failure is a 401; nothing in a token
causes a 5xx.
"""

from __future__ import annotations

from typing import Any

import jwt
from starlette.requests import HTTPConnection

from ..errors import Unauthorized
from ..settings import Settings
from .claims import GrantTemplate, topics_from
from .keys import ASYMMETRIC_ALGORITHMS, Jwks, PublicKey
from .tokens import ANONYMOUS, MAX_TOKEN_BYTES, Principal, check_times, token_from

# What PyJWT (and json, base64, int()) raise on hostile input: all mean "invalid token".
MALFORMED = (jwt.PyJWTError, ValueError, TypeError, OverflowError, KeyError, RecursionError)


class UnknownKey(Unauthorized):
    """The token names a ``kid`` no fetched set holds (yet)."""


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = settings.auth_secret
        self.jwks = (Jwks(settings.auth_jwks_url, settings.auth_jwks_ttl_seconds,
                          settings.auth_jwks_min_interval_seconds)
                     if settings.auth_jwks_url else None)
        offered = ({"HS256"} if self.keys else set()) | (
            ASYMMETRIC_ALGORITHMS if self.jwks else set())
        self.algorithms = frozenset(offered & set(settings.auth_algorithms)
                                    if settings.auth_algorithms else offered)
        self.audience = _csv(settings.auth_audience)
        self.issuer = _csv(settings.auth_issuer)
        self.topics_claim = settings.auth_topics_claim
        self.templates = tuple(GrantTemplate(text) for text in settings.auth_grants)

    @property
    def enabled(self) -> bool:
        return bool(self.keys) or self.jwks is not None

    async def identify(self, conn: HTTPConnection) -> Principal:
        """The caller; a token naming an unknown ``kid`` first refreshes the key sets."""
        try:
            return self.authenticate(conn)
        except UnknownKey:
            if self.jwks is None or not await self.jwks.refresh_for_unknown_kid():
                raise
            return self.authenticate(conn)

    def authenticate(self, conn: HTTPConnection) -> Principal:
        """The caller, from the keys at hand (an unknown ``kid`` is a 401 here)."""
        if not self.enabled:
            return ANONYMOUS
        token = token_from(conn)
        if token is None:
            raise Unauthorized("a token is required")
        return self.verify(token)

    def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized("token too large")
        try:
            claims = self._decode(token)
            expires_at = check_times(claims)
            grants = topics_from(claims, self.topics_claim)
            for template in self.templates:
                topic = template.fill(claims)
                if topic is not None:
                    grants.append(topic)
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired", code="token_expired") from exc
        except MALFORMED as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}: {exc}"[:300],
                               code="invalid_token") from exc
        sub = claims.get("sub")
        return Principal(grants=tuple(grants), claims=claims, expires_at=expires_at,
                         subject=str(sub) if sub is not None else None)

    def _decode(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)  # a non-string kid is refused here
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthorized(f"invalid token: algorithm {str(alg)[:20]!r} is not accepted",
                               code="invalid_token")
        kid = header.get("kid")
        # The key follows from the algorithm, never the reverse: HS256 only ever meets the
        # shared secrets, an asymmetric algorithm only a public key of its own type.
        keys: list[Any]
        if alg == "HS256":
            keys = list(self.keys)
        else:
            assert self.jwks is not None  # an asymmetric algorithm is accepted only with JWKS
            found: list[PublicKey] = self.jwks.candidates(kid, alg)
            if not found:
                if isinstance(kid, str) and not self.jwks.knows(kid):
                    raise UnknownKey("invalid token: unknown key id", code="invalid_token")
                raise Unauthorized("invalid token: no key for this kid and algorithm",
                                   code="invalid_token")
            keys = [key.key for key in found]
        options: dict[str, Any] = {"require": ["exp"], "verify_aud": bool(self.audience),
                                   "verify_exp": False, "verify_nbf": False,
                                   "verify_iat": False}
        last_error: Exception | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=[alg], options=options,  # type: ignore[arg-type]
                    audience=list(self.audience) or None,
                    issuer=list(self.issuer) or None, leeway=0)
                return claims
            except jwt.InvalidSignatureError as exc:
                last_error = exc
        raise Unauthorized("invalid token: bad signature", code="invalid_token") from last_error


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())
