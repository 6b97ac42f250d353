"""A real Chromium against the Mercure hub, the way Mercure's own conformance suite drives a
hub: the page is served by the hub's origin, opens a plain ``EventSource`` on
``/.well-known/mercure`` and publishes with ``fetch`` (form body, bearer token). Each case
says whether the update must arrive with the publisher's id as ``lastEventId`` and the
multi-line data intact. Both dialects: 0.x (``topic``, URI templates, legacy claim token)
and 1.0 (``match`` / ``match_urlpattern``, RFC 9068 token with ``authorization_details``)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.test_dashboard import launch
from tests.test_mercure import KEY, PUBLISH_ALL, V1_ALL, env

CHECK = """async ([params, topics, id, data, priv, token]) => {
  const url = new URL("/.well-known/mercure", window.origin);
  for (const [k, v] of params) url.searchParams.append(k, v);
  // A public sentinel published right after the update: updates arrive in commit order, so
  // when it is in, the update is in too if it matched (no clock decides a "not received").
  const sentinel = "sentinel-" + Math.random().toString(16).slice(2);
  url.searchParams.append("topic", sentinel);
  const form = new URLSearchParams();
  for (const t of topics) form.append("topic", t);
  form.set("id", id); form.set("data", data);
  if (priv) form.set("private", "on");
  const es = new EventSource(url);
  await new Promise((resolve, reject) => { es.onopen = resolve; es.onerror = reject; });
  let received = false;
  const done = new Promise((resolve) => {
    es.onmessage = (e) => {
      if (e.lastEventId === id && e.data === data) received = true;
      if (e.data === sentinel) resolve(true);
    };
    setTimeout(() => resolve(false), 20000);
  });
  const post = (body) => fetch("/.well-known/mercure", {method: "POST", body,
                               headers: {Authorization: "Bearer " + token}});
  const resp = await post(form);
  const body = await resp.text();
  const after = new URLSearchParams([["topic", sentinel], ["data", sentinel]]);
  await post(after);
  const sentinelSeen = await done;
  es.close();
  return {received, sentinelSeen, status: resp.status, type: resp.headers.get("Content-Type"), body};
}"""


def cases(dialect: str) -> list[tuple[str, list[list[str]], list[str], bool, bool]]:
    r = [uuid.uuid4().hex for _ in range(5)]
    pattern = "topic" if dialect == "0.x" else "match_urlpattern"
    placeholder = "{random}" if dialect == "0.x" else ":random"
    other = "{var}" if dialect == "0.x" else ":var"
    exact = "topic" if dialect == "0.x" else "match"
    out = [
        ("raw string", [[exact, r[0]]], [r[0]], True, False),
        ("multiple selectors", [[exact, "foo"], [exact, r[2]]], [r[2]], True, False),
        ("URI", [[exact, f"https://example.net/foo/{r[3]}"]], [f"https://example.net/foo/{r[3]}"],
         True, False),
        ("pattern", [[pattern, f"https://example.net/foo/{placeholder}"]],
         [f"https://example.net/foo/{r[4]}"], True, False),
        ("nonmatching raw", [[exact, "another-name"]], ["will-not-match"], False, False),
        ("nonmatching URI", [[exact, "https://example.net/foo/another-name"]],
         ["https://example.net/foo/will-not-match"], False, False),
        ("nonmatching pattern", [[pattern, f"https://example.net/bar/{other}"]],
         ["https://example.net/foo/will-not-match"], False, False),
        ("private raw", [[exact, r[0]]], [r[0]], False, True),
        ("private URI", [[exact, f"https://example.net/foo/{r[3]}"]],
         [f"https://example.net/foo/{r[3]}"], False, True),
        ("private pattern", [[pattern, f"https://example.net/foo/{placeholder}"]],
         [f"https://example.net/foo/{r[4]}"], False, True),
    ]
    if dialect == "0.x":
        out.insert(1, ("multiple topics", [[exact, r[1]]], [uuid.uuid4().hex, r[1]], True, False))
    return out


@pytest.mark.parametrize("dialect", ["0.x", "1.0"])
async def test_conformance_style_cases_in_chromium(start_server: Any, dialect: str) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    server = start_server(env())
    token = PUBLISH_ALL if dialect == "0.x" else V1_ALL
    assert KEY  # the tokens are signed with the hub's configured key
    async with playwright_api.async_playwright() as p:
        browser = await launch(playwright_api, p)
        try:
            page = await browser.new_page()
            await page.goto(server.url + "/")  # the hub's origin (a 404 page is fine)
            results = {}
            for name, params, topics, must, private in cases(dialect):
                update_id = f"id-{topics}"
                data = f"data for\n\n        {name}"
                got = await page.evaluate(CHECK, [params, topics, update_id, data, private, token])
                results[name] = got
                assert got["sentinelSeen"] and got["received"] is must, (dialect, name, got)
                assert got["status"] == 200 and got["type"].startswith("text/plain"), got
                assert got["body"] == update_id, got
            assert len(results) == (11 if dialect == "0.x" else 10)
        finally:
            await browser.close()
