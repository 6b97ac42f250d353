"""Named queries: every name the code asks for exists, files parse, lock ids agree with SQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pgsse import queries
from pgsse.queries import Lock, parse, query

ROOT = Path(__file__).resolve().parent.parent


def test_every_query_the_code_names_exists_and_is_one_statement_or_a_script() -> None:
    used = set()
    for path in (ROOT / "service").glob("*.py"):
        used |= set(re.findall(r'(?<![a-z_])(?:named_)?query\("([a-z_0-9]+)"\)', path.read_text()))
    assert len(used) >= 10
    for name in used:
        assert query(name).strip(), name


def test_parse_drops_comments_and_semicolons_and_refuses_duplicates() -> None:
    text = "-- header\n\n-- name: a\n-- what a does\nSELECT 1;\n\n-- name: b\nSELECT 2\n"
    assert parse(text) == {"a": "SELECT 1", "b": "SELECT 2"}
    with pytest.raises(ValueError):
        parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")
    with pytest.raises(queries.UnknownQuery):
        query("no_such_query")


def test_the_sequencing_lock_in_sql_is_the_one_named_in_python() -> None:
    for path in sorted((ROOT / "sql" / "migrations").glob("*.sql")):
        for number in re.findall(r"pg_advisory_xact_lock\((\d+)\)", path.read_text()):
            assert int(number) == Lock.SEQUENCE_BATCH, path.name
    assert len(set(Lock)) == 3, "distinct ids"
