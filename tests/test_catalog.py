"""The named-query catalog: loading a directory, lookup and binding.

No database here: the shipped queries are run against PostgreSQL by the
database-backed tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import parse_one as one
from support import query_with

from gateway._errors import BadRequest, UnknownQuery
from gateway.catalog._catalog import Catalog, CatalogError
from gateway.catalog._parser import parse_queries
from gateway.values._encoding import JSONNumber, loads_exact

QUERIES_DIR = Path(__file__).resolve().parent.parent / "sql" / "queries"


# --------------------------------------------------------------------------
# Catalog


def test_load_reads_sql_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.sql").write_text("-- name: from_b\nSELECT 2\n")
    (tmp_path / "a.sql").write_text("-- name: from_a\nSELECT 1\n-- name: also_a\nSELECT 3\n")
    (tmp_path / "notes.txt").write_text("-- name: ignored\nSELECT 4\n")
    (tmp_path / "dir.sql").mkdir()

    catalog = Catalog.load(tmp_path)

    assert [q.name for q in catalog] == ["from_a", "also_a", "from_b"]
    assert len(catalog) == 3
    assert "from_b" in catalog
    assert "ignored" not in catalog
    assert catalog.get("from_b").source == "b.sql:1"


def test_a_missing_directory_is_an_empty_catalog(tmp_path: Path) -> None:
    catalog = Catalog.load(tmp_path / "nope")
    assert len(catalog) == 0
    assert list(catalog) == []


def test_a_file_of_comments_only_holds_no_query(tmp_path: Path) -> None:
    (tmp_path / "notes.sql").write_text("-- no statement and no name\n/* nor here */\n")
    (tmp_path / "empty.sql").write_text("")
    assert len(Catalog.load(tmp_path)) == 0


def test_a_file_instead_of_a_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "queries").write_text("")
    with pytest.raises(CatalogError, match="not a directory"):
        Catalog.load(tmp_path / "queries")


def test_duplicate_names_across_files_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- name: twice\nSELECT 1\n")
    (tmp_path / "b.sql").write_text("\n-- name: twice!\nDELETE FROM t\n")
    with pytest.raises(CatalogError) as caught:
        Catalog.load(tmp_path)
    assert caught.value.where == "b.sql:2"
    assert "duplicate query name 'twice' (first at a.sql:1)" in caught.value.problem


def test_load_errors_name_the_file_path_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.sql").write_text("-- name: q\n-- params: a int\nSELECT 1\n")
    with pytest.raises(CatalogError) as caught:
        Catalog.load(tmp_path)
    assert caught.value.where == f"{tmp_path / 'bad.sql'}:2"


def test_a_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "latin1.sql").write_bytes("-- name: q\nSELECT 'café'\n".encode("latin-1"))
    with pytest.raises(CatalogError, match="cannot read"):
        Catalog.load(tmp_path)


def test_get_an_unknown_name_raises_unknown_query() -> None:
    catalog = Catalog(parse_queries("-- name: known\nSELECT 1"))
    assert catalog.get("known").name == "known"
    with pytest.raises(UnknownQuery, match="'unknown'"):
        catalog.get("unknown")


def test_describe_gives_the_catalog_entry() -> None:
    query = one("-- name: add<!\n-- Adds.\n-- params: a int, b text[]\nSELECT :a, :b")
    assert query.describe() == {
        "name": "add",
        "doc": "Adds.",
        "params": [{"name": "a", "type": "int"}, {"name": "b", "type": "text[]"}],
        "read_only": False,
        "roles": None,
        "sql": "SELECT ($1::int), ($2::text[])",
    }


# --------------------------------------------------------------------------
# bind


ALL_TYPES = query_with(
    "i int, n numeric, b boolean, j jsonb, t text, d date, a int[]",
    "SELECT :i, :n, :b, :j, :t, :d, :a",
)


def test_bind_returns_values_in_declaration_order() -> None:
    query = query_with("first int, second text", "SELECT :second, :first")
    assert query.bind({"second": "x", "first": 1}) == [1, "x"]


def test_bind_keeps_values_from_a_json_body_unchanged() -> None:
    body = loads_exact(
        b'{"i": 9007199254740993, "n": 12.50, "b": false, "t": "h\\u00e9llo",'
        b' "d": "2024-02-29", "a": [[1, null], [3, 4]]}'
    )
    bound = ALL_TYPES.bind({**body, "j": None})
    assert bound == [
        9007199254740993,
        "12.50",
        False,
        None,
        "héllo",
        "2024-02-29",
        [[1, None], [3, 4]],
    ]
    assert isinstance(bound[1], JSONNumber)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            b'{"a": [1, null], "b": 0.10000000000000000555}',
            '{"a":[1,null],"b":0.10000000000000000555}',
        ),
        (b'"a string"', '"a string"'),
        (b'"caf\\u00e9 \\"q\\""', '"café \\"q\\""'),
        (b"[1, 2.50, [true]]", "[1,2.50,[true]]"),
        (b"12345678901234567890123", "12345678901234567890123"),
        (b"1e400", "1e400"),
        (b"false", "false"),
    ],
)
def test_json_params_become_json_text(body: bytes, text: str) -> None:
    query = query_with("j jsonb", "SELECT :j")
    assert query.bind({"j": loads_exact(body)}) == [text]


def test_json_array_params_become_arrays_of_json_text() -> None:
    query = query_with("js json[]", "SELECT :js")
    value = loads_exact(b'[{"a": 1}, "x", [1, 2], null]')
    assert query.bind({"js": value}) == [['{"a":1}', '"x"', "[1,2]", None]]


def test_non_finite_floats_are_not_json() -> None:
    query = query_with("j jsonb", "SELECT :j")
    with pytest.raises(BadRequest, match="expected a finite number"):
        query.bind({"j": [float("nan")]})


def test_null_is_allowed_for_every_type() -> None:
    values = dict.fromkeys(["i", "n", "b", "j", "t", "d", "a"])
    assert ALL_TYPES.bind(values) == [None] * 7
    assert ALL_TYPES.bind(values, from_query_string=True) == [None] * 7


def test_missing_param_is_a_bad_request_naming_it() -> None:
    query = query_with("id int, lim int", "SELECT :id LIMIT :lim")
    with pytest.raises(BadRequest, match="needs parameter 'lim'"):
        query.bind({"id": 1})


def test_undeclared_param_is_a_bad_request_naming_it() -> None:
    query = query_with("id int", "SELECT :id")
    with pytest.raises(BadRequest, match="no parameter 'idd'; its parameters are 'id'"):
        query.bind({"id": 1, "idd": 2})


def test_a_query_without_params_refuses_any() -> None:
    with pytest.raises(BadRequest, match="its parameters are none"):
        one("-- name: q\nSELECT 1").bind({"x": 1})


@pytest.mark.parametrize(
    ("type_", "fits"),
    [
        ("int", [0, -5, 2**70]),
        ("bigint", [1]),
        ("smallint", [1]),
        ("int8", [1]),
        ("serial", [1]),
        ("numeric", [1, 1.5, "1.50", "-1e10", ".5", "NaN", "-Infinity", "inf", JSONNumber("1.5")]),
        ("decimal(10, 2)", [1, "3.14"]),
        ("double precision", [1.5, 2, "1.5"]),
        ("real", [1.5]),
        ("float", [1.5]),
        ("boolean", [True, False]),
        ("bool", [True]),
        ("text", ["", "x"]),
        ("varchar(3)", ["abcd"]),
        ("date", ["2024-01-01"]),
        ("timestamp with time zone", ["2024-01-01 00:00:00+00"]),
        ("uuid", ["not even a uuid: PostgreSQL checks"]),
        ("int[]", [[], [1, None, 3], [[1, 2], [3, 4]]]),
        ("text[]", [["a", None]]),
        ("numeric[]", [[1, 1.5, "2.5"]]),
        ("boolean[]", [[True, None]]),
    ],
)
def test_values_that_fit(type_: str, fits: list[object]) -> None:
    query = query_with(f"p {type_}", "SELECT :p")
    for value in fits:
        assert query.bind({"p": value}) == [value]


def test_integral_numbers_are_integers_as_json_schema_has_them() -> None:
    # JSON Schema's "integer" takes 1000.0 and 1e3; PostgreSQL's integer input does not
    query = query_with("a int, b bigint[]", "SELECT :a, :b")
    body = loads_exact(b'{"a": 1000.0, "b": [1e3, null, -2.50e1, 7]}')
    assert query.bind(body) == [1000, [1000, None, -25, 7]]


@pytest.mark.parametrize(
    ("type_", "value", "got"),
    [
        ("int", "1x", "a string"),
        ("int", 1.0, "a number"),
        ("int", True, "a boolean"),
        ("bigint", [1], "an array"),
        ("numeric", "1,5", "a string"),
        ("numeric", "12abc", "a string"),
        ("numeric", False, "a boolean"),
        ("double precision", {}, "an object"),
        ("boolean", 1, "an integer"),
        ("boolean", "true", "a string"),
        ("text", 1, "an integer"),
        ("text", JSONNumber("1.5"), "a number"),
        ("int", JSONNumber("1.5"), "a number"),
        ("int", JSONNumber("1e200"), "a number"),  # no integer anyone means
        ("text", ["a"], "an array"),
        ("date", 20240101, "an integer"),
        ("int[]", 1, "an integer"),
        ("int[]", "{1,2}", "a string"),
        ("int[]", [1, "two"], "an array"),
        ("int[]", [[1], ["x"]], "an array"),
        ("text[]", [1], "an array"),
    ],
)
def test_values_that_do_not_fit_are_bad_requests_naming_the_param(
    type_: str, value: object, got: str
) -> None:
    query = query_with(f"p {type_}", "SELECT :p")
    with pytest.raises(BadRequest) as caught:
        query.bind({"p": value})
    message = caught.value.message
    assert message.startswith(f"parameter 'p' of query 'q' is {type_}: expected ")
    assert message.endswith(f"got {got}")


@pytest.mark.parametrize(
    ("type_", "text", "value"),
    [
        ("int", "42", 42),
        ("int", "-7", -7),
        ("int", "+7", 7),
        ("bigint", "99999999999999999999", 99999999999999999999),
        ("numeric", "12.50", "12.50"),
        ("numeric", "-1.5e3", "-1.5e3"),
        ("float8", "Infinity", "Infinity"),
        ("boolean", "true", True),
        ("boolean", "T", True),
        ("boolean", "1", True),
        ("boolean", "yes", True),
        ("boolean", "False", False),
        ("boolean", "f", False),
        ("boolean", "0", False),
        ("boolean", "NO", False),
        ("jsonb", '{"a": [1, null]}', '{"a": [1, null]}'),
        ("json", '"s"', '"s"'),
        ("json", "0.10000000000000000555", "0.10000000000000000555"),
        ("jsonb[]", '[{"a": 1}, 2.50]', ['{"a":1}', "2.50"]),
        ("numeric[]", "[1.50, 2]", ["1.50", 2]),
        ("text", "42", "42"),
        ("text", "", ""),
        ("date", "2024-02-29", "2024-02-29"),
        ("int[]", "[1, 2, null]", [1, 2, None]),
        ("text[]", '["a", "b"]', ["a", "b"]),
        ("int[]", "[]", []),
    ],
)
def test_query_string_values_convert_by_the_same_rules(
    type_: str, text: str, value: object
) -> None:
    query = query_with(f"p {type_}", "SELECT :p")
    assert query.bind({"p": text}, from_query_string=True) == [value]


@pytest.mark.parametrize(
    ("type_", "text", "expected"),
    [
        ("int", "1.5", "an integer"),
        ("int", " 1", "an integer"),
        ("int", "", "an integer"),
        ("int", "٣", "an integer"),  # a digit to Python's int(), not to PostgreSQL
        ("int", "1" * 5000, "an integer of sensible length"),
        ("numeric", "abc", "a number"),
        ("boolean", "maybe", "one of true/false"),
        ("jsonb", "{not json", "valid JSON text"),
        ("jsonb", "NaN", "valid JSON text"),
        ("int[]", "{1,2}", "valid JSON text"),
        ("int[]", '{"a": 1}', "an array"),
        ("int[]", '["x"]', "an array whose elements are an integer"),
    ],
)
def test_query_string_values_that_do_not_fit(type_: str, text: str, expected: str) -> None:
    query = query_with(f"p {type_}", "SELECT :p")
    with pytest.raises(BadRequest, match=f"parameter 'p' of query 'q' is .*expected {expected}"):
        query.bind({"p": text}, from_query_string=True)


def test_query_string_mode_wants_one_string_per_param() -> None:
    query = query_with("p int", "SELECT :p")
    with pytest.raises(BadRequest, match="expected a single value, got \\['1', '2'\\]"):
        query.bind({"p": ["1", "2"]}, from_query_string=True)


# --------------------------------------------------------------------------
# The shipped queries


def test_the_shipped_queries_load() -> None:
    catalog = Catalog.load(QUERIES_DIR)
    shipped = {q.name: ([f"{p.name} {p.type}" for p in q.params], q.read_only) for q in catalog}
    assert shipped == {
        "author_by_id": (["id int"], True),
        "author_stats": (["min_books int", "lim int"], True),
        "book_by_id": (["id int"], True),
        "search_books": (["q text", "lim int"], True),
        "list_books": (["page_size int", "after_id int"], True),
        "reviews_for_book": (["book_id int", "lim int"], True),
        "top_rated": (["min_reviews int", "lim int"], True),
        "add_review": (["book_id int", "rating int", "reviewer text", "body text"], False),
        "draft_review": (["book_id int", "rating int", "body text"], False),
    }
    assert catalog.get("draft_review").roles == ("bookshop_reviewer",)
    for query in catalog:
        assert query.doc, f"{query.name} has no doc"
        assert ":" + query.params[0].name not in query.sql


def test_the_shipped_queries_load_from_the_documented_relative_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(QUERIES_DIR.parent.parent)
    assert len(Catalog.load(Path("sql/queries"))) == len(Catalog.load(QUERIES_DIR))
