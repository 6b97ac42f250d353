"""Identity providers: JWKS-verified tokens (RS/PS/ES/EdDSA), key rotation, claim paths and
grant templates, against a real pgsse and a JWKS served over real HTTP on 127.0.0.1.

Keys are generated with ``cryptography``; tokens are signed with PyJWT as a provider would.
"""

from __future__ import annotations

import base64
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.support import ROOT, eventually, free_port, open_stream

Start = Callable[..., Any]
SECRET = "hs-secret-0123456789abcdef0123456789abcdef"

# --- keys and tokens ---------------------------------------------------------------------

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_RSA2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_P256 = ec.generate_private_key(ec.SECP256R1())
_P384 = ec.generate_private_key(ec.SECP384R1())
_ED = ed25519.Ed25519PrivateKey.generate()
_STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)

FAMILIES = {  # algorithm → (private key, kid)
    "RS256": (_RSA, "rsa-1"), "RS384": (_RSA, "rsa-1"), "RS512": (_RSA, "rsa-1"),
    "PS256": (_RSA, "rsa-1"), "PS384": (_RSA, "rsa-1"), "PS512": (_RSA, "rsa-1"),
    "ES256": (_P256, "p256-1"), "ES384": (_P384, "p384-1"), "EdDSA": (_ED, "ed-1"),
}


def jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    """The public JWK of ``private`` (as a provider publishes it)."""
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    else:
        data = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


ALL_KEYS = [jwk(_RSA, "rsa-1", use="sig"), jwk(_P256, "p256-1"), jwk(_P384, "p384-1"),
            jwk(_ED, "ed-1")]


def sign(alg: str = "RS256", topics: Any = ("orders/1",), ttl: float = 300,
         kid: Any = ..., key: Any = None, headers: dict[str, Any] | None = None,
         **claims: Any) -> str:
    private, default_kid = FAMILIES.get(alg, (_RSA, "rsa-1"))
    body: dict[str, Any] = {"exp": int(time.time() + ttl), "iat": int(time.time()), **claims}
    if topics is not None:
        body["topics"] = list(topics)
    header = dict(headers or {})
    if kid is not ...:
        if kid is not None:
            header["kid"] = kid
    else:
        header["kid"] = default_kid
    # Signed as given: PyJWT's jwt.encode would refuse some claims a test sends on purpose.
    return jwt.api_jws.encode(json.dumps(body).encode(), key if key is not None else private,
                              algorithm=alg, headers=header or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Any, payload: Any, signature: bytes = b"sig") -> str:
    """A token with any header/payload JSON (a kid of any type, odd algs)."""
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()),
                     b64(signature)])


def hs256_with(secret: bytes, kid: str | None, alg: str = "HS256") -> str:
    """An HS* token whose HMAC key is ``secret`` (a public key's PEM: the confusion attack)."""
    import hashlib
    import hmac

    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = forge(header, {"exp": int(time.time()) + 60, "topics": ["*"]}).rsplit(".", 1)[0]
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), digest).digest())


# --- a JWKS provider over real HTTP ------------------------------------------------------

class Provider:
    """A JWKS endpoint on 127.0.0.1 that counts its requests; tests change what it serves."""

    def __init__(self, keys: list[dict[str, Any]] | None = None, port: int | None = None,
                 max_age: int | None = None) -> None:
        self.keys = list(ALL_KEYS if keys is None else keys)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/.well-known/jwks.json"
        self.max_age = max_age
        self.status = 200
        self.body: bytes | None = None  # raw answer instead of the key set
        self.requests = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> Provider:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                with provider.lock:
                    provider.requests += 1
                    body = provider.body if provider.body is not None else json.dumps(
                        {"keys": provider.keys}).encode()
                    status, max_age = provider.status, provider.max_age
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if max_age is not None:
                    self.send_header("Cache-Control", f"public, max-age={max_age}")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def count(self) -> int:
        with self.lock:
            return self.requests


@pytest.fixture
def provider() -> Iterator[Provider]:
    started = Provider().start()
    yield started
    started.stop()


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def opens(server: Any, token: str, *topics: str) -> int:
    """The status of ``/events`` (a granted stream is endless: its status line is the answer)."""
    with httpx.stream("GET", server.url + "/events", params=[("topic", t) for t in topics],
                      headers=bearer(token), timeout=10) as response:
        return response.status_code


def error_code(server: Any, token: str, path: str = "/events?topic=orders/1") -> tuple[int, str]:
    response = httpx.get(server.url + path, headers=bearer(token), timeout=10)
    body = response.json() if response.headers.get("content-type", "").startswith(
        "application/json") else {}
    return response.status_code, body.get("error", {}).get("code", "")


# --- algorithms --------------------------------------------------------------------------

async def test_each_algorithm_family_streams_its_grant(start_server: Start, provider: Provider,
                                                       conn: asyncpg.Connection) -> None:
    server = start_server({"AUTH_JWKS_URL": provider.url})
    for alg in FAMILIES:
        token = sign(alg, ["orders/1"])
        assert opens(server, token, "orders/1") == 200, alg
        assert opens(server, token, "orders/2") == 403, alg
    # HS256 over the public key's PEM: no shared secret here, and a public key never meets HS*.
    pem = _RSA.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert error_code(server, hs256_with(pem, "rsa-1")) == (401, "invalid_token")
    # A key of another family under the token's kid is never used (ES256 header, RSA kid).
    assert error_code(server, sign("ES256", kid="rsa-1")) == (401, "invalid_token")
    assert error_code(server, sign("RS256", kid="p256-1")) == (401, "invalid_token")
    # /stats still needs "*"; a provider's token may carry it.
    assert httpx.get(server.url + "/stats", headers=bearer(sign("ES256", ["orders"])),
                     timeout=5).status_code == 403
    assert httpx.get(server.url + "/stats", headers=bearer(sign("EdDSA", ["*"])),
                     timeout=5).status_code == 200
    # auth_expired mid-stream, at the provider's exp.
    task = await open_stream(server.url + "/events", params={"topic": "exp"}, timeout=15,
                             headers=bearer(sign("PS256", ["exp"], ttl=3)))
    await conn.execute("SELECT realtime.publish('exp', 'n', '{}')")
    stream = await task
    assert stream.ended and stream.events[-1].event == "auth_expired", stream.events


def test_without_jwks_or_with_a_one_key_set_kid_is_optional(start_server: Start) -> None:
    single = Provider([jwk(_P256, None)]).start()
    try:
        server = start_server({"AUTH_JWKS_URL": single.url})
        assert opens(server, sign("ES256", ["a"], kid=None), "a") == 200
        assert opens(server, sign("ES256", ["a"], kid="whatever"), "a") == 401
    finally:
        single.stop()


def test_algorithm_confusion_none_and_header_keys_are_refused(start_server: Start,
                                                              provider: Provider) -> None:
    attacker = Provider([jwk(_STRANGER, "evil")]).start()
    try:
        server = start_server({"AUTH_JWKS_URL": provider.url, "AUTH_SECRET": SECRET})
        # The two combine: HS256 with the shared secret, and the provider's keys.
        assert opens(server, jwt.encode({"exp": int(time.time()) + 60, "topics": ["orders/1"]},
                                        SECRET, algorithm="HS256"), "orders/1") == 200
        assert opens(server, sign("RS256"), "orders/1") == 200
        pem = _RSA.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        body = {"exp": int(time.time()) + 60, "topics": ["*"]}
        for kid in ("rsa-1", None):
            for alg in ("HS256", "HS384", "HS512"):
                token = hs256_with(pem, kid, alg)
                assert error_code(server, token) == (401, "invalid_token"), (alg, kid)
        for header in ({"alg": "none"}, {"alg": "none", "kid": "rsa-1"}, {"alg": "None"},
                       {"alg": "NONE", "kid": "rsa-1"}):
            assert error_code(server, forge(header, body, b"")) == (401, "invalid_token"), header
        # Keys named by the token itself are never fetched nor trusted.
        evil_jwk = jwk(_STRANGER, "evil")
        for extra in ({"jku": attacker.url}, {"x5u": attacker.url}, {"jwk": evil_jwk},
                      {"jwk": {**evil_jwk, "kid": "rsa-1"}, "kid": "rsa-1"},
                      {"x5c": ["MIIB"]}):
            token = sign("RS256", ["*"], key=_STRANGER, kid=extra.get("kid", "evil"),
                         headers={k: v for k, v in extra.items() if k != "kid"})
            assert error_code(server, token) == (401, "invalid_token"), extra
        assert attacker.count() == 0
    finally:
        attacker.stop()


def test_algorithms_issuer_and_audience_lists(start_server: Start, provider: Provider) -> None:
    server = start_server({"AUTH_JWKS_URL": provider.url, "AUTH_ALGORITHMS": "RS256,ES256",
                           "AUTH_ISSUER": "https://a.example.com/,https://b.example.com/",
                           "AUTH_AUDIENCE": "api-one,api-two"})

    def code(alg: str = "RS256", **claims: Any) -> int:
        return opens(server, sign(alg, ["orders/1"], **claims), "orders/1")

    assert code(iss="https://a.example.com/", aud="api-one") == 200
    assert code(iss="https://b.example.com/", aud="api-two") == 200
    assert code("ES256", iss="https://b.example.com/", aud=["other", "api-one"]) == 200
    assert code(iss="https://c.example.com/", aud="api-one") == 401
    assert code(iss="https://a.example.com/", aud="api-three") == 401
    assert code(iss="https://a.example.com/") == 401
    assert code(aud="api-one") == 401
    assert code(iss=["https://a.example.com/"], aud="api-one") == 401
    # AUTH_ALGORITHMS narrows the list.
    assert code("PS256", iss="https://a.example.com/", aud="api-one") == 401
    assert code("EdDSA", iss="https://a.example.com/", aud="api-one") == 401


# --- rotation, rate limit, outages -------------------------------------------------------

def test_rotation_new_kid_without_restart_removed_kid_refused(start_server: Start) -> None:
    a, b = jwk(_RSA, "2026-a"), jwk(_RSA2, "2026-b")
    source = Provider([a]).start()
    try:
        server = start_server({"AUTH_JWKS_URL": source.url})
        old = sign("RS256", ["orders/1"], kid="2026-a")
        assert opens(server, old, "orders/1") == 200
        fetched = source.count()
        with source.lock:
            source.keys = [b]  # the provider rotates: b in, a out
        new = sign("RS256", ["orders/1"], kid="2026-b", key=_RSA2)
        assert opens(server, new, "orders/1") == 200, "an unknown kid refreshes at once"
        assert source.count() == fetched + 1
        assert error_code(server, old) == (401, "invalid_token"), "a removed key stops verifying"
    finally:
        source.stop()


def test_a_flood_of_unknown_kids_fetches_at_most_once(start_server: Start,
                                                       provider: Provider) -> None:
    server = start_server({"AUTH_JWKS_URL": provider.url})
    assert opens(server, sign("RS256"), "orders/1") == 200
    before = provider.count()
    with httpx.Client(timeout=10) as client:
        for _ in range(200):
            token = sign("RS256", ["*"], kid=uuid.uuid4().hex, key=_STRANGER)
            response = client.get(server.url + "/events?topic=orders/1", headers=bearer(token))
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_token"
    assert provider.count() - before <= 1
    # Within those 30 s a newly published kid is not fetched either; known keys still work.
    with provider.lock:
        provider.keys = [*ALL_KEYS, jwk(_RSA2, "late")]
    assert error_code(server, sign("RS256", kid="late", key=_RSA2))[0] == 401
    assert provider.count() - before <= 1
    assert opens(server, sign("ES256"), "orders/1") == 200


async def test_provider_down_at_start_up_then_up(start_server: Start) -> None:
    source = Provider()  # not listening yet
    server = start_server({"AUTH_JWKS_URL": source.url, "AUTH_JWKS_MIN_INTERVAL": "200ms"},
                          wait_ready=False)
    try:
        def not_ready_for_jwks() -> Any:
            try:
                response = httpx.get(server.url + "/readyz", timeout=2)
            except httpx.HTTPError:
                return None
            body = response.json()
            checks = body["checks"]
            return (response.status_code == 503 and checks.get("database") == "ok"
                    and checks.get("feed") == "ok" and "jwks" in checks
                    and checks["jwks"] != "ok" and body)

        body = await eventually(not_ready_for_jwks, timeout=30, what="/readyz 503 naming jwks")
        assert "jwks" in json.dumps(body)
        assert error_code(server, sign("RS256"))[0] == 401  # no key yet: refused, not a 5xx
        source.start()
        await eventually(lambda: httpx.get(server.url + "/readyz", timeout=2).status_code == 200,
                         timeout=30, what="/readyz 200 once the provider answers")
        assert opens(server, sign("RS256"), "orders/1") == 200
    finally:
        source.stop()


async def test_provider_down_later_keeps_the_last_good_keys(start_server: Start) -> None:
    source = Provider(max_age=1).start()
    try:
        server = start_server({"AUTH_JWKS_URL": source.url, "AUTH_JWKS_MIN_INTERVAL": "200ms"})
        assert opens(server, sign("ES384"), "orders/1") == 200
        with source.lock:
            source.status = 503
            source.body = b'{"error": "down"}'
        failing_from = source.count()
        # Refreshed on max-age (1 s, shorter than the 10 min TTL): failing refreshes happen.
        await eventually(lambda: source.count() >= failing_from + 2, timeout=20,
                         what="refreshes against the failing provider")
        assert opens(server, sign("ES384"), "orders/1") == 200
        assert opens(server, sign("RS256"), "orders/1") == 200
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
        source.stop()  # and now not even listening
        assert opens(server, sign("EdDSA"), "orders/1") == 200
    finally:
        source.stop()


def hostile_tokens(rng: random.Random) -> list[str]:
    now = int(time.time())
    odd = [None, True, 0, -1, 1.5, 10**40, "", "x" * 3000, [], ["rsa-1"], {}, {"a": 1},
           "rsa-1\u0000", "\u202e", "../../etc/passwd", "p256-1", "rsa-1 "]
    algs = ["RS256", "ES256", "EdDSA", "HS256", "none", "", None, 1, ["RS256"], "RS1",
            "ES512", "PS256", "EdDSA ", "ES256K"]
    tokens: list[str] = []
    while len(tokens) < 300:
        kind = rng.randrange(6)
        if kind == 0:
            header: Any = {"alg": rng.choice(algs), "kid": rng.choice(odd)}
            tokens.append(forge(header, {"exp": now + 60, "topics": ["*"]},
                                rng.randbytes(rng.choice([0, 3, 64, 256]))))
        elif kind == 1:
            header = rng.choice([[], "x", 1, None, {"alg": {"x": 1}}, {"kid": "rsa-1"},
                                 {"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]},
                                 {"alg": "RS256", "kid": "rsa-1", "b64": False}])
            tokens.append(forge(header, rng.choice([{}, [], "x", {"exp": now + 60}]),
                                rng.randbytes(256)))
        elif kind == 2:  # a valid signature over odd claims
            claims = rng.choice([
                {"exp": rng.choice(odd)}, {"exp": now + 60, "nbf": rng.choice(odd)},
                {"exp": now + 60, "iat": rng.choice(odd)},
                {"exp": now + 60, "topics": rng.choice(odd)},
                {"exp": now + 60, "org_id": rng.choice(odd), "app_metadata": rng.choice(odd)},
                {"exp": now + 60, "sub": rng.choice(odd), "iss": rng.choice(odd)},
                {"exp": now + 60, "aud": rng.choice(odd)},
            ])
            alg = rng.choice(list(FAMILIES))
            private, kid = FAMILIES[alg]
            # Signed as given (PyJWT's encode would refuse some of these claims itself).
            tokens.append(jwt.api_jws.encode(json.dumps(claims).encode(), private,
                                             algorithm=alg, headers={"kid": kid}))
        elif kind == 3:  # garbage
            tokens.append(rng.choice([".", "..", "a.b", "a.b.c.d", "@@.@@.@@", "eyJ.eyJ.",
                                      "e" * rng.randrange(1, 9000)]))
        elif kind == 4:  # a valid token, mangled
            token = sign(rng.choice(list(FAMILIES)))
            index = rng.randrange(len(token))
            tokens.append(token[:index] + rng.choice("A_-.=+/") + token[index + 1:])
        else:  # an unknown kid, or a right kid with a wrong key
            tokens.append(sign("RS256", ["*"], key=_STRANGER,
                               kid=rng.choice(["rsa-1", uuid.uuid4().hex])))
    return tokens


def test_hostile_tokens_and_malformed_jwks_answers_never_5xx(start_server: Start) -> None:
    source = Provider().start()
    try:
        server = start_server({"AUTH_JWKS_URL": source.url, "AUTH_JWKS_MIN_INTERVAL": "10ms",
                               "AUTH_GRANTS": "orgs/{org_id},apps/{app_metadata.org}",
                               "AUTH_TOPICS_CLAIM": "app_metadata.topics"})
        rng = random.Random(21)
        statuses: dict[int, int] = {}
        malformed = [b"not json", b"[]", b"null", b'{"keys": "x"}', b'{"keys": [1, "a", null]}',
                     b'{"keys": [{"kty": "RSA"}]}', b'{"keys": [{"kty": "EC", "crv": "P-999"}]}',
                     b'{"keys": [{"kty": "RSA", "alg": ["RS256"], "n": "AQAB", "e": "AQAB"}]}',
                     b'{"keys": [{"kty": ["RSA"]}]}', b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
                     b'{"keys": []}', b'{"keys": {}}', b"\xff\xfe", b"{" * 5000,
                     json.dumps({"keys": [{**jwk(_RSA, "rsa-1"), "kid": ["rsa-1"]}]}).encode(),
                     json.dumps({"keys": [{**jwk(_RSA, "rsa-1"), "n": 5}]}).encode()]
        with httpx.Client(timeout=10) as client:
            for i, token in enumerate(hostile_tokens(rng)):
                if i % 15 == 0:  # the provider's answer turns bad, or good again
                    with source.lock:
                        source.body = None if i % 30 == 0 else malformed[(i // 30) % len(malformed)]
                        source.status = rng.choice([200, 200, 500, 404])
                for path in ("/events?topic=orders/1", "/stats"):
                    status = client.get(server.url + path, headers=bearer(token)).status_code
                    statuses[status] = statuses.get(status, 0) + 1
        print("statuses of 600 hostile requests:", statuses, "JWKS fetches:", source.count())
        assert not [s for s in statuses if s >= 500], statuses
        assert source.count() > 10, "the malformed answers were fetched"
        with source.lock:
            source.body, source.status = None, 200
        good = sign("RS256", None, app_metadata={"topics": ["orders/1"]})
        assert opens(server, good, "orders/1") == 200  # the good set survived
    finally:
        source.stop()


# --- claims: topics claim shapes, grant templates, claim-bound parameters ----------------

def test_the_three_claim_shapes(start_server: Start, provider: Provider) -> None:
    verbatim = start_server({"AUTH_JWKS_URL": provider.url,
                             "AUTH_TOPICS_CLAIM": "https://example.com/topics"})
    claim = {"https://example.com/topics": ["orders/1", "invoices"]}
    token = sign("RS256", None, **claim)
    assert opens(verbatim, token, "orders/1", "invoices/9") == 200
    assert opens(verbatim, token, "orders/2") == 403
    assert opens(verbatim, sign("RS256", ["orders/2"]), "orders/2") == 403  # not `topics` now
    spaced = sign("ES256", None, **{"https://example.com/topics": "orders/1  invoices"})
    assert opens(verbatim, spaced, "orders/1", "invoices") == 200
    assert opens(verbatim, spaced, "orders") == 403

    dotted = start_server({"AUTH_JWKS_URL": provider.url,
                           "AUTH_TOPICS_CLAIM": "app_metadata.topics"})
    nested = sign("EdDSA", None, app_metadata={"topics": ["orders/7"], "role": "x"})
    assert opens(dotted, nested, "orders/7") == 200
    assert opens(dotted, nested, "orders/8") == 403
    nested_string = sign("EdDSA", None, app_metadata={"topics": "orders/7 orders/8"})
    assert opens(dotted, nested_string, "orders/8") == 200
    # A top-level name that is itself dotted wins over the path.
    both = sign("EdDSA", None, app_metadata={"topics": ["y"]}, **{"app_metadata.topics": ["x"]})
    assert opens(dotted, both, "x") == 200
    assert opens(dotted, both, "y") == 403
    assert opens(dotted, sign("EdDSA", None, app_metadata="flat"), "orders") == 403
    assert error_code(dotted, sign("EdDSA", None, app_metadata={"topics": [1]}))[0] == 401


async def test_grant_templates(start_server: Start, provider: Provider,
                               conn: asyncpg.Connection, tmp_path: Path) -> None:
    directory = tmp_path / "agg"
    directory.mkdir()
    (directory / "whoami.sql").write_text(
        "-- The caller's organisation.\n-- param org: text from claim org.id\n"
        "SELECT :org AS org\n")
    server = start_server({"AUTH_JWKS_URL": provider.url, "AGGREGATES_DIR": str(directory),
                           "AUTH_GRANTS": "orders/{org_id}, users/{sub}/inbox,"
                                          "aggregates/whoami,deep/{org.id}"})

    def grants(**claims: Any) -> str:
        return sign("ES256", None, **claims)

    acme = grants(org_id="acme", sub="user-1", org={"id": "o-9"})
    assert opens(server, acme, "orders/acme", "users/user-1/inbox", "deep/o-9") == 200
    assert opens(server, acme, "orders") == 403, "never the bare parent"
    assert opens(server, acme, "orders/other") == 403
    assert opens(server, acme, "users/user-1") == 403
    for missing in ({}, {"org_id": None}, {"org_id": ""}, {"org_id": []}, {"org_id": {}},
                    {"org_id": True}, {"org_id": ["acme"]}):
        token = grants(**missing)
        assert opens(server, token, "orders") == 403, missing
        assert opens(server, token, "orders/acme") == 403, missing
        assert opens(server, token, "orders/") == 400, missing
    assert opens(server, grants(org_id=42), "orders/42") == 200
    # Encoded as realtime.watch encodes a key, so the grant matches the events' topics.
    for value in ("a b/ü", "50%", "x/y", "ok-._:@"):
        topic = await conn.fetchval("SELECT realtime.key_topic_v2('orders', $1)", value)
        assert opens(server, grants(org_id=value), topic) == 200, (value, topic)
        assert opens(server, grants(org_id=value), "orders/x") == 403
    # A claim-bound aggregate parameter takes the same dotted path.
    response = httpx.get(server.url + "/aggregates/whoami", headers=bearer(acme), timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [{"org": "o-9"}]
    assert httpx.get(server.url + "/aggregates/whoami", timeout=10,
                     headers=bearer(grants(org={"x": 1}))).status_code == 403


# --- recipes: the README's "Use your identity provider", each with the token shape it shows

ISSUED = int(time.time())
RECIPES: dict[str, tuple[dict[str, str], str, dict[str, Any], list[str], list[str]]] = {
    # provider: (configuration, algorithm, claims, granted topics, refused topics)
    "auth0": (
        {"AUTH_ISSUER": "https://example-tenant.us.auth0.com/",
         "AUTH_AUDIENCE": "https://api.example.com",
         "AUTH_TOPICS_CLAIM": "https://pgsse.example.com/topics"},
        "RS256",
        {"iss": "https://example-tenant.us.auth0.com/", "sub": "auth0|65f0c0ffee",
         "aud": ["https://api.example.com", "https://example-tenant.us.auth0.com/userinfo"],
         "azp": "x5M3YnL0lbAW5wzdNS2nyg", "scope": "openid profile email",
         "https://pgsse.example.com/topics": ["orders/acme", "aggregates/daily_sales"]},
        ["orders/acme/17", "aggregates/daily_sales"], ["orders/other", "aggregates"]),
    "clerk": (
        {"AUTH_ISSUER": "https://clerk.example.com",
         "AUTH_TOPICS_CLAIM": "metadata.topics",
         "AUTH_GRANTS": "orgs/{org_id},users/{sub}"},
        "RS256",
        {"iss": "https://clerk.example.com", "sub": "user_2abcDEF", "azp": "https://app.example.com",
         "sid": "sess_2xyz", "org_id": "org_29w9", "metadata": {"topics": ["news"]}},
        ["orgs/org_29w9", "users/user_2abcDEF", "news"], ["orgs", "users/user_other"]),
    "supabase-jwks": (
        {"AUTH_ISSUER": "https://abcdefghijklmnop.supabase.co/auth/v1",
         "AUTH_AUDIENCE": "authenticated",
         "AUTH_GRANTS": "users/{sub},orgs/{app_metadata.org_id}"},
        "ES256",
        {"iss": "https://abcdefghijklmnop.supabase.co/auth/v1", "aud": "authenticated",
         "sub": "8f4e2c1a-5b6d-4e7f-9a0b-1c2d3e4f5a6b", "role": "authenticated",
         "email": "ada@example.com", "session_id": "3b1e", "is_anonymous": False,
         "app_metadata": {"provider": "email", "providers": ["email"], "org_id": 42},
         "user_metadata": {"name": "Ada"}},
        ["users/8f4e2c1a-5b6d-4e7f-9a0b-1c2d3e4f5a6b", "orgs/42"], ["orgs/43", "users"]),
    "supabase-secret": (
        {"AUTH_SECRET": SECRET,
         "AUTH_ISSUER": "https://abcdefghijklmnop.supabase.co/auth/v1",
         "AUTH_AUDIENCE": "authenticated",
         "AUTH_GRANTS": "users/{sub},orgs/{app_metadata.org_id}"},
        "HS256",
        {"iss": "https://abcdefghijklmnop.supabase.co/auth/v1", "aud": "authenticated",
         "sub": "8f4e2c1a-5b6d-4e7f-9a0b-1c2d3e4f5a6b", "role": "authenticated",
         "app_metadata": {"provider": "email", "providers": ["email"]}},
        ["users/8f4e2c1a-5b6d-4e7f-9a0b-1c2d3e4f5a6b"], ["orgs", "users"]),
    "cognito": (
        {"AUTH_ISSUER": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123",
         "AUTH_AUDIENCE": "3n4b5urk1ft4fl3mg5e62d9ado",
         "AUTH_TOPICS_CLAIM": "cognito:groups",
         "AUTH_GRANTS": "users/{sub},tenants/{custom:tenant}"},
        "RS256",
        {"iss": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123",
         "aud": "3n4b5urk1ft4fl3mg5e62d9ado", "token_use": "id",
         "sub": "a1b2c3d4-0000-1111-2222-333344445555", "cognito:username": "ada",
         "cognito:groups": ["reports"], "custom:tenant": "acme", "auth_time": ISSUED},
        ["reports/q1", "users/a1b2c3d4-0000-1111-2222-333344445555", "tenants/acme"],
        ["tenants", "orders"]),
    "keycloak": (
        {"AUTH_ISSUER": "https://sso.example.com/realms/shop",
         "AUTH_AUDIENCE": "pgsse",
         "AUTH_TOPICS_CLAIM": "pgsse.topics",
         "AUTH_GRANTS": "users/{preferred_username}"},
        "PS256",
        {"iss": "https://sso.example.com/realms/shop", "aud": ["pgsse", "account"],
         "sub": "f1e2d3c4-b5a6-4798-8a9b-0c1d2e3f4a5b", "typ": "Bearer", "azp": "shop-web",
         "preferred_username": "ada", "scope": "openid profile email",
         "realm_access": {"roles": ["offline_access", "uma_authorization"]},
         "pgsse": {"topics": "orders/acme invoices/acme"}},
        ["orders/acme", "invoices/acme/3", "users/ada"], ["orders", "users/bob"]),
}


def recipes_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Use your identity provider")
    end = text.find("\n## ", start + 3)
    return text[start:end if end != -1 else len(text)]


@pytest.mark.parametrize("name", list(RECIPES))
def test_provider_recipes(name: str, start_server: Start, provider: Provider) -> None:
    config, alg, claims, granted, refused = RECIPES[name]
    section = recipes_section()
    for variable, value in config.items():  # the README shows exactly these lines
        shown = "<your JWT secret>" if variable == "AUTH_SECRET" else value
        assert f"{variable}={shown}" in section, (name, variable)
    env = dict(config)
    if alg != "HS256":
        env["AUTH_JWKS_URL"] = provider.url
    server = start_server(env)
    if alg == "HS256":
        token = jwt.encode({"exp": int(time.time()) + 300, "iat": int(time.time()), **claims},
                           SECRET, algorithm="HS256")
    else:
        token = sign(alg, None, **claims)
    assert opens(server, token, *granted) == 200, name
    for topic in refused:
        assert opens(server, token, topic) == 403, (name, topic)
    assert re.search(r"alg[^\n]*" + re.escape(alg), section), (name, alg)


# --- pgsse token with a private key; configuration; encoding --------------------------------

@pytest.mark.parametrize("private,alg,expected", [
    (_RSA, None, "RS256"), (_RSA, "PS384", "PS384"), (_P256, None, "ES256"),
    (_P384, None, "ES384"), (_ED, None, "EdDSA")])
def test_token_command_signs_with_a_private_key(tmp_path: Path, private: Any, alg: str | None,
                                                expected: str) -> None:
    import subprocess
    import sys

    pem = tmp_path / "key.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    args = [sys.executable, "-m", "pgsse", "token", "--key", str(pem), "--kid", "k1",
            "--topics", "orders/42", "--ttl", "60", *(["--alg", alg] if alg else [])]
    result = subprocess.run(args, cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    claims = jwt.decode(token, private.public_key(), algorithms=[expected])
    assert claims["topics"] == ["orders/42"] and 50 < claims["exp"] - time.time() <= 60
    wrong = "ES256" if expected != "ES256" else "RS256"
    refused = subprocess.run([*args[:5], str(pem), "--alg", wrong], cwd=ROOT,
                             env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                             timeout=30)
    assert refused.returncode == 2 and wrong in refused.stderr


def test_configuration_is_checked_at_start_up() -> None:
    from pgsse.settings import ConfigError, Settings

    good = Settings.from_env({
        "AUTH_JWKS_URL": "https://idp.example.com/jwks.json, http://127.0.0.1:9/k,"
                         "http://localhost/k,http://[::1]:8/k",
        "AUTH_ALGORITHMS": "RS256,EdDSA", "AUTH_GRANTS": "orders/{org_id},t-{a.b}/x,plain",
        "AUTH_TOPICS_CLAIM": "https://example.com/topics", "AUTH_JWKS_TTL": "5m"})
    assert len(good.auth_jwks_url) == 4 and good.auth_enabled
    assert good.auth_grants == ("orders/{org_id}", "t-{a.b}/x", "plain")
    assert good.auth_jwks_ttl_seconds == 300
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({"AUTH_JWKS_URL": "http://idp.example.com/jwks.json",
                           "AUTH_ALGORITHMS": "RS256,HS512", "AUTH_GRANTS": "orders/{org_id",
                           "AUTH_TOPICS_CLAIM": " ", "AUTH_JWKS_MIN_INTERVAL": "0s"})
    assert set(bad.value.problems) == {"AUTH_JWKS_URL", "AUTH_ALGORITHMS", "AUTH_GRANTS",
                                       "AUTH_TOPICS_CLAIM", "AUTH_JWKS_MIN_INTERVAL"}
    for url in ("ftp://x/k", "file:///etc/passwd", "https://", "http://10.0.0.1/k", ""):
        with pytest.raises(ConfigError):
            Settings.from_env({"AUTH_JWKS_URL": url})
    for template in ("orders/{}", "orders//{a}", "{a}/ x", "orders/{a}}"):
        with pytest.raises(ConfigError):
            Settings.from_env({"AUTH_GRANTS": template})


async def test_template_values_are_encoded_as_realtime_watch_encodes_keys(
        conn: asyncpg.Connection) -> None:
    from pgsse.auth import GrantTemplate

    values = ["acme", "a b", "ü", "50%", "x/y", "ok-._:@", "tab\there", "日本", "emoji 🙂",
              "'quote\"", "{braces}", "+=&?#", 42, 7.0, -3]
    template = GrantTemplate("orders/{v}")
    for value in values:
        expected = await conn.fetchval("SELECT realtime.key_topic_v2('orders', $1::jsonb ->> 0)",
                                       json.dumps([value]))
        assert template.fill({"v": value}) == expected, value
    for nothing in (None, "", True, False, [], {}, ["a"], {"a": 1}):
        assert template.fill({"v": nothing}) is None, nothing
    assert template.fill({}) is None


def test_parse_jwks_keeps_only_usable_signature_keys() -> None:
    from pgsse.auth.keys import JwksError, parse_jwks

    bodies = [b"", b"not json", b"[]", b"null", b'{"keys": "x"}', b'{"keys": [1, "a", null]}',
              b'{"keys": [{"kty": "RSA"}]}', b'{"keys": [{"kty": "EC", "crv": "P-999"}]}',
              b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', b"[" * 100_000, b"\xff",
              json.dumps({"keys": [jwk(_RSA, "a", use="enc"), jwk(_RSA, ["a"]),
                                   jwk(_RSA, "b", alg=["RS256"]), jwk(_RSA, "c", n=5),
                                   jwk(_P256, "d", alg="RS256")]}).encode()]
    for body in bodies:
        with pytest.raises(JwksError):
            parse_jwks(body)
    private_rsa = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_RSA))  # a leaked private key
    keys = parse_jwks(json.dumps({"keys": [
        {**private_rsa, "kid": "leaked"}, jwk(_RSA2, "ps", alg="PS256"), jwk(_P384, None),
        jwk(_ED, "ed"), {"kty": "oct", "k": "c2VjcmV0", "kid": "hs"}, "junk"]}).encode())
    by_kid = {key.kid: key for key in keys}
    assert set(by_kid) == {"leaked", "ps", None, "ed"}
    assert not hasattr(by_kid["leaked"].key, "private_bytes"), "only ever a public key"
    assert by_kid["ps"].algorithms == {"PS256"}
    assert by_kid[None].algorithms == {"ES384"} and by_kid["ed"].algorithms == {"EdDSA"}
