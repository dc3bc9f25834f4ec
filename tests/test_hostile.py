"""Hostile input (issue 5, point 6): every one gets a 4xx with the JSON error
shape, writes nothing, and the gateway keeps serving.

The gateway under attack runs raw SQL in read-write mode on the demo database,
so a request that slipped through could write; after the barrage the demo's
tables are unchanged and every connection still works.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from support import (
    GatewayClient,
    as_gateway,
    assert_error,
    query,
    settled_stats,
    wait_until_ready,
)

from gateway import create_app, load_settings

MAX_BODY = 256 * 1024
JSON = "application/json"


@dataclass(frozen=True)
class Hostile:
    id: str
    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = JSON
    status: int = 400
    code: str = "bad_request"
    headers: tuple[tuple[str, str], ...] = ()


def q(body: bytes, status: int = 400, code: str = "bad_request", *, id: str) -> Hostile:
    return Hostile(id, "POST", "/v1/query", body, JSON, status, code)


def named(body: bytes, name: str = "book_by_id", code: str = "bad_request", *, id: str) -> Hostile:
    return Hostile(id, "POST", f"/v1/queries/{name}", body, code=code)


def get(path: str, status: int = 400, code: str = "bad_request", *, id: str) -> Hostile:
    return Hostile(id, "GET", path, None, None, status, code)


DEEP = 100_000
CASES = [
    # malformed JSON, and JSON that is not an object
    q(b'{"sql": "select 1"', id="truncated"),
    q(b"", id="empty-body"),
    q(b"[1, 2]", id="array-body"),
    q(b'"select 1"', id="string-body"),
    q(b"null", id="null-body"),
    q(b"{'sql': 'select 1'}", id="single-quotes"),
    q(b'{"sql": "select 1",}', id="trailing-comma"),
    # wrong JSON types anywhere
    q(b'{"sql": 1}', id="sql-number"),
    q(b'{"sql": ["select 1"]}', id="sql-array"),
    q(b'{"sql": null}', id="sql-null"),
    q(b'{"sql": "select $1", "params": {"a": 1}}', id="params-object"),
    q(b'{"sql": "select $1", "params": "x"}', id="params-string"),
    q(b'{"sql": "select 1", "timeout_ms": "soon"}', id="timeout-string"),
    q(b'{"sql": "select 1", "timeout_ms": 1.5}', id="timeout-float"),
    q(b'{"sql": "select 1", "timeout_ms": 0}', id="timeout-zero"),
    q(b'{"sql": "select 1", "timeout_ms": true}', id="timeout-bool"),
    q(b'{"sql": "select 1", "max_rows": -1}', id="max-rows-negative"),
    q(b'{"sql": "select 1", "shape": 3}', id="shape-number"),
    q(b'{"sql": "select 1", "shape": []}', id="shape-empty-array"),
    q(b'{"sql": "select 1", "shape": "tables"}', id="shape-unknown"),
    # missing, extra and duplicate fields and parameters
    q(b"{}", id="sql-missing"),
    q(b'{"sql": "   "}', id="sql-blank"),
    q(b'{"sql": "select 1", "sqll": "x"}', id="extra-field"),
    q(b'{"sql": "select 1", "sql": "select 2"}', id="duplicate-key"),
    q(b'{"sql": "select $1::int", "params": [{"a": 1, "a": 2}]}', id="duplicate-nested"),
    # compact JSON, as browsers send it, takes a faster parser: the same answers
    q(b'{"sql":"select 1","sql":"delete from review"}', id="compact-duplicate-key"),
    q(b'{"sql":"select $1::int","params":[{"a":1,"a":2}]}', id="compact-duplicate-nested"),
    q(b'{"sql":"select 1\\u0000"}', id="compact-nul-in-sql"),
    q(b'{"sql":"copy book from stdin"}', id="compact-copy-from-stdin"),
    q(b'{"sql":" "}', id="compact-blank-sql"),
    q(b'{"sql":"select 1","params":[1],"x":1}', id="compact-unknown-field"),
    q(b'{"sql": "select $1::int"}', 400, "query_error", id="param-missing"),
    q(b'{"sql": "select 1", "params": [1, 2]}', 400, "query_error", id="param-extra"),
    q(
        b'{"sql": "select 1", "params": [' + b",".join([b"1"] * 70_000) + b"]}",
        id="params-over-protocol-limit",
    ),
    # numbers that overflow, NaN literals
    q(b'{"sql": "select $1::int", "params": [1e999999]}', 400, "query_error", id="int-1e999999"),
    q(
        b'{"sql": "select $1::float8", "params": [1e999999]}',
        400,
        "query_error",
        id="float-1e999999",
    ),
    q(
        b'{"sql": "select $1::int", "params": [' + b"9" * 400 + b"]}",
        400,
        "query_error",
        id="int-400-digits",
    ),
    q(
        b'{"sql": "select $1::bigint", "params": [-9223372036854775809]}',
        400,
        "query_error",
        id="bigint-underflow",
    ),
    q(b'{"sql": "select $1", "params": [NaN]}', id="nan-literal"),
    q(b'{"sql": "select $1", "params": [Infinity]}', id="infinity-literal"),
    q(b'{"sql": "select $1", "params": [-Infinity]}', id="minus-infinity-literal"),
    q(b'{"sql": "select 1", "timeout_ms": NaN}', id="nan-option"),
    # invalid UTF-8, lone surrogates, NUL
    q(b'{"sql": "select \xff\xfe"}', id="invalid-utf8"),
    q(b'{"sql": "select \xc0\xaf"}', id="overlong-utf8"),
    q(b'{"sql": "select \'\\ud800\'"}', id="lone-surrogate-sql"),
    q(b'{"sql": "select $1", "params": ["\\udfff"]}', id="lone-surrogate-param"),
    q(b'{"sql": "select $1", "params": [{"\\ud800": 1}]}', id="lone-surrogate-key"),
    q(b'{"sql": "select 1\\u0000"}', id="nul-in-sql"),
    q(b'{"sql": "select $1", "params": ["a\\u0000b"]}', id="nul-in-param"),
    q(b'{"sql": "select $1", "params": [["a\\u0000"]]}', id="nul-in-array-param"),
    q(b'{"sql": "select $1::jsonb", "params": [{"a": "\\u0000"}]}', id="nul-in-json-param"),
    # deeply nested JSON
    q(b"[" * DEEP + b"]" * DEEP, id="deep-array"),
    q(b'{"sql": "select $1", "params": [' + b"[" * 5000 + b"]" * 5000 + b"]}", id="deep-param"),
    q(b'{"a":' * 5000 + b"1" + b"}" * 5000, id="deep-object"),
    # statements the protocol cannot carry, or the server refuses
    q(b'{"sql": "select 1; delete from book"}', 400, "query_error", id="two-statements"),
    q(b'{"sql": "copy book from stdin"}', id="copy-from-stdin"),
    q(b'{"sql": "COPY (select 1) TO STDOUT"}', id="copy-to-stdout"),
    q(b'{"sql": "-- nothing"}', id="comment-only"),
    # oversized bodies and the wrong content type
    q(b'{"sql": "select \'' + b"x" * (2 * MAX_BODY) + b"'\"}", 413, "too_large", id="too-large"),
    Hostile(
        "form",
        "POST",
        "/v1/query",
        b"sql=select+1",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
    ),
    Hostile(
        "text-plain",
        "POST",
        "/v1/query",
        b'{"sql": "select 1"}',
        "text/plain",
        415,
        "unsupported_media_type",
    ),
    Hostile(
        "no-content-type",
        "POST",
        "/v1/query",
        b'{"sql": "select 1"}',
        None,
        415,
        "unsupported_media_type",
    ),
    # unknown paths (JSON 404) and methods (405)
    get("/nope", 404, "not_found", id="unknown-path"),
    get("/v2/query", 404, "not_found", id="unknown-version"),
    get("/v1/query/", 404, "not_found", id="trailing-slash"),
    Hostile("delete", "DELETE", "/v1/query", None, None, 405, "method_not_allowed"),
    Hostile("put", "PUT", "/v1/query", b"{}", JSON, 405, "method_not_allowed"),
    get("/v1/query", 405, "method_not_allowed", id="get-query"),
    Hostile(
        "patch-named", "PATCH", "/v1/queries/book_by_id", None, None, 405, "method_not_allowed"
    ),
    get("/v1/queries/add_review?book_id=1", 405, "method_not_allowed", id="get-writing-query"),
    # path tricks in query names
    get("/v1/queries/..%2F..%2Fetc%2Fpasswd", 404, "unknown_query", id="encoded-dotdot"),
    get("/v1/queries/../../etc/passwd", 404, "not_found", id="dotdot"),
    get("/v1/queries/%2e%2e%2fschema", 404, "unknown_query", id="encoded-dots"),
    get("/v1/queries/book_by_id%00", 404, "unknown_query", id="nul-in-name"),
    get("/v1/queries/book_by_id%2F", 404, "unknown_query", id="encoded-slash"),
    get("/v1/queries/%ff%fe", 404, "unknown_query", id="invalid-utf8-name"),
    get("/v1/queries/BOOK_BY_ID?id=1", 404, "unknown_query", id="other-case"),
    get("/v1/queries/" + "a" * 4000, 404, "unknown_query", id="long-name"),
    get("/v1/queries/book_by_id;drop%20table%20book", 404, "unknown_query", id="semicolon"),
    # named queries: missing, extra, duplicate and mistyped parameters
    get("/v1/queries/book_by_id", id="named-param-missing"),
    get("/v1/queries/book_by_id?id=1&x=2", id="named-param-extra"),
    get("/v1/queries/book_by_id?id=1&id=2", id="named-param-twice"),
    get("/v1/queries/book_by_id?id=abc", id="named-param-not-int"),
    get("/v1/queries/book_by_id?id=1%00", id="named-param-nul"),
    get("/v1/queries/book_by_id?id=%ff", id="named-param-invalid-utf8"),
    get("/v1/queries/book_by_id?id=1e999999", id="named-param-overflow-text"),
    get("/v1/queries/book_by_id?id=1&timeout_ms=x", id="named-option-mistyped"),
    get("/v1/queries/book_by_id?id=1&format=xml", 406, "not_acceptable", id="named-format"),
    named(b'{"params": {"id": "x"}}', id="named-json-string"),
    named(b'{"params": {"id": 1.5}}', id="named-json-float"),
    named(b'{"params": {"id": true}}', id="named-json-bool"),
    named(b'{"params": {"id": [1]}}', id="named-json-array"),
    named(b'{"params": {"id": {"a": 1}}}', id="named-json-object"),
    named(b'{"params": {"id": 1e999999}}', id="named-json-1e999999"),
    named(
        b'{"params": {"id": 99999999999999999999999}}',
        code="query_error",  # PostgreSQL's range check: 22003
        id="named-json-overflow",
    ),
    named(b'{"params": {"id": "1\\u0000"}}', id="named-json-nul"),
    named(b'{"params": {}}', id="named-json-missing"),
    named(b'{"params": {"id": 1, "zz": 2}}', id="named-json-extra"),
    named(b'{"params": {"id": 1, "id": 2}}', id="named-json-duplicate"),
    named(b'{"params": [1]}', id="named-json-params-array"),
    named(b'{"prams": {"id": 1}}', id="named-json-typo"),
    named(
        b'{"params": {"book_id": "1; drop table book"}}', "add_review", id="named-write-mistyped"
    ),
    named(
        b'{"params": {"book_id": 1, "rating": 99999999999, "reviewer": "x", "body": "y"}}',
        "add_review",
        "query_error",
        id="named-write-overflow",
    ),
    # transactions
    Hostile("tx-statements-string", "POST", "/v1/transaction", b'{"statements": "x"}'),
    Hostile("tx-statements-empty", "POST", "/v1/transaction", b'{"statements": []}'),
    Hostile("tx-statement-number", "POST", "/v1/transaction", b'{"statements": [1]}'),
    Hostile(
        "tx-read-only-string",
        "POST",
        "/v1/transaction",
        b'{"statements": [{"sql": "select 1"}], "read_only": "yes"}',
    ),
    Hostile(
        "tx-isolation-unknown",
        "POST",
        "/v1/transaction",
        b'{"statements": [{"sql": "select 1"}], "isolation": "chaos"}',
    ),
    Hostile(
        "tx-second-fails",
        "POST",
        "/v1/transaction",
        b'{"statements": [{"sql": "delete from review"}, {"sql": "select 1/0"}]}',
        code="query_error",
    ),
    # a gzip body that inflates past the limit
    Hostile(
        "gzip-bomb",
        "POST",
        "/v1/query",
        gzip.compress(b'{"sql": "select 1", "x": "' + b"a" * 10_000_000 + b'"}'),
        JSON,
        413,
        "too_large",
        (("Content-Encoding", "gzip"),),
    ),
]


@pytest.fixture(scope="module")
def demo_counts(demo_dsn: str) -> dict[str, int]:
    return table_counts(demo_dsn)


def table_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute("select tablename from pg_tables where schemaname = 'public'")
        ]
        return {t: conn.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables}  # type: ignore[index]


@pytest.fixture(scope="module")
async def target(demo_dsn: str, demo_counts: dict[str, int]) -> AsyncIterator[GatewayClient]:
    """One gateway for the whole barrage (a fresh one per case costs 0.1 s each);
    the demo tables are counted before it starts."""
    settings = load_settings(
        dsn=as_gateway(demo_dsn), raw_sql="read-write", max_body_bytes=MAX_BODY, pool_size=2
    )
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        await wait_until_ready(client)
        yield client
    finally:
        await client.close()


async def send(client: GatewayClient, case: Hostile) -> tuple[int, Any]:
    headers = dict(case.headers)
    if case.content_type:
        headers["Content-Type"] = case.content_type
    resp = await client.request(case.method, case.path, data=case.body, headers=headers)
    assert resp.content_type == "application/json", await resp.text()
    return resp.status, await resp.json()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_request_gets_a_json_4xx(target: GatewayClient, case: Hostile) -> None:
    status, body = await send(target, case)
    assert status == case.status, body
    assert_error(body, case.code)


async def test_the_gateway_keeps_serving_and_wrote_nothing(
    target: GatewayClient, demo_dsn: str, demo_counts: dict[str, int]
) -> None:
    # all at once, twice over: concurrency must not change any answer
    answers = await asyncio.gather(*(send(target, case) for case in CASES * 2))
    assert [status for status, _ in answers] == [case.status for case in CASES * 2]
    assert table_counts(demo_dsn) == demo_counts
    assert (await query(target, "select count(*)::int AS n from book"))[0] == 200
    stats = await settled_stats(target)  # nothing left running or queued
    assert all(c["connected"] for c in stats["connections"])


async def test_a_body_announced_too_large_is_refused_without_waiting_for_it(
    target: GatewayClient,
) -> None:
    # the client announces 1 MB and sends 2 bytes: answered at once, not when it gives up
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    try:
        writer.write(
            b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n{}"
        )
        async with asyncio.timeout(2):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413")
