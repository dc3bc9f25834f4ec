"""Splitting SQL files into statements (`gateway.catalog._sqlfile`), as psql splits them."""

from __future__ import annotations

import pytest

from gateway.catalog._sqlfile import SqlFileError, split_statements


def texts(sql: str) -> list[str]:
    return [s.text for s in split_statements(sql)]


def test_plpgsql_body_with_semicolons_stays_whole() -> None:
    sql = """
create function add_one(x int) returns int language plpgsql as $$
declare
  y int := x; -- a comment; with a semicolon
begin
  y := y + 1; /* another ; */
  return y;
end
$$;
select add_one(41);
"""
    assert texts(sql) == [
        sql[sql.index("create") : sql.index("$$;") + 2],
        "select add_one(41)",
    ]


def test_tagged_dollar_quotes_nest() -> None:
    sql = "select $outer$ a; $inner$ b; $inner$ c; $outer$; select 2"
    assert texts(sql) == ["select $outer$ a; $inner$ b; $inner$ c; $outer$", "select 2"]


def test_string_literals_and_identifiers() -> None:
    sql = (
        "select 'a;b', 'it''s;', E'x\\';y', U&'d\\0061;t', \"odd;name\" from t;"
        "insert into t values (';')"
    )
    assert texts(sql) == [
        "select 'a;b', 'it''s;', E'x\\';y', U&'d\\0061;t', \"odd;name\" from t",
        "insert into t values (';')",
    ]


def test_comments() -> None:
    sql = "-- head; comment\nselect 1; /* block; /* nested; */ still; */ select 2 -- tail;\n;"
    statements = split_statements(sql)
    assert [s.text for s in statements] == ["select 1", "select 2"]
    assert [s.line for s in statements] == [2, 2]


def test_only_comments_and_empty_statements_are_dropped() -> None:
    assert texts(";;  -- nothing\n/* here */ ;") == []
    assert texts("") == []


def test_last_statement_needs_no_semicolon() -> None:
    assert texts("select 1;\nselect 2\n") == ["select 1", "select 2"]


def test_parentheses_keep_rule_actions_together() -> None:
    sql = "create rule r as on insert to a do also (insert into b values (1); delete from c);"
    assert texts(sql) == [sql[:-1]]


def test_begin_atomic_bodies_stay_whole() -> None:
    sql = """create or replace function f(x int) returns int language sql
begin atomic
  select case when x > 0 then 1 else 2 end;
  select x;
end;
create procedure p() begin atomic insert into t values (1); end;
select f(1)"""
    statements = texts(sql)
    assert len(statements) == 3
    assert statements[0].endswith("select x;\nend")
    assert statements[1] == "create procedure p() begin atomic insert into t values (1); end"
    assert statements[2] == "select f(1)"


def test_begin_outside_routines_is_a_transaction() -> None:
    assert texts("begin; insert into t values (1); commit;") == [
        "begin",
        "insert into t values (1)",
        "commit",
    ]
    assert texts("do $$ begin perform 1; end $$; select case when true then 1 end; select 2") == [
        "do $$ begin perform 1; end $$",
        "select case when true then 1 end",
        "select 2",
    ]


def test_numbers_lines_and_error_positions() -> None:
    sql = "select 1;\n\n-- comment\nselect\n  2,\n  3;\n"
    first, second = split_statements(sql)
    assert (first.number, first.line, second.number, second.line) == (1, 1, 2, 4)
    assert sql[second.offset :].startswith("select\n  2")
    assert second.line_of(second.text.index("3") + 1) == 6
    assert second.line_of(None) == 4


def test_non_ascii_text() -> None:
    statements = split_statements("select 'é€;'; select '😀' as \"ü;\"")
    assert [s.text for s in statements] == ["select 'é€;'", "select '😀' as \"ü;\""]


@pytest.mark.parametrize(
    ("sql", "line", "message"),
    [
        ("select 1;\nselect 'open", 2, "unterminated quoted string"),
        ("select 1;\n\nselect $$ é body", 3, "unterminated dollar-quoted string"),
        ("select 1; /* never closed", 1, "unterminated /* comment"),
        ('select "x', 1, "unterminated quoted identifier"),
        ("select 1;\n\\connect other\nselect 2", 2, "\\connect is a psql meta-command"),
        ("select 1;\nCOPY t (a) FROM stdin;\n1\n\\.\n", 2, "COPY ... FROM STDIN / TO STDOUT"),
        ("copy (select 1) to stdout", 1, "not supported here"),
    ],
)
def test_what_cannot_be_split_names_the_line(sql: str, line: int, message: str) -> None:
    with pytest.raises(SqlFileError) as caught:
        split_statements(sql)
    assert caught.value.line == line
    assert message in caught.value.message
