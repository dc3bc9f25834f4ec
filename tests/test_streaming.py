"""Streamed answers: NDJSON and CSV (DESIGN §3, README "Streaming").

Row counts, CSV quoting checked byte for byte against PostgreSQL's own
``COPY … (FORMAT csv, HEADER)``, NDJSON values checked against the JSON answer,
errors before and after the first row, row limits, and the connection freed at
once when a client goes away or stops reading.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import psycopg
import pytest
from aiohttp import ClientPayloadError
from support import GatewayClient, assert_error, query

from gateway.values._formats import OutputFormat, csv_cell, negotiate

NDJSON = "application/x-ndjson"
CSV = "text/csv"


async def stream(client: GatewayClient, sql: str, *params: Any, fmt: str, **options: Any) -> Any:
    """POST /v1/query asking for `fmt` by ``?format=``; the response, unread."""
    return await client.post(
        f"/v1/query?format={fmt}", json={"sql": sql, "params": list(params), **options}
    )


async def read_all(resp: Any) -> bytes:
    """The whole body, or what came before the response was cut (then `ClientPayloadError`)."""
    data = bytearray()
    async for chunk in resp.content.iter_any():
        data += chunk
    return bytes(data)


async def read_cut(resp: Any) -> bytes:
    """The body of a response that must end cut short."""
    data = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            data += chunk
    except ClientPayloadError:
        return bytes(data)
    raise AssertionError("the response ended as if complete")


def ndjson_rows(body: bytes) -> list[Any]:
    assert body == b"" or body.endswith(b"\n")
    return [json.loads(line) for line in body.splitlines()]


# --- formats and negotiation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("format_param", "accept", "expected"),
    [
        (None, None, OutputFormat.JSON),
        (None, "*/*", OutputFormat.JSON),
        (None, "application/x-ndjson", OutputFormat.NDJSON),
        (None, "text/csv; charset=utf-8", OutputFormat.CSV),
        (None, "text/html, text/csv;q=0.5, application/json;q=0.4", OutputFormat.CSV),
        (None, "application/json;q=0.1, application/x-ndjson", OutputFormat.NDJSON),
        ("csv", "application/json", OutputFormat.CSV),
        ("NDJSON", None, OutputFormat.NDJSON),
    ],
)
def test_negotiate(format_param: str | None, accept: str | None, expected: OutputFormat) -> None:
    assert negotiate(format_param, accept) is expected


def test_csv_cells_quote_like_copy() -> None:
    assert csv_cell(None) == b""
    assert csv_cell(b"") == b'""'
    assert csv_cell(b"plain") == b"plain"
    assert csv_cell(b'a,b"c\nd\re') == b'"a,b""c\nd\re"'
    assert csv_cell(b"\\.", alone=True) == b'"\\."'
    assert csv_cell(b"\\.") == b"\\."


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/query?format=xml", {}),
        ("/v1/query", {"Accept": "application/xml"}),
        ("/v1/transaction?format=ndjson", {}),
        ("/v1/transaction", {"Accept": "text/csv"}),
    ],
)
async def test_formats_we_cannot_give_are_406(
    client: GatewayClient, path: str, headers: dict[str, str]
) -> None:
    body = {"sql": "select 1"} if path.startswith("/v1/query") else {"statements": []}
    resp = await client.post(path, json=body, headers=headers)
    assert resp.status == 406
    assert_error(await resp.json(), "not_acceptable")


# --- row counts --------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [0, 1, 999, 1000, 2501])
async def test_ndjson_row_counts(client: GatewayClient, rows: int) -> None:
    resp = await stream(
        client, "select g, g::text AS t from generate_series(1, $1::int) g", rows, fmt="ndjson"
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == NDJSON
    got = ndjson_rows(await read_all(resp))
    assert got == [{"g": i, "t": str(i)} for i in range(1, rows + 1)]


@pytest.mark.parametrize("rows", [0, 1, 2501])
async def test_csv_row_counts(client: GatewayClient, rows: int) -> None:
    resp = await client.post(
        "/v1/query",
        json={"sql": "select g AS n from generate_series(1, $1::int) g", "params": [rows]},
        headers={"Accept": "text/csv"},
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    lines = (await read_all(resp)).decode().splitlines()
    assert lines == ["n", *(str(i) for i in range(1, rows + 1))]


async def test_a_large_export_counts_every_row(client: GatewayClient) -> None:
    sql = "select g, md5(g::text) from generate_series(1, 200000) g"
    for fmt, extra in (("ndjson", 0), ("csv", 1)):
        resp = await stream(client, sql, fmt=fmt)
        count = 0
        async for chunk in resp.content.iter_any():
            count += chunk.count(b"\n")
        assert count == 200000 + extra, fmt


async def test_named_queries_stream(demo_client: GatewayClient) -> None:
    params = {"page_size": "5", "after_id": "0"}
    as_json = await (await demo_client.get("/v1/queries/list_books", params=params)).json()
    resp = await demo_client.get("/v1/queries/list_books", params={**params, "format": "ndjson"})
    assert resp.status == 200
    assert ndjson_rows(await read_all(resp)) == as_json["rows"]
    resp = await demo_client.post(
        "/v1/queries/list_books",
        json={"params": {"page_size": 5, "after_id": 0}},
        headers={"Accept": "text/csv"},
    )
    lines = (await read_all(resp)).decode().splitlines()
    assert lines[0].split(",") == [c["name"] for c in as_json["columns"]]
    assert len(lines) == 6


async def test_statements_without_rows_stream_nothing(rw_client: GatewayClient) -> None:
    for fmt in ("ndjson", "csv"):
        resp = await stream(rw_client, "set local work_mem = '8MB'", fmt=fmt)
        assert resp.status == 200
        assert await read_all(resp) == b""


# --- values ------------------------------------------------------------------------------

ROW_SQL = """select 1::int2 AS i2, 9007199254740993::int8 AS i8, 0.10::numeric AS n,
    0.1::float8 AS f, 'NaN'::float4 AS nan, true AS b,
    '{"b": 0.10000000000000000555, "a": 1}'::json AS j,
    array[array[1, null], array[3, 4]] AS a, array['NULL', null, 'a,b'] AS t,
    'a'::char(3) AS c, '\\x00ff'::bytea AS y, '0044-03-15 BC'::date AS d,
    '[1,3)'::int4range AS r, null::text AS z, '' AS e"""


@pytest.mark.parametrize("shape", ["objects", "arrays"])
async def test_ndjson_values_are_the_json_answers(client: GatewayClient, shape: str) -> None:
    buffered = await (await client.post("/v1/query", json={"sql": ROW_SQL, "shape": shape})).text()
    resp = await stream(client, ROW_SQL, fmt="ndjson", shape=shape)
    line = await read_all(resp)
    assert line.count(b"\n") == 1
    # the same bytes: json's digits and key order survive the stream too
    assert line.rstrip(b"\n").decode() in buffered


CSV_SQL = ROW_SQL.replace(", '' AS e", "") + (
    ", E'line\\nbreak' AS nl, E'cr\\rhere' AS cr, E'crlf\\r\\n' AS crlf,"
    " 'say \"hi\", twice' AS q, '\\.' AS dot, ' spaced ' AS sp, 'x' AS \"odd, \"\"name\"\"\""
)


@pytest.mark.parametrize(
    "sql",
    [
        CSV_SQL,  # no empty string: Python's csv writer
        CSV_SQL + ", '' AS empty",  # an empty string: cell by cell
        "select generate_series(1, 2500) AS g, null AS n, 'a,b' AS t",  # several chunks
        "select v from (values ('\\.'), (''), (null), ('a\"b')) AS t(v)",  # one column
    ],
)
async def test_csv_is_what_copy_writes(
    client: GatewayClient, admin: psycopg.AsyncConnection[Any], sql: str
) -> None:
    resp = await stream(client, sql, fmt="csv")
    got = await read_all(resp)
    copied = bytearray()
    cur = admin.cursor()
    async with cur.copy(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
        async for data in copy:
            copied += data
    assert got == bytes(copied)


async def test_csv_quotes_a_lone_end_marker_like_copy(client: GatewayClient) -> None:
    resp = await stream(client, "select '\\.' AS v union all select 'ok'", fmt="csv")
    assert await read_all(resp) == b'v\n"\\."\nok\n'


async def test_a_user_type_first_seen_in_a_stream(
    client: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> None:
    name = f"e_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE TYPE {name} AS ENUM ('a', 'NULL'); CREATE DOMAIN {name}_d AS int")
    try:
        sql = f"select array['a', 'NULL', null]::{name}[] AS e, array[1]::{name}_d[] AS d"
        resp = await stream(client, sql, fmt="ndjson")
        assert ndjson_rows(await read_all(resp)) == [{"e": ["a", "NULL", None], "d": [1]}]
    finally:
        await admin.execute(f"DROP TYPE {name}; DROP DOMAIN {name}_d")


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
async def test_an_error_before_the_first_row_is_a_json_error(
    client: GatewayClient, fmt: str
) -> None:
    resp = await stream(client, "select 1/0", fmt=fmt)
    assert resp.status == 400
    assert_error(await resp.json(), "query_error", "22012")
    resp = await stream(client, "select * from no_such_table", fmt=fmt)
    assert resp.status == 400
    assert_error(await resp.json(), "query_error", "42P01")
    resp = await stream(client, "insert into nowhere values (1) returning 1", fmt=fmt)
    assert resp.status == 400


async def test_read_only_is_enforced_in_streams(client: GatewayClient, table: str) -> None:
    resp = await stream(client, f"insert into {table} values (1, 'x') returning id", fmt="ndjson")
    assert resp.status == 403
    assert_error(await resp.json(), "query_error", "25006")


async def test_a_slow_first_row_times_out(client: GatewayClient) -> None:
    # without the timeout, the answer would be a 200 ten minutes later
    resp = await stream(client, "select pg_sleep(600)", fmt="ndjson", timeout_ms=300)
    assert resp.status == 504
    status, body = await query(client, "select 1 AS one")
    assert status == 200 and body["rows"] == [{"one": 1}]


async def test_an_error_midway_ends_ndjson_with_an_error_line(client: GatewayClient) -> None:
    sql = "select g, 1 / (g - 2500) AS x from generate_series(1, 5000) g"
    resp = await stream(client, sql, fmt="ndjson")
    assert resp.status == 200
    lines = (await read_cut(resp)).splitlines()
    *rows, last = [json.loads(line) for line in lines]
    assert rows and all("g" in row for row in rows)
    assert last["error"]["sqlstate"] == "22012"
    status, _ = await query(client, "select 1")
    assert status == 200


async def test_an_error_midway_cuts_csv(client: GatewayClient) -> None:
    sql = "select g, 1 / (g - 2500) AS x from generate_series(1, 5000) g"
    resp = await stream(client, sql, fmt="csv")
    assert resp.status == 200
    body = await read_cut(resp)
    assert body.startswith(b"g,x\n1,0\n") and b"error" not in body


# --- limits ------------------------------------------------------------------------------


async def test_streams_have_no_row_limit_by_default(gateway_factory: Any) -> None:
    client = await gateway_factory(max_rows=10)
    sql = "select g from generate_series(1, 25) g"
    status, body = await query(client, sql)
    assert status == 200 and body["truncated"] is True and len(body["rows"]) == 10
    resp = await stream(client, sql, fmt="ndjson")
    assert len(ndjson_rows(await read_all(resp))) == 25
    resp = await stream(client, sql, fmt="csv", max_rows=20)
    assert len((await read_all(resp)).splitlines()) == 21


async def test_stream_max_rows_cuts_streams(gateway_factory: Any) -> None:
    client = await gateway_factory(stream_max_rows=1500, pool_size=1)
    sql = "select generate_series(1, 2000000000) AS g"
    resp = await stream(client, sql, fmt="ndjson")
    assert [row["g"] for row in ndjson_rows(await read_all(resp))] == list(range(1, 1501))
    resp = await stream(client, sql, fmt="csv", max_rows=5000)  # capped by the setting
    assert len((await read_all(resp)).splitlines()) == 1501
    resp = await stream(client, sql, fmt="csv", max_rows=3)
    assert (await read_all(resp)).splitlines() == [b"g", b"1", b"2", b"3"]
    # the rest was cancelled, not computed: a stream has no statement timeout, and
    # had one kept the only connection, this would answer 504 after its deadline
    status, _ = await query(client, "select 1", timeout_ms=30_000)
    assert status == 200


async def test_streams_outlive_the_statement_timeout(gateway_factory: Any) -> None:
    """A stream may run past statement_timeout_ms while rows keep flowing.

    The first chunk (1000 rows) must come within the timeout; after it, rows
    (2 kB each, so the server sends often) trickle in for longer than that.
    """
    client = await gateway_factory(statement_timeout_ms=400, pool_size=1)
    sql = (
        "select g, repeat('x', 2000) AS pad, pg_sleep(case when g > 1000 then 0.002 else 0 end)"
        " from generate_series(1, 1400) g"
    )
    started = time.perf_counter()
    resp = await stream(client, sql, fmt="ndjson")
    assert len(ndjson_rows(await read_all(resp))) == 1400
    assert time.perf_counter() - started > 0.8


# --- the connection comes back at once ----------------------------------------------------


async def backend_running(admin: psycopg.AsyncConnection[Any], marker: str) -> bool:
    cur = await admin.execute(
        "select count(*) from pg_stat_activity where state = 'active' and query like %s",
        [f"%{marker}%"],
    )
    row = await cur.fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
async def test_a_client_that_goes_away_frees_the_connection(
    gateway_factory: Any, admin: psycopg.AsyncConnection[Any], fmt: str
) -> None:
    client = await gateway_factory(pool_size=1)
    marker = f"gone_{uuid.uuid4().hex[:8]}"
    sql = f"select generate_series(1, 1000000000) AS g, '{marker}' AS m"
    resp = await stream(client, sql, fmt=fmt)
    assert resp.status == 200
    assert await resp.content.read(1000)
    resp.close()  # the client goes away mid-stream
    # the stream has no statement timeout: had it kept the only connection, this
    # would wait out its own deadline and answer 504
    status, body = await query(client, "select 1 AS one", timeout_ms=30_000)
    assert status == 200 and body["rows"] == [{"one": 1}]
    async with asyncio.timeout(30):
        while await backend_running(admin, marker):
            await asyncio.sleep(0.05)


async def test_a_cancelled_read_write_stream_leaves_nothing_behind(
    gateway_factory: Any,
) -> None:
    client = await gateway_factory(pool_size=1, raw_sql="read-write")
    _, before = await query(client, "show work_mem")
    sql = "select generate_series(1, 1000000000) AS g, set_config('work_mem', '77MB', false)"
    resp = await stream(client, sql, fmt="ndjson")
    assert resp.status == 200
    assert b"77MB" in await resp.content.read(1000)
    resp.close()
    status, after = await query(client, "show work_mem", timeout_ms=30_000)
    assert status == 200 and after["rows"] == before["rows"]


async def test_a_client_that_stops_reading_is_cut_after_the_timeout(
    gateway_factory: Any, admin: psycopg.AsyncConnection[Any]
) -> None:
    client = await gateway_factory(pool_size=1)
    marker = f"slow_{uuid.uuid4().hex[:8]}"
    sql = f"select generate_series(1, 1000000000) AS g, repeat('{marker}', 100) AS m"
    resp = await stream(client, sql, fmt="csv", timeout_ms=300)
    assert resp.status == 200
    assert client.server.runner is not None and client.server.runner.server is not None
    server = client.server.runner.server
    # read nothing: buffers fill, the gateway waits 0.3 s, then gives up: the query
    # is cancelled and the HTTP connection dropped, though the client never reads again
    async with asyncio.timeout(60):
        while server.connections or await backend_running(admin, marker):
            await asyncio.sleep(0.05)
    status, _ = await query(client, "select 1", timeout_ms=30_000)
    assert status == 200
    assert len(server.connections) == 1  # the one "select 1" used
    assert marker.encode() in await read_cut(resp)  # what was under way, then the cut


async def test_json_jobs_wait_for_a_stream_but_never_share_its_batch(gateway_factory: Any) -> None:
    client = await gateway_factory(pool_size=1)
    sql = "select g from generate_series(1, 20000) g"
    results = await asyncio.gather(
        *(query(client, "select $1::int AS i", i) for i in range(5)),
        stream(client, sql, fmt="ndjson"),
        *(query(client, "select $1::int AS i", i) for i in range(5, 10)),
    )
    resp = results[5]
    assert resp.status == 200
    assert len(ndjson_rows(await read_all(resp))) == 20000
    answers = [r for i, r in enumerate(results) if i != 5]
    assert [body["rows"] for _, body in answers] == [[{"i": i}] for i in range(10)]


async def test_openapi_describes_the_streamed_formats(client: GatewayClient) -> None:
    spec = await (await client.get("/openapi.json")).json()
    post = spec["paths"]["/v1/query"]["post"]
    assert set(post["responses"]["200"]["content"]) == {
        "application/json",
        "application/x-ndjson",
        "text/csv",
    }
    formats = [
        p for p in spec["paths"]["/v1/queries/{name}"]["get"]["parameters"] if p["name"] == "format"
    ]
    assert formats[0]["schema"]["enum"] == ["json", "ndjson", "csv"]
