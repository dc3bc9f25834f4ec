"""Reading named-query files: queries, docs and params, ``:name`` rewriting, load errors.

No database here: the shipped queries are run against PostgreSQL by the
database-backed tests.
"""

from __future__ import annotations

import pytest
from support import parse_one as one
from support import query_with

from gateway.catalog._catalog import CatalogError, Param
from gateway.catalog._parser import parse_queries

# --------------------------------------------------------------------------
# Parsing files


TWO_QUERIES = """\
-- Queries about books: this header is not part of any query.

-- name: book_by_id
-- One book by its id.
--
--   With its author.
-- params: id int
SELECT b.id, a.name FROM book b JOIN author a ON a.id = b.author_id
WHERE b.id = :id;

-- name: add_review<!
-- Adds a review.
-- params: book_id int, rating int, body text
INSERT INTO review (book_id, rating, body) VALUES (:book_id, :rating, :body)
RETURNING id;  -- the new row
"""


def test_a_file_holds_several_queries_with_docs_params_and_sources() -> None:
    first, second = parse_queries(TWO_QUERIES, "sql/queries/books.sql")

    assert first.name == "book_by_id"
    assert first.doc == "One book by its id.\n\n  With its author."
    assert first.params == (Param("id", "int"),)
    assert first.sql == (
        "SELECT b.id, a.name FROM book b JOIN author a ON a.id = b.author_id\n"
        "WHERE b.id = ($1::int)"
    )
    assert first.read_only is True
    assert first.source == "books.sql:3"

    assert second.name == "add_review"
    assert second.doc == "Adds a review."
    assert [p.name for p in second.params] == ["book_id", "rating", "body"]
    assert second.sql.endswith("VALUES (($1::int), ($2::int), ($3::text))\nRETURNING id")
    assert second.read_only is False
    assert second.source == "books.sql:11"


@pytest.mark.parametrize(
    ("suffix", "read_only"),
    [("", True), ("!", False), ("<!", False), ("^", True), ("$", True)],
)
def test_aiosql_suffixes_set_read_only_and_are_not_part_of_the_name(
    suffix: str, read_only: bool
) -> None:
    query = one(f"-- name: save_it{suffix}\nSELECT 1")
    assert query.name == "save_it"
    assert query.read_only is read_only


def test_a_query_needs_no_doc_and_no_params() -> None:
    query = one("-- name: ping\nSELECT 1")
    assert (query.doc, query.params, query.sql) == ("", (), "SELECT 1")
    assert one("-- name: ping\n-- params:\nSELECT 1").params == ()


def test_name_lines_inside_strings_or_dollar_quotes_do_not_start_queries() -> None:
    text = "-- name: q\nSELECT $$\n-- name: not_a_query\n$$, '\n-- name: nor_this\n'"
    assert [q.name for q in parse_queries(text)] == ["q"]


def test_a_name_comment_after_code_on_the_same_line_does_not_start_a_query() -> None:
    text = "-- name: q\nSELECT 1 -- name: trailing\n, 2"
    assert one(text).sql == "SELECT 1 -- name: trailing\n, 2"


def test_trailing_semicolon_and_trailing_comments_are_dropped() -> None:
    assert one("-- name: q\nSELECT 1 ;  -- done\n/* really */\n\n").sql == "SELECT 1"


def test_comments_between_header_and_statement_are_doc_and_inside_it_are_sql() -> None:
    query = one("-- name: q\n-- first\n\n-- second\nSELECT 1 -- inline\n, /* c */ 2")
    assert query.doc == "first\nsecond"
    assert query.sql == "SELECT 1 -- inline\n, /* c */ 2"


# --------------------------------------------------------------------------
# Rewriting :name to ($n::type)


def test_same_param_twice_gets_the_same_number() -> None:
    query = query_with("a int, b text", "SELECT :b, :a, :b")
    assert query.sql == "SELECT ($2::text), ($1::int), ($2::text)"


@pytest.mark.parametrize(
    "untouched",
    [
        "x::int",
        "x::text[]",
        "':a'",
        "'it''s :a'",
        "E'\\':a'",
        "U&':a'",
        '"x:a"',
        "$$ :a $$",
        "$tag$ :a $$ :a $tag$",
        "/* :a */ 1",
        "/* nested /* :a */ :a */ 1",
        "arr[lo:hi]",
        "arr[1:2]",
        "f(x => 1)",
        "f(x := 1)",
    ],
)
def test_placeholders_elsewhere_are_left_alone(untouched: str) -> None:
    query = query_with("a int", f"SELECT {untouched}, :a")
    assert query.sql == f"SELECT {untouched}, ($1::int)"


def test_a_line_comment_is_left_alone() -> None:
    query = query_with("a int", "SELECT :a -- not :a\n, 1")
    assert query.sql == "SELECT ($1::int) -- not :a\n, 1"


def test_casts_after_a_param_survive() -> None:
    query = query_with("a text", "SELECT :a::int, :a :: int")
    assert query.sql == "SELECT ($1::text)::int, ($1::text) :: int"


def test_parentheses_keep_subscripts_and_fields_off_the_cast() -> None:
    query = query_with("ids int[], ids2 int[]", "SELECT :ids[1], (:ids2)[2]")
    assert query.sql == "SELECT ($1::int[])[1], (($2::int[]))[2]"


def test_keywords_are_valid_param_names() -> None:
    query = query_with("name text, limit int, type text", "SELECT :name, :type LIMIT :limit")
    assert query.sql == "SELECT ($1::text), ($3::text) LIMIT ($2::int)"


def test_param_right_after_an_operator_or_bracket_is_found() -> None:
    query = query_with("a int, b int", "SELECT 1 WHERE x=:a AND y IN(:b) AND z[:a] = 1")
    assert query.sql == "SELECT 1 WHERE x=($1::int) AND y IN(($2::int)) AND z[($1::int)] = 1"


def test_positions_count_characters_not_bytes() -> None:
    query = query_with("a text", "SELECT 'é€😀', \"ñ\" || :a")
    assert query.sql == "SELECT 'é€😀', \"ñ\" || ($1::text)"


@pytest.mark.parametrize(
    ("declared", "cast"),
    [
        ("int", "int"),
        ("double precision", "double precision"),
        ("timestamp with time zone", "timestamp with time zone"),
        ("numeric(10, 2)", "numeric(10, 2)"),
        ("numeric(10,2)[]", "numeric(10,2)[]"),
        ("int[]", "int[]"),
        ("character varying(20)", "character varying(20)"),
        ("public.mood", "public.mood"),
        ('"My Type"', '"My Type"'),
        ("serial", "int4"),
        ("bigserial", "int8"),
    ],
)
def test_declared_types_are_kept_and_cast_to(declared: str, cast: str) -> None:
    query = query_with(f"a {declared}", "SELECT :a")
    assert query.params == (Param("a", declared),)
    assert query.sql == f"SELECT ($1::{cast})"


def test_params_with_commas_inside_parentheses_split_correctly() -> None:
    query = query_with("a numeric(10, 2), b varchar(3), c int", "SELECT :a, :b, :c")
    assert [p.type for p in query.params] == ["numeric(10, 2)", "varchar(3)", "int"]


# --------------------------------------------------------------------------
# Load errors


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("SELECT 1;\n-- name: q\nSELECT 1", "f.sql:1", "SQL before the first"),
        ("-- name:\nSELECT 1", "f.sql:1", "invalid query name ''"),
        ("-- name: 1q\nSELECT 1", "f.sql:1", "invalid query name '1q'"),
        ("-- name: two words\nSELECT 1", "f.sql:1", "invalid query name"),
        ("-- name: bulk*!\nSELECT 1", "f.sql:1", "not supported"),
        ("-- name: script#\nSELECT 1", "f.sql:1", "not supported"),
        ("-- name: q\n-- just a doc\n", "f.sql:1", "has no SQL"),
        ("-- name: q\n-- name: r\nSELECT 1", "f.sql:1", "'q' has no SQL"),
        ("-- name: q\nSELECT 1;\nSELECT 2", "f.sql:2", "more than one statement"),
        ("-- name: q\n\nSELECT $1", "f.sql:3", "not $1"),
        ("-- name: q\n-- params: a int\n\nSELECT :a,\n  :b", "f.sql:5", ":b is not declared"),
        ("-- name: q\nSELECT :a", "f.sql:2", ":a is not declared"),
        ("-- name: q\n-- params: a int, b int\nSELECT :a", "f.sql:2", "'b' is declared but"),
        ("-- name: q\n-- params: a int\n-- params: b int\nSELECT :a, :b", "f.sql:3", "second"),
        ("-- name: q\n-- params: a int, a text\nSELECT :a", "f.sql:2", "'a' declared twice"),
        ("-- name: q\n-- params: int\nSELECT 1", "f.sql:2", "expected 'name type'"),
        ("-- name: q\n-- params: a int,\nSELECT :a", "f.sql:2", "expected 'name type'"),
        ('-- name: q\n-- params: "a" int\nSELECT :a', "f.sql:2", "invalid parameter name"),
        ("-- name: q\n-- params: a int -- note\nSELECT :a", "f.sql:2", "a comment inside"),
        ("-- name: q\n-- params: a no such type!\nSELECT :a", "f.sql:2", "not a PostgreSQL type"),
        ("-- name: q\n-- params: a int FROM t\nSELECT :a", "f.sql:2", "not a PostgreSQL type"),
        ("-- name: q\n-- params: a int, 1\nSELECT :a", "f.sql:2", "expected 'name type'"),
        ("-- name: q\n-- params: a setof int\nSELECT :a", "f.sql:2", "not a PostgreSQL type"),
        ('-- name: q\n-- params: a text COLLATE "C"\nSELECT :a', "f.sql:2", "not a Postgre"),
        ("-- name: q\nSELECT 1,\n\n 2 3", "f.sql:4", 'syntax error at or near "3"'),
        ("-- name: q\n-- params: a int\nSELECT :a +\nFROM t", "f.sql:4", "syntax error"),
        ("-- name: q\nSELECT : a", "f.sql:2", "syntax error"),
        ("-- name: q\nSELECT 1\n\n'open", "f.sql:4", "unterminated quoted string"),
        ("-- name: q\nSELECT $$ open", "f.sql:2", "unterminated dollar-quoted"),
        ("-- name: q\nSELECT 1 /* open", "f.sql:2", "unterminated /* comment"),
    ],
)
def test_malformed_files_raise_catalog_error_naming_file_and_line(
    text: str, where: str, problem: str
) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_queries(text, "f.sql")
    assert caught.value.where == where
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{where}: ")


@pytest.mark.parametrize(
    "text",
    [
        "-- name: q\n-- Gabriel García Márquez ☃ 😀\nSELECT 'é😀',\n\n 'open\n",
        "-- name: q\n-- Gabriel García Márquez ☃ 😀\nSELECT 'é😀',\n\n 1 2\n",
    ],
)
def test_error_lines_are_right_after_non_ascii_text(text: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_queries(text, "f.sql")
    assert caught.value.where == "f.sql:5"


def test_error_names_the_path_it_was_given() -> None:
    with pytest.raises(CatalogError, match=r"^sql/queries/x\.sql:1: "):
        parse_queries("SELECT 1", "sql/queries/x.sql")


# --------------------------------------------------------------------------
# roles


def test_a_roles_line_names_the_only_roles_that_may_run_it() -> None:
    query = one(
        "-- name: q\n-- Doc.\n-- roles: reader,  Reviewer , reader\n-- params: a int\nSELECT :a"
    )
    assert query.roles == ("reader", "Reviewer")  # as written: role names are exact
    assert query.doc == "Doc."
    assert query.describe()["roles"] == ["reader", "Reviewer"]
    assert one("-- name: q\nSELECT 1").roles is None


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("-- roles:", "takes role names"),
        ("-- roles: a,,b", "takes role names"),
        ("-- roles: two words", "takes role names"),
        ("-- roles: none", "takes role names"),
        ("-- roles: " + "r" * 64, "longer than 63 bytes"),
        ("-- roles: a\n-- roles: b", "a second '-- roles:' line"),
    ],
)
def test_a_bad_roles_line_is_an_error(header: str, problem: str) -> None:
    with pytest.raises(CatalogError, match=problem) as caught:
        parse_queries(f"-- name: q\n{header}\nSELECT 1", "f.sql")
    assert caught.value.where.startswith("f.sql:")
