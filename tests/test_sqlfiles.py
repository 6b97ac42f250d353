"""The aggregate file grammar in-process (``pgsse.sqlfiles``): headers, parameters, ``:name``
binding and the errors that stop start-up, each naming the file and the line."""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

import pytest
from pgsse.sqlfiles import AggregateFileError, parse


def aggregate(tmp_path: Path, text: str, name: str = "agg") -> Path:
    path = tmp_path / f"{name}.sql"
    path.write_text(text)
    return path


def broken(tmp_path: Path, text: str, name: str = "agg") -> AggregateFileError:
    path = aggregate(tmp_path, text, name)
    with pytest.raises(AggregateFileError) as caught:
        parse(path)
    assert str(caught.value).startswith(f"{path}:{caught.value.line}: ")
    return caught.value


def test_the_contract_example(tmp_path: Path) -> None:
    agg = parse(aggregate(tmp_path, """-- Daily revenue of one store.
-- param store_id: int from claim store_id
-- param since: date = 2024-01-01
-- param page: int = 1
-- param limit: int = 50
-- cache: public, max-age=5, stale-while-revalidate=30
-- ttl: 60s
-- depends: public.orders
SELECT day, sum(total) FROM public.orders
WHERE store_id = :store_id AND created_at >= :since
GROUP BY day
""", "daily_revenue"))
    assert agg.name == "daily_revenue" and agg.description == "Daily revenue of one store."
    assert [(p.name, p.type) for p in agg.params] == [
        ("store_id", "int"), ("since", "date"), ("page", "int"), ("limit", "int")]
    store, since, page, _ = agg.params
    assert store.claim == "store_id" and not store.required and not store.has_default
    assert since.default == dt.date(2024, 1, 1) and since.has_default
    assert agg.paged and page.default == 1
    assert agg.cache == "public, max-age=5, stale-while-revalidate=30"
    assert agg.ttl == 60.0 and agg.depends == ("public.orders",)
    assert agg.line == 9, "the SQL starts on line 9"
    assert "($1::bigint)" in agg.sql and "($2::date)" in agg.sql
    assert ":store_id" not in agg.sql and agg.order == ("store_id", "since")
    assert agg.param("since") is since and agg.param("nope") is None


def test_defaults_without_headers(tmp_path: Path) -> None:
    agg = parse(aggregate(tmp_path, "-- Just a count.\nSELECT count(*) FROM t;\n"))
    assert agg.params == () and agg.cache == "no-cache" and agg.ttl is None
    assert agg.depends is None and not agg.paged and agg.export_order == ()
    assert agg.sql == "SELECT count(*) FROM t", "the trailing ; is dropped"


@pytest.mark.parametrize("declaration,value", [
    ("int = -42", -42), ("float = 1.5e3", 1500.0), ("numeric = 1.50", decimal.Decimal("1.5")),
    ("text = 'hello world'", "hello world"), ("text = plain", "plain"), ("bool = false", False),
    ("date = 2024-02-29", dt.date(2024, 2, 29)),
    ("timestamp = 2024-01-02T03:04:05+02:00", dt.datetime(2024, 1, 2, 1, 4, 5, tzinfo=dt.UTC)),
    ("text = null", None),
])
def test_typed_defaults(tmp_path: Path, declaration: str, value: object) -> None:
    agg = parse(aggregate(tmp_path, f"-- D.\n-- param x: {declaration}\nSELECT :x AS x\n"))
    (param,) = agg.params
    assert param.default == value and param.has_default and not param.required


def test_required_params_and_describe(tmp_path: Path) -> None:
    agg = parse(aggregate(tmp_path, "-- D.\n-- param shop: text\n-- param n: numeric = 0\n"
                                    "-- param day: date = 2024-01-01\nSELECT :shop, :n, :day\n"))
    assert [p.required for p in agg.params] == [True, False, False]
    assert [p.describe() for p in agg.params] == [
        {"name": "shop", "type": "text", "default": None},
        {"name": "n", "type": "numeric", "default": "0"},
        {"name": "day", "type": "date", "default": "2024-01-01"}]


def test_a_name_used_twice_binds_once(tmp_path: Path) -> None:
    agg = parse(aggregate(tmp_path, "-- D.\n-- param a: int\n-- param b: text\n"
                                    "SELECT :a, :b, :a + 1\n"))
    assert agg.order == ("a", "b")
    assert agg.sql == "SELECT ($1::bigint), ($2::text), ($1::bigint) + 1"


@pytest.mark.parametrize("sql", [
    "SELECT ':x' AS lit",
    "SELECT 'it''s :x' AS lit",
    "SELECT E'a\\':x' AS lit",
    'SELECT 1 AS ":x"',
    "SELECT 1 -- :x in a comment",
    "SELECT 1 /* :x\n in a block */",
    "SELECT '1'::int",
    "SELECT $$ :x $$ AS body",
    "SELECT $tag$ :x $tag$ AS body",
])
def test_colon_names_are_not_recognised_in_literals_identifiers_comments_or_casts(
        tmp_path: Path, sql: str) -> None:
    # :x is not declared: were it recognised, parsing would fail.
    agg = parse(aggregate(tmp_path, f"-- D.\n{sql}\n"))
    assert agg.sql == sql and agg.order == ()


def test_a_cast_after_a_parameter_is_kept(tmp_path: Path) -> None:
    agg = parse(aggregate(tmp_path, "-- D.\n-- param d: text\nSELECT :d::date, ':d'\n"))
    assert agg.sql == "SELECT ($1::text)::date, ':d'"


def test_export_headers(tmp_path: Path) -> None:
    agg = parse(aggregate(tmp_path, "-- D.\n-- export: order by day, store_id DESC\n"
                                    "-- export: count\nSELECT day, store_id FROM t\n"))
    assert agg.export_order == (("day", False), ("store_id", True))
    assert agg.export_line == 2 and agg.export_count


@pytest.mark.parametrize("text,line,problem", [
    ("-- D.\n-- param x: integer\nSELECT :x\n", 2, "unknown type 'integer'"),
    ("-- D.\n-- param x int\nSELECT 1\n", 2, "expected 'param NAME: TYPE"),
    ("-- D.\n-- param x: int\n-- param x: text\nSELECT :x\n", 3, "reserved or repeated"),
    ("-- D.\n-- param fields: text\nSELECT 1\n", 2, "reserved or repeated"),
    ("-- D.\n-- param n: int = abc\nSELECT :n\n", 2, "default for n"),
    ("-- D.\n-- param d: date = 2024-13-01\nSELECT :d\n", 2, "default for d"),
    ("-- D.\n-- cahce: public\nSELECT 1\n", 2, "unknown header 'cahce'"),
    ("-- D.\n-- cache:\nSELECT 1\n", 2, "cache: needs a Cache-Control value"),
    ("-- D.\n\n-- ttl: soon\nSELECT 1\n", 3, "ttl:"),
    ("-- D.\n-- depends: orders\nSELECT 1\n", 2, "depends: list schema.table names"),
    ("-- D.\n-- export: sorted\nSELECT 1\n", 2, "export:"),
    ("-- D.\n-- export: order by a\n-- export: order by b\nSELECT 1\n", 3, "export:"),
    ("-- D.\n-- param a: int\nSELECT 1,\n  :b\n", 4, "parameter :b is not declared"),
    ("-- D.\nSELECT 1; SELECT 2\n", 2, "one statement only"),
    ("-- Only a description.\n", 1, "no SQL after the header"),
    ("-- D.\n-- param page: text = 1\n-- param limit: int = 5\nSELECT 1\n", 1,
     "page must be a plain int parameter"),
])
def test_errors_name_the_line_and_the_problem(tmp_path: Path, text: str, line: int,
                                              problem: str) -> None:
    error = broken(tmp_path, text)
    assert error.line == line and problem in error.problem, str(error)


def test_a_bad_file_name_is_refused(tmp_path: Path) -> None:
    assert "file name" in broken(tmp_path, "-- D.\nSELECT 1\n", name="has space").problem


def test_a_semicolon_inside_a_literal_is_fine(tmp_path: Path) -> None:
    agg = parse(aggregate(tmp_path, "-- D.\nSELECT 'a;b' AS s -- ; here too\n"))
    assert agg.sql == "SELECT 'a;b' AS s -- ; here too"
