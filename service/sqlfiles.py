"""Aggregate ``.sql`` files: the header grammar, ``:name`` binding, and parameter types.

    -- Daily revenue of one store.                 (first comment line: description)
    -- param store_id: int from claim store_id
    -- param since: date = 2024-01-01
    -- cache: public, max-age=5, stale-while-revalidate=30
    -- ttl: 60s
    -- depends: public.orders
    SELECT … WHERE store_id = :store_id AND created_at >= :since

``:name`` becomes a typed placeholder (``$n::bigint``), never interpolated text. The scanner
skips string literals, dollar-quoted strings, quoted identifiers, comments and ``::`` casts.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import parse_duration

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PARAM_RE = re.compile(
    r"param\s+(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*:\s*(?P<type>[a-z]+)"
    r"(?:\s*=\s*(?P<default>.*?))?(?:\s+from\s+claim\s+(?P<claim>[A-Za-z_][A-Za-z0-9_.:-]*))?\s*$"
)
PG_TYPES = {"int": "bigint", "float": "float8", "numeric": "numeric", "text": "text",
            "bool": "boolean", "date": "date", "timestamp": "timestamptz"}
RESERVED = {"fields", "access_token"}
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class AggregateFileError(ValueError):
    """An aggregate file is broken; start-up stops, naming the file, the line, the problem."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")


def coerce(type_: str, raw: str) -> Any:
    """A query-string value → the Python value for its declared type (``ValueError`` if not)."""
    if type_ == "text":
        if "\x00" in raw:
            raise ValueError("text must not contain NUL")
        return raw
    text = raw.strip()
    if type_ == "int":
        if not re.fullmatch(r"[+-]?\d{1,19}", text):
            raise ValueError("expected an integer")
        value = int(text)
        if not INT_MIN <= value <= INT_MAX:
            raise ValueError("integer out of range")
        return value
    if type_ == "float":
        number = float(text)
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if type_ == "numeric":
        if not re.fullmatch(r"[+-]?(\d{1,100}(\.\d{0,100})?|\.\d{1,100})", text):
            raise ValueError("expected a decimal number")
        return decimal.Decimal(text)
    if type_ == "bool":
        if text not in ("true", "false"):
            raise ValueError("expected true or false")
        return text == "true"
    if type_ == "date":
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError("expected a date YYYY-MM-DD")
        return dt.date.fromisoformat(text)
    if type_ == "timestamp":
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            raise ValueError("expected an ISO 8601 timestamp with an offset")
        return stamp
    raise ValueError(f"unknown type {type_}")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any = None
    has_default: bool = False
    claim: str | None = None

    @property
    def required(self) -> bool:
        return not self.has_default and self.claim is None

    def describe(self) -> dict[str, Any]:
        default = self.default.isoformat() if isinstance(self.default, dt.date) else self.default
        if isinstance(default, decimal.Decimal):
            default = str(default)
        out: dict[str, Any] = {"name": self.name, "type": self.type, "default": default}
        if self.claim:
            out["claim"] = self.claim
        return out


@dataclass(frozen=True)
class AggregateFile:
    name: str
    path: Path
    description: str
    params: tuple[Param, ...]
    cache: str
    ttl: float | None
    depends: tuple[str, ...] | None
    sql: str          # with $n placeholders
    order: tuple[str, ...]  # parameter name for each $n

    @property
    def paged(self) -> bool:
        names = {p.name for p in self.params}
        return "page" in names and "limit" in names

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def compile_sql(sql: str, types: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """Replace ``:name`` with ``$n::type``; return the SQL and the names in ``$n`` order."""
    out: list[str] = []
    order: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch == "'" or ch == '"':
            end = i + 1
            while end < n:
                if sql[end] == ch:
                    if end + 1 < n and sql[end + 1] == ch:
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i:end + 1])
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end == -1 else end
            out.append(sql[i:end])
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end == -1 else end + 2
            out.append(sql[i:end])
            i = end
        elif ch == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", sql[i:])):
            tag = m.group(0)
            end = sql.find(tag, i + len(tag))
            end = n if end == -1 else end + len(tag)
            out.append(sql[i:end])
            i = end
        elif sql.startswith("::", i):
            out.append("::")
            i += 2
        elif ch == ":" and (m := re.match(r":([A-Za-z_][A-Za-z0-9_]*)", sql[i:])):
            name = m.group(1)
            if name not in types:
                raise KeyError(name)
            if name not in order:
                order.append(name)
            out.append(f"(${order.index(name) + 1}::{PG_TYPES[types[name]]})")
            i += len(m.group(0))
        else:
            out.append(ch)
            i += 1
    return "".join(out), tuple(order)


def parse(path: Path) -> AggregateFile:
    name = path.stem
    if not NAME_RE.fullmatch(name):
        raise AggregateFileError(path, 1, "file name must be [A-Za-z0-9_-], at most 64 characters")
    lines = path.read_text().splitlines()
    description = ""
    params: list[Param] = []
    cache = "no-cache"
    ttl: float | None = None
    depends: tuple[str, ...] | None = None
    body_start = len(lines)
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("--"):
            body_start = number - 1
            break
        text = stripped[2:].strip()
        key, _, value = text.partition(":")
        key = key.strip()
        if text.startswith("param "):
            params.append(_param(path, number, text, params))
        elif key == "cache":
            cache = value.strip()
            if not cache or "\n" in cache:
                raise AggregateFileError(path, number, "cache: needs a Cache-Control value")
        elif key == "ttl":
            try:
                ttl = parse_duration(value)
            except ValueError as exc:
                raise AggregateFileError(path, number, f"ttl: {exc}") from exc
        elif key == "depends":
            depends = tuple(t.strip() for t in value.split(",") if t.strip())
            if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*", t) for t in depends):
                raise AggregateFileError(path, number, "depends: list schema.table names")
        elif not description:
            description = text
    sql = "\n".join(lines[body_start:]).strip().rstrip(";").strip()
    if not sql:
        raise AggregateFileError(path, len(lines) or 1, "no SQL after the header")
    if ";" in _strip_literals(sql):
        raise AggregateFileError(path, body_start + 1, "one statement only (found ';')")
    types = {p.name: p.type for p in params}
    try:
        compiled, order = compile_sql(sql, types)
    except KeyError as exc:
        missing = str(exc.args[0])
        offset = next((i for i, text in enumerate(lines[body_start:]) if f":{missing}" in text), 0)
        raise AggregateFileError(path, body_start + 1 + offset,
                                 f"parameter :{missing} is not declared") from exc
    return AggregateFile(name, path, description, tuple(params), cache, ttl, depends, compiled, order)


def _param(path: Path, number: int, text: str, seen: list[Param]) -> Param:
    match = PARAM_RE.match(text)
    if not match:
        raise AggregateFileError(path, number, "expected 'param NAME: TYPE [= LITERAL | null] [from claim CLAIM]'")
    name, type_ = match.group("name"), match.group("type")
    if type_ not in PG_TYPES:
        raise AggregateFileError(path, number, f"unknown type {type_!r} (one of {', '.join(PG_TYPES)})")
    if name in RESERVED or any(p.name == name for p in seen):
        raise AggregateFileError(path, number, f"parameter name {name!r} is reserved or repeated")
    raw = match.group("default")
    default: Any = None
    if raw is not None:
        raw = raw.strip()
        if raw != "null":
            try:
                default = coerce(type_, raw.strip("'"))
            except ValueError as exc:
                raise AggregateFileError(path, number, f"default for {name}: {exc}") from exc
    return Param(name, type_, default, raw is not None, match.group("claim"))


def _strip_literals(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", "", sql, flags=re.S)
