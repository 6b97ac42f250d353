"""Public keys from the configured JWKS URLs (RFC 7517), kept fresh without blocking.

One ``KeySource`` per URL holds the last good set. ``Jwks.run`` (owned by the lifespan)
fetches every set at start-up and again when due: after ``AUTH_JWKS_TTL``, or the answer's
``Cache-Control: max-age`` when shorter (at least 1 s; ``no-cache`` speaks to HTTP caches,
not to key lifetimes, and is ignored);
after a failure, with backoff from 1 s up to that interval. A token naming an unknown
``kid`` refreshes at once (``refresh_for_unknown_kid``), at most once per interval per URL,
so a flood of random kids cannot make pgsse hammer the provider. A failed fetch keeps the
last good set; a successful one replaces it whole (a removed key stops verifying).

Keys come only from these URLs: a token's ``jku``/``x5u``/``jwk``/``x5c`` is never read. A
key verifies only algorithms of its own type (RSA: RS*/PS*; P-256: ES256; P-384: ES384;
Ed25519: EdDSA), narrowed by the JWK's ``alg``; symmetric (``oct``) keys are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

log = logging.getLogger("pgsse.auth")

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | {"ES256", "ES384", "EdDSA"}
MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT = 5.0  # a request naming an unknown kid waits for the refetch this long at most
MIN_REFRESH = 1.0  # seconds: the shortest max-age honoured
MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)


class JwksError(Exception):
    """A JWKS answer that cannot be used (the last good set stays)."""


@dataclass(frozen=True)
class PublicKey:
    kid: str | None
    algorithms: frozenset[str]
    key: Any  # a cryptography public key


def algorithms_of(key: Any) -> frozenset[str]:
    """The token algorithms a key of this type may verify (none for other types)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset({"ES256"} if key.curve.name == "secp256r1" else
                         {"ES384"} if key.curve.name == "secp384r1" else set())
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def parse_jwks(body: bytes) -> tuple[PublicKey, ...]:
    """A JWKS document → its usable signature keys; ``JwksError`` when there are none."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise JwksError(f"not JSON: {type(exc).__name__}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError('not a JWK set (no "keys" array)')
    keys: list[PublicKey] = []
    for entry in data["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # symmetric keys never verify: only the provider's public keys do
        kid, alg, use = entry.get("kid"), entry.get("alg"), entry.get("use", "sig")
        if not isinstance(kid, str | None) or not isinstance(alg, str | None) or use != "sig":
            continue
        try:
            loaded = jwt.PyJWK(entry).key
            # A set that leaks private keys still only verifies.
            public = loaded.public_key() if hasattr(loaded, "private_bytes") else loaded
        except Exception as exc:  # foreign data: a key PyJWT cannot load is skipped
            log.warning("JWKS key skipped: %s", exc, extra={"event": "jwks_key_skipped",
                                                           "kid": str(kid)[:64]})
            continue
        algorithms = algorithms_of(public)
        if alg is not None:
            algorithms &= {alg}
        if algorithms:
            keys.append(PublicKey(kid, algorithms, public))
    if not keys:
        raise JwksError("no usable signature key (RSA, EC P-256/P-384 or Ed25519)")
    return tuple(keys)


def max_age(headers: httpx.Headers) -> float | None:
    value = headers.get("cache-control", "")
    match = MAX_AGE.search(value)
    return float(match.group(1)) if match else None


@dataclass
class KeySource:
    url: str
    keys: tuple[PublicKey, ...] = ()
    fetched: bool = False
    due: float = 0.0  # time.monotonic() of the next timed refresh
    failures: int = 0
    last_error: str = ""
    unknown_kid_fetch: float = -math.inf
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Jwks:
    def __init__(self, urls: Iterable[str], ttl: float, min_interval: float) -> None:
        self.sources = [KeySource(url) for url in urls]
        self.ttl = ttl
        self.min_interval = min_interval
        self.client: httpx.AsyncClient | None = None

    @property
    def ready(self) -> bool:
        return any(source.fetched for source in self.sources)

    def status(self) -> str:
        if self.ready:
            return "ok"
        reasons = "; ".join(f"{s.url}: {s.last_error or 'not fetched yet'}" for s in self.sources)
        return f"waiting for a first JWKS fetch ({reasons})"

    def knows(self, kid: str) -> bool:
        return any(key.kid == kid for source in self.sources for key in source.keys)

    def candidates(self, kid: str | None, alg: str) -> list[PublicKey]:
        """Keys that may verify a token with this ``kid`` and ``alg``: the ones named by the
        kid, or without a kid, the key of each set that holds only one."""
        found: list[PublicKey] = []
        for source in self.sources:
            pool: tuple[PublicKey, ...]
            if kid is None:
                pool = source.keys if len(source.keys) == 1 else ()
            else:
                pool = tuple(key for key in source.keys if key.kid == kid)
            found.extend(key for key in pool if alg in key.algorithms)
        return found

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch every set now and whenever due, until ``stop``."""
        # trust_env: HTTPS_PROXY, NO_PROXY and SSL_CERT_FILE apply, as for any outbound call.
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False) as client:
            self.client = client
            try:
                while not stop.is_set():
                    now = time.monotonic()
                    due = [source for source in self.sources if source.due <= now]
                    if due and not await self._until_stopped(
                            asyncio.gather(*(self.refresh(source) for source in due)), stop):
                        break
                    wait = min(source.due for source in self.sources) - time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=max(0.01, wait))
            finally:
                self.client = None
                log.info("JWKS refresher stopped", extra={"event": "jwks_stopped"})

    @staticmethod
    async def _until_stopped(work: asyncio.Future[Any], stop: asyncio.Event) -> bool:
        """Await ``work``; on ``stop`` cancel it (shutdown does not wait on a slow
        provider) and return False."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if work.done():
            return True
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return False

    async def refresh_for_unknown_kid(self) -> bool:
        """Refetch the sets a token's unknown kid may be new in; False if none could be."""
        now = time.monotonic()
        waited = False
        refreshes = []
        for source in self.sources:
            if now - source.unknown_kid_fetch >= self.min_interval:
                source.unknown_kid_fetch = now  # before awaiting: concurrent tokens skip
                refreshes.append(self.refresh(source))
            elif source.lock.locked():  # a refresh is under way: its answer may hold the kid
                async with source.lock:
                    waited = True
        results = await asyncio.gather(*refreshes)
        return any(results) or waited

    async def refresh(self, source: KeySource) -> bool:
        """Fetch one set; True when it replaced the keys."""
        async with source.lock:
            client = self.client
            if client is None:
                return False
            try:
                keys, age = await self._fetch(client, source.url)
            except Exception as exc:  # any failure of a foreign server's answer
                # keeps the last good set, and must not end the refresh loop.
                source.failures += 1
                source.last_error = f"{type(exc).__name__}: {exc}"[:300]
                source.due = time.monotonic() + min(self.min_interval,
                                                    2.0 ** min(source.failures - 1, 10))
                log.warning("JWKS fetch failed; keeping the last good keys",
                            extra={"event": "jwks_fetch_failed", "url": source.url,
                                   "reason": source.last_error,
                                   "keys": len(source.keys)})
                return False
            interval = self.ttl if age is None else min(self.ttl, age)
            source.keys, source.fetched, source.failures, source.last_error = keys, True, 0, ""
            source.due = time.monotonic() + max(MIN_REFRESH, interval)
            log.info("JWKS fetched", extra={"event": "jwks_fetched", "url": source.url,
                                            "keys": len(keys)})
            return True

    async def _fetch(self, client: httpx.AsyncClient, url: str) -> tuple[tuple[PublicKey, ...],
                                                                         float | None]:
        async with asyncio.timeout(FETCH_TIMEOUT):
            async with client.stream("GET", url, headers={"Accept": "application/json"}) as r:
                if r.status_code != 200:
                    raise JwksError(f"HTTP {r.status_code}")
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError(f"answer larger than {MAX_JWKS_BYTES} bytes")
                return parse_jwks(bytes(body)), max_age(r.headers)
