"""Streaming exports (``?format=csv|ndjson``) against a real PostgreSQL and a real pgsse."""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from tests.support import eventually

Start = Callable[..., Any]
ROWS = 1_000_000
KEYS = "export-key-0123456789abcdef0123456789"

BIG = """-- Every row of public.big.
-- export: order by id
-- export: count
SELECT id, store_id, label, amount, created_at FROM public.big
"""
# A two-column key with mixed directions, like the dashboard's recent orders.
RECENT = """-- Rows newest first.
-- param store_id: int = null
-- export: order by created_at desc, id
-- export: count
SELECT id, store_id, label, created_at FROM public.big
WHERE id <= 20000 AND (:store_id IS NULL OR store_id = :store_id)
"""
UNORDERED = """-- No export key: cannot resume.
SELECT id, label FROM public.big WHERE id <= 10
"""
BROKEN = """-- Fails at row 30000: division by zero mid-stream.
SELECT g AS id, 1 / (g - 30000) AS x FROM generate_series(1, 50000) g
"""
ENDLESS = """-- Two million generated rows.
SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 2000000) g
"""
MINE = """-- The caller's store's rows, by the claim.
-- param store_id: int from claim store_id
-- export: order by id
SELECT id, store_id FROM public.big WHERE id <= 100 AND store_id = :store_id
"""
POLICED = """-- Whatever row-level security lets the caller see.
-- export: order by id
SELECT id, store_id FROM public.big WHERE id <= 100
"""

# The JSON form of each row, joined: compared with what an export carried.
FINGERPRINT = """
SELECT md5(string_agg(concat_ws('|', id, store_id, coalesce(label, '<null>'),
                                to_jsonb(amount) #>> '{}', to_jsonb(created_at) #>> '{}'),
                      E'\\n' ORDER BY id) || E'\\n'), count(*)
FROM public.big
"""


@pytest.fixture
async def export_dir(conn: asyncpg.Connection, tmp_path: Path) -> Path:
    return await make_export_dir(conn, tmp_path, 100_000)


@pytest.fixture
async def million_dir(conn: asyncpg.Connection, tmp_path: Path) -> Path:
    return await make_export_dir(conn, tmp_path, ROWS)


async def make_export_dir(conn: asyncpg.Connection, tmp_path: Path, rows: int) -> Path:
    """public.big with ``rows`` rows, and a directory of aggregate files reading it."""
    await conn.execute(f"""
        CREATE TABLE public.big (id bigint PRIMARY KEY, store_id int NOT NULL, label text,
                                 amount numeric, created_at timestamptz);
        INSERT INTO public.big
        SELECT g, g % 7,
               CASE WHEN g % 1000 = 0 THEN 'say "hi", then' || E'\\n' || 'go'
                    WHEN g % 777 = 0 THEN NULL WHEN g % 501 = 0 THEN '#hash'
                    ELSE 'item ' || g END,
               (g % 10000) / 100.0, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 s'
        FROM generate_series(1, {rows}) g;
        GRANT SELECT ON public.big TO pgsse_reader;
        ANALYZE public.big;
    """)
    directory = tmp_path / "aggregates"
    directory.mkdir()
    for name, sql in {"big": BIG, "recent": RECENT, "unordered": UNORDERED, "broken": BROKEN,
                      "endless": ENDLESS, "mine": MINE, "policed": POLICED}.items():
        (directory / f"{name}.sql").write_text(sql)
    return directory


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PeakRss:
    """The largest VmRSS of a process, sampled every 10 ms in a thread while in the block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_kb(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def csv_lines(body: bytes) -> Iterator[list[str | None]]:
    """Rows of an export's CSV, with NULL (an unquoted empty cell) as None."""
    text = body.decode()
    for raw, row in zip(split_csv_records(text), csv.reader(io.StringIO(text, newline="")), strict=True):
        cells: list[str | None] = list(row)
        # csv reads "" and an empty cell alike; the raw record tells them apart.
        raw_cells = raw.rstrip("\r\n").split(",") if '"' not in raw else None
        if raw_cells is not None:
            cells = [None if c == "" else c for c in raw_cells]
        yield cells


def split_csv_records(text: str) -> Iterator[str]:
    start = scan = 0
    while (cut := text.find("\r\n", scan)) != -1:
        if text.count('"', start, cut) % 2:
            scan = cut + 2
            continue
        yield text[start:cut + 2]
        start = scan = cut + 2
    assert start == len(text), "the body ends with a whole record"


def export(url: str, name: str, fmt: str, **params: Any) -> httpx.Response:
    headers = params.pop("headers", {})
    return httpx.get(f"{url}/aggregates/{name}", params={"format": fmt, **params},
                     headers=headers, timeout=60)


def metric(server: Any, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}}" if labels else name
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return next((float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith(prefix + " ")), 0.0)


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_a_million_rows_in_constant_memory_each_row_once(
        start_server: Start, conn: asyncpg.Connection, million_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(million_dir)})
    assert server.proc is not None
    pid = server.proc.pid
    fingerprint, count = await conn.fetchrow(FINGERPRINT)
    assert count == ROWS
    for fmt in ("csv", "ndjson"):  # warm up: imports, first-use allocations
        assert export(server.url, "recent", fmt).status_code == 200
    for fmt in ("csv", "ndjson"):
        before = rss_kb(pid)
        digest = hashlib.md5()
        rows = size = 0
        started = time.perf_counter()
        with PeakRss(pid) as rss, httpx.stream(
                "GET", f"{server.url}/aggregates/big", params={"format": fmt}, timeout=60,
                headers={"Accept-Encoding": "identity"}) as response:
            assert response.status_code == 200
            assert response.headers["x-total-count"] == str(ROWS)
            position = response.headers["x-export-position"]
            assert response.headers["content-disposition"] == (
                f'attachment; filename="big-{position}.{fmt}"')
            assert response.headers["cache-control"] == "no-store"
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
        elapsed = time.perf_counter() - started
        size = len(body)
        growth_mb = (rss.peak - before) / 1024
        if fmt == "csv":
            records = csv_lines(bytes(body))
            assert next(records) == ["id", "store_id", "label", "amount", "created_at"]
            for cells in records:
                digest.update(("|".join("<null>" if c is None else c for c in cells) + "\n").encode())
                rows += 1
            assert response.headers["content-type"] == "text/csv; charset=utf-8; header=present"
        else:
            lines = bytes(body).split(b"\n")
            assert lines[-1] == b""
            trailer = json.loads(lines[-2])
            assert trailer == {"@pgsse": "end", "rows": ROWS, "bytes": size - len(lines[-2]) - 1,
                               "position": int(position)}
            for line in lines[:-2]:
                row = json.loads(line, parse_float=str, parse_int=str)
                cells = [row["id"], row["store_id"], row["label"] or "<null>", row["amount"],
                         row["created_at"]]
                digest.update(("|".join(cells) + "\n").encode())
                rows += 1
        print(f"\n{fmt}: {ROWS} rows, {size / 1e6:.1f} MB in {elapsed:.2f} s: "
              f"{ROWS / elapsed:,.0f} rows/s, {size / 1e6 / elapsed:.1f} MB/s; "
              f"server RSS +{growth_mb:.1f} MB")
        assert rows == ROWS
        assert digest.hexdigest() == fingerprint, f"{fmt}: rows differ from the table"
        assert growth_mb < 30, f"{fmt}: server RSS grew by {growth_mb:.1f} MB"
    # An export is counted when its handler returns, just after the client has its last byte.
    await eventually(lambda: metric(server, "pgsse_export_streams_total", aggregate="big",
                                    outcome="complete") == 2, what="both exports counted")
    assert metric(server, "pgsse_export_rows_total", aggregate="big") == 2 * ROWS


def records_of(fmt: str, body: bytes) -> list[bytes]:
    """Complete data records of a (possibly cut) body: no header, trailer or cut tail."""
    if fmt == "csv":
        text = body.decode(errors="ignore")
        complete = text[:text.rfind("\r\n") + 2] if "\r\n" in text else ""
        out, start, scan = [], 0, 0
        while (cut := complete.find("\r\n", scan)) != -1:
            if complete.count('"', start, cut) % 2:
                scan = cut + 2
                continue
            out.append(complete[start:cut + 2].encode())
            start = scan = cut + 2
        return out[1:]
    lines = body.split(b"\n")[:-1]
    return [line + b"\n" for line in lines if not line.startswith(b'{"@pgsse"')]


def key_of(fmt: str, record: bytes, columns: list[str]) -> str:
    if fmt == "csv":
        cells = next(csv.reader(io.StringIO(record.decode())))
        row = dict(zip(["id", "store_id", "label", "created_at"], cells, strict=True))
    else:
        row = json.loads(record)
    return json.dumps([row[c] for c in columns])


async def test_interrupted_export_resumes_after_the_last_row(
        start_server: Start, export_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(export_dir)})
    rng = random.Random()
    for fmt in ("csv", "ndjson"):
        full = export(server.url, "recent", fmt)
        assert full.status_code == 200 and full.headers["x-total-count"] == "20000"
        assert json.loads(full.headers["x-export-key"]) == ["created_at", "id"]
        whole = records_of(fmt, full.content)
        assert len(whole) == 20000
        position = full.headers["x-export-position"]
        for _ in range(3):
            cut_at = rng.randrange(1, len(full.content) - 1)
            got = bytearray()
            with httpx.stream("GET", f"{server.url}/aggregates/recent",
                              params={"format": fmt}, timeout=30,
                              headers={"Accept-Encoding": "identity"}) as response:
                for chunk in response.iter_raw(4096):
                    got += chunk
                    if len(got) >= cut_at:
                        break  # the connection closes here, mid-record
            first = records_of(fmt, bytes(got[:cut_at]))
            after = key_of(fmt, first[-1], ["created_at", "id"]) if first else None
            params = {"after": after} if after else {}
            rest = export(server.url, "recent", fmt, headers={"X-Export-Position": position},
                          **params)
            assert rest.status_code == 200, rest.text
            assert rest.headers["x-export-changed"] == "unknown"  # public.big is not watched
            assert int(rest.headers["x-total-count"]) == 20000 - len(first)
            assert b"".join(first + records_of(fmt, rest.content)) == b"".join(whole), (fmt, cut_at)


async def test_tenants_export_only_their_rows(
        start_server: Start, conn: asyncpg.Connection, export_dir: Path) -> None:
    await conn.execute("ALTER TABLE public.big ENABLE ROW LEVEL SECURITY")
    await conn.execute("CREATE POLICY tenant ON public.big FOR SELECT TO pgsse_reader USING "
                       "(store_id = (current_setting('request.jwt.claims', true)::jsonb"
                       " ->> 'store_id')::int)")
    server = start_server({"AGGREGATES_DIR": str(export_dir), "AUTH_SECRET": KEYS})

    def bearer(store: int, topics: tuple[str, ...] = ("aggregates",)) -> dict[str, str]:
        claims = {"exp": int(time.time()) + 300, "topics": list(topics), "store_id": store}
        return {"Authorization": "Bearer " + jwt.encode(claims, KEYS, algorithm="HS256")}

    expected = {s: [i for i in range(1, 101) if i % 7 == s] for s in (1, 2)}
    for name in ("mine", "policed"):
        for store in (1, 2):
            for fmt in ("csv", "ndjson"):
                response = export(server.url, name, fmt, headers=bearer(store))
                assert response.status_code == 200, response.text
                assert response.headers["vary"].count("Authorization") == 1
                rows = records_of(fmt, response.content)
                if fmt == "csv":
                    ids = [int(r.split(b",")[0]) for r in rows]
                    stores = {int(r.split(b",")[1]) for r in rows}
                else:
                    ids = [json.loads(r)["id"] for r in rows]
                    stores = {json.loads(r)["store_id"] for r in rows}
                assert ids == expected[store] and stores == {store}, (name, store, fmt)
    assert export(server.url, "mine", "csv").status_code == 401
    assert export(server.url, "mine", "csv", headers=bearer(1, ("orders",))).status_code == 403
    forged = export(server.url, "mine", "csv", store_id="2", headers=bearer(1))
    assert forged.status_code == 403 and forged.json()["error"]["param"] == "store_id"


def test_bad_format_and_after_are_400_json(start_server: Start, export_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(export_dir)})
    cases = [
        ("big", {"format": "xml"}, "format"),
        ("big", {"format": ""}, "format"),
        ("big", {"format": "csv", "after": "not-a-number"}, "after"),
        ("big", {"format": "csv", "after": "[1, 2]"}, "after"),
        ("big", {"format": "ndjson", "after": "[{\"a\": 1}]"}, "after"),
        ("big", {"format": "csv", "after": "[1"}, "after"),
        ("big", {"format": "csv", "after": "99999999999999999999999"}, "after"),
        ("recent", {"format": "csv", "after": '["yesterday-ish", 5]'}, "after"),
        ("unordered", {"format": "csv", "after": "3"}, "after"),
        ("big", {"format": "csv", "fields": "nope"}, "fields"),
        ("recent", {"format": "csv", "store_id": "x"}, "store_id"),
    ]
    for name, params, param in cases:
        response = httpx.get(f"{server.url}/aggregates/{name}", params=params, timeout=10)
        assert response.status_code == 400, (params, response.text)
        error = response.json()["error"]
        assert set(error) == {"code", "message", "param"} and error["param"] == param, params
        assert error["code"] == ("invalid_fields" if param == "fields" else "invalid_parameter")
    # Without an export, format and after stay unknown parameters of the JSON form.
    plain = httpx.get(f"{server.url}/aggregates/unordered", params={"after": "1"}, timeout=10)
    assert plain.status_code == 400 and plain.json()["error"]["code"] == "unknown_parameter"
    # A resume naming a bad position.
    bad = httpx.get(f"{server.url}/aggregates/big", params={"format": "csv"},
                    headers={"X-Export-Position": "-1"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-export-position"


def test_negotiation_gzip_fields_and_head(start_server: Start, export_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(export_dir)})
    url = f"{server.url}/aggregates/unordered"
    plain = httpx.get(url, params={"format": "csv"}, headers={"Accept-Encoding": "identity"})
    assert plain.content.startswith(b"id,label\r\n1,item 1\r\n")
    assert plain.content.count(b"\r\n") == 11 and "content-encoding" not in plain.headers
    by_accept = httpx.get(url, headers={"Accept": "text/csv", "Accept-Encoding": "identity"})
    assert by_accept.content == plain.content
    assert by_accept.headers["content-type"].startswith("text/csv")
    ndjson = httpx.get(url, headers={"Accept": "application/json;q=0.5, application/x-ndjson"})
    assert ndjson.headers["content-type"] == "application/x-ndjson"
    assert json.loads(ndjson.text.splitlines()[0]) == {"id": 1, "label": "item 1"}
    assert httpx.get(url, headers={"Accept": "text/csv;q=0.1, application/json"}).json()["data"]
    with httpx.stream("GET", url, params={"format": "csv"},
                      headers={"Accept-Encoding": "gzip"}) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        assert zipped.headers["vary"].startswith("Accept, Accept-Encoding")
        assert gzip.decompress(b"".join(zipped.iter_raw())) == plain.content
    only_label = httpx.get(url, params={"format": "csv", "fields": "label"})
    assert only_label.content.startswith(b"label\r\nitem 1\r\n")
    keyed = httpx.get(f"{server.url}/aggregates/big", params={"format": "csv", "fields": "label",
                                                               "after": "99998"})
    assert keyed.content == b"id,label\r\n99999,item 99999\r\n100000,\"say \"\"hi\"\", then\ngo\"\r\n"
    head = httpx.head(url, params={"format": "ndjson"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "application/x-ndjson"


async def test_query_error_mid_stream_ends_with_a_marker_and_a_cut_connection(
        start_server: Start, export_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(export_dir)})
    for fmt in ("csv", "ndjson"):
        got = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):  # the chunked body never ends
            with httpx.stream("GET", f"{server.url}/aggregates/broken", params={"format": fmt},
                              timeout=30) as response:
                assert response.status_code == 200
                for chunk in response.iter_bytes():
                    got += chunk
        lines = bytes(got).splitlines()
        assert len(lines) > 20000, "rows were streamed before the error"
        if fmt == "csv":
            assert lines[-1].startswith(b"#pgsse-export-error code=22012 rows=")
            assert b"division by zero" in lines[-1]
        else:
            marker = json.loads(lines[-1])
            assert marker["@pgsse"] == "error" and marker["code"] == "22012"
            assert marker["rows"] == len(lines) - 1
    assert metric(server, "pgsse_export_streams_total", aggregate="broken", outcome="failed") == 2
    assert '"export_failed"' in server.logs()


async def test_client_going_away_releases_cursor_and_transaction(
        start_server: Start, conn: asyncpg.Connection, export_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(export_dir)})

    async def in_transaction() -> int:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"))

    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", f"{server.url}/aggregates/endless",
                                 params={"format": "csv"}) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                break  # read one chunk, then stop reading: the server blocks on the socket

            async def open_transaction() -> bool:
                return await in_transaction() == 1

            await wait_for(open_transaction)  # the test can fail: the export holds one
    # The connection is closed now.

    async def released() -> bool:
        return await in_transaction() == 0

    await wait_for(released, timeout=5)
    idle = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE"
                               " datname = current_database() AND state LIKE 'idle in transaction%'")
    assert idle == 0

    def outcome() -> float:
        return metric(server, "pgsse_export_streams_total", aggregate="endless",
                      outcome="disconnected")

    async def counted() -> bool:
        return outcome() == 1

    await wait_for(counted)
    assert metric(server, "pgsse_export_active") == 0
