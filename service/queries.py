"""Named SQL queries, read from ``sql/queries/*.sql`` (package data ``pgsse.sql``), and the
advisory-lock ids, named in one place.

A file holds blocks, each starting with ``-- name: <name>``; the comment lines after the name
say what the query is for. ``query("watched_tables")`` returns the text (loaded once).
Wrapping SQL that depends on an aggregate file (catalog.py, export.py) is built there, from
the file's own text; everything else lives in ``sql/``.
"""

from __future__ import annotations

import enum
import functools
import re

from .settings import SQL_DIR

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.M)


class Lock(enum.IntEnum):
    """Advisory-lock ids. ``SEQUENCE_BATCH`` is also written in the sequencing functions of
    ``sql/migrations/`` (a test checks that they agree)."""

    MIGRATE = 7013170583925          # pgsse migrate: one migrator at a time
    SEQUENCE_BATCH = 7013170583926   # realtime.sequence_*: one numbering batch at a time
    SEQUENCER_LEADER = 7013170583927  # session lock: one sequencer process per database


class UnknownQuery(KeyError):
    pass


def parse(text: str) -> dict[str, str]:
    """``{name: sql}`` of one file's blocks (leading comments and trailing ``;`` dropped)."""
    found: dict[str, str] = {}
    parts = _NAME.split(text)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        while lines and lines[0].startswith("--"):
            lines.pop(0)
        sql = "\n".join(lines).strip().rstrip(";").strip()
        if name in found or not sql:
            raise ValueError(f"query {name!r} is duplicated or empty")
        found[name] = sql
    return found


@functools.cache
def _all() -> dict[str, str]:
    queries: dict[str, str] = {}
    for path in sorted((SQL_DIR / "queries").glob("*.sql")):
        for name, sql in parse(path.read_text()).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined twice ({path.name})")
            queries[name] = sql
    return queries


def query(name: str) -> str:
    try:
        return _all()[name]
    except KeyError:
        raise UnknownQuery(name) from None
