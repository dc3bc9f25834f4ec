"""Named queries over HTTP, on the demo database (sql/schema.sql + sql/seed.sql)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from support import GatewayClient, assert_error


async def test_catalog_lists_queries_with_params(demo_client: GatewayClient) -> None:
    body = await (await demo_client.get("/v1/queries")).json()
    by_name = {q["name"]: q for q in body["queries"]}
    assert {"book_by_id", "search_books", "list_books", "author_stats", "add_review"} <= set(
        by_name
    )
    assert by_name["book_by_id"]["params"] == [{"name": "id", "type": "int"}]
    assert by_name["book_by_id"]["read_only"] is True
    assert by_name["add_review"]["read_only"] is False


async def test_get_one_row_by_id(demo_client: GatewayClient) -> None:
    resp = await demo_client.get("/v1/queries/book_by_id", params={"id": "7"})
    assert resp.status == 200
    body = await resp.json()
    assert body["row_count"] == 1
    book = body["rows"][0]
    assert book["id"] == 7
    assert isinstance(book["price"], str)  # numeric: exact, as text
    assert isinstance(book["tags"], list)


async def test_post_search_and_pagination(demo_client: GatewayClient) -> None:
    resp = await demo_client.post(
        "/v1/queries/search_books", json={"params": {"q": "the", "lim": 5}}
    )
    assert resp.status == 200
    assert 0 < (await resp.json())["row_count"] <= 5

    first = await (await demo_client.get("/v1/queries/list_books?page_size=10&after_id=0")).json()
    ids = [r["id"] for r in first["rows"]]
    second = await (
        await demo_client.get(f"/v1/queries/list_books?page_size=10&after_id={ids[-1]}")
    ).json()
    assert len(ids) == 10 and second["rows"][0]["id"] > ids[-1]


async def test_aggregate_and_shape_arrays(demo_client: GatewayClient) -> None:
    resp = await demo_client.get("/v1/queries/author_stats?min_books=1&lim=3&shape=arrays")
    body = await resp.json()
    assert resp.status == 200
    assert len(body["rows"]) == 3 and isinstance(body["rows"][0], list)


async def test_insert_through_post_only(demo_client: GatewayClient, demo_dsn: str) -> None:
    params = {"book_id": 1, "rating": 5, "reviewer": "tester", "body": "great"}
    resp = await demo_client.get(
        "/v1/queries/add_review", params={k: str(v) for k, v in params.items()}
    )
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"  # HTTP requires it on a 405
    resp = await demo_client.post("/v1/queries/add_review", json={"params": params})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["command"] == "INSERT" and body["rows"][0]["reviewer"] == "tester"


async def test_int8_strings_come_back_in(demo_client: GatewayClient) -> None:
    resp = await demo_client.post("/v1/queries/book_by_id", json={"params": {"id": "7"}})
    assert resp.status == 200
    assert (await resp.json())["rows"][0]["id"] == 7


async def test_parameter_errors(demo_client: GatewayClient) -> None:
    cases: list[tuple[str, Any, str]] = [
        ("book_by_id", {"id": "seven"}, "bad_request"),
        ("book_by_id", {}, "bad_request"),
        ("book_by_id", {"id": 1, "extra": 2}, "bad_request"),
        ("book_by_id", {"id": True}, "bad_request"),
    ]
    for name, params, code in cases:
        resp = await demo_client.post(f"/v1/queries/{name}", json={"params": params})
        assert resp.status == 400, params
        assert_error(await resp.json(), code)
    resp = await demo_client.post(
        "/v1/queries/add_review",
        json={"params": {"book_id": 1, "rating": 9, "reviewer": "x", "body": "y"}},
    )
    assert resp.status == 400
    assert_error(await resp.json(), "query_error", "23514")
    resp = await demo_client.post(
        "/v1/queries/add_review",
        json={"params": {"book_id": 999999, "rating": 3, "reviewer": "x", "body": "y"}},
    )
    assert resp.status == 409
    assert_error(await resp.json(), "query_error", "23503")
    resp = await demo_client.get("/v1/queries/book_by_id?id=99999999999")
    assert resp.status == 400
    assert_error(await resp.json(), "query_error", "22003")


async def test_unknown_query_and_path_tricks(demo_client: GatewayClient) -> None:
    for name in ("nope", "..%2F..%2Fetc%2Fpasswd", "book_by_id%00", "BOOK_BY_ID"):
        resp = await demo_client.get(f"/v1/queries/{name}?id=1")
        assert resp.status == 404, name
        assert (await resp.json())["error"]["code"] in {"unknown_query", "not_found"}


async def test_named_queries_work_with_raw_sql_off(gateway_factory: Any, demo_dsn: str) -> None:
    client = await gateway_factory(dsn=demo_dsn, raw_sql="off")
    resp = await client.get("/v1/queries/book_by_id?id=1")
    assert resp.status == 200


async def test_a_named_query_runs_after_its_connection_is_leased_again(
    gateway_factory: Any, demo_dsn: str, monkeypatch: Any
) -> None:
    # A worker hands its connection back to the pool every lease and takes it
    # (or another) again: the statement prepared on it in the last lease is still there.
    from gateway.engine import _dispatcher

    monkeypatch.setattr(_dispatcher, "LEASE_S", 0.2)
    client = await gateway_factory(dsn=demo_dsn, pool_size=1)
    for _ in range(3):
        resp = await client.get("/v1/queries/book_by_id", params={"id": "7"})
        assert resp.status == 200, await resp.text()
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("close", [True, False], ids=["close-parse", "run-unnamed"])
async def test_raw_sql_cannot_make_a_named_query_answer_for_it(
    gateway_factory: Any, demo_dsn: str, monkeypatch: Any, close: bool
) -> None:
    # A read-only raw statement replaces the named query's prepared statement on
    # the one connection (DO hides it from the command tag, and it outlives the
    # ROLLBACK): the named query, buffered or streamed, still runs the catalog's SQL.
    from gateway.engine import _pipeline

    monkeypatch.setattr(_pipeline, "CLOSE_PREPARED", close)
    client = await gateway_factory(dsn=demo_dsn, pool_size=1)
    url = "/v1/queries/book_by_id?id=7"
    real = (await (await client.get(url)).json())["rows"]
    hijack = (
        "DO $$BEGIN EXECUTE 'DEALLOCATE pgqg_book_by_id'; EXECUTE 'PREPARE"
        " pgqg_book_by_id(int) AS SELECT ''forged''::text AS title, $1 AS id'; END$$"
    )
    for sql in (hijack, "DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$"):
        resp = await client.post("/v1/query", json={"sql": sql})
        assert resp.status == 200, await resp.text()
        assert (await (await client.get(url)).json())["rows"] == real
        await client.post("/v1/query", json={"sql": sql})
        streamed = await (await client.get(url + "&format=ndjson")).text()
        assert [orjson.loads(line) for line in streamed.splitlines()] == real
