"""Every PostgreSQL value crosses the gateway without loss (DESIGN §4).

The value table is checked against PostgreSQL itself: for each expression the
gateway's JSON is compared with what `oracle.Oracle` derives from the value's own
text output on a direct connection opened with the gateway's session options.
User-defined types are created after the gateway started, so it must learn them.
Parameters are checked the other way, and hypothesis round-trips numeric, int8,
float8 and text through a table.
"""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from oracle import Num, Obj, Oracle, exact_json, plain
from support import GatewayClient, wait_until_ready

from gateway import Settings, create_app, load_settings
from gateway.engine._pool import session_options

# hypothesis keeps caches even without an example database: not in the repository
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "pgqg-hypothesis"))

# --- the value table -------------------------------------------------------------------
# One expression per row; ``{s}`` is a schema of user-defined types made after the
# gateway started (see `user_types`).

BUILTIN_CASES = [
    # integers: int2/int4 are JSON numbers, int8 a string (past 2^53 a number would lie)
    "0::int2",
    "(-32768)::int2",
    "(-2147483648)::int4",
    "2147483647::int4",
    "(-9223372036854775808)::int8",
    "9007199254740993::int8",
    # floats: JSON numbers with exactly PostgreSQL's digits; non-finite as strings
    "1.5::float8",
    "0.1::float4",
    "0.1::float8",
    "1e100::float8",
    "5e-324::float8",
    "1.7976931348623157e308::float8",
    "'-0'::float8",
    "3.4028235e38::float4",
    "'NaN'::float8",
    "'Infinity'::float8",
    "'-Infinity'::float4",
    # numeric keeps its scale; money its locale-free text
    "0.10::numeric",
    "'0.10000000000000000555'::numeric",
    "123456789012345678901234567890.000000001::numeric",
    "'-0.000'::numeric",
    "1.5::numeric(10,3)",
    "'NaN'::numeric",
    "'Infinity'::numeric",
    "'-Infinity'::numeric",
    "'12.34'::money",
    "'-92233720368547758.08'::money",
    # character types: char(n) keeps its padding
    "'text'::text",
    "''::text",
    "E'tab\\there, line\\nbreak'",
    "'quote\"s and \\back'::text",
    "'unicode ✓ 𝄞'::text",
    "'NULL'::text",
    "'a'::varchar(5)",
    "'a'::char(3)",
    "'x'::\"char\"",
    "'a name'::name",
    "true",
    "false",
    # json keeps key order, whitespace and digits; jsonb its digits
    '\'{"b": 0.10000000000000000555, "a": [1, 2.50]}\'::json',
    "'  [1,  2 ]'::json",
    "'\"a string\"'::json",
    '\'{"b": 1, "a": 0.10000000000000000555, "c": 1e400}\'::jsonb',
    "'[1e2, 1.000, -0]'::jsonb",
    '\'{"a": {"b": [true, null, "x"]}}\'::jsonb',
    "'\\x00ff'::bytea",
    "''::bytea",
    # dates and times, infinities and BC included
    "'2024-02-29'::date",
    "'0044-03-15 BC'::date",
    "'infinity'::date",
    "'-infinity'::date",
    "'12:34:56.789'::time",
    "'24:00:00'::time",
    "'12:34:56+05:30'::timetz",
    "'2024-02-29 12:34:56.789'::timestamp",
    "'infinity'::timestamp",
    "'2024-02-29 12:34:56.789+02'::timestamptz",
    "'0044-03-15 12:00+01 BC'::timestamptz",
    "'-infinity'::timestamptz",
    "'1 year 2 mons 3 days 04:05:06.7'::interval",
    "'-1 day +02:00'::interval",
    "'178000000 years'::interval",
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
    # network, geometric, text search, bit strings
    "'192.168.0.1'::inet",
    "'::1'::inet",
    "'10.0.0.0/8'::cidr",
    "'08:00:2b:01:02:03'::macaddr",
    "'08:00:2b:01:02:03:04:05'::macaddr8",
    "point(1.5, -2)",
    "'{1,-1,0}'::line",
    "'[(0,0),(1,1)]'::lseg",
    "box '(0,0),(1,1)'",
    "'[(0,0),(1,1),(2,0)]'::path",
    "'((0,0),(1,1),(2,0))'::polygon",
    "'<(1,1),5>'::circle",
    "'a fat cat:2 sat'::tsvector",
    "'fat & (rat | !cat)'::tsquery",
    "B'101'",
    "'1011'::varbit",
    # ranges and multiranges
    "'[1,3)'::int4range",
    "'(,5]'::int8range",
    "'[0.10,2.50]'::numrange",
    "'[2024-01-01,2024-02-01)'::daterange",
    "'[2024-01-01 00:00+00,infinity)'::tstzrange",
    "'empty'::int4range",
    "'{[1,3), [5,7)}'::int4multirange",
    "'{}'::datemultirange",
    # oids and the rest: text output
    "1234::oid",
    "'pg_class'::regclass",
    "'int4'::regtype",
    "'0/16B3748'::pg_lsn",
    "'12'::xid",
    "'$.a[*] ? (@ > 1)'::jsonpath",
    "'(0,1)'::tid",
    "row(1, 'a b', null)",
    # arrays: nested, with nulls, 'NULL' the string is not null
    "array[1, null, 3]",
    "'{{1,2},{3,4}}'::int[]",
    "'{}'::int[]",
    "'[0:1]={7,8}'::int[]",
    "array['a', null, 'NULL', 'b,c', '', ' sp ', 'q\"', 'b\\s', '{x}']",
    "array[1.5, 'NaN', '-Infinity']::float8[]",
    "array[10000000000]::int8[]",
    "array[0.10, 'NaN']::numeric[]",
    "array[true, false, null]",
    "array['{\"b\": 1.10, \"a\": 2}'::json, '[1]', null]",
    "array[array['1'::json, '{\"x\": [2.0]}'], array['null'::json, '\"s\"']]",
    'array[\'{"b": 1, "a": 0.10000000000000000555}\'::jsonb]',
    "array['\\x00'::bytea, '']",
    "array['0044-03-15 BC'::date, 'infinity']",
    "array['2024-02-29 12:34:56+02'::timestamptz]",
    "array['1 day'::interval, '-01:00']",
    "array[box '(0,0),(1,1)', box '(2,2),(3,3)']",
    "array[point(1, 2), null]",
    "array['a'::char(3), 'bc']",
    "array['[1,3)'::int4range, 'empty']",
    "array['{[1,2)}'::int4multirange]",
    "array[row(1, 'a b'), row(2, 'x\"y')]",
    "array['a:1 b'::tsvector]",
    "array['192.168.0.1'::inet, '::1']",
    "array['12.34'::money]",
    "array[B'101', B'0']",
    "array['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]",
    "array[1::oid, 4294967295::oid]",
    "array['x'::name]",
    "array['{\"a\": 1}'::json]::text",
]

USER_TYPES = """
CREATE TYPE {s}.mood AS ENUM ('sad', 'ok', 'NULL', 'with,comma');
CREATE DOMAIN {s}.posint AS int CHECK (VALUE > 0);
CREATE DOMAIN {s}.intarr AS int[];
CREATE DOMAIN {s}.doc AS jsonb;
CREATE DOMAIN {s}.amount AS numeric(12, 2);
CREATE DOMAIN {s}.dbox AS box;
CREATE DOMAIN {s}.boxes AS box[];
CREATE DOMAIN {s}.dmood AS {s}.mood;
CREATE TYPE {s}.pair AS (a int, b text, c {s}.mood[]);
CREATE TYPE {s}.frange AS RANGE (subtype = float8);
"""

USER_CASES = [
    "'ok'::{s}.mood",
    "array['sad', 'NULL', null, 'with,comma']::{s}.mood[]",
    "3::{s}.posint",
    "array[1, 2, null]::{s}.posint[]",
    "'{4,5}'::{s}.intarr",
    '\'{"{4,5}","{}",NULL}\'::{s}.intarr[]',
    '\'{"b": 0.10, "a": 1}\'::{s}.doc',
    "array['{\"b\": 0.10}', '[1.0]', null]::{s}.doc[]",
    "1.5::{s}.amount",
    "array[1.5, null]::{s}.amount[]",
    "array[box '(0,0),(1,1)', box '(2,2),(3,3)']::{s}.dbox[]",
    "array['ok', 'with,comma']::{s}.dmood[]",
    "row(1, 'a b', '{ok,sad}')::{s}.pair",
    "array[row(1, 'a\"b', '{ok}')::{s}.pair, null]",
    "'[1.5,2.25)'::{s}.frange",
    "array['[1,2)'::{s}.frange, 'empty']",
    "'{[1,2), [3,4)}'::{s}.fmultirange",
]


@pytest.fixture(scope="module")
def value_settings(gateway_dsn: str) -> Settings:
    return load_settings(dsn=gateway_dsn, pool_size=2, raw_sql="read-write")


@pytest.fixture(scope="module")
async def gateway(value_settings: Settings) -> AsyncIterator[GatewayClient]:
    """One gateway for the whole table (read-write raw SQL, 2 connections)."""
    client = TestClient(TestServer(create_app(value_settings)))
    await client.start_server()
    await wait_until_ready(client)
    yield client
    await client.close()


@pytest.fixture(scope="module")
def direct(database_dsn: str, value_settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection with the gateway's session options."""
    with psycopg.connect(
        database_dsn, autocommit=True, options=session_options(value_settings)
    ) as conn:
        yield conn


@pytest.fixture(scope="module")
def oracle(direct: psycopg.Connection[Any]) -> Oracle:
    return Oracle(direct)


@pytest.fixture(scope="module")
async def user_types(gateway: GatewayClient, database_dsn: str) -> AsyncIterator[str]:
    """A schema of user-defined types, created after `gateway` answered its first query."""
    await value_json(gateway, "1")
    schema = f"values_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(database_dsn, autocommit=True) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(USER_TYPES.replace("{s}", schema))
        try:
            yield schema
        finally:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def post_query(
    client: GatewayClient, sql: str, params_json: str = "[]", *, fmt: str = "json", **options: str
) -> bytes:
    """POST /v1/query answered in `fmt`, parameters as raw JSON text; the body of the 200."""
    extra = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in options.items())
    body = f'{{"sql": {json.dumps(sql)}, "params": {params_json}{extra}}}'
    resp = await client.post(
        f"/v1/query?format={fmt}", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    data = await resp.read()
    assert resp.status == 200, data
    return data


async def gateway_answer(client: GatewayClient, sql: str, params_json: str = "[]") -> Any:
    """POST /v1/query with the parameters as raw JSON text; the body parsed exactly."""
    return exact_json(await post_query(client, sql, params_json))


async def value_json(client: GatewayClient, expr: str) -> Any:
    """The gateway's JSON for ``SELECT expr`` (numbers as `Num`, objects as `Obj`)."""
    answer = await gateway_answer(client, f"SELECT {expr} AS v")
    return answer.get("rows")[0].get("v")


def exact_dumps(text: str) -> str:
    return json.dumps(text)


def test_the_table_is_large_enough() -> None:
    assert len(BUILTIN_CASES) + len(USER_CASES) >= 60
    assert len(set(BUILTIN_CASES)) == len(BUILTIN_CASES)


@pytest.mark.parametrize("expr", BUILTIN_CASES)
async def test_builtin_value(gateway: GatewayClient, oracle: Oracle, expr: str) -> None:
    assert await value_json(gateway, expr) == oracle.expected(expr)


@pytest.mark.parametrize("expr", USER_CASES)
async def test_user_type_value(
    gateway: GatewayClient, oracle: Oracle, user_types: str, expr: str
) -> None:
    expr = expr.replace("{s}", user_types)
    assert await value_json(gateway, expr) == oracle.expected(expr)


async def test_oracle_and_gateway_agree_on_the_rule(gateway: GatewayClient) -> None:
    """Spot checks of the rule itself, so a wrong oracle cannot pass the table."""
    assert await value_json(gateway, "'a'::char(3)") == "a  "
    assert await value_json(gateway, "9007199254740993::int8") == "9007199254740993"
    assert await value_json(gateway, "0.10::numeric") == "0.10"
    assert await value_json(gateway, "0.1::float4") == Num("0.1")
    assert await value_json(gateway, "'[1.000]'::jsonb") == [Num("1.000")]
    assert await value_json(gateway, '\'{"b": 1, "a": 2}\'::json') == Obj(
        (("b", Num("1")), ("a", Num("2")))
    )
    assert await value_json(gateway, "array['NULL', null]") == ["NULL", None]
    assert await value_json(gateway, "'12.34'::money") == "$12.34"
    assert await value_json(gateway, "'\\x00ff'::bytea") == "\\x00ff"


async def test_column_metadata_names_user_types(gateway: GatewayClient, user_types: str) -> None:
    answer = plain(
        await gateway_answer(
            gateway,
            f"SELECT 'ok'::{user_types}.mood AS m, '{{1}}'::{user_types}.posint[] AS p,"
            f" 1::{user_types}.posint AS d",
        )
    )
    assert [(c["name"], c["type"]) for c in answer["columns"]] == [
        ("m", "mood"),
        ("p", "posint[]"),
        ("d", "int4"),  # a domain is sent as its base type
    ]


async def test_type_recreated_after_it_was_learnt(
    gateway: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> None:
    """Dropping and recreating a type gives it a new oid, learnt afresh."""
    name = f"d_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE DOMAIN {name} AS text")
    try:
        assert await value_json(gateway, f"array['1'::{name}]") == ["1"]
        await admin.execute(f"DROP DOMAIN {name}; CREATE DOMAIN {name} AS int")
        assert await value_json(gateway, f"array['1'::{name}]") == [Num("1")]
    finally:
        await admin.execute(f"DROP DOMAIN IF EXISTS {name}")


# --- session settings ----------------------------------------------------------------------

SETTING_CASES = [
    "'2024-02-29 12:34:56.789+02'::timestamptz",
    "'2024-02-29'::date",
    "'0044-03-15 12:00 BC'::timestamp",
    "'1 year 2 mons 3 days 04:05:06.7'::interval",
    "'12:34:56+05:30'::timetz",
    "'12.34'::money",
    "'\\x00ff'::bytea",
    "0.1::float8",
]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"timezone": "America/New_York", "datestyle": "SQL, DMY", "intervalstyle": "iso_8601"},
        {"timezone": "Asia/Kolkata", "datestyle": "German", "intervalstyle": "sql_standard"},
    ],
)
async def test_session_settings_fix_the_output(
    gateway_factory: Any, database_dsn: str, overrides: dict[str, str]
) -> None:
    client = await gateway_factory(pool_size=1, **overrides)
    settings = load_settings(dsn=database_dsn, **overrides)
    with psycopg.connect(database_dsn, options=session_options(settings)) as conn:
        oracle = Oracle(conn)
        for expr in SETTING_CASES:
            assert await value_json(client, expr) == oracle.expected(expr), expr


async def test_output_ignores_the_servers_defaults(gateway_factory: Any, database_dsn: str) -> None:
    """A database whose defaults print values differently still gets the fixed output."""
    name = f"odd_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(database_dsn, autocommit=True) as conn:
        await conn.execute(f"CREATE DATABASE {name}")
        for guc, value in [
            ("DateStyle", "'SQL, DMY'"),
            ("IntervalStyle", "'sql_standard'"),
            ("TimeZone", "'Asia/Tokyo'"),
            ("bytea_output", "'escape'"),
            ("extra_float_digits", "-3"),
        ]:
            await conn.execute(f"ALTER DATABASE {name} SET {guc} = {value}")
        dsn = psycopg.conninfo.make_conninfo(database_dsn, dbname=name)
        client = await gateway_factory(dsn=dsn, pool_size=1)
        try:
            for expr, expected in [
                ("'2024-02-29 12:34:56+02'::timestamptz", "2024-02-29 10:34:56+00"),
                ("'1 day 02:00'::interval", "1 day 02:00:00"),
                ("'\\x00ff'::bytea", "\\x00ff"),
                ("0.1::float8", Num("0.1")),
                ("1.0/3::float8", Num("0.3333333333333333")),
            ]:
                assert await value_json(client, expr) == expected, expr
        finally:
            await client.close()
            await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


# --- parameters ----------------------------------------------------------------------------

PARAM_CASES: list[tuple[str, str, Any]] = [
    # (sql, params as raw JSON, expected value of column v as exact_json parses it)
    ("SELECT $1::numeric AS v", "[0.10000000000000000555]", "0.10000000000000000555"),
    (
        "SELECT $1::numeric AS v",
        '["12345678901234567890.12345678901234567890"]',
        "12345678901234567890.12345678901234567890",
    ),
    ("SELECT $1::numeric AS v", "[1e-30]", "0.000000000000000000000000000001"),
    ("SELECT $1::numeric AS v", '["NaN"]', "NaN"),
    ("SELECT $1::int8 AS v", "[9007199254740993]", "9007199254740993"),
    ("SELECT $1::int8 AS v", "[-9223372036854775808]", "-9223372036854775808"),
    (
        "SELECT $1::numeric AS v",
        "[123456789012345678901234567890]",
        "123456789012345678901234567890",
    ),
    ("SELECT $1::float8 AS v", "[0.1]", Num("0.1")),
    ("SELECT $1::float8 AS v", '["-Infinity"]', "-Infinity"),
    ("SELECT $1::int AS v", "[42]", Num("42")),
    ("SELECT $1::bool AS v", "[true]", True),
    ("SELECT $1::text AS v", '["NULL"]', "NULL"),
    ("SELECT $1::text AS v", "[null]", None),
    ("SELECT $1::text AS v", '["tab\\t, quote\\" and \\\\ ✓"]', 'tab\t, quote" and \\ ✓'),
    (
        "SELECT $1::jsonb AS v",
        '[{"b": 0.10000000000000000555, "a": [1, null]}]',
        Obj((("a", [Num("1"), None]), ("b", Num("0.10000000000000000555")))),
    ),
    (
        "SELECT $1::json AS v",
        '[{"b": 1.10, "a": 12345678901234567890123}]',
        Obj((("b", Num("1.10")), ("a", Num("12345678901234567890123")))),
    ),
    ("SELECT $1::jsonb AS v", '["[1, 2.50]"]', [Num("1"), Num("2.50")]),
    ("SELECT $1::int[] AS v", "[[1, null, 3]]", [Num("1"), None, Num("3")]),
    ("SELECT $1::int[] AS v", "[[[1, 2], [3, 4]]]", [[Num("1"), Num("2")], [Num("3"), Num("4")]]),
    (
        "SELECT $1::text[] AS v",
        '[["a,b", "NULL", null, "q\\"", "\\\\", "", "{x}"]]',
        ["a,b", "NULL", None, 'q"', "\\", "", "{x}"],
    ),
    ("SELECT $1::numeric[] AS v", "[[0.10, 1e400]]", ["0.10", "1" + "0" * 400]),
    ("SELECT $1::int8[] AS v", "[[9007199254740993]]", ["9007199254740993"]),
    # inside an array parameter a list is a dimension, an object a JSON value
    (
        "SELECT $1::jsonb[] AS v",
        '[[{"a": 1.0}, {"b": [2]}, null]]',
        [Obj((("a", Num("1.0")),)), Obj((("b", [Num("2")]),)), None],
    ),
    ("SELECT $1::bool[] AS v", "[[true, false, null]]", [True, False, None]),
    ("SELECT $1::date AS v", '["0044-03-15 BC"]', "0044-03-15 BC"),
    ("SELECT $1::timestamptz AS v", '["2024-02-29 12:00+02"]', "2024-02-29 10:00:00+00"),
    ("SELECT $1::bytea AS v", '["\\\\x00ff"]', "\\x00ff"),
    ("SELECT $1::money AS v", "[12.34]", "$12.34"),
    ("SELECT $1 AS v", '["untyped"]', "untyped"),
    ("SELECT $1::int4range AS v", '["[1,3)"]', "[1,3)"),
]


@pytest.mark.parametrize(("sql", "params", "expected"), PARAM_CASES)
async def test_parameters_go_in_losslessly(
    gateway: GatewayClient, sql: str, params: str, expected: Any
) -> None:
    answer = await gateway_answer(gateway, sql, params)
    assert answer.get("rows")[0].get("v") == expected


async def test_parameters_for_user_types(gateway: GatewayClient, user_types: str) -> None:
    answer = await gateway_answer(
        gateway,
        f"SELECT $1::{user_types}.mood[] AS v, $2::{user_types}.posint[] AS w",
        '[["ok", "NULL", null], [1, 2]]',
    )
    row = answer.get("rows")[0]
    assert row.get("v") == ["ok", "NULL", None]
    assert row.get("w") == [Num("1"), Num("2")]


async def test_nul_in_a_parameter_is_refused(gateway: GatewayClient) -> None:
    for params in ['["a\\u0000b"]', '[["a\\u0000b"]]', '[{"k": "a\\u0000b"}]']:
        resp = await gateway.post(
            "/v1/query",
            data=f'{{"sql": "SELECT $1 AS v", "params": {params}}}'.encode(),
            headers={"Content-Type": "application/json"},
        )
        assert resp.status == 400, params
        assert (await resp.json())["error"]["code"] == "bad_request"


# --- every output format -----------------------------------------------------------------
# A value comes out the same in the JSON answer (both shapes) and in NDJSON (both shapes,
# one row per line, always), and as PostgreSQL's own text in CSV: byte for byte what
# ``COPY … (FORMAT csv, HEADER)`` writes. A case is the gateway's expression, its
# parameters as raw JSON, and (when it has parameters) the same value written without
# them, which the oracle and COPY are asked about.

FORMAT_CASES: list[tuple[str, str, str | None]] = [
    # json text with line breaks (PostgreSQL's own functions write them): an NDJSON
    # row stays one line, and the value stays the same JSON value
    ("(SELECT json_agg(t) FROM (VALUES (1, 'a'), (2, 'b')) t)", "[]", None),
    ("row_to_json(row(1, 'x'), true)", "[]", None),
    ("array_to_json(array[1, 2], true)", "[]", None),
    ("E'[1,\\r\\n2]'::json", "[]", None),
    ('E\'\\r\\n{"a\\\\nb":\\n"c\\\\r\\\\n"}\\n\'::json', "[]", None),
    ("array[E'{\"a\":\\n1}'::json, E'\\r\\n[\"s\\\\n\"]\\n'::json, null]", "[]", None),
    ("$1::json", '["[1,\\r\\n2]"]', "E'[1,\\r\\n2]'::json"),
    # -0 keeps its sign wherever a parameter holds it (-0.0 did already)
    ("$1::float8", "[-0]", "'-0'::float8"),
    ("$1::float8", "[-0.0]", "'-0.0'::float8"),
    ("$1::float4", "[-0]", "'-0'::float4"),
    ("$1::text", "[-0]", "'-0'::text"),
    ("$1::int", "[-0]", "'-0'::int"),
    ("$1::numeric", "[-0]", "'-0'::numeric"),
    ("$1::float8[]", "[[-0, 0, -0.0, null]]", "'{-0,0,-0.0,NULL}'::float8[]"),
    ("$1::json", '[{"a": -0, "b": [-0, 0]}]', '\'{"a":-0,"b":[-0,0]}\'::json'),
    ("$1::jsonb", '[{"a": -0}]', "'{\"a\": -0}'::jsonb"),  # jsonb's numeric has no -0
    # a list parameter takes its element type's delimiter: ';' for box
    ("$1::box[]", '[["(1,1),(0,0)", "(3,3),(2,2)"]]', "'{(1,1),(0,0);(3,3),(2,2)}'::box[]"),
    (
        "$1::box[]",
        '[[["(1,1),(0,0)", null], [null, "(3,3),(2,2)"]]]',
        "'{{(1,1),(0,0);NULL};{NULL;(3,3),(2,2)}}'::box[]",
    ),
    ("$1::box[]", '[["(1,1),(0,0)"]]', "'{(1,1),(0,0)}'::box[]"),
    ("$1::box[]", "[[]]", "'{}'::box[]"),
    (
        "row($1::box[], $2::text[], $3::int[])",
        '[["(1,1),(0,0)", "(3,3),(2,2)"], ["a;b", "c,d"], [[1, 2], [3, 4]]]',
        "row('{(1,1),(0,0);(3,3),(2,2)}'::box[], '{\"a;b\",\"c,d\"}'::text[],"
        " '{{1,2},{3,4}}'::int[])",
    ),
    (
        "(SELECT array_agg(b ORDER BY area(b)) FROM unnest($1::box[]) b)",
        '[["(2,2),(0,0)", "(1,1),(0,0)"]]',
        "'{(1,1),(0,0);(2,2),(0,0)}'::box[]",
    ),
    # an array whose lower bounds are not all 1 is its text: a JSON array has none
    ("'[2:3]={1,2}'::int[]", "[]", None),
    ("'[0:1][1:2]={{1,2},{3,4}}'::int[]", "[]", None),
    ("'[1:2][0:0]={{a},{\"b c\"}}'::text[]", "[]", None),
    ("'[-1:0]={\"a b\",NULL}'::text[]", "[]", None),
    ("array['[2:3]={1,2}'::int[]]", "[]", None),
    ('\'[0:1]={"(1,1),(0,0)";"(2,2),(1,1)"}\'::box[]', "[]", None),
    ('\'[0:0]={"{\\"a\\": 1}"}\'::jsonb[]', "[]", None),
    ("array_fill(7, array[2, 1], array[0, 1])", "[]", None),
    ("'[1:2]={1,2}'::int[]", "[]", None),  # lower bound 1: an array
    # json null and SQL NULL are both null in JSON; CSV tells them apart
    ("'null'::json", "[]", None),
    ("'null'::jsonb", "[]", None),
    ("NULL::json", "[]", None),
    ("array['null'::json, NULL]", "[]", None),
]

USER_FORMAT_CASES: list[tuple[str, str, str | None]] = [
    (
        "$1::{s}.dbox[]",
        '[["(1,1),(0,0)", "(3,3),(2,2)"]]',
        "'{(1,1),(0,0);(3,3),(2,2)}'::{s}.dbox[]",
    ),
    (
        "$1::{s}.boxes",
        '[["(1,1),(0,0)", "(3,3),(2,2)", null]]',
        "'{(1,1),(0,0);(3,3),(2,2);NULL}'::{s}.boxes",
    ),
    ("$1::{s}.intarr", "[[1, 2]]", "'{1,2}'::{s}.intarr"),
    ("'[0:1]={4,5}'::{s}.intarr", "[]", None),
    ('\'{"[0:1]={4,5}","{6}",NULL}\'::{s}.intarr[]', "[]", None),
]


def ndjson_lines(body: bytes) -> list[Any]:
    """NDJSON rows as a reader that splits on line feeds gets them, parsed exactly."""
    assert body.endswith(b"\n") and b"\r" not in body, body
    return [exact_json(line) for line in body[:-1].split(b"\n")]


async def every_format(client: GatewayClient, sql: str, params_json: str) -> dict[str, Any]:
    """Column ``v`` of the one row of `sql` as each JSON format has it, and the CSV body."""
    objects = await gateway_answer(client, sql, params_json)
    arrays = exact_json(await post_query(client, sql, params_json, shape="arrays"))
    (ndjson_object,) = ndjson_lines(await post_query(client, sql, params_json, fmt="ndjson"))
    (ndjson_array,) = ndjson_lines(
        await post_query(client, sql, params_json, fmt="ndjson", shape="arrays")
    )
    return {
        "json objects": objects.get("rows")[0].get("v"),
        "json arrays": arrays.get("rows")[0][0],
        "ndjson objects": ndjson_object.get("v"),
        "ndjson arrays": ndjson_array[0],
        "csv": await post_query(client, sql, params_json, fmt="csv"),
    }


def copy_csv(direct: psycopg.Connection[Any], sql: str) -> bytes:
    """What PostgreSQL's ``COPY (sql) TO STDOUT (FORMAT csv, HEADER)`` writes."""
    data = bytearray()
    with direct.cursor().copy(f"COPY ({sql}) TO STDOUT (FORMAT csv, HEADER)") as copy:
        for chunk in copy:
            data += chunk
    return bytes(data)


async def check_every_format(
    client: GatewayClient, oracle: Oracle, direct: psycopg.Connection[Any], case: tuple[str, ...]
) -> None:
    expr, params_json, same_as = case
    literal = same_as or expr
    got = await every_format(client, f"SELECT {expr} AS v", params_json)
    assert got.pop("csv") == copy_csv(direct, f"SELECT {literal} AS v")
    assert got == dict.fromkeys(got, oracle.expected(literal))


@pytest.mark.parametrize("case", FORMAT_CASES, ids=[f"{c[0]} {c[1]}" for c in FORMAT_CASES])
async def test_value_in_every_format(
    gateway: GatewayClient,
    oracle: Oracle,
    direct: psycopg.Connection[Any],
    case: tuple[str, str, str | None],
) -> None:
    await check_every_format(gateway, oracle, direct, case)


@pytest.mark.parametrize("case", USER_FORMAT_CASES, ids=[c[0] for c in USER_FORMAT_CASES])
async def test_user_type_value_in_every_format(
    gateway: GatewayClient,
    oracle: Oracle,
    direct: psycopg.Connection[Any],
    user_types: str,
    case: tuple[str, str, str | None],
) -> None:
    expr, params_json, same_as = case
    await check_every_format(
        gateway,
        oracle,
        direct,
        (
            expr.replace("{s}", user_types),
            params_json,
            (same_as or expr).replace("{s}", user_types),
        ),
    )


async def test_rows_with_line_breaks_are_one_line_each(gateway: GatewayClient) -> None:
    sql = (
        "SELECT i, row_to_json(t, true) AS pretty, json_agg(t) OVER () AS agg"
        " FROM (VALUES (1, 'a'), (2, E'b\\nc')) AS t(i, s)"
    )
    rows = (await gateway_answer(gateway, sql)).get("rows")
    assert len(rows) == 2
    assert ndjson_lines(await post_query(gateway, sql, fmt="ndjson")) == rows
    arrays = ndjson_lines(await post_query(gateway, sql, fmt="ndjson", shape="arrays"))
    assert [Obj(zip(("i", "pretty", "agg"), line, strict=True)) for line in arrays] == rows


async def test_json_null_and_sql_null(
    gateway: GatewayClient, direct: psycopg.Connection[Any]
) -> None:
    """Both are null in the JSON formats; CSV, or ``IS NULL`` in the SQL, tells them apart."""
    sql = "SELECT 'null'::json AS j, NULL::json AS n, 'null'::json IS NULL AS j_is_null"
    row = (await gateway_answer(gateway, sql)).get("rows")[0]
    assert row == Obj((("j", None), ("n", None), ("j_is_null", False)))
    assert ndjson_lines(await post_query(gateway, sql, fmt="ndjson")) == [row]
    csv = await post_query(gateway, sql, fmt="csv")
    assert csv == b"j,n,j_is_null\nnull,,f\n" == copy_csv(direct, sql)


async def test_list_parameters_in_a_transaction(
    gateway: GatewayClient, direct: psycopg.Connection[Any]
) -> None:
    """Each statement's lists take their own types' delimiters. A statement that cannot
    be described before its transaction runs (its table is made by an earlier
    statement) keeps ``,``, which every built-in type but box takes."""
    name = f"lists_{uuid.uuid4().hex[:8]}"
    direct.execute(f"CREATE TABLE {name} (b box[], i int[])")
    try:
        statements = [
            (
                f"INSERT INTO {name} VALUES ($1, $2) RETURNING b, i",
                [["(1,1),(0,0)", "(3,3),(2,2)"], [1, 2]],
            ),
            ("SELECT $1::box[] AS b, $2::int[] AS i", [["(2,2),(1,1)", "(4,4),(3,3)"], [3, 4]]),
            (f"CREATE TEMP TABLE {name}_t (i int[], t text[])", []),
            (f"INSERT INTO {name}_t VALUES ($1, $2) RETURNING i, t", [[5, 6], ["a;b", "c,d"]]),
        ]
        resp = await gateway.post(
            "/v1/transaction",
            json={"statements": [{"sql": sql, "params": params} for sql, params in statements]},
        )
        body = await resp.json()
        assert resp.status == 200, body
        assert [result["rows"] for result in body["results"]] == [
            [{"b": ["(1,1),(0,0)", "(3,3),(2,2)"], "i": [1, 2]}],
            [{"b": ["(2,2),(1,1)", "(4,4),(3,3)"], "i": [3, 4]}],
            [],
            [{"i": [5, 6], "t": ["a;b", "c,d"]}],
        ]
    finally:
        direct.execute(f"DROP TABLE {name}")


NAMED_QUERIES = """\
-- name: signed
-- params: f float8, fs float8[], j json, t text
SELECT :f AS f, :fs AS fs, :j AS j, :t AS t;

-- name: boxes
-- params: b box[]
SELECT :b AS b, pg_catalog.array_length(:b, 1) AS n;
"""


async def test_named_query_parameters(
    gateway_factory: Any, tmp_path: Path, direct: psycopg.Connection[Any]
) -> None:
    """-0 and box[] lists reach a named query as they reach raw SQL: from a JSON body or a
    query string, buffered or streamed."""
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "values.sql").write_text(NAMED_QUERIES)
    client = await gateway_factory(sql_dir=tmp_path, pool_size=1)
    signed = [{"f": Num("-0"), "fs": [Num("-0"), Num("1")], "j": {"a": Num("-0")}, "t": "-0"}]
    resp = await client.post(
        "/v1/queries/signed",
        data=b'{"params": {"f": -0, "fs": [-0, 1], "j": {"a": -0}, "t": "-0"}}',
        headers={"Content-Type": "application/json"},
    )
    assert plain(exact_json(await resp.read()).get("rows")) == signed
    query = {"f": "-0", "fs": "[-0, 1]", "j": '{"a": -0}', "t": "-0"}
    resp = await client.get("/v1/queries/signed", params=query)
    assert plain(exact_json(await resp.read()).get("rows")) == signed

    boxes = [{"b": ["(1,1),(0,0)", "(3,3),(2,2)"], "n": Num("2")}]
    for fmt in ("json", "ndjson"):
        resp = await client.post(
            f"/v1/queries/boxes?format={fmt}",
            json={"params": {"b": ["(1,1),(0,0)", "(3,3),(2,2)"]}},
        )
        data = await resp.read()
        assert resp.status == 200, data
        rows = exact_json(data).get("rows") if fmt == "json" else ndjson_lines(data)
        assert plain(rows) == boxes
    resp = await client.get(
        "/v1/queries/boxes", params={"b": '["(1,1),(0,0)", "(3,3),(2,2)"]', "format": "csv"}
    )
    expected = "SELECT '{(1,1),(0,0);(3,3),(2,2)}'::box[] AS b, 2 AS n"
    assert await resp.read() == copy_csv(direct, expected)


# --- round trips through a table (hypothesis) ---------------------------------------------

ROUND_TRIP = hsettings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
async def round_trip_table(database_dsn: str) -> AsyncIterator[str]:
    name = f"rt_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(database_dsn, autocommit=True) as conn:
        await conn.execute(
            f"CREATE TABLE {name} (id serial PRIMARY KEY, n numeric, i int8, f float8, t text)"
        )
        try:
            yield name
        finally:
            await conn.execute(f"DROP TABLE {name}")


async def round_trip(
    client: GatewayClient, table: str, column: str, param_json: str
) -> tuple[Any, Any]:
    """Insert one parameter into `column`; the value as RETURNING and a later SELECT read it."""
    inserted = await gateway_answer(
        client,
        f"INSERT INTO {table} ({column}) VALUES ($1) RETURNING id, {column} AS v",
        f"[{param_json}]",
    )
    row = inserted.get("rows")[0]
    selected = await gateway_answer(
        client, f"SELECT {column} AS v FROM {table} WHERE id = $1", f"[{row.get('id').text}]"
    )
    return row.get("v"), selected.get("rows")[0].get("v")


@ROUND_TRIP
@given(
    value=st.decimals(allow_nan=False, allow_infinity=False)
    | st.sampled_from([Decimal("NaN"), Decimal("0.10"), Decimal("-0.000")]),
    as_number=st.booleans(),
)
async def test_numeric_round_trip(
    gateway: GatewayClient,
    direct: psycopg.Connection[Any],
    round_trip_table: str,
    value: Decimal,
    as_number: bool,
) -> None:
    text = str(value)
    param = text if as_number and value.is_finite() else exact_dumps(text)
    returned, selected = await round_trip(gateway, round_trip_table, "n", param)
    canonical = direct.execute("SELECT %s::numeric::text", [text]).fetchone()
    assert canonical is not None
    assert returned == selected == canonical[0]
    if value.is_finite():
        assert Decimal(returned) == value  # no digit lost on the way in or out


@ROUND_TRIP
@given(value=st.integers(min_value=-(2**63), max_value=2**63 - 1))
async def test_int8_round_trip(gateway: GatewayClient, round_trip_table: str, value: int) -> None:
    assert await round_trip(gateway, round_trip_table, "i", str(value)) == (str(value),) * 2


@ROUND_TRIP
@given(value=st.floats(allow_nan=True, allow_infinity=True))
async def test_float8_round_trip(
    gateway: GatewayClient, round_trip_table: str, value: float
) -> None:
    if math.isfinite(value):
        param = repr(value)
    else:
        param = exact_dumps(
            "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        )
    returned, selected = await round_trip(gateway, round_trip_table, "f", param)
    assert returned == selected
    if math.isnan(value):
        assert returned == "NaN"
    elif math.isinf(value):
        assert returned == ("Infinity" if value > 0 else "-Infinity")
    else:
        assert isinstance(returned, Num)
        back = float(returned.text)
        assert back == value and math.copysign(1, back) == math.copysign(1, value)


@ROUND_TRIP
@given(value=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))))
async def test_text_round_trip(gateway: GatewayClient, round_trip_table: str, value: str) -> None:
    assert await round_trip(gateway, round_trip_table, "t", exact_dumps(value)) == (value,) * 2


# --- NDJSON rows are lines (hypothesis) ---------------------------------------------------

#: whitespace JSON allows between tokens, line breaks included
_WHITESPACE = st.text(st.sampled_from(" \t\n\r"), max_size=3)
#: how a character may be written inside a JSON string, besides \uXXXX
_STRING_FORMS = {
    '"': ['\\"'],
    "\\": ["\\\\"],
    "/": ["/", "\\/"],
    "\b": ["\\b"],
    "\f": ["\\f"],
    "\n": ["\\n"],
    "\r": ["\\r"],
    "\t": ["\\t"],
}
_JSON_NUMBERS = st.from_regex(
    r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?", fullmatch=True
)


def _unicode_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04x}"


@st.composite
def json_strings(draw: st.DrawFn) -> str:
    """A JSON string, each character written as itself or escaped, at random (controls
    always escaped, as JSON requires)."""
    text = draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=8))
    written = []
    for char in text:
        forms = _STRING_FORMS.get(char, [] if ord(char) < 0x20 else [char])
        written.append(draw(st.sampled_from([*forms, _unicode_escape(char)])))
    return '"' + "".join(written) + '"'


def _containers(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Arrays and objects of `inner` JSON texts, with whitespace around every token."""
    value = st.tuples(_WHITESPACE, inner, _WHITESPACE).map("".join)
    member = st.tuples(_WHITESPACE, json_strings(), _WHITESPACE, st.just(":"), value).map("".join)
    arrays = st.tuples(st.lists(value, max_size=4), _WHITESPACE).map(
        lambda parts: "[" + ",".join(parts[0]) + parts[1] + "]"
    )
    objects = st.tuples(st.lists(member, max_size=4), _WHITESPACE).map(
        lambda parts: "{" + ",".join(parts[0]) + parts[1] + "}"
    )
    return arrays | objects


#: JSON documents with random whitespace (line breaks too) and escapes
JSON_DOCUMENTS = st.tuples(
    _WHITESPACE,
    st.recursive(
        st.sampled_from(["null", "true", "false"]) | _JSON_NUMBERS | json_strings(),
        _containers,
        max_leaves=10,
    ),
    _WHITESPACE,
).map("".join)


@ROUND_TRIP
@given(documents=st.lists(JSON_DOCUMENTS, min_size=1, max_size=4))
async def test_ndjson_rows_are_lines(gateway: GatewayClient, documents: list[str]) -> None:
    """json documents stored as written, streamed: split on line feeds, each line is
    its row, and its value is the document's."""
    sql = (
        "SELECT d.i, d.doc::json AS j FROM unnest($1::text[]) WITH ORDINALITY AS d(doc, i)"
        " ORDER BY d.i"
    )
    params = json.dumps([documents])
    expected = [exact_json(doc) for doc in documents]
    objects = ndjson_lines(await post_query(gateway, sql, params, fmt="ndjson"))
    assert [row.get("j") for row in objects] == expected
    arrays = ndjson_lines(await post_query(gateway, sql, params, fmt="ndjson", shape="arrays"))
    assert [row[1] for row in arrays] == expected
    answer = (await gateway_answer(gateway, sql, params)).get("rows")
    assert [row.get("j") for row in answer] == expected
