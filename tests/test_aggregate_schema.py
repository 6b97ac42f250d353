"""Aggregates follow their tables' shape (contract section 14).

``ALTER TABLE`` does not move a table's version, so without more an aggregate kept answering
304 (or its cached 200) with the old columns. An aggregate whose tables changed shape is
prepared again and answers with the new shape; one that no longer compiles answers 503
``aggregate_unavailable`` naming the SQL error while ``/readyz`` stays 200 and lists it under
``degraded``; it recovers by itself once the schema allows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import eventually, open_stream, stats

Start = Callable[..., Any]

PEOPLE = """-- Every person, every column.
SELECT * FROM public.people ORDER BY 1
"""
NAMES = """-- Names only: breaks when the column goes.
SELECT id, name FROM public.people ORDER BY id
"""


@pytest.fixture
async def agg_dir(conn: asyncpg.Connection, tmp_path: Path) -> Path:
    await conn.execute("CREATE TABLE public.people (id int PRIMARY KEY, name text)")
    await conn.execute("SELECT realtime.watch('public.people', 'people')")
    await conn.execute("GRANT SELECT ON public.people TO pgsse_reader")
    await conn.execute("INSERT INTO public.people VALUES (1, 'ann'), (2, 'bob')")
    while await conn.fetchval("SELECT realtime.sequence_v1()"):
        pass
    directory = tmp_path / "aggregates"
    directory.mkdir()
    (directory / "people.sql").write_text(PEOPLE)
    (directory / "names.sql").write_text(NAMES)
    return directory


@pytest.fixture
async def server(start_server: Start, conn: asyncpg.Connection, agg_dir: Path) -> Any:
    server = start_server({"AGGREGATES_DIR": str(agg_dir)})
    head = await conn.fetchval("SELECT last_position FROM realtime.sequencer")
    await eventually(lambda: stats(server)["position"] >= head, what="events fanned out")
    return server


def get(server: Any, name: str, etag: str | None = None) -> httpx.Response:
    headers = {"If-None-Match": etag} if etag else None
    return httpx.get(f"{server.url}/aggregates/{name}", headers=headers, timeout=10)


async def new_shape(server: Any, name: str, etag: str, check: Callable[[list[Any]], bool]) -> str:
    """Wait until ``If-None-Match: etag`` gets a 200 whose rows pass ``check``; its ETag.
    (A plain GET must agree: no cached 200 with the old columns either.)"""
    def changed() -> httpx.Response | None:
        answer = get(server, name, etag)
        return answer if answer.status_code == 200 and check(answer.json()["data"]) else None

    answer = await eventually(changed, what=f"{name} in its new shape")
    plain = get(server, name)
    assert plain.status_code == 200 and check(plain.json()["data"]), plain.text
    assert plain.headers["etag"] == answer.headers["etag"] != etag
    # and that new shape is cached again: a free 304
    assert get(server, name, answer.headers["etag"]).status_code == 304
    return str(answer.headers["etag"])


async def test_add_rename_retype_drop_column_change_the_answer(
        server: Any, conn: asyncpg.Connection) -> None:
    first = get(server, "people")
    assert first.status_code == 200
    assert first.json()["data"] == [{"id": 1, "name": "ann"}, {"id": 2, "name": "bob"}]
    etag = first.headers["etag"]
    assert get(server, "people", etag).status_code == 304

    stream = await open_stream(server.url + "/events", params={"topic": "aggregates/people"},
                               until=lambda s: any(e.event == "aggregate.invalidated"
                                                   for e in s.events), timeout=15)
    await conn.execute("ALTER TABLE public.people ADD COLUMN age int DEFAULT 7")
    etag = await new_shape(server, "people", etag, lambda rows: rows[0] == {"id": 1, "name": "ann", "age": 7})
    heard = await stream
    assert [e.json() for e in heard.events] == [{"aggregate": "people"}], \
        "subscribers hear of the change, as of a data change"
    fields = httpx.get(server.url + "/aggregates/people?fields=id,age", timeout=10)
    assert fields.status_code == 200 and fields.json()["data"][0] == {"id": 1, "age": 7}

    await conn.execute("ALTER TABLE public.people RENAME COLUMN name TO full_name")
    etag = await new_shape(server, "people", etag,
                           lambda rows: rows[1] == {"id": 2, "full_name": "bob", "age": 7})

    await conn.execute("ALTER TABLE public.people ALTER COLUMN age TYPE text")
    etag = await new_shape(server, "people", etag, lambda rows: rows[0]["age"] == "7")

    await conn.execute("ALTER TABLE public.people DROP COLUMN age")
    await new_shape(server, "people", etag, lambda rows: rows[0] == {"id": 1, "full_name": "ann"})


async def test_a_broken_aggregate_is_unavailable_then_recovers(
        server: Any, conn: asyncpg.Connection) -> None:
    first = get(server, "names")
    assert first.status_code == 200 and first.json()["data"][0] == {"id": 1, "name": "ann"}
    ready = httpx.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json().get("degraded", []) == []

    await conn.execute("ALTER TABLE public.people DROP COLUMN name")

    def unavailable() -> httpx.Response | None:
        answer = get(server, "names", first.headers["etag"])
        return answer if answer.status_code == 503 else None

    answer = await eventually(unavailable, what="names unavailable")
    error = answer.json()["error"]
    assert error["code"] == "aggregate_unavailable", error
    assert "name" in error["message"] and "42703" in error["message"], error
    assert get(server, "names").status_code == 503, "no cached 200 either"
    assert get(server, "people").status_code == 200, "the other aggregate is not broken"
    ready = httpx.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["degraded"] == ["names"]

    await conn.execute("ALTER TABLE public.people ADD COLUMN name text DEFAULT 'x'")
    back = await eventually(lambda: (a := get(server, "names")).status_code == 200 and a,
                            what="names back")
    assert back.json()["data"][0] == {"id": 1, "name": "x"}
    ready = httpx.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json().get("degraded", []) == [], ready.text


async def test_a_renamed_table_breaks_then_recovers(server: Any, conn: asyncpg.Connection) -> None:
    etag = get(server, "names").headers["etag"]
    await conn.execute("ALTER TABLE public.people RENAME TO persons")
    answer = await eventually(lambda: (a := get(server, "names", etag)).status_code == 503 and a,
                              what="names unavailable")
    assert answer.json()["error"]["code"] == "aggregate_unavailable"
    assert "people" in answer.json()["error"]["message"]
    await eventually(lambda: httpx.get(server.url + "/readyz", timeout=5).json().get("degraded")
                     == ["names", "people"], what="both degraded")
    await conn.execute("ALTER TABLE public.persons RENAME TO people")
    await eventually(lambda: get(server, "names").status_code == 200, what="names back")
    await eventually(lambda: httpx.get(server.url + "/readyz", timeout=5).json().get("degraded")
                     in (None, []), what="nothing degraded")


async def test_schema_changes_under_a_writer(server: Any, conn: asyncpg.Connection,
                                             database: str) -> None:
    """With a writer committing all along (so answers are queries, not cache hits, and a
    query can meet the change before the poller does), every answer is a 200 in one shape
    or the other, or 503 aggregate_unavailable for the aggregate that broke."""
    writer = await asyncpg.connect(database)
    stop = asyncio.Event()
    written = 0

    async def write() -> None:
        nonlocal written
        while not stop.is_set():
            await writer.execute("INSERT INTO public.people (id) VALUES ($1)", 100 + written)
            written += 1
            await asyncio.sleep(0.005)  # pacing, not synchronisation

    answers: dict[str, dict[str, int]] = {"people": {}, "names": {}}

    async def until(client: httpx.AsyncClient, done: Callable[[dict[str, Any]], bool],
                    what: str) -> None:
        async def poll() -> bool:
            got: dict[str, Any] = {}
            for name in answers:
                answer = await client.get(f"/aggregates/{name}")
                outcome = str(answer.status_code)
                if answer.status_code != 200:
                    outcome += " " + answer.json()["error"]["code"]
                answers[name][outcome] = answers[name].get(outcome, 0) + 1
                got[name] = (answer.status_code, answer.json())
            return done(got)
        await eventually(poll, what=what)

    task = asyncio.create_task(write())
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            await eventually(lambda: written >= 5, what="the writer writing")
            await conn.execute("ALTER TABLE public.people DROP COLUMN name")
            await until(client, lambda got: got["names"][0] == 503 and got["people"][0] == 200
                        and "name" not in got["people"][1]["data"][0], "names broken")
            await conn.execute("ALTER TABLE public.people ADD COLUMN name text")
            await until(client, lambda got: got["names"][0] == 200
                        and "name" in got["people"][1]["data"][0], "names back")
    finally:
        stop.set()
        await task
        await writer.close()
    assert set(answers["people"]) == {"200"}, answers
    assert set(answers["names"]) <= {"200", "503 aggregate_unavailable"}, answers
    assert written >= 10


async def test_shapes_in_process(tmp_path: Path) -> None:
    """``Shapes`` without a database: a broken aggregate answers from memory, is not inspected
    again on every request, and recovers once its inspection passes."""
    from pgsse.catalog import Aggregate
    from pgsse.shapes import AggregateUnavailable, Shapes
    from pgsse.sqlfiles import AggregateFileError, parse

    path = tmp_path / "names.sql"
    path.write_text(NAMES)
    aggregate = Aggregate(parse(path))
    broken: list[str] = ["42703: column \"name\" does not exist"]
    inspected = 0
    changed: list[str] = []

    async def inspect(a: Aggregate) -> None:
        nonlocal inspected
        inspected += 1
        if broken:
            raise AggregateFileError(path, 2, broken[0])

    shapes = Shapes({aggregate.name: aggregate}, inspect, lambda: None,  # type: ignore[arg-type, return-value]
                    lambda a: changed.append(a.name))
    await shapes.ensure(aggregate)  # neither stale nor broken: nothing to do
    assert inspected == 0 and shapes.degraded() == []

    shapes.stale.add(aggregate.name)  # what the poller does when a table's fingerprint moves
    with pytest.raises(AggregateUnavailable) as caught:
        await shapes.ensure(aggregate)
    assert caught.value.status == 503 and caught.value.code == "aggregate_unavailable"
    assert "42703" in caught.value.message and shapes.degraded() == ["names"]
    for _ in range(5):  # from memory: no inspection per request
        with pytest.raises(AggregateUnavailable):
            await shapes.ensure(aggregate)
    assert inspected == 1

    broken.clear()
    shapes.stale.add(aggregate.name)
    await shapes.ensure(aggregate)
    assert inspected == 2 and shapes.degraded() == []
