"""``pgsse.publish(conn, topic, type, data)``: a custom event in the caller's transaction.

It runs ``realtime.publish`` on the connection it is given, inside whatever transaction that
connection has open, so a rollback publishes nothing and a commit publishes exactly once.
Nothing here commits, begins or opens a connection.

The connection's driver is recognised by the module and name of its class (and of its
bases), never by importing the driver: a process that uses psycopg does not load asyncpg or
SQLAlchemy because of this module. Asynchronous connections return a coroutine to await;
synchronous ones run the statement and return ``None``. The topic, type and data are checked
here first, with ``realtime.publish``'s rules, so a bad one raises ``ValueError`` before any
SQL (and before the transaction is aborted by a server-side error).
"""

from __future__ import annotations

import json
import re
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, overload

from .topics import is_valid

if TYPE_CHECKING:
    import asyncpg
    import psycopg
    from asyncpg.pool import PoolConnectionProxy
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
    from sqlalchemy.orm import Session as SASession

    AsyncConn = (asyncpg.Connection[Any] | PoolConnectionProxy[Any]
                 | psycopg.AsyncConnection[Any] | SAAsyncConnection | SAAsyncSession)
    SyncConn = psycopg.Connection[Any] | SAConnection | SASession

__all__ = ["publish", "validate"]

TYPE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
RESERVED_TYPES = ("reset", "auth_expired")
# jsonb refuses the NUL character; json.dumps writes it as \u0000 (an escaped backslash
# before "u0000" is not one: count the backslashes).
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

Kind = Literal["asyncpg", "psycopg", "psycopg_async", "sqlalchemy", "sqlalchemy_async"]
# (module prefix, class name) → how to run a statement on it.
_KINDS: dict[tuple[str, str], Kind] = {
    ("asyncpg", "Connection"): "asyncpg",
    ("asyncpg", "PoolConnectionProxy"): "asyncpg",
    ("psycopg", "Connection"): "psycopg",
    ("psycopg", "AsyncConnection"): "psycopg_async",
    ("sqlalchemy", "Connection"): "sqlalchemy",
    ("sqlalchemy", "Session"): "sqlalchemy",
    ("sqlalchemy", "AsyncConnection"): "sqlalchemy_async",
    ("sqlalchemy", "AsyncSession"): "sqlalchemy_async",
}
SUPPORTED = ("an asyncpg Connection, a psycopg 3 Connection or AsyncConnection, or a "
             "SQLAlchemy 2 Connection, Session, AsyncConnection or AsyncSession")


def validate(topic: str, type: str, data: object) -> str:
    """Check an event as ``realtime.publish`` would; return ``data`` as JSON text."""
    if not isinstance(topic, str) or not is_valid(topic):
        raise ValueError(f"invalid topic {topic!r}: use /-separated non-empty segments of "
                         "[A-Za-z0-9_.:@%-], at most 256 characters")
    if (not isinstance(type, str) or TYPE_RE.fullmatch(type) is None
            or type in RESERVED_TYPES or type.startswith("aggregate.")):
        raise ValueError(f"invalid event type {type!r}: [A-Za-z0-9_.:-]{{1,64}}, "
                         "not reset, auth_expired or aggregate.*")
    try:
        text = json.dumps(data, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data is not JSON: {exc}") from exc
    if _NUL.search(text):
        raise ValueError("data holds a NUL character (\\u0000), which jsonb cannot store")
    try:
        text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: not UTF-8, not storable
        raise ValueError(f"data is not valid Unicode: {exc}") from exc
    return text


def _kind(conn: object) -> Kind:
    for cls in type(conn).__mro__:
        root = cls.__module__.partition(".")[0]
        kind = _KINDS.get((root, cls.__name__))
        if kind is not None:
            return kind
    raise TypeError(f"pgsse.publish needs {SUPPORTED}, not {type(conn).__module__}."
                    f"{type(conn).__qualname__}")


def _sql(kind: Kind) -> str:
    from .queries import query

    sql = query("publish")
    if kind in ("psycopg", "psycopg_async"):
        return re.sub(r"\$\d", "%s", sql)
    if kind in ("sqlalchemy", "sqlalchemy_async"):
        return re.sub(r"\$(\d)", r":p\1", sql)
    return sql


@overload
def publish(conn: AsyncConn, topic: str, type: str, data: object
            ) -> Coroutine[Any, Any, None]: ...


@overload
def publish(conn: SyncConn, topic: str, type: str, data: object) -> None: ...


def publish(conn: Any, topic: str, type: str, data: object
            ) -> Coroutine[Any, Any, None] | None:
    """Publish ``data`` (anything ``json.dumps`` accepts) as an event of ``type`` on
    ``topic``, in ``conn``'s current transaction. Await the result for asyncpg, psycopg's
    ``AsyncConnection`` and SQLAlchemy's ``AsyncConnection``/``AsyncSession``."""
    kind = _kind(conn)
    payload = validate(topic, type, data)
    sql = _sql(kind)
    if kind == "asyncpg":
        return _asyncpg(conn, sql, topic, type, payload)
    if kind == "psycopg":
        conn.execute(sql, (topic, type, payload))
        return None
    if kind == "psycopg_async":
        return _psycopg_async(conn, sql, topic, type, payload)
    from sqlalchemy import text  # the caller's SQLAlchemy: already imported

    params = {"p1": topic, "p2": type, "p3": payload}
    if kind == "sqlalchemy":
        conn.execute(text(sql), params)
        return None
    return _sqlalchemy_async(conn, text(sql), params)


async def _asyncpg(conn: Any, sql: str, topic: str, type: str, payload: str) -> None:
    await conn.execute(sql, topic, type, payload)


async def _psycopg_async(conn: Any, sql: str, topic: str, type: str, payload: str) -> None:
    await conn.execute(sql, (topic, type, payload))


async def _sqlalchemy_async(conn: Any, statement: Any, params: dict[str, str]) -> None:
    await conn.execute(statement, params)
