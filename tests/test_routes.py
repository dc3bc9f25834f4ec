"""The v1 HTTP API against a real PostgreSQL: every endpoint and error class."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from support import GatewayClient, assert_error, query, transaction


async def test_query_adds_one(client: GatewayClient) -> None:
    status, body = await query(client, "select $1::int + 1 AS x", 41)
    assert status == 200
    assert body["rows"] == [{"x": 42}]
    assert body["columns"] == [{"name": "x", "type": "int4", "type_oid": 23}]
    assert body["row_count"] == 1
    assert body["command"] == "SELECT"
    assert body["truncated"] is False
    assert body["elapsed_ms"] >= 0


async def test_columns_follow_the_result_as_it_changes(client: GatewayClient) -> None:
    """Column metadata is remembered per result shape: the same shape again, another
    shape of the same statement, and a result too wide to remember all answer right."""
    for _ in range(2):
        status, body = await query(client, "select $1::int AS a, 'x' AS b", 1)
        assert status == 200, body
        assert [c["name"] for c in body["columns"]] == ["a", "b"]
        assert body["rows"] == [{"a": 1, "b": "x"}]
    status, body = await query(client, "select $1::int AS a, 'x' AS b", 2, shape="arrays")
    assert (status, body["rows"]) == (200, [[2, "x"]])
    wide = "select " + ", ".join(f"{i} AS c{i}" for i in range(100))
    for _ in range(2):
        status, body = await query(client, wide)
        assert status == 200, body
        assert [c["name"] for c in body["columns"]] == [f"c{i}" for i in range(100)]
        assert body["rows"] == [{f"c{i}": i for i in range(100)}]


async def test_shape_arrays(client: GatewayClient) -> None:
    status, body = await query(client, "select 1 AS a, 'x' AS b", shape="arrays")
    assert status == 200
    assert body["rows"] == [[1, "x"]]


async def test_json_parameters_bind_as_users_expect(client: GatewayClient) -> None:
    _, body = await query(client, "select x from generate_series(1, 5) x where x = $1", 3)
    assert body["rows"] == [{"x": 3}]
    _, body = await query(client, "select $1::jsonb -> 'a' AS a", {"a": [1, 2]})
    assert body["rows"] == [{"a": [1, 2]}]
    _, body = await query(client, "select 3 = ANY($1::int[]) AS hit", [1, 2, 3])
    assert body["rows"] == [{"hit": True}]
    _, body = await query(client, "select $1::text IS NULL AS n", None)
    assert body["rows"] == [{"n": True}]


async def test_max_rows_truncates(client: GatewayClient) -> None:
    _, body = await query(client, "select generate_series(1, 10) AS n", max_rows=3)
    assert [r["n"] for r in body["rows"]] == [1, 2, 3]
    assert body["truncated"] is True
    assert body["row_count"] == 10


@pytest.mark.parametrize(
    ("sql", "status", "sqlstate"),
    [
        ("select 1/0", 400, "22012"),
        ("select * from no_such_table", 400, "42P01"),
        ("selec 1", 400, "42601"),
        ("select 'x'::int", 400, "22P02"),
        ("select 2147483647::int + 1", 400, "22003"),
        ("select pg_sleep(2)", 504, None),
    ],
)
async def test_sqlstate_maps_to_status(
    client: GatewayClient, sql: str, status: int, sqlstate: str | None
) -> None:
    got, body = await query(client, sql, timeout_ms=300)
    assert got == status
    assert_error(body, "timeout" if status == 504 else "query_error", sqlstate)


async def test_error_fields_carry_position_and_detail(rw_client: GatewayClient, table: str) -> None:
    status, body = await query(rw_client, "select nope from generate_series(1,2)")
    assert status == 400
    assert body["error"]["position"] == 8
    await query(rw_client, f"insert into {table} values (1, 'a')")
    status, body = await query(rw_client, f"insert into {table} values (1, 'b')")
    assert status == 409
    assert_error(body, "query_error", "23505")
    assert "already exists" in body["error"]["detail"]


async def test_foreign_key_violation_is_409(rw_client: GatewayClient, admin: Any) -> None:
    await admin.execute("create table if not exists fk_parent (id int primary key)")
    await admin.execute(
        "create table if not exists fk_child (id int, p int references fk_parent(id))"
    )
    status, body = await query(rw_client, "insert into fk_child values (1, 999)")
    assert status == 409
    assert_error(body, "query_error", "23503")


async def test_raw_sql_off(gateway_factory: Any) -> None:
    client = await gateway_factory(raw_sql="off")
    status, body = await query(client, "select 1")
    assert status == 403
    assert_error(body, "raw_sql_disabled")
    status, body = await transaction(client, ("select 1", []), read_only=True)
    assert status == 403
    assert_error(body, "raw_sql_disabled")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", "bad_request"),
        (b"[]", "bad_request"),
        (b'{"sql": 1}', "bad_request"),
        (b'{"sql": ""}', "bad_request"),
        (b'{"sql": "select 1", "params": {}}', "bad_request"),
        (b'{"sql": "select 1", "extra": 1}', "bad_request"),
        (b'{"sql": "select 1", "timeout_ms": "soon"}', "bad_request"),
        (b'{"sql": "select 1", "timeout_ms": true}', "bad_request"),
        (b'{"sql": "select 1", "shape": "rows"}', "bad_request"),
        (b'{"sql": "select $1", "params": [NaN]}', "bad_request"),
        (b'{"sql": "select $1", "params": ["a\\u0000b"]}', "bad_request"),
        (b'{"sql": "select 1"}\xff', "bad_request"),
    ],
)
async def test_bad_bodies_are_400(client: GatewayClient, body: bytes, code: str) -> None:
    resp = await client.post("/v1/query", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert_error(await resp.json(), code)
    # and the gateway keeps serving
    status, _ = await query(client, "select 1")
    assert status == 200


async def test_a_refused_statement_is_named_where_it_stands(client: GatewayClient) -> None:
    # each SQL text is checked once, but every refusal names its own place
    bad = "select 1\x00"
    for statements, where in [
        ([bad], "statements[0].sql"),
        (["select 1", bad], "statements[1].sql"),
    ]:
        resp = await client.post(
            "/v1/transaction",
            json={"statements": [{"sql": sql} for sql in statements], "read_only": True},
        )
        assert resp.status == 400
        body = await resp.json()
        assert_error(body, "bad_request")
        assert body["error"]["message"].startswith(where), body
    resp = await client.post("/v1/query", json={"sql": bad})
    assert (await resp.json())["error"]["message"].startswith("body.sql")


async def test_wrong_content_type_is_415(client: GatewayClient) -> None:
    resp = await client.post("/v1/query", data=b'{"sql": "select 1"}')
    assert resp.status == 415
    assert_error(await resp.json(), "unsupported_media_type")


async def test_oversized_body_is_413(gateway_factory: Any) -> None:
    client = await gateway_factory(max_body_bytes=4096)
    resp = await client.post("/v1/query", json={"sql": "select '" + "x" * 10000 + "'"})
    assert resp.status == 413
    assert_error(await resp.json(), "too_large")

    # sent in chunks, with no Content-Length to refuse it by: small enough to
    # arrive whole before it is read, or so big that the stream pauses
    for size in (10_000, 1_000_000):
        body = b'{"sql": "select 1", "x": "' + b"a" * size + b'"}'

        async def chunks(body: bytes = body) -> AsyncIterator[bytes]:
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        resp = await client.post(
            "/v1/query", data=chunks(), headers={"Content-Type": "application/json"}
        )
        assert resp.status == 413, size
        assert_error(await resp.json(), "too_large")
    status, _ = await query(client, "select 1")
    assert status == 200


async def test_unknown_path_and_method(client: GatewayClient) -> None:
    resp = await client.get("/v2/nothing")
    assert resp.status == 404
    assert_error(await resp.json(), "not_found")
    resp = await client.delete("/v1/query")
    assert resp.status == 405
    assert_error(await resp.json(), "method_not_allowed")


async def test_transaction_all_or_nothing(rw_client: GatewayClient, table: str, admin: Any) -> None:
    status, body = await transaction(
        rw_client,
        (f"insert into {table} values ($1, 'a')", [1]),
        (f"insert into {table} values ($1, 'b')", [2]),
        (f"select count(*) AS n from {table}", []),
    )
    assert status == 200
    assert [r["command"] for r in body["results"]] == ["INSERT", "INSERT", "SELECT"]
    assert body["results"][2]["rows"] == [{"n": "2"}]  # count() is int8: a string

    status, body = await transaction(
        rw_client,
        (f"insert into {table} values ($1, 'c')", [3]),
        (f"insert into {table} values ($1, 'dup')", [1]),
    )
    assert status == 409
    assert_error(body, "query_error", "23505")
    rows = await (await admin.execute(f"select id from {table} order by id")).fetchall()
    assert rows == [(1,), (2,)]  # nothing of the failed transaction is left


async def test_transaction_isolation_and_validation(rw_client: GatewayClient) -> None:
    status, body = await transaction(
        rw_client, ("show transaction_isolation", []), isolation="serializable"
    )
    assert status == 200
    assert body["results"][0]["rows"] == [{"transaction_isolation": "serializable"}]
    status, body = await transaction(rw_client, ("select 1", []), isolation="chaos")
    assert status == 400
    resp = await rw_client.post("/v1/transaction", json={"statements": []})
    assert resp.status == 400


async def test_transaction_read_only_mode(client: GatewayClient, table: str) -> None:
    # read-only is the default on a read-only gateway: reads need no read_only: true
    status, body = await transaction(client, (f"select count(*)::int AS n from {table}", []))
    assert status == 200, body
    assert body["results"][0]["rows"] == [{"n": 0}]
    for read_only in ({}, {"read_only": True}, {"read_only": None}):
        status, body = await transaction(
            client, (f"insert into {table} values (1, 'a')", []), **read_only
        )
        assert status == 403
        assert_error(body, "query_error", "25006")
        assert body["error"]["message"].endswith(": raw SQL is read-only on this gateway")
        assert "PGQG_RAW_SQL=read-write" in body["error"]["hint"]
    status, body = await transaction(client, ("select 1", []), read_only=False)
    assert status == 403
    assert_error(body, "forbidden")
    assert "PGQG_RAW_SQL=read-write" in body["error"]["message"]


async def test_a_write_on_a_read_only_gateway_names_the_setting(
    client: GatewayClient, table: str
) -> None:
    status, body = await query(client, f"insert into {table} values (1, 'a')")
    assert status == 403
    assert_error(body, "query_error", "25006")
    assert body["error"]["message"] == (
        "cannot execute INSERT in a read-only transaction: raw SQL is read-only on this gateway"
    )
    assert body["error"]["hint"] == (
        "writes need PGQG_RAW_SQL=read-write (pgqg serve --raw-sql read-write)"
    )
    # streamed, the error comes before the first row: the same answer
    resp = await client.post(
        "/v1/query?format=csv", json={"sql": f"insert into {table} values (1, 'a') returning id"}
    )
    assert resp.status == 403
    assert (await resp.json())["error"] == body["error"]


async def test_a_write_refused_by_a_read_only_transaction_on_a_read_write_gateway(
    rw_client: GatewayClient, table: str
) -> None:
    # the client chose read-only: nothing about the gateway's mode to say
    status, body = await transaction(
        rw_client, (f"insert into {table} values (1, 'a')", []), read_only=True
    )
    assert status == 403
    assert body["error"]["message"] == "cannot execute INSERT in a read-only transaction"
    assert body["error"]["hint"] is None


@pytest.mark.parametrize(
    ("sql", "params", "message"),
    [
        ("select $1::int + $2::int", [1], "the statement has 2 parameters ($1, $2); 1 given"),
        ("select $1::int", [1, 2], "the statement has 1 parameter ($1); 2 given"),
        ("select $1::int", [], "the statement has 1 parameter ($1); 0 given"),
        ("select 1", [1], "the statement has no parameters; 1 given"),
    ],
)
async def test_a_wrong_parameter_count_says_how_many(
    client: GatewayClient, sql: str, params: list[int], message: str
) -> None:
    status, body = await query(client, sql, *params)
    assert status == 400
    assert_error(body, "query_error", "08P01")
    assert body["error"]["message"] == message


async def test_healthz_readyz_stats_openapi(client: GatewayClient) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    stats = await (await client.get("/v1/stats")).json()
    assert stats["queue"]["capacity"] == 256
    assert len(stats["connections"]) == 4
    assert {"id", "jobs", "busy_s", "errors"} <= set(stats["connections"][0])
    assert stats["pool"]["pool_max"] == 4
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/query", "/v1/transaction", "/v1/queries/{name}", "/readyz"} <= set(spec["paths"])


async def test_readyz_reflects_a_database_that_is_down(gateway_factory: Any) -> None:
    client = await gateway_factory(
        dsn="postgresql://nobody@127.0.0.1:9/none", wait_ready=False, connect_timeout_ms=200
    )
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert_error(await resp.json(), "unavailable")
    status, body = await query(client, "select 1")
    assert status == 503
    assert_error(body, "unavailable")


async def test_connections_are_named_pgqg(client: GatewayClient, database_dsn: str) -> None:
    _, body = await query(client, "select current_setting('application_name') AS app")
    assert body["rows"][0]["app"].startswith("pgqg")
    with psycopg.connect(database_dsn) as conn:
        names = conn.execute(
            "select count(*) from pg_stat_activity where application_name like 'pgqg%'"
        ).fetchone()
    assert names is not None and names[0] >= 4
