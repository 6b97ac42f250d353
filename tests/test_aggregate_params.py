"""Property tests (no server): If-None-Match parsing, parameter coercion and normalisation,
``:name`` compilation, and request parameter resolution."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pgsse.caching import accepts_gzip, entity_tags, if_none_match, weak_etag
from pgsse.errors import BadRequest, Forbidden
from pgsse.sqlfiles import Param
from pgsse.sqlparams import coerce, compile_sql, resolve
from starlette.datastructures import QueryParams

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


@given(st.lists(opaque, min_size=1, max_size=6), st.sampled_from([",", ", ", " ,\t", ",,"]))
def test_entity_tags_parse_any_list(tags: list[str], sep: str) -> None:
    header = sep.join(("W/" if i % 2 else "") + t for i, t in enumerate(tags))
    assert entity_tags(header) == tags


@given(st.text(alphabet='W/" ,abc*', max_size=30))
def test_malformed_lists_match_nothing_but_star(header: str) -> None:
    tags = entity_tags(header)
    if tags is None and header.strip() != "*":
        assert not if_none_match(header, 'W/"abc"')


def test_if_none_match_edge_cases() -> None:
    etag = weak_etag("x")
    assert etag.startswith('W/"') and len(etag) == 36 and etag == weak_etag("x") != weak_etag("y")
    assert not if_none_match(etag[2:-1], etag), "an unquoted tag is not a tag"
    assert not if_none_match('"x,' + etag[2:], etag), "commas inside quotes are part of a tag"
    assert not if_none_match("", etag) and not if_none_match("W/", etag)
    assert if_none_match(" * ", etag)


@given(st.sampled_from(["gzip", "GZIP", "br, gzip", "gzip;q=0.5", "*", "deflate, gzip ;q=1"]))
def test_accepts_gzip(header: str) -> None:
    assert accepts_gzip(header)


@given(st.sampled_from(["", "br", "gzip;q=0", "identity", "gzip;q=abc", "gzipx"]))
def test_refuses_gzip(header: str) -> None:
    assert not accepts_gzip(header)


@given(st.decimals(allow_nan=False, allow_infinity=False, places=4,
                   min_value=-(10**12), max_value=10**12))
def test_numeric_is_normalised(value: decimal.Decimal) -> None:
    plain = coerce("numeric", format(value, "f"))
    padded = coerce("numeric", format(value, "f") + ("0" if "." in format(value, "f") else ".000"))
    assert plain == padded == value and str(plain) == str(padded), "one value, one cache key"


@given(st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1),
                    timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)),
                                               dt.timezone(dt.timedelta(hours=-8))])))
def test_timestamps_are_normalised_to_utc(value: dt.datetime) -> None:
    got = coerce("timestamp", value.isoformat())
    assert got == value and got.utcoffset() == dt.timedelta(0)
    assert str(got) == str(coerce("timestamp", value.astimezone(dt.UTC).isoformat()))


def test_edges_of_ranges_are_value_errors_not_crashes() -> None:
    for type_, raw in [("timestamp", "0001-01-01T00:00:00+01:00"),
                       ("timestamp", "9999-12-31T23:59:59-01:00"), ("int", "١٢"),
                       ("date", "٢٠٢٤-٠١-٠١"), ("float", "1_000"), ("float", "inf"),
                       ("numeric", "1e5"), ("int", ""), ("bool", "True")]:
        with pytest.raises(ValueError):
            coerce(type_, raw)


@given(st.text(alphabet=st.characters(blacklist_characters="'"), max_size=30))
def test_nothing_inside_a_literal_is_bound(inside: str) -> None:
    sql = f"SELECT '{inside}' AS x, :a AS y"
    compiled, order = compile_sql(sql, {"a": "int"})
    assert order == ("a",) and compiled == f"SELECT '{inside}' AS x, ($1::bigint) AS y"


def test_escape_strings_and_dollar_identifiers() -> None:
    sql = r"SELECT E'it\'s :a', x$y, $tag$ :a $tag$, :a"
    compiled, order = compile_sql(sql, {"a": "text"})
    assert compiled == r"SELECT E'it\'s :a', x$y, $tag$ :a $tag$, ($1::text)"


PARAMS = (Param("shop", "text"), Param("min", "numeric", decimal.Decimal(0), True),
          Param("store", "int", 1, True, "store_id"), Param("page", "int", 1, True),
          Param("limit", "int", 10, True))
COLUMNS = ("a", "b", "c")


def run(query: str, claims: dict[str, object] | None = None) -> tuple[dict[str, object], tuple[str, ...]]:
    return resolve(PARAMS, QueryParams(query), claims, COLUMNS, paged=True)


def test_resolve_defaults_claims_and_fields() -> None:
    values, fields = run("shop=x&fields=c,a,c")
    assert values == {"shop": "x", "min": 0, "store": 1, "page": 1, "limit": 10}
    assert fields == ("a", "c"), "file order, no repeats"
    assert run("shop=x&fields=a,b,c")[1] == (), "all columns = no projection"
    assert run("shop=x", {"store_id": "7"})[0]["store"] == 7
    assert run("shop=x&min=1.50")[0]["min"] == run("shop=x&min=1.5")[0]["min"]


@given(st.sampled_from(["", "shop=x&x=1", "shop=x&min=abc", "shop=x&page=0", "shop=x&limit=1001",
                        "shop=x&limit=0", "shop=x&fields=zz", "shop=x&fields=,", "shop=a&shop=b",
                        "shop=x&page=9223372036854775807&limit=1000", "shop=%00"]))
def test_resolve_rejects_with_the_parameter_named(query: str) -> None:
    with pytest.raises(BadRequest) as info:
        run(query)
    assert info.value.param


@given(st.one_of(st.none(), st.lists(st.integers()), st.text(alphabet="abc", min_size=1)))
def test_unusable_claims_are_forbidden(claim: object) -> None:
    claims = {} if claim is None else {"store_id": claim}
    with pytest.raises(Forbidden):
        run("shop=x", claims)
    with pytest.raises(Forbidden):
        run("shop=x&store=2", {"store_id": 2})
