"""Aggregate parameters: ``:name`` binding, typed coercion, and a request's values.

``:name`` becomes a typed placeholder ``($n::type)``: a value reaches PostgreSQL only as a
bound parameter, never as SQL text. The scanner skips string literals, dollar-quoted
strings, quoted identifiers, comments and ``::`` casts.

Values are *normalised* as they are coerced (``1.50`` → ``1.5``, a timestamp → UTC), so
requests that mean the same thing share one cache entry and one ETag.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.datastructures import QueryParams

from .auth.claims import MISSING, claim_at
from .errors import BadRequest, Forbidden

PG_TYPES = {"int": "bigint", "float": "float8", "numeric": "numeric", "text": "text",
            "bool": "boolean", "date": "date", "timestamp": "timestamptz"}
RESERVED = frozenset({"fields", "access_token", "min_position"})  # min_position: freshness.py
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_LIMIT = 1000
_INT = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)
_NUMERIC = re.compile(r"[+-]?([0-9]{1,100}(\.[0-9]{0,100})?|\.[0-9]{1,100})", re.ASCII)
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)", re.ASCII)
_NAME = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")
_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def coerce(type_: str, raw: str) -> Any:
    """A query-string value → the normalised Python value of its type (``ValueError`` if not)."""
    if type_ == "text":
        if "\x00" in raw:
            raise ValueError("text must not contain NUL")
        return raw
    text = raw.strip()
    if type_ == "int":
        if not _INT.fullmatch(text) or not INT_MIN <= int(text) <= INT_MAX:
            raise ValueError("expected an integer from -2^63 to 2^63-1")
        return int(text)
    if type_ == "float":
        if not _FLOAT.fullmatch(text) or not math.isfinite(number := float(text)):
            raise ValueError("expected a finite number")
        return number + 0.0  # -0.0 → 0.0
    if type_ == "numeric":
        if not _NUMERIC.fullmatch(text):
            raise ValueError("expected a decimal number")
        value = decimal.Decimal(text)
        return decimal.Decimal(0) if value.is_zero() else decimal.Decimal(
            format(value.normalize(decimal.Context(prec=250)), "f"))
    if type_ == "bool":
        if text not in ("true", "false"):
            raise ValueError("expected true or false")
        return text == "true"
    if type_ == "date":
        if not _DATE.fullmatch(text):
            raise ValueError("expected a date YYYY-MM-DD")
        return dt.date.fromisoformat(text)
    if type_ == "timestamp":
        if not _TIMESTAMP.fullmatch(text):
            raise ValueError("expected an ISO 8601 timestamp with an offset, e.g. 2024-01-02T03:04:05Z")
        try:
            return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.UTC)
        except OverflowError as exc:
            raise ValueError("timestamp out of range") from exc
    raise ValueError(f"unknown type {type_}")


def compile_sql(sql: str, types: Mapping[str, str]) -> tuple[str, tuple[str, ...]]:
    """Replace ``:name`` with ``($n::type)``; return the SQL and the names in ``$n`` order.

    Raises ``KeyError(name)`` for a ``:name`` that is not declared."""
    out: list[str] = []
    order: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        end = i + 1
        if ch in "'\"":
            # E'…' strings also escape with a backslash.
            escapes = ch == "'" and i > 0 and sql[i - 1] in "eE" and (
                i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            while end < n and not (sql[end] == ch and not sql.startswith(ch * 2, end)):
                end += 2 if sql.startswith(ch * 2, end) or (escapes and sql[end] == "\\") else 1
            end += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end == -1 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end == -1 else end + 2
        elif ch == "$" and (not i or not (sql[i - 1].isalnum() or sql[i - 1] == "_")) \
                and (m := _DOLLAR.match(sql, i)):
            end = sql.find(m.group(0), m.end())
            end = n if end == -1 else end + len(m.group(0))
        elif sql.startswith("::", i):
            end = i + 2
        elif ch == ":" and (m := _NAME.match(sql, i)):
            name = m.group(1)
            if name not in types:
                raise KeyError(name)
            if name not in order:
                order.append(name)
            out.append(f"(${order.index(name) + 1}::{PG_TYPES[types[name]]})")
            i = m.end()
            continue
        out.append(sql[i:end])
        i = end
    return "".join(out), tuple(order)


def claim_value(type_: str, claim: Any) -> Any:
    """A token claim → the value of a claim-bound parameter (``ValueError`` if unusable)."""
    if isinstance(claim, bool):
        return coerce(type_, "true" if claim else "false")
    if isinstance(claim, int | float | str):
        return coerce(type_, str(claim))
    raise ValueError("claim must be a string, number or boolean")


def resolve(params: Sequence[Any], query: QueryParams, claims: Mapping[str, Any] | None,
            columns: Sequence[str], paged: bool, extra: frozenset[str] = frozenset(),
            ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Declared parameters' values from the query string and the token, and the fields.

    ``params`` are ``sqlfiles.Param``; ``claims`` is ``None`` when auth is off (claim-bound
    parameters are then ordinary ones); ``extra`` names more parameters the caller handles
    itself (an export's ``format`` and ``after``). Raises ``BadRequest``/``Forbidden``."""
    declared = {p.name for p in params}
    for name in query.keys():
        if name not in declared and name not in RESERVED and name not in extra:
            raise BadRequest(f"unknown parameter {name!r}", code="unknown_parameter", param=name)
        if len(query.getlist(name)) > 1:
            raise BadRequest(f"parameter {name!r} given more than once",
                             code="invalid_parameter", param=name)
    values: dict[str, Any] = {}
    for p in params:
        if p.claim is not None and claims is not None:
            if p.name in query:
                raise Forbidden(f"{p.name} comes from the token", param=p.name)
            claim = claim_at(claims, p.claim)  # issue 21: a verbatim name, else a dotted path
            if claim is MISSING:
                raise Forbidden(f"token has no claim {p.claim!r}", param=p.name)
            try:
                values[p.name] = claim_value(p.type, claim)
            except ValueError as exc:
                raise Forbidden(f"claim {p.claim!r}: {exc}", param=p.name) from exc
        elif p.name in query:
            try:
                values[p.name] = coerce(p.type, query[p.name])
            except ValueError as exc:
                raise BadRequest(f"{p.name}: {exc}", code="invalid_parameter", param=p.name) from exc
        elif p.has_default:
            values[p.name] = p.default
        else:
            raise BadRequest(f"{p.name} is required", code="missing_parameter", param=p.name)
    if paged:
        page, limit = values["page"], values["limit"]
        if not isinstance(page, int) or page < 1:
            raise BadRequest("page starts at 1", code="invalid_parameter", param="page")
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be 1 to {MAX_LIMIT}", code="invalid_parameter",
                             param="limit")
        if (page - 1) * limit > INT_MAX:
            raise BadRequest("page is too large", code="invalid_parameter", param="page")
    fields: tuple[str, ...] = ()
    if "fields" in query:
        wanted = {f.strip() for f in query["fields"].split(",") if f.strip()}
        unknown = sorted(wanted - set(columns))
        if unknown or not wanted:
            raise BadRequest(f"unknown field {unknown[0] if unknown else ''!r}; columns: "
                             f"{', '.join(columns)}", code="invalid_fields", param="fields")
        if wanted != set(columns):  # normalised: file order, no repeats; all → none
            fields = tuple(c for c in columns if c in wanted)
    return values, fields
