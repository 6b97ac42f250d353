"""Property tests: If-None-Match parsing, parameter coercion, and ``:name`` compilation."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.aggregates import if_none_match
from service.sqlfiles import coerce, compile_sql

opaque = st.text(alphabet="abcdef0123456789", min_size=1, max_size=32).map(lambda s: f'"{s}"')


@given(tag=opaque, others=st.lists(opaque, max_size=5), weak=st.booleans(), spaces=st.booleans())
def test_if_none_match_finds_the_tag_in_any_list(tag: str, others: list[str], weak: bool,
                                                  spaces: bool) -> None:
    etag = "W/" + tag
    listed = [*others, ("W/" if weak else "") + tag]
    header = (", " if spaces else ",").join(listed)
    assert if_none_match(header, etag)
    assert if_none_match("*", etag)


@given(tag=opaque, others=st.lists(opaque, max_size=5))
def test_if_none_match_rejects_other_tags(tag: str, others: list[str]) -> None:
    header = ", ".join(o for o in others if o != tag)
    assert not if_none_match(header, "W/" + tag)


@given(st.text(max_size=200))
def test_if_none_match_never_raises(header: str) -> None:
    if_none_match(header, 'W/"abc"')


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int_round_trips(value: int) -> None:
    assert coerce("int", str(value)) == value


@given(st.text(max_size=40))
def test_every_type_accepts_or_raises_value_error(raw: str) -> None:
    for type_ in ("int", "float", "numeric", "text", "bool", "date", "timestamp"):
        try:
            coerce(type_, raw)
        except ValueError:
            pass


@given(st.dates())
def test_dates_round_trip(value: dt.date) -> None:
    assert coerce("date", value.isoformat()) == value


def test_typed_values() -> None:
    assert coerce("numeric", "12.50") == decimal.Decimal("12.50")
    assert coerce("bool", "true") is True and coerce("bool", "false") is False
    assert coerce("timestamp", "2024-01-02T03:04:05Z").tzinfo is not None
    for type_, raw in [("int", "9223372036854775808"), ("bool", "yes"), ("float", "nan"),
                       ("timestamp", "2024-01-02T03:04:05"), ("date", "2024-13-01"), ("text", "a\x00")]:
        with pytest.raises(ValueError):
            coerce(type_, raw)


def test_names_are_bound_outside_literals_comments_and_casts() -> None:
    sql = ("SELECT ':a', \":a\", $$ :a $$, x::text, :a, :b::int /* :a */ -- :b\n"
           "FROM t WHERE y = :a")
    compiled, order = compile_sql(sql, {"a": "int", "b": "text"})
    assert order == ("a", "b")
    assert compiled == ("SELECT ':a', \":a\", $$ :a $$, x::text, ($1::bigint), ($2::text)::int /* :a */ -- :b\n"
                        "FROM t WHERE y = ($1::bigint)")
    with pytest.raises(KeyError):
        compile_sql("SELECT :undeclared", {})
