"""Neon's SQL over HTTP at POST /sql (gateway/web/_neon.py), on the wire.

The unmodified driver and drizzle-orm are tested in tests/test_neon_js.py; these
tests pin what they rely on byte for byte: the request and header rules Neon's
proxy has, the result and error bodies, the batch's transaction, and the
gateway's own rules (read-only mode, limits, bad input) through this door.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from oracle import Oracle, exact_json
from support import GatewayClient, get_stats, settled_stats
from test_values import BUILTIN_CASES

from gateway import load_settings
from gateway.engine._pool import session_options
from gateway.web._neon import ISOLATION_LEVELS

#: what the driver sends with every request (its batch options come on top)
DRIVER = {
    "Neon-Connection-String": "postgresql://someone:secret@127.0.0.1:5432/anydb",
    "Neon-Raw-Text-Output": "true",
    "Neon-Array-Mode": "true",
    "Content-Type": "text/plain;charset=UTF-8",  # fetch's for a string body
}
NEON_ERROR_KEYS = {
    "message",
    "code",
    "detail",
    "hint",
    "position",
    "internalPosition",
    "internalQuery",
    "severity",
    "where",
    "table",
    "column",
    "schema",
    "dataType",
    "constraint",
    "file",
    "line",
    "routine",
}


async def sql(
    client: GatewayClient, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST /sql as the driver does (`headers` replace or add to `DRIVER`)."""
    resp = await client.post("/sql", json=body, headers={**DRIVER, **(headers or {})})
    return resp.status, await resp.json()


async def one(client: GatewayClient, query: str, *params: Any, **headers: str) -> Any:
    """The result of one query that must succeed."""
    status, body = await sql(client, {"query": query, "params": list(params)}, headers)
    assert status == 200, body
    return body


def assert_neon_error(body: Any, code: str) -> None:
    """Neon's flat error body, with this code."""
    assert set(body) == NEON_ERROR_KEYS, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]


async def count_rows(admin: psycopg.AsyncConnection[Any], table: str) -> int:
    cur = await admin.execute(f"SELECT count(*) FROM {table}")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# --- one statement ---------------------------------------------------------------------


async def test_a_query_as_the_driver_sends_it(client: GatewayClient) -> None:
    body = await one(
        client, "select $1::int8 + 1 as n, $2::text as t, null::int as z", "9007199254740992", "a"
    )
    assert body == {
        "rowAsArray": True,
        "fields": [
            {
                "name": name,
                "dataTypeID": oid,
                "tableID": 0,
                "columnID": 0,
                "dataTypeSize": size,
                "dataTypeModifier": -1,
                "format": "text",
            }
            for name, oid, size in (("n", 20, 8), ("t", 25, -1), ("z", 23, 4))
        ],
        "rows": [["9007199254740993", "a", None]],
        "command": "SELECT",
        "rowCount": 1,
    }


async def test_fields_describe_table_columns(
    client: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    await admin.execute(f"CREATE TABLE {name} (id int, code varchar(12), price numeric(8,2))")
    try:
        await admin.execute(f"INSERT INTO {name} VALUES (1, 'abc', 2.5)")
        cur = await admin.execute("SELECT %s::regclass::oid", [name])
        row = await cur.fetchone()
        assert row is not None
        body = await one(client, f"select id, code, price, id + 1 as next from {name}")
    finally:
        await admin.execute(f"DROP TABLE {name}")
    fields = {f["name"]: f for f in body["fields"]}
    assert {n: (f["tableID"], f["columnID"]) for n, f in fields.items()} == {
        "id": (row[0], 1),
        "code": (row[0], 2),
        "price": (row[0], 3),
        "next": (0, 0),
    }
    assert fields["code"]["dataTypeModifier"] == 12 + 4  # varchar(n): n + the header
    assert fields["price"]["dataTypeModifier"] == ((8 << 16) | 2) + 4
    assert fields["id"]["dataTypeSize"] == 4 and fields["code"]["dataTypeSize"] == -1
    assert body["rows"] == [["1", "abc", "2.50", "2"]]


async def test_rows_as_objects_unless_array_mode(client: GatewayClient) -> None:
    query = {"query": "select 1 as a, 'x' as b"}
    _, objects = await sql(client, query, {"Neon-Array-Mode": "false"})
    assert objects["rowAsArray"] is False and objects["rows"] == [{"a": "1", "b": "x"}]
    # anything but exactly "true" is false, as Neon's proxy reads its headers
    _, shouted = await sql(client, query, {"Neon-Array-Mode": "TRUE"})
    assert shouted["rows"] == [{"a": "1", "b": "x"}]
    # a query's own arrayMode wins over the header, both ways
    _, asked = await sql(client, {**query, "arrayMode": False})
    assert asked["rows"] == [{"a": "1", "b": "x"}]
    _, arrays = await sql(client, {**query, "arrayMode": True}, {"Neon-Array-Mode": "false"})
    assert arrays["rowAsArray"] is True and arrays["rows"] == [["1", "x"]]


async def test_values_as_json_without_raw_text_output(client: GatewayClient) -> None:
    """Without Neon-Raw-Text-Output the values are /v1's, digit for digit."""
    query = (
        "select 1::int2 as i, 9007199254740993::int8 as big, 0.10::numeric as n,"
        " 0.1::float8 as f, true as b, '{\"b\": 1.50, \"a\": [null]}'::jsonb as j,"
        " array[1, null]::int[] as arr, 'NaN'::float8 as nan"
    )
    resp = await client.post(
        "/sql", json={"query": query}, headers={"Neon-Connection-String": "postgresql://x@y/z"}
    )
    assert resp.status == 200
    text = await resp.text()
    assert '"rows":[{"i":1,"big":"9007199254740993","n":"0.10","f":0.1,"b":true,' in text
    assert '"j":{"a": [null], "b": 1.50},"arr":[1,null],"nan":"NaN"}]' in text


async def test_every_value_is_postgresqls_text(client: GatewayClient, database_dsn: str) -> None:
    """The value table of tests/test_values.py in one batch: each value as a direct
    connection (with the gateway's session options) reads PostgreSQL's text output."""
    queries = [{"query": f"select {expr} as v"} for expr in BUILTIN_CASES]
    status, body = await sql(client, {"queries": queries})
    assert status == 200, body
    options = session_options(load_settings(dsn=database_dsn))
    async with await psycopg.AsyncConnection.connect(database_dsn, options=options) as conn:
        for expr, result in zip(BUILTIN_CASES, body["results"], strict=True):
            cur = await conn.execute(f"select {expr}", binary=False)
            assert cur.pgresult is not None
            raw = cur.pgresult.get_value(0, 0)
            assert result["rows"] == [[None if raw is None else raw.decode()]], expr
            assert result["fields"][0]["dataTypeID"] == cur.pgresult.ftype(0), expr


@pytest.fixture
def oracle(database_dsn: str) -> Iterator[Oracle]:
    options = session_options(load_settings(dsn=database_dsn))
    with psycopg.connect(database_dsn, autocommit=True, options=options) as conn:
        yield Oracle(conn)


async def test_every_value_as_v1_has_it_without_raw_text(
    client: GatewayClient, oracle: Oracle
) -> None:
    queries = [{"query": f"select {expr} as v"} for expr in BUILTIN_CASES]
    resp = await client.post("/sql", json={"queries": queries}, headers={"Neon-Array-Mode": "true"})
    assert resp.status == 200
    answer = exact_json(await resp.text())
    for expr, result in zip(BUILTIN_CASES, answer.get("results"), strict=True):
        assert result.get("rows") == [[oracle.expected(expr)]], expr


@pytest.fixture
async def mood(admin: psycopg.AsyncConnection[Any]) -> AsyncIterator[str]:
    """An enum type made while the gateway is up (so its connections have not met it)."""
    name = f"mood_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE TYPE {name} AS ENUM ('sad', 'ok')")
    try:
        yield name
    finally:
        await admin.execute(f"DROP TYPE {name}")


async def test_a_type_made_after_start(client: GatewayClient, mood: str) -> None:
    await one(client, "select 1")
    query = {"query": f"select 'ok'::{mood} as m, array['sad']::{mood}[] as ms"}
    _, text = await sql(client, query)
    assert text["rows"] == [["ok", "{sad}"]]
    _, typed = await sql(client, query, {"Neon-Raw-Text-Output": "false"})
    assert typed["rows"] == [["ok", ["sad"]]]
    assert typed["fields"][0]["dataTypeID"] == text["fields"][0]["dataTypeID"] > 16384


async def test_commands_and_their_row_counts(rw_client: GatewayClient, table: str) -> None:
    insert = await one(rw_client, f"insert into {table} values (1, 'a'), (2, 'b')")
    assert (insert["command"], insert["rowCount"], insert["rows"], insert["fields"]) == (
        "INSERT",
        2,
        [],
        [],
    )
    update = await one(rw_client, f"update {table} set v = 'c' where id = 1 returning id")
    assert (update["command"], update["rowCount"], update["rows"]) == ("UPDATE", 1, [["1"]])
    # a command without a count has rowCount null, as in Neon's answer
    listen = await one(rw_client, "do $$ begin end $$")
    assert (listen["command"], listen["rowCount"]) == ("DO", None)


async def test_parameters_as_the_driver_sends_them(client: GatewayClient) -> None:
    """The driver sends every parameter as a string or null (node-postgres's
    prepareValue); other JSON values follow /v1's rules."""
    body = await one(
        client,
        "select $1::timestamptz, $2::int[], $3::jsonb ->> 'a', $4::bytea, $5::text, $6::bool",
        "2024-02-29T12:34:56.789+02:00",
        '{"1","2",NULL}',
        '{"a":"x"}',
        "\\x00ff",
        None,
        True,
    )
    assert body["rows"] == [
        ["2024-02-29 10:34:56.789+00", "{1,2,NULL}", "x", "\\x00ff", None, "t"]
    ]


# --- batches ---------------------------------------------------------------------------


async def test_a_batch_is_one_transaction(rw_client: GatewayClient, table: str) -> None:
    status, body = await sql(
        rw_client,
        {
            "queries": [
                {"query": f"insert into {table} values ($1, $2)", "params": ["1", "a"]},
                {"query": f"select v from {table} where id = $1", "params": ["1"]},
                {"query": "select true as same", "arrayMode": False},
                {"query": "select pg_current_xact_id_if_assigned() is not null"},
            ]
        },
    )
    assert status == 200, body
    assert [r["rows"] for r in body["results"]] == [[], [["a"]], [{"same": "t"}], [["t"]]]
    assert [r["command"] for r in body["results"]] == ["INSERT", "SELECT", "SELECT", "SELECT"]


@pytest.mark.parametrize(
    ("neon", "postgres"),
    [
        ("ReadUncommitted", "read uncommitted"),
        ("ReadCommitted", "read committed"),
        ("RepeatableRead", "repeatable read"),
        ("Serializable", "serializable"),
    ],
)
async def test_batch_isolation_levels(rw_client: GatewayClient, neon: str, postgres: str) -> None:
    resp = await rw_client.post(
        "/sql",
        json={"queries": [{"query": "select current_setting('transaction_isolation')"}]},
        headers={**DRIVER, "Neon-Batch-Isolation-Level": neon},
    )
    body = await resp.json()
    assert resp.status == 200, body
    assert body["results"][0]["rows"] == [[postgres]]
    assert resp.headers["Neon-Batch-Isolation-Level"] == neon


SETTINGS_QUERY = {
    "query": "select current_setting('transaction_isolation'),"
    " current_setting('transaction_read_only'), current_setting('transaction_deferrable')"
}


async def test_batch_read_only_and_deferrable(rw_client: GatewayClient, table: str) -> None:
    options = {
        "Neon-Batch-Isolation-Level": "Serializable",
        "Neon-Batch-Read-Only": "true",
        "Neon-Batch-Deferrable": "true",
    }
    resp = await rw_client.post(
        "/sql", json={"queries": [SETTINGS_QUERY]}, headers={**DRIVER, **options}
    )
    body = await resp.json()
    assert body["results"][0]["rows"] == [["serializable", "on", "on"]]
    assert {k: resp.headers[k] for k in options} == options
    # the defaults, as Neon's: read committed (the server's default), read write, not deferrable
    plain = await rw_client.post("/sql", json={"queries": [SETTINGS_QUERY]}, headers=DRIVER)
    assert (await plain.json())["results"][0]["rows"] == [["read committed", "off", "off"]]
    assert "Neon-Batch-Read-Only" not in plain.headers
    status, refused = await sql(
        rw_client,
        {"queries": [{"query": f"insert into {table} values (1, 'a')"}]},
        {"Neon-Batch-Read-Only": "true"},
    )
    assert status == 400
    assert_neon_error(refused, "25006")


async def test_a_failed_batch_is_rolled_back(
    rw_client: GatewayClient, table: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    status, body = await sql(
        rw_client,
        {
            "queries": [
                {"query": f"insert into {table} values (1, 'a')"},
                {"query": "select 1 / 0"},
            ]
        },
    )
    assert status == 400
    assert_neon_error(body, "22012")
    assert body["message"] == "division by zero" and body["severity"] == "ERROR"
    assert await count_rows(admin, table) == 0


async def test_an_empty_batch(client: GatewayClient) -> None:
    assert await sql(client, {"queries": []}) == (200, {"results": []})


# --- errors ----------------------------------------------------------------------------


async def test_an_error_has_every_field_neon_sends(
    rw_client: GatewayClient, table: str
) -> None:
    await one(rw_client, f"insert into {table} values (1, 'a')")
    status, body = await sql(rw_client, {"query": f"insert into {table} values (1, 'b')"})
    assert status == 400
    assert_neon_error(body, "23505")
    assert body["severity"] == "ERROR"
    assert body["detail"] == "Key (id)=(1) already exists."
    assert (body["schema"], body["table"], body["constraint"]) == (
        "public",
        table,
        f"{table}_pkey",
    )
    assert body["file"] and body["line"].isdigit() and body["routine"]
    status, syntax = await sql(rw_client, {"query": "select 1 frm x"})
    assert status == 400
    assert_neon_error(syntax, "42601")
    assert syntax["position"] == "14"  # a string, as Neon sends it
    status, inner = await sql(
        rw_client,
        {"query": "do $$ begin perform 1 / 0; end $$"},
    )
    assert_neon_error(inner, "22012")
    assert "PL/pgSQL function inline_code_block" in inner["where"]


async def test_a_read_only_gateway_refuses_writes(
    client: GatewayClient, table: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    """As /v1/query does: PostgreSQL refuses the write (25006), a batch's too."""
    status, body = await sql(client, {"query": f"insert into {table} values (1, 'a')"})
    assert status == 400
    assert_neon_error(body, "25006")
    batch = {"queries": [{"query": f"insert into {table} values (1, 'a')"}]}
    status, body = await sql(client, batch, {"Neon-Batch-Read-Only": "false"})
    assert status == 400
    assert_neon_error(body, "25006")
    assert await count_rows(admin, table) == 0


async def test_raw_sql_off(gateway_factory: Any) -> None:
    gateway = await gateway_factory(raw_sql="off")
    status, body = await sql(gateway, {"query": "select 1"})
    assert status == 403
    assert_neon_error(body, "raw_sql_disabled")


async def test_a_timeout_is_postgresqls_statement_timeout(gateway_factory: Any) -> None:
    gateway = await gateway_factory(statement_timeout_ms=300)
    status, body = await sql(gateway, {"query": "select pg_sleep(30)"})
    assert status == 400
    assert_neon_error(body, "57014")
    assert (await one(gateway, "select 1"))["rows"] == [["1"]]


async def test_more_rows_than_max_rows(gateway_factory: Any, table: str) -> None:
    """Neon's answer cannot say it was cut: more than max_rows is an error, which
    says whether the statements may have taken effect."""
    read_only = await gateway_factory(max_rows=3)
    assert len((await one(read_only, "select generate_series(1, 3)"))["rows"]) == 3
    status, body = await sql(read_only, {"query": "select generate_series(1, 4)"})
    assert status == 507
    assert_neon_error(body, "result_too_large")
    assert "committed" not in body["message"] and "PGQG_MAX_ROWS" in body["hint"]
    read_write = await gateway_factory(max_rows=3, raw_sql="read-write")
    status, body = await sql(
        read_write,
        {"query": f"insert into {table} select i, 'x' from generate_series(1, 4) i returning id"},
    )
    assert status == 507
    assert "the transaction was committed, so any writes took effect" in body["message"]


BAD_INPUT = [
    (b"not json", "request body is not valid JSON"),
    (b"[1]", "must be a JSON object"),
    (b"{}", "body.query must be a non-empty string"),
    (b'{"query": ""}', "body.query must be a non-empty string"),
    (b'{"query": 1}', "body.query must be a non-empty string"),
    (b'{"query": "select 1", "params": "1"}', "body.params must be a list"),
    (b'{"query": "select 1", "arrayMode": "yes"}', "body.arrayMode must be true or false"),
    (b'{"query": "select 1", "sql": "x"}', "unknown field 'sql' in the body"),
    (b'{"queries": {}}', "queries must be a list"),
    (b'{"queries": [1]}', "queries[0] must be an object"),
    (b'{"queries": [{"query": "select 1"}, {}]}', "queries[1].query must be a non-empty"),
    (b'{"queries": [], "query": "select 1"}', "unknown field 'query' in the body"),
    (b'{"query": "copy x to stdout"}', "COPY TO STDOUT is not available"),
    (b'{"query": "select $1", "params": [{"a": "\\u0000"}]}', "NUL"),
]


@pytest.mark.parametrize(("body", "message"), BAD_INPUT)
async def test_bad_input_is_a_400(client: GatewayClient, body: bytes, message: str) -> None:
    resp = await client.post("/sql", data=body, headers=DRIVER)
    answer = await resp.json()
    assert resp.status == 400, answer
    assert_neon_error(answer, "bad_request")
    assert message in answer["message"]
    assert (await one(client, "select 1"))["rows"] == [["1"]]


async def test_bad_headers_and_methods(client: GatewayClient) -> None:
    status, body = await sql(
        client, {"queries": []}, {"Neon-Batch-Isolation-Level": "serializable"}
    )
    assert status == 400
    assert_neon_error(body, "bad_request")
    assert "ReadUncommitted, ReadCommitted, RepeatableRead, Serializable" in body["message"]
    resp = await client.get("/sql")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert_neon_error(await resp.json(), "method_not_allowed")


async def test_a_body_over_the_limit(gateway_factory: Any) -> None:
    gateway = await gateway_factory(max_body_bytes=1024)
    status, body = await sql(gateway, {"query": "select $1", "params": ["x" * 2000]})
    assert status == 413
    assert_neon_error(body, "too_large")
    # the connection string is not used: anything goes, and nothing is needed
    status, _ = await sql(gateway, {"query": "select 1"}, {"Neon-Connection-String": "?"})
    assert status == 200


# --- the same engine -------------------------------------------------------------------


async def test_requests_ride_the_dispatcher(client: GatewayClient) -> None:
    """/sql's jobs are the dispatcher's like /v1's: counted per connection, and
    pipelined several to a round trip when they queue up together."""
    before = await settled_stats(client)
    answers = await asyncio.gather(
        *(one(client, "select $1::int * 2", str(i)) for i in range(100))
    )
    assert [a["rows"] for a in answers] == [[[str(2 * i)]] for i in range(100)]
    after = await get_stats(client)
    jobs = sum(c["jobs"] for c in after["connections"]) - sum(
        c["jobs"] for c in before["connections"]
    )
    assert jobs == 100
    # and observed as /v1's are: a request id, Server-Timing, in the access log and /metrics
    resp = await client.post("/sql", json={"query": "select 1"}, headers=DRIVER)
    assert resp.headers["X-Request-Id"]
    assert resp.headers["Server-Timing"].startswith("queue;dur=")


async def test_browsers_may_call_it_where_cors_allows(gateway_factory: Any) -> None:
    """/sql is a route like the others: CORS (web/_cors.py) grants it the Neon headers."""
    gateway = await gateway_factory(cors_origins="https://app.example.com")
    origin = {"Origin": "https://app.example.com"}
    preflight = await gateway.options(
        "/sql",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "neon-connection-string, neon-raw-text-output,"
            " neon-array-mode, neon-batch-isolation-level, neon-batch-read-only,"
            " neon-batch-deferrable, authorization",
        },
    )
    assert preflight.status == 204
    for query in ("select 1", "select 1 / 0"):
        resp = await gateway.post("/sql", json={"query": query}, headers={**DRIVER, **origin})
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


async def test_openapi_describes_sql(client: GatewayClient) -> None:
    spec = await (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/sql"]["post"]
    headers = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert headers["Neon-Batch-Isolation-Level"]["enum"] == list(ISOLATION_LEVELS)
    assert set(spec["components"]["schemas"]["NeonError"]["properties"]) == NEON_ERROR_KEYS
