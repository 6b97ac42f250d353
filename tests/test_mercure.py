"""The Mercure hub (``MERCURE=1``): both dialects' selectors, private updates, ids, data as
sent, token forms, resume by publisher id and ``earliest`` across a restart, and a second
replica serving what the first accepted — written from the two drafts, against a real server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
from pgsse.mercure import selectors

from tests.support import open_stream, read_sse

KEY = "!ChangeThisMercureHubJWTSecretKey!"
PUBLISH_ALL = jwt.encode({"mercure": {"publish": ["*"], "subscribe": ["*"]}}, KEY)
# The 1.0 shape: RFC 9068 header and RFC 9396 details, no legacy claim.
V1_ALL = jwt.encode(
    {"aud": "https://localhost/.well-known/mercure", "iss": "https://localhost", "exp": 4102444800,
     "authorization_details": [
         {"type": "https://mercure.rocks/authorization-detail", "actions": ["publish"],
          "topics": [{"match": "*"}]},
         {"type": "https://mercure.rocks/authorization-detail", "actions": ["subscribe"],
          "topics": [{"match": "*"}]}]},
    KEY, headers={"typ": "at+jwt"})
HUB = "/.well-known/mercure"
MULTILINE = "data for\n\n        a test"


def env(**extra: str) -> dict[str, str]:
    return {"MERCURE": "1", "MERCURE_ANONYMOUS": "1", "MERCURE_PUBLISHER_JWT_KEY": KEY,
            "MERCURE_SUBSCRIBER_JWT_KEY": KEY, **extra}


def publish(server: Any, topics: list[str], *, token: str = PUBLISH_ALL, **fields: str
            ) -> httpx.Response:
    form: list[tuple[str, str]] = [("topic", t) for t in topics]
    form += list(fields.items())
    return httpx.post(server.url + HUB, content=urlencode(form), timeout=10,
                      headers={"Authorization": f"Bearer {token}",
                               "Content-Type": "application/x-www-form-urlencoded"})


async def received(server: Any, params: list[tuple[str, str]], topics: list[str], *,
                   headers: dict[str, str] | None = None, cookies: str | None = None,
                   wait: float = 30.0, **fields: str) -> tuple[httpx.Response, list[Any]]:
    """Subscribe, publish one update, and return the answer and what the stream got.

    The stream also selects a sentinel topic, published to right after the update: updates
    arrive in commit order, so once the sentinel is in, the update is in too if it matched
    (no waiting on a clock to prove that something did not arrive)."""
    marker, sentinel = uuid.uuid4().hex, f"sentinel-{uuid.uuid4().hex}"
    fields.setdefault("data", f"{MULTILINE} {marker}")
    hdrs = dict(headers or {})
    if cookies:
        hdrs["Cookie"] = cookies
    task = await open_stream(server.url + HUB, params=[*params, ("topic", sentinel)],
                             headers=hdrs, timeout=wait,
                             until=lambda s: any(e.data == sentinel for e in s.events))
    answer = publish(server, topics, **fields)
    publish(server, [sentinel], data=sentinel)
    stream = await task
    assert any(e.data == sentinel for e in stream.events), stream
    return answer, [e for e in stream.events if marker in e.data]


def rnd() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def hub(start_server: Any) -> Any:
    return start_server(env())


async def test_legacy_selectors_match_and_do_not_match(hub: Any) -> None:
    a, b, c, d = rnd(), rnd(), rnd(), rnd()
    cases = [
        ([("topic", a)], [a], True),                                          # raw string
        ([("topic", b)], [rnd(), b], True),                                   # multiple topics
        ([("topic", "foo"), ("topic", c)], [c], True),                        # multiple selectors
        ([("topic", f"https://example.net/foo/{d}")], [f"https://example.net/foo/{d}"], True),
        ([("topic", "https://example.net/foo/{random}")], [f"https://example.net/foo/{a}"], True),
        ([("topic", "*")], [rnd()], True),
        ([("topic", "another-name")], ["will-not-match"], False),
        ([("topic", "https://example.net/foo/another-name")],
         ["https://example.net/foo/will-not-match"], False),
        ([("topic", "https://example.net/bar/{var}")], ["https://example.net/foo/x"], False),
    ]
    results = await asyncio.gather(*(received(hub, params, topics, id=f"id-{i}-{rnd()}")
                                      for i, (params, topics, _) in enumerate(cases)))
    for (params, topics, expected), (answer, got) in zip(cases, results, strict=True):
        assert answer.status_code == 200, answer.text
        assert (len(got) == 1) is expected, (params, topics, got)


async def test_v1_match_and_urlpattern(hub: Any) -> None:
    a = rnd()
    cases = [
        ([("match", a)], [a], True),
        ([("match_urlpattern", "https://example.net/foo/:random")],
         [f"https://example.net/foo/{a}"], True),
        ([("match_urlpattern", "https://example.net/bar/:var")], ["https://example.net/foo/x"],
         False),
        ([("match", "https://example.net/foo/{random}")], [f"https://example.net/foo/{a}"], False),
    ]
    results = await asyncio.gather(*(received(hub, params, topics)
                                      for params, topics, _ in cases))
    for (params, topics, expected), (_, got) in zip(cases, results, strict=True):
        assert (len(got) == 1) is expected, (params, topics, got)


async def test_ids_data_type_retry_and_answer(hub: Any) -> None:
    custom = f'id-["{rnd()}"]'
    answer, got = await received(hub, [("topic", "t")], ["t"], id=custom, type="shout",
                                 retry="1500")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert answer.text == custom
    (event,) = got
    assert (event.id, event.event) == (custom, "shout")
    assert event.data.startswith(MULTILINE)  # one data: line per line, empty lines kept
    answer, got = await received(hub, [("topic", "t")], ["t"])
    assert answer.text.startswith("urn:uuid:") and got[0].id == answer.text
    assert got[0].event == "message"  # no event: line, the browser's default type


async def test_private_updates_need_a_matching_subscriber_token(hub: Any) -> None:
    topic = f"https://example.net/private/{rnd()}"
    _, got = await received(hub, [("topic", topic)], [topic], private="on")
    assert got == []  # anonymous: public updates only
    mine = jwt.encode({"mercure": {"subscribe": ["https://example.net/private/{id}"]}}, KEY)
    other = jwt.encode({"mercure": {"subscribe": ["https://example.net/other/{id}"]}}, KEY)
    _, got = await received(hub, [("topic", topic)], [topic], private="on",
                            headers={"Authorization": f"Bearer {mine}"})
    assert len(got) == 1
    _, got = await received(hub, [("topic", topic)], [topic], private="on",
                            cookies=f"mercureAuthorization={other}")
    assert got == []
    # the cookie and the query parameter carry a token like the header
    _, got = await received(hub, [("topic", topic)], [topic], private="on",
                            cookies=f"mercureAuthorization={mine}")
    assert len(got) == 1
    _, got = await received(hub, [("topic", topic), ("authorization", mine)], [topic],
                            private="on")
    assert len(got) == 1
    v1 = jwt.encode({"authorization_details": [{
        "type": "https://mercure.rocks/authorization-detail", "actions": ["subscribe"],
        "topics": [{"match_urlpattern": "https://example.net/private/:id"}]}]}, KEY,
        headers={"typ": "at+jwt"})
    _, got = await received(hub, [("match", topic)], [topic], private="on",
                            headers={"Authorization": f"Bearer {v1}"})
    assert len(got) == 1


async def test_publisher_rules_and_bad_input(hub: Any) -> None:
    assert publish(hub, ["t"], token=V1_ALL).status_code == 200  # 1.0 token, typ at+jwt, no aud
    narrow = jwt.encode({"mercure": {"publish": ["https://example.net/books/{id}"]}}, KEY)
    assert publish(hub, ["https://example.net/books/1"], token=narrow).status_code == 200
    assert publish(hub, ["https://example.net/authors/1"], token=narrow).status_code == 403
    assert publish(hub, ["t"], token=jwt.encode({"mercure": {"publish": ["*"]}}, "wrong")
                   ).status_code == 401
    assert httpx.post(hub.url + HUB, data={"topic": "t"}, timeout=5).status_code == 401
    assert publish(hub, []).status_code == 400
    assert publish(hub, ["t"], id="a\nb").status_code == 400
    assert publish(hub, ["t"], retry="soon").status_code == 400
    none_alg = jwt.encode({"mercure": {"publish": ["*"]}}, None, algorithm="none")
    assert publish(hub, ["t"], token=none_alg).status_code == 401
    for params in ([], [("match_urlpattern", "relative/:x")], [("topic", "a{b")]):
        r = httpx.get(hub.url + HUB, params=params, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_selector", params
    r = httpx.get(hub.url + HUB, params={"topic": "t"}, timeout=5,
                  headers={"Authorization": "Bearer not.a.token"})
    assert r.status_code == 401
    # /events never serves the reserved topic (private updates would leak there)
    r = httpx.get(hub.url + "/events", params={"topic": "_mercure"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "reserved_topic"


async def test_aggregates_advertise_the_hub(hub: Any) -> None:
    r = httpx.get(hub.url + "/aggregates/event_types", timeout=10)
    assert r.status_code == 200
    assert r.headers["link"] == '</.well-known/mercure>; rel="mercure"'


async def test_anonymous_off_needs_a_token(start_server: Any) -> None:
    server = start_server(env(MERCURE_ANONYMOUS="0"))
    r = httpx.get(server.url + HUB, params={"topic": "t"}, timeout=5)
    assert r.status_code == 401
    sub = jwt.encode({"mercure": {"subscribe": ["t"]}}, KEY)
    _, got = await received(server, [("topic", "t")], ["t"],
                            headers={"Authorization": f"Bearer {sub}"})
    assert len(got) == 1


async def test_resume_by_publisher_id_and_earliest_across_a_restart(start_server: Any) -> None:
    server = start_server(env())
    topic = f"books/{rnd()}"
    ids = [publish(server, [topic], id=f"book-{i}", data=f"v{i}").text for i in range(5)]
    assert ids == [f"book-{i}" for i in range(5)]
    server.stop()
    server = start_server(env(), port=server.port)
    stream = await read_sse(server.url + HUB, params={"topic": topic}, timeout=10,
                            headers={"Last-Event-ID": "book-1"}, max_events=3)
    assert [e.id for e in stream.events] == ["book-2", "book-3", "book-4"]
    for name in ("lastEventID", "last_event_id"):
        stream = await read_sse(server.url + HUB, timeout=10, max_events=2,
                                params={"topic": topic, name: "book-2"})
        assert [e.data for e in stream.events] == ["v3", "v4"], name
    stream = await read_sse(server.url + HUB, params={"topic": topic, "lastEventID": "earliest"},
                            timeout=10, max_events=5)
    assert [e.id for e in stream.events] == ids
    # an id history does not hold: pgsse's reset, then live
    stream = await read_sse(server.url + HUB, params={"topic": topic}, timeout=10, max_events=1,
                            headers={"Last-Event-ID": "never-published"})
    assert stream.events[0].event == "reset"


async def test_a_replica_serves_what_another_accepted(start_server: Any) -> None:
    first, second = start_server(env()), start_server(env())
    topic = f"https://example.net/replicated/{rnd()}"
    marker = rnd()
    task = await open_stream(second.url + HUB, params={"topic": topic}, timeout=10,
                             until=lambda s: any(marker in e.data for e in s.events))
    answer = publish(first, [topic], data=marker, id=f"r-{marker}")
    stream = await task
    assert answer.status_code == 200
    assert [e.id for e in stream.events if marker in e.data] == [f"r-{marker}"]


@pytest.mark.parametrize(("template", "topic", "expected"), [
    ("https://example.net/foo/{id}", "https://example.net/foo/1", True),
    ("https://example.net/foo/{id}", "https://example.net/foo/1/2", False),
    ("https://example.net/{+path}", "https://example.net/a/b/c", True),
    ("https://example.net/foo{/seg*}", "https://example.net/foo/a/b", True),
    ("https://example.net/foo{?q,r}", "https://example.net/foo?q=1&r=2", True),
    ("https://example.net/foo{?q,r}", "https://example.net/foo", True),
    ("https://example.net/foo/{id}.json", "https://example.net/foo/7.json", True),
    ("https://example.net/foo/{id}.json", "https://example.net/foo/7.xml", False),
])
def test_uri_templates(template: str, topic: str, expected: bool) -> None:
    assert selectors.legacy(template).matches(topic) is expected


async def test_tokens_signed_by_the_identity_provider_jwks(start_server: Any) -> None:
    from tests.test_jwks import Provider, sign

    provider = Provider().start()
    try:
        server = start_server({**env(), "AUTH_JWKS_URL": provider.url})
        topic = f"https://example.net/jwks/{rnd()}"
        publisher = sign("ES256", topics=None, mercure={"publish": ["*"]})
        subscriber = sign("RS256", topics=None, mercure={"subscribe": [topic]})
        assert publish(server, [topic], token=publisher).status_code == 200
        _, got = await received(server, [("topic", topic)], [topic], private="on",
                                headers={"Authorization": f"Bearer {subscriber}"})
        assert len(got) == 1
        # an HS256 token signed with the provider's public key material is no way in
        forged = jwt.encode({"mercure": {"publish": ["*"]}}, provider.url, algorithm="HS256")
        assert publish(server, [topic], token=forged).status_code == 401
    finally:
        provider.stop()
