"""The ``pgqg`` command line against a real PostgreSQL: query, run, db init.

Commands run in-process through click's `CliRunner`. Where a command talks to a
gateway (``--url``), the gateway is the aiohttp test server of `gateway_factory` on
this test's event loop, and the command runs in a worker thread (it blocks on HTTP).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import psycopg.conninfo
import pytest
from click.testing import CliRunner, Result
from conftest import TEST_REQUEST_ROLE, ClientFactory
from support import JWT_SECRET

import gateway.cli._commands
from gateway import load_settings
from gateway.cli._commands import _announce, main
from gateway.cli._demo import demo_state
from gateway.web._auth import Authenticator

#: settings the machine may have that would change where commands go
CLEAN_ENV: dict[str, str | None] = {"PGQG_DSN": None, "DATABASE_URL": None}


def pgqg(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run ``pgqg ARGS`` in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, list(args), env={**CLEAN_ENV, **(env or {})}, prog_name="pgqg")


def raw(result: Result) -> str:
    """Standard output as written (`Result.stdout` turns CRLF into LF)."""
    return result.stdout_bytes.decode()


async def pgqg_async(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """`pgqg` in a worker thread, so a gateway on this event loop can answer it."""
    return await asyncio.to_thread(pgqg, *args, env=env)


@pytest.fixture
def fresh_db(database_dsn: str) -> Iterator[str]:
    """An empty database of the test's own, dropped after; yields its DSN."""
    name = f"pgqg_cli_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield psycopg.conninfo.make_conninfo(database_dsn, dbname=name)
    finally:
        with psycopg.connect(database_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def scalar(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


# --- query, directly ---------------------------------------------------------------------


def test_query_positional_parameters(database_dsn: str) -> None:
    result = pgqg("query", "--dsn", database_dsn, "select $1::int + 1 AS answer", "41")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["answer"]
    assert lines[2].strip() == "42"
    assert lines[-1] == "(1 row)"
    # a negative number is a parameter, not an unknown option; --format may come last
    result = pgqg("query", "--dsn", database_dsn, "select $1::int AS x", "-5", "--format", "csv")
    assert (result.exit_code, raw(result)) == (0, "x\r\n-5\r\n")


def test_query_formats(database_dsn: str) -> None:
    sql = "select $1::int AS n, $2 AS t, NULL::text AS z, 1.50::numeric AS d, true AS b"
    args = ("query", "--dsn", database_dsn, sql, "7", "a,b")

    body = json.loads(pgqg(*args, "--format", "json").stdout)
    assert body["rows"] == [{"n": 7, "t": "a,b", "z": None, "d": "1.50", "b": True}]
    assert [c["type"] for c in body["columns"]] == ["int4", "text", "text", "numeric", "bool"]
    assert (body["row_count"], body["command"], body["truncated"]) == (1, "SELECT", False)

    ndjson = pgqg(*args, "--format", "ndjson").stdout.splitlines()
    assert [json.loads(line) for line in ndjson] == body["rows"]
    arrays = pgqg(*args, "--format", "ndjson", "--shape", "arrays").stdout
    assert json.loads(arrays) == [7, "a,b", None, "1.50", True]

    csv = raw(pgqg(*args, "--format", "csv"))
    assert csv == 'n,t,z,d,b\r\n7,"a,b",,1.50,t\r\n'

    table = pgqg(*args).stdout.splitlines()
    assert table[0].split() == ["n", "t", "z", "d", "b"]
    assert table[2].split() == ["7", "a,b", "NULL", "1.50", "t"]


def test_query_statement_without_rows(database_dsn: str, table: str) -> None:
    result = pgqg("query", "--dsn", database_dsn, f"insert into {table} values (1, 'a'), (2, 'b')")
    assert (result.exit_code, result.stdout) == (0, "INSERT 2\n")
    body = json.loads(
        pgqg("query", "--dsn", database_dsn, f"delete from {table}", "--format", "json").stdout
    )
    assert (body["columns"], body["rows"], body["row_count"], body["command"]) == (
        [],
        [],
        2,
        "DELETE",
    )


def test_query_error_prints_postgres_message_detail_and_hint(database_dsn: str) -> None:
    result = pgqg("query", "--dsn", database_dsn, "select 1/0")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "ERROR:  division by zero (SQLSTATE 22012)" in result.stderr

    raise_it = (
        "DO $$ BEGIN RAISE EXCEPTION 'no such book' "
        "USING DETAIL = 'id 99 is not in the shop', HINT = 'try id 7'; END $$"
    )
    result = pgqg("query", "--dsn", database_dsn, raise_it)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "ERROR:  no such book (SQLSTATE P0001)",
        "DETAIL:  id 99 is not in the shop",
        "HINT:  try id 7",
    ]


@pytest.mark.parametrize(
    ("sql", "params", "message"),
    [
        ("select $1::int + $2::int", ["1"], "the statement has 2 parameters ($1, $2); 1 given"),
        ("select $1::int", ["1", "2"], "the statement has 1 parameter ($1); 2 given"),
        ("select $1::int", [], "the statement has 1 parameter ($1); 0 given"),
        ("select 1", ["1"], "the statement has no parameters; 1 given"),
    ],
)
async def test_a_wrong_parameter_count_reads_the_same_directly_and_through_a_gateway(
    database_dsn: str, rw_gateway: str, sql: str, params: list[str], message: str
) -> None:
    expected = f"ERROR:  {message} (SQLSTATE 08P01)\n"
    direct = await pgqg_async("query", "--dsn", database_dsn, sql, *params)
    gateway = await pgqg_async("query", "--url", rw_gateway, sql, *params)
    assert (direct.exit_code, direct.stderr) == (gateway.exit_code, gateway.stderr) == (1, expected)


def test_query_takes_one_statement(database_dsn: str) -> None:
    result = pgqg("query", "--dsn", database_dsn, "select 1; select 2")
    assert result.exit_code == 2
    assert "pgqg query runs one" in result.stderr


def test_query_connection_failure(database_dsn: str) -> None:
    bad = psycopg.conninfo.make_conninfo(database_dsn, password="wrong", connect_timeout=5)
    result = pgqg("query", "--dsn", bad, "select 1")
    assert result.exit_code == 1
    assert result.stderr.startswith("pgqg: cannot connect to the database:")
    assert "wrong" not in result.stderr


def test_query_reads_the_dsn_from_the_environment(database_dsn: str) -> None:
    result = pgqg("query", "select 6 * 7 AS x", "--format", "csv", env={"PGQG_DSN": database_dsn})
    assert (result.exit_code, raw(result)) == (0, "x\r\n42\r\n")
    result = pgqg("query", "select 1", env={"DATABASE_URL": database_dsn})
    assert result.exit_code == 0, result.output


def test_query_dsn_and_url_exclude_each_other(database_dsn: str) -> None:
    result = pgqg("query", "--dsn", database_dsn, "--url", "http://127.0.0.1:1", "select 1")
    assert result.exit_code == 2
    assert "not both" in result.stderr


# --- query, through a gateway ------------------------------------------------------------

#: one row of every kind of value, to compare direct and gateway output cell by cell
VALUES_SQL = """
select 1::int2 AS i2, 2147483647 AS i4, 9007199254740993::int8 AS i8,
       12345678901234567890.000001::numeric AS num, 0.1::float8 AS f8, 1e20::float8 AS big,
       100000::float4 AS f4, 'NaN'::float8 AS nan, '-Infinity'::float8 AS ninf,
       true AS t, false AS f, NULL::int AS null_int, '' AS empty, 'NULL' AS null_word,
       E'two\\nlines, "quoted"' AS text_special, 'é€😀' AS unicode,
       '{"b": 1, "a": [1.50, "x", null, true], "big": 123456789012345678901234567890,
         "s": "q\\"\\\\\\u0001"}'::jsonb AS jb,
       '"just a string"'::jsonb AS jb_string,
       ARRAY[1, NULL, 3] AS ints, ARRAY[['a b', ''], [NULL, 'NULL']] AS texts2d,
       ARRAY['q"', 'back\\slash', '{}', ','] AS texts_special,
       ARRAY[true, false] AS bools, ARRAY['NaN'::float8, 1.5] AS floats,
       ARRAY['{"k": 1}'::jsonb] AS jsonbs, '\\x00ff'::bytea AS bytes,
       ARRAY['\\x01'::bytea] AS byteses, '2024-02-29 12:34:56.789+00'::timestamptz AS ts,
       '1 year 2 mons 3 days 04:05:06'::interval AS iv,
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u,
       '10.1.2.3/32'::inet AS ip, '[1,5)'::int4range AS r, '(1,2)'::point AS pt,
       ARRAY['(1,1),(0,0)'::box, '(3,3),(2,2)'::box] AS boxes, 12.5::money AS m,
       ARRAY[1.10, NULL]::numeric[] AS nums
"""


@pytest.fixture
async def rw_gateway(gateway_factory: ClientFactory, database_dsn: str) -> str:
    """The URL of a read-write gateway on the test database."""
    client = await gateway_factory(raw_sql="read-write")
    return str(client.make_url("")).rstrip("/")


async def test_query_through_the_gateway_prints_what_the_direct_query_prints(
    database_dsn: str, rw_gateway: str
) -> None:
    for fmt in ("table", "csv", "ndjson", "json"):
        direct = await pgqg_async("query", "--dsn", database_dsn, VALUES_SQL, "--format", fmt)
        gateway = await pgqg_async("query", "--url", rw_gateway, VALUES_SQL, "--format", fmt)
        assert direct.exit_code == gateway.exit_code == 0, (direct.output, gateway.output)
        if fmt == "json":
            direct_body, gateway_body = json.loads(direct.stdout), json.loads(gateway.stdout)
            del direct_body["elapsed_ms"], gateway_body["elapsed_ms"]
            assert direct_body == gateway_body
        else:
            assert raw(direct) == raw(gateway), fmt


async def test_types_learnt_on_the_way_print_the_same(
    database_dsn: str, rw_gateway: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    mood = f"mood_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE TYPE {mood} AS ENUM ('sad', 'ok, fine', 'happy')")
    try:
        sql = f"select 'ok, fine'::{mood} AS m, ARRAY['sad', 'ok, fine', NULL]::{mood}[] AS ms"
        for fmt in ("csv", "json"):
            direct = await pgqg_async("query", "--dsn", database_dsn, sql, "--format", fmt)
            gateway = await pgqg_async("query", "--url", rw_gateway, sql, "--format", fmt)
            assert direct.exit_code == gateway.exit_code == 0, (direct.output, gateway.output)
            if fmt == "csv":
                assert (
                    raw(direct)
                    == raw(gateway)
                    == ('m,ms\r\n"ok, fine","{sad,""ok, fine"",NULL}"\r\n')
                )
            else:
                body = json.loads(direct.stdout)
                assert body["rows"] == [{"m": "ok, fine", "ms": ["sad", "ok, fine", None]}]
                assert [c["type"] for c in body["columns"]] == [mood, f"{mood}[]"]
                assert body["columns"] == json.loads(gateway.stdout)["columns"]
    finally:
        await admin.execute(f"DROP TYPE {mood}")


async def test_query_through_the_gateway_keeps_every_digit(rw_gateway: str) -> None:
    result = await pgqg_async("query", "--url", rw_gateway, VALUES_SQL, "--format", "json")
    body = result.stdout
    assert '"f8":0.1,' in body and '"big":1e+20,' in body and '"f4":100000,' in body
    # a jsonb value is embedded as PostgreSQL printed it: digits and spaces
    assert '"big": 123456789012345678901234567890}' in body
    assert '{"a": [1.50, "x", null, true], "b": 1,' in body
    csv = raw(await pgqg_async("query", "--url", rw_gateway, VALUES_SQL, "--format", "csv"))
    header, row = csv.split("\r\n")[:2]
    cells = dict(zip(header.split(","), row.split(","), strict=False))
    assert (cells["i8"], cells["f8"], cells["big"], cells["t"]) == (
        "9007199254740993",
        "0.1",
        "1e+20",
        "t",
    )


async def test_query_through_the_gateway_with_parameters(rw_gateway: str) -> None:
    result = await pgqg_async(
        "query", "--url", rw_gateway, "select $1::int + 1 AS x", "41", "--format", "csv"
    )
    assert (result.exit_code, raw(result)) == (0, "x\r\n42\r\n")


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
async def test_query_through_the_gateway_streams_every_row(
    gateway_factory: ClientFactory, database_dsn: str, fmt: str
) -> None:
    # more rows than the gateway's max_rows: its JSON answer would stop there
    url = str((await gateway_factory(max_rows=100)).make_url("")).rstrip("/")
    sql = "select g, repeat('x', g % 7) AS pad, E'a\\nb' AS nl from generate_series(1, 2500) g"
    direct = await pgqg_async("query", "--dsn", database_dsn, sql, "--format", fmt)
    gateway = await pgqg_async("query", "--url", url, sql, "--format", fmt)
    assert direct.exit_code == gateway.exit_code == 0, (direct.output, gateway.output)
    assert raw(gateway) == raw(direct)
    assert gateway.stderr == ""
    lines = raw(gateway).count("\n")
    assert lines == (1 + 2500 * 2 if fmt == "csv" else 2500)  # a header; a LF in every row


async def test_a_lone_backslash_dot_is_quoted_as_copy_does(
    database_dsn: str, rw_gateway: str
) -> None:
    sql = "select '\\.' AS x"  # COPY's end-of-data marker, alone on its line
    direct = await pgqg_async("query", "--dsn", database_dsn, sql, "--format", "csv")
    gateway = await pgqg_async("query", "--url", rw_gateway, sql, "--format", "csv")
    assert raw(direct) == raw(gateway) == 'x\r\n"\\."\r\n'


async def test_query_through_the_gateway_a_stream_that_fails_midway(rw_gateway: str) -> None:
    sql = "select g, 1 / (g - 4000) AS x from generate_series(1, 5000) g"
    ndjson = await pgqg_async("query", "--url", rw_gateway, sql, "--format", "ndjson")
    assert ndjson.exit_code == 1
    assert ndjson.stderr == "ERROR:  division by zero (SQLSTATE 22012)\n"
    rows = [json.loads(line) for line in ndjson.stdout.splitlines()]
    assert rows and rows == [{"g": g, "x": -1 if g > 3000 else 0} for g in range(1, len(rows) + 1)]
    csv = await pgqg_async("query", "--url", rw_gateway, sql, "--format", "csv")
    assert csv.exit_code == 1
    assert "cut its answer short" in csv.stderr
    assert raw(csv).startswith("g,x\r\n1,0\r\n")


async def test_query_gateway_errors(gateway_factory: ClientFactory, rw_gateway: str) -> None:
    result = await pgqg_async("query", "--url", rw_gateway, "select 1/0")
    assert result.exit_code == 1
    assert result.stderr == "ERROR:  division by zero (SQLSTATE 22012)\n"

    off = await gateway_factory(raw_sql="off")
    result = await pgqg_async("query", "--url", str(off.make_url("")), "select 1")
    assert result.exit_code == 1
    assert "(raw_sql_disabled, HTTP 403)" in result.stderr

    read_only = await gateway_factory()
    result = await pgqg_async(
        "query", "--url", str(read_only.make_url("")), "create table nope (x int)"
    )
    assert result.exit_code == 1
    assert "SQLSTATE 25006" in result.stderr  # read-only, enforced by PostgreSQL
    assert result.stderr.splitlines() == [
        "ERROR:  cannot execute CREATE TABLE in a read-only transaction: raw SQL is read-only"
        " on this gateway (SQLSTATE 25006)",
        "HINT:  writes need PGQG_RAW_SQL=read-write (pgqg serve --raw-sql read-write)",
    ]


def test_query_unreachable_gateway() -> None:
    result = pgqg("query", "--url", "http://127.0.0.1:9", "select 1")
    assert result.exit_code == 1
    assert result.stderr.startswith("pgqg: cannot reach the gateway at http://127.0.0.1:9")


async def test_query_defaults_to_the_local_gateway(gateway_factory: ClientFactory) -> None:
    client = await gateway_factory()
    env = {"PGQG_HOST": "127.0.0.1", "PGQG_PORT": str(client.port)}
    result = await pgqg_async("query", "select 42 AS x", "--format", "csv", env=env)
    assert (result.exit_code, raw(result)) == (0, "x\r\n42\r\n")


# --- values that print alike in every format, directly and through a gateway -----------------


async def outputs(dsn: str, url: str, sql: str, *params: str) -> dict[tuple[str, str], str]:
    """``pgqg query`` output by (target, format), each run checked to succeed."""
    printed = {}
    for target, where in (("--dsn", dsn), ("--url", url)):
        for fmt in ("json", "ndjson", "csv", "table"):
            result = await pgqg_async("query", target, where, sql, *params, "--format", fmt)
            assert result.exit_code == 0, (target, fmt, result.output)
            printed[target, fmt] = raw(result)
    return printed


def one_line(printed: str) -> Any:
    """The one NDJSON row of `printed`, which is one line whatever its values hold."""
    assert printed.endswith("\n") and printed.count("\n") == 1 and "\r" not in printed, printed
    return json.loads(printed)


async def test_json_with_line_breaks_is_one_ndjson_line(database_dsn: str, rw_gateway: str) -> None:
    sql = (
        "select (select json_agg(t) from (values (1, 'a'), (2, 'b')) t) AS agg,"
        " row_to_json(row(1, 'x'), true) AS pretty, E'[1,\\r\\n2]'::json AS crlf"
    )
    printed = await outputs(database_dsn, rw_gateway, sql)
    row = {
        "agg": [{"column1": 1, "column2": "a"}, {"column1": 2, "column2": "b"}],
        "pretty": {"f1": 1, "f2": "x"},
        "crlf": [1, 2],
    }
    for target in ("--dsn", "--url"):
        assert one_line(printed[target, "ndjson"]) == row
        assert json.loads(printed[target, "json"])["rows"] == [row]
    # directly, CSV cells are PostgreSQL's text, line breaks and all
    agg, pretty, crlf = (scalar(database_dsn, f"select {c}::text from ({sql}) s") for c in row)
    assert printed["--dsn", "csv"] == (
        f'agg,pretty,crlf\r\n"{agg.replace(chr(34), 2 * chr(34))}",'
        f'"{pretty.replace(chr(34), 2 * chr(34))}","{crlf}"\r\n'
    )
    # through a gateway, json is rebuilt from the JSON answer: the same values
    header, cells = printed["--url", "csv"].split("\r\n", 1)
    assert header == "agg,pretty,crlf"
    assert [json.loads(c) for c in next(csv.reader(io.StringIO(cells)))] == list(row.values())


async def test_negative_zero_parameter(database_dsn: str, rw_gateway: str) -> None:
    sql = "select $1::float8 AS f, $1::text AS t, array[$1::float8] AS fs"
    printed = await outputs(database_dsn, rw_gateway, sql, "-0")
    for target in ("--dsn", "--url"):
        assert '"rows":[{"f":-0,"t":"-0","fs":[-0]}]' in printed[target, "json"]
        assert printed[target, "ndjson"] == '{"f":-0,"t":"-0","fs":[-0]}\n'
        assert printed[target, "csv"] == "f,t,fs\r\n-0,-0,{-0}\r\n"
        assert printed[target, "table"].splitlines()[2].split() == ["-0", "-0", "{-0}"]


async def test_box_array_parameter(database_dsn: str, rw_gateway: str) -> None:
    sql = "select $1::box[] AS b"
    printed = await outputs(database_dsn, rw_gateway, sql, "{(1,1),(0,0);(3,3),(2,2)}")
    for target in ("--dsn", "--url"):
        assert json.loads(printed[target, "json"])["rows"] == [
            {"b": ["(1,1),(0,0)", "(3,3),(2,2)"]}
        ]
        assert one_line(printed[target, "ndjson"]) == {"b": ["(1,1),(0,0)", "(3,3),(2,2)"]}
        assert printed[target, "csv"] == 'b\r\n"{(1,1),(0,0);(3,3),(2,2)}"\r\n'
        assert "{(1,1),(0,0);(3,3),(2,2)}" in printed[target, "table"]


async def test_array_with_lower_bounds_is_its_text(database_dsn: str, rw_gateway: str) -> None:
    sql = "select '[2:3]={1,2}'::int[] AS a, '[0:0][1:1]={{x}}'::text[] AS t, '{1,2}'::int[] AS b"
    printed = await outputs(database_dsn, rw_gateway, sql)
    row = {"a": "[2:3]={1,2}", "t": "[0:0][1:1]={{x}}", "b": [1, 2]}
    for target in ("--dsn", "--url"):
        assert json.loads(printed[target, "json"])["rows"] == [row]
        assert one_line(printed[target, "ndjson"]) == row
        assert printed[target, "csv"] == 'a,t,b\r\n"[2:3]={1,2}",[0:0][1:1]={{x}},"{1,2}"\r\n'
        assert "[2:3]={1,2}" in printed[target, "table"]


async def test_json_null_and_sql_null(database_dsn: str, rw_gateway: str) -> None:
    """Both are null in JSON and NDJSON; ``IS NULL`` tells them apart in every output, and
    CSV (PostgreSQL's text, directly or streamed by a gateway) shows json's ``null``
    beside NULL's empty field, as does a direct query's table."""
    sql = "select 'null'::json AS j, NULL::json AS n, 'null'::json IS NULL AS j_is_null"
    printed = await outputs(database_dsn, rw_gateway, sql)
    row = {"j": None, "n": None, "j_is_null": False}
    for target in ("--dsn", "--url"):
        assert json.loads(printed[target, "json"])["rows"] == [row]
        assert one_line(printed[target, "ndjson"]) == row
    for target in ("--dsn", "--url"):
        assert printed[target, "csv"] == "j,n,j_is_null\r\nnull,,f\r\n"
    assert printed["--dsn", "table"].splitlines()[2].split() == ["null", "NULL", "f"]


# --- run -----------------------------------------------------------------------------------

SCRIPT = """\
-- a real file: functions, quotes and comments holding semicolons
CREATE TABLE shelf (id int PRIMARY KEY, label text NOT NULL);

CREATE FUNCTION shelf_label(n int) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    result text;  -- a comment; inside the body
BEGIN
    IF n < 0 THEN
        RAISE EXCEPTION 'negative; %', n;
    END IF;
    result := 'shelf ' || n || ';';  /* a block comment; too */
    RETURN result;
END
$$;

CREATE FUNCTION twice(n int) RETURNS int LANGUAGE sql
BEGIN ATOMIC
    SELECT n * 2;
END;

INSERT INTO shelf VALUES (1, shelf_label(1)), (2, E'tab\\there; it''s');
INSERT INTO shelf VALUES (3, $tag$ $$;$$ $tag$);  -- a trailing comment;
INSERT INTO shelf SELECT twice(2), 'four';
"""


def test_run_a_file_with_functions_strings_and_comments(fresh_db: str, tmp_path: Path) -> None:
    path = tmp_path / "script.sql"
    path.write_text(SCRIPT)
    result = pgqg("run", str(path), "--dsn", fresh_db)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ran 6 statements from {path} in ")
    assert result.stderr == ""  # no progress bar when not on a terminal
    with psycopg.connect(fresh_db) as conn:
        rows = conn.execute("SELECT id, label FROM shelf ORDER BY id").fetchall()
        assert rows == [(1, "shelf 1;"), (2, "tab\there; it's"), (3, " $$;$$ "), (4, "four")]
        assert conn.execute("SELECT shelf_label(7)").fetchone() == ("shelf 7;",)


FAILING = """\
CREATE TABLE steps (n int);
INSERT INTO steps VALUES (1);
INSERT INTO steps
VALUES (1 / 0);
INSERT INTO steps VALUES (3);
SELECT nope FROM steps;
INSERT INTO steps VALUES (5);
"""


def test_run_stops_at_the_first_error(fresh_db: str, tmp_path: Path) -> None:
    path = tmp_path / "failing.sql"
    path.write_text(FAILING)
    result = pgqg("run", str(path), "--dsn", fresh_db)
    assert result.exit_code == 1
    assert f"{path}:3: statement 3 failed: INSERT INTO steps" in result.stderr
    assert "ERROR:  division by zero (SQLSTATE 22012)" in result.stderr
    assert result.stdout == (
        f"ran 2 of 6 statements from {path}: statement 3 (line 3) failed, 3 not run\n"
    )
    assert scalar(fresh_db, "SELECT array_agg(n ORDER BY n) FROM steps") == [1]


def test_run_continue_goes_on_and_says_which_failed(fresh_db: str, tmp_path: Path) -> None:
    path = tmp_path / "failing.sql"
    path.write_text(FAILING)
    result = pgqg("run", str(path), "--dsn", fresh_db, "--continue")
    assert result.exit_code == 1
    assert result.stdout == (
        f"ran 6 statements from {path}: 4 succeeded, 2 failed: 3 (line 3), 5 (line 6)\n"
    )
    # the error position points at the line of the file
    assert f"{path}:6: statement 5 failed: SELECT nope FROM steps" in result.stderr
    assert scalar(fresh_db, "SELECT array_agg(n ORDER BY n) FROM steps") == [1, 3, 5]


def test_run_directly_is_one_session(fresh_db: str, tmp_path: Path) -> None:
    path = tmp_path / "session.sql"
    path.write_text(
        "CREATE SCHEMA app;\nSET search_path = app;\nBEGIN;\n"
        "CREATE TABLE t (x int);\nINSERT INTO t VALUES (1);\nROLLBACK;\n"
        "CREATE TABLE kept (x int);\n"
    )
    result = pgqg("run", str(path), "--dsn", fresh_db)
    assert result.exit_code == 0, result.output
    assert scalar(fresh_db, "SELECT to_regclass('app.kept') IS NOT NULL")
    assert scalar(fresh_db, "SELECT to_regclass('app.t') IS NULL")  # rolled back


def test_run_refuses_a_file_it_cannot_split(fresh_db: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.sql"
    path.write_text("CREATE TABLE first (x int);\nSELECT 'never closed;\n")
    result = pgqg("run", str(path), "--dsn", fresh_db)
    assert result.exit_code == 1
    assert f"{path}:2: unterminated quoted string" in result.stderr
    assert "nothing was run" in result.stderr
    assert scalar(fresh_db, "SELECT to_regclass('first') IS NULL")


def test_run_reads_standard_input(fresh_db: str) -> None:
    result = CliRunner().invoke(
        main, ["run", "-", "--dsn", fresh_db], input="CREATE TABLE x (a int); SELECT 1;"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ran 2 statements from <stdin>")


def test_run_an_empty_file(tmp_path: Path, database_dsn: str) -> None:
    path = tmp_path / "empty.sql"
    path.write_text("-- nothing but a comment;\n")
    result = pgqg("run", str(path), "--dsn", database_dsn)
    assert (result.exit_code, result.stdout) == (0, f"no statements in {path}\n")


async def test_run_through_the_gateway(
    gateway_factory: ClientFactory, fresh_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        # what migrations through the gateway need of its least-privileged role
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {TEST_REQUEST_ROLE}")
    client = await gateway_factory(raw_sql="read-write", dsn=fresh_db)
    url = str(client.make_url(""))
    path = tmp_path / "script.sql"
    path.write_text(SCRIPT)
    result = await pgqg_async("run", str(path), "--url", url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ran 6 statements from {path}")
    assert scalar(fresh_db, "SELECT count(*) FROM shelf") == 4

    path.write_text(FAILING)
    result = await pgqg_async("run", str(path), "--url", url)
    assert result.exit_code == 1
    assert "ERROR:  division by zero (SQLSTATE 22012)" in result.stderr
    assert "statement 3 (line 3) failed, 3 not run" in result.stdout


# --- db init --------------------------------------------------------------------------------


async def test_db_init_loads_the_demo_once(fresh_db: str, gateway_factory: ClientFactory) -> None:
    result = await pgqg_async("db", "init", "--dsn", fresh_db)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("loaded the demo bookshop into database pgqg_cli_")
    counts = "SELECT array[(SELECT count(*) FROM author), (SELECT count(*) FROM book), " \
             "(SELECT count(*) FROM review)]"  # fmt: skip
    assert scalar(fresh_db, counts) == [120, 1200, 3600]

    again = await pgqg_async("db", "init", "--dsn", fresh_db)
    assert again.exit_code == 0, again.output
    assert "already in" in again.stdout
    assert scalar(fresh_db, counts) == [120, 1200, 3600]

    # the named queries work on it
    client = await gateway_factory(dsn=fresh_db)
    resp = await client.get("/v1/queries/book_by_id", params={"id": "7"})
    assert resp.status == 200
    assert (await resp.json())["rows"][0]["id"] == 7


def test_db_init_changes_nothing_when_it_fails(fresh_db: str) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE review (id int)")  # in the way of schema.sql
    result = pgqg("db", "init", "--dsn", fresh_db)
    assert result.exit_code == 1
    assert "nothing was changed" in result.stderr
    assert 'ERROR:  relation "review" already exists (SQLSTATE 42P07)' in result.stderr
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('author')").fetchone() == (None,)
        assert not demo_state(conn).loaded


def test_db_init_needs_a_database() -> None:
    result = pgqg("db", "init")
    assert result.exit_code == 2
    assert "no database" in result.stderr


def test_help_lists_every_command() -> None:
    result = pgqg("--help")
    assert result.exit_code == 0
    for command in ("serve", "query", "run", "db", "token"):
        assert f"  {command} " in result.stdout
    assert "init" in pgqg("db", "--help").stdout


def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    toml = tmp_path / "pgqg.toml"
    toml.write_text("port = \n")
    result = pgqg("serve", "--config", str(toml))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"Error: {toml}: not valid TOML: Invalid value (at line 1, column 8)\n"
    toml.write_text("pool-size = 2\n")
    result = pgqg("serve", "--config", str(toml))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        f"Error: invalid settings: unknown setting 'pool-size' in {toml} (did you mean"
        " 'pool_size'?)"
    )


def test_a_bad_named_query_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "queries").mkdir()
    bad = tmp_path / "queries" / "bad.sql"
    bad.write_text("-- name: q\n-- params: a int\nSELECT 1\n")
    # refused before anything starts: no embedded server, no port
    result = pgqg("serve", "--port", "0", env={"PGQG_SQL_DIR": str(tmp_path)})
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"Error: bad named-query file {bad}:2: parameter 'a' is declared but not used by 'q'\n"
    )


def test_an_unknown_pgqg_variable_is_warned_of_once(database_dsn: str) -> None:
    result = pgqg(
        "query", "--dsn", database_dsn, "select 1 AS x", "--format", "csv",
        env={"PGQG_POOLSIZE": "3"},
    )  # fmt: skip
    assert (result.exit_code, raw(result)) == (0, "x\r\n1\r\n")
    assert result.stderr == (
        "pgqg: warning: PGQG_POOLSIZE is not a setting and is ignored; did you mean"
        " PGQG_POOL_SIZE?\n"
    )


def test_serve_fails_at_once_on_a_taken_port(database_dsn: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        data_dir = tmp_path / "never-created"
        for extra in (["--dsn", database_dsn], ["--data-dir", str(data_dir)]):
            result = pgqg("serve", "--port", port, *extra)
            assert result.exit_code == 1
            assert f"pgqg: cannot serve on 127.0.0.1:{port}:" in result.stderr
        assert not data_dir.exists()  # no embedded server was started for nothing


@pytest.mark.parametrize("compiled", [True, False])
def test_serve_says_when_the_request_path_is_not_compiled(
    compiled: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # an install without a C compiler falls back to plain Python: the operator is told
    compiled_modules = ["web._routes"] if compiled else []
    monkeypatch.setattr(gateway.cli._commands, "compiled_modules", lambda: compiled_modules)
    _announce(load_settings(port=8123), demo=False)("http://127.0.0.1:8123")
    out = capsys.readouterr().out
    assert "pgqg is serving on http://127.0.0.1:8123" in out
    assert ("plain Python" in out) is not compiled


@pytest.mark.parametrize("console", [True, False])
def test_serve_names_the_console(console: bool, capsys: pytest.CaptureFixture[str]) -> None:
    _announce(load_settings(port=8123, console=console), demo=False)("http://127.0.0.1:8123")
    out = capsys.readouterr().out
    assert ("query console: http://127.0.0.1:8123/" in out) is console


# --- token -----------------------------------------------------------------------------------


def test_token_signs_with_the_gateway_secret() -> None:
    env = {"PGQG_JWT_SECRET": JWT_SECRET, "PGQG_JWT_AUDIENCE": "shop"}
    result = pgqg("token", "--role", "bookshop_reader", "--sub", "ana", "--claim", "k=v", env=env)
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="shop")
    assert claims["role"] == "bookshop_reader"
    assert (claims["sub"], claims["k"], claims["aud"]) == ("ana", "v", "shop")
    assert claims["exp"] - claims["iat"] == 3600
    # where the gateway reads the role, and what it makes of the token
    env["PGQG_JWT_ROLE_CLAIM"] = "app_metadata.role"
    nested = pgqg("token", "--role", "r", "--ttl-s", "60", env=env).stdout.strip()
    claims = jwt.decode(nested, JWT_SECRET, algorithms=["HS256"], audience="shop")
    assert claims["app_metadata"] == {"role": "r"} and "role" not in claims
    settings = load_settings(jwt_secret=JWT_SECRET, jwt_audience="shop")
    identity = Authenticator(settings).identify("Bearer " + token)
    assert identity is not None and identity.role == "bookshop_reader"


def test_token_needs_a_secret(tmp_path: Path) -> None:
    result = pgqg("token", "--role", "r", env={"PGQG_JWT_SECRET": None})
    assert result.exit_code == 2
    assert "PGQG_JWT_SECRET, which is not set" in result.stderr
    bad = pgqg("token", "--role", "r", "--claim", "novalue", env={"PGQG_JWT_SECRET": JWT_SECRET})
    assert bad.exit_code == 2
    assert "'novalue' is not NAME=VALUE" in bad.stderr
