"""Aggregate ``.sql`` files: the header grammar, ``:name`` binding, and parameter types.

    -- Daily revenue of one store.                 (first comment line: description)
    -- param store_id: int from claim store_id
    -- param since: date = 2024-01-01
    -- cache: public, max-age=5, stale-while-revalidate=30
    -- ttl: 60s
    -- timeout: 2s                         (optional: statement timeout, else AGGREGATE_TIMEOUT)
    -- depends: public.orders
    -- export: order by day, store_id     (optional: a unique key; exports resume after it)
    -- export: count                       (optional: exports send X-Total-Count first)
    SELECT … WHERE store_id = :store_id AND created_at >= :since

``:name`` becomes a typed placeholder (``$n::bigint``), never interpolated text (see
``sqlparams``). ``parse`` raises ``AggregateFileError`` naming the file, the line and the
problem; ``app`` turns it into a failed start-up.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import parse_duration
from .sqlparams import PG_TYPES, RESERVED, coerce, compile_sql

__all__ = ["AggregateFile", "AggregateFileError", "Param", "coerce", "compile_sql", "parse"]

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
EXPORT_ORDER_RE = re.compile(
    r"order\s+by\s+(?P<cols>[A-Za-z_][A-Za-z0-9_]*(?:\s+(?:asc|desc))?"
    r"(?:\s*,\s*[A-Za-z_][A-Za-z0-9_]*(?:\s+(?:asc|desc))?)*)\s*", re.IGNORECASE)
PARAM_RE = re.compile(
    r"param\s+(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*:\s*(?P<type>[a-z]+)"
    r"(?:\s*=\s*(?P<default>.*?))?(?:\s+from\s+claim\s+(?P<claim>[A-Za-z_][A-Za-z0-9_.:/-]*))?\s*$"
)


class AggregateFileError(ValueError):
    """An aggregate file is broken; start-up stops, naming the file, the line, the problem."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


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
    line: int = 1     # the file's line where the SQL starts
    # ``-- export: order by a, b desc``: (column, descending) of a unique key; and its line.
    export_order: tuple[tuple[str, bool], ...] = ()
    export_line: int = 0
    export_count: bool = False  # ``-- export: count``
    timeout: float | None = None  # ``-- timeout: 2s``; None: the AGGREGATE_TIMEOUT setting

    @property
    def paged(self) -> bool:
        names = {p.name for p in self.params}
        return "page" in names and "limit" in names

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def parse(path: Path) -> AggregateFile:
    name = path.stem
    if not NAME_RE.fullmatch(name):
        raise AggregateFileError(path, 1, "file name must be [A-Za-z0-9_-], at most 64 characters")
    lines = path.read_text().splitlines()
    description = ""
    params: list[Param] = []
    cache = "no-cache"
    ttl: float | None = None
    timeout: float | None = None
    depends: tuple[str, ...] | None = None
    export_order: tuple[tuple[str, bool], ...] = ()
    export_line = 0
    export_count = False
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
        elif key == "timeout":
            try:
                timeout = parse_duration(value)
            except ValueError as exc:
                raise AggregateFileError(path, number, f"timeout: {exc}") from exc
            if timeout <= 0:
                raise AggregateFileError(path, number, "timeout: must be greater than zero")
        elif key == "depends":
            depends = tuple(t.strip() for t in value.split(",") if t.strip())
            if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*", t) for t in depends):
                raise AggregateFileError(path, number, "depends: list schema.table names")
        elif key == "export":
            export = value.strip()
            if export.lower() == "count":
                export_count = True
            elif (match := EXPORT_ORDER_RE.fullmatch(export)) and not export_order:
                export_order = tuple(
                    (col.split()[0], col.split()[-1].lower() == "desc")
                    for col in match.group("cols").split(","))
                export_line = number
            else:
                raise AggregateFileError(path, number, "export: expected 'order by COLUMN [asc|desc], …'"
                                         " (once) or 'count'")
        elif not description and not params:
            description = text
        elif re.fullmatch(r"[a-z_]+", key) and value:
            raise AggregateFileError(path, number, f"unknown header {key!r} "
                                     "(param, cache, ttl, timeout, depends or export)")
    sql = "\n".join(lines[body_start:]).strip().rstrip(";").strip()
    if not sql:
        raise AggregateFileError(path, len(lines) or 1, "no SQL after the header")
    if ";" in _strip_literals(sql):
        raise AggregateFileError(path, body_start + 1, "one statement only (found ';')")
    names = {p.name: p for p in params}
    if "page" in names and "limit" in names:
        for paging in ("page", "limit"):
            if names[paging].type != "int" or names[paging].claim is not None:
                raise AggregateFileError(path, 1, f"{paging} must be a plain int parameter")
    types = {p.name: p.type for p in params}
    try:
        compiled, order = compile_sql(sql, types)
    except KeyError as exc:
        missing = str(exc.args[0])
        offset = next((i for i, text in enumerate(lines[body_start:]) if f":{missing}" in text), 0)
        raise AggregateFileError(path, body_start + 1 + offset,
                                 f"parameter :{missing} is not declared") from exc
    return AggregateFile(name, path, description, tuple(params), cache, ttl, depends, compiled,
                         order, body_start + 1, export_order, export_line, export_count, timeout)


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
