"""Request ids, Server-Timing and the access log (gateway.web._observe)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from conftest import ClientFactory
from support import GatewayClient, connection_held, query

from gateway.web._observe import MAX_REQUEST_ID, new_request_id, sane_request_id

_TIMING = re.compile(r"(\w+);dur=(\d+\.\d{3})")


def timing(headers: Any) -> dict[str, float]:
    """``Server-Timing``'s metrics: name -> milliseconds."""
    return {name: float(ms) for name, ms in _TIMING.findall(headers["Server-Timing"])}


# --- request ids ---------------------------------------------------------------------------


def test_sane_ids_are_short_and_printable() -> None:
    assert sane_request_id("abc-123_x.y:z")
    assert sane_request_id("a" * MAX_REQUEST_ID)
    for insane in (None, "", "a" * (MAX_REQUEST_ID + 1), "a b", "x\ny", "é", "a/*b", "';--"):
        assert not sane_request_id(insane), insane


def test_made_ids_are_sane_and_unique() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(sane_request_id(i) for i in ids)


async def test_every_answer_has_a_request_id(client: GatewayClient) -> None:
    answers = [
        await client.post("/v1/query", json={"sql": "select 1"}),
        await client.post("/v1/query", json={"sql": "select 1/0"}),
        await client.post("/v1/query", data=b"not json", headers={"Content-Type": "text/plain"}),
        await client.get("/healthz"),
        await client.get("/no/such/path"),
        await client.post("/v1/query", json={"sql": "select 1"}, params={"format": "csv"}),
    ]
    ids = [resp.headers["X-Request-Id"] for resp in answers]
    assert len(set(ids)) == len(ids) and all(sane_request_id(i) for i in ids)


async def test_a_sane_client_id_is_kept_and_an_insane_one_replaced(client: GatewayClient) -> None:
    mine = f"client-{uuid.uuid4()}"
    for fmt in ("json", "ndjson"):
        resp = await client.post(
            "/v1/query", json={"sql": "select 1"}, params={"format": fmt}, headers=_id(mine)
        )
        assert resp.status == 200 and resp.headers["X-Request-Id"] == mine
    for insane in ("x" * 200, "a b", "a*/b"):
        resp = await client.get("/healthz", headers=_id(insane))
        given = resp.headers["X-Request-Id"]
        assert given != insane and sane_request_id(given)


def _id(value: str) -> dict[str, str]:
    return {"X-Request-Id": value}


async def test_the_id_is_in_pg_stat_activity_while_the_query_runs(
    client: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> None:
    mine = f"dba-{uuid.uuid4().hex}"
    for fmt in ("json", "csv"):
        running = asyncio.create_task(
            client.post(
                "/v1/query",
                json={"sql": "select pg_sleep(0.5)"},
                params={"format": fmt},
                headers=_id(mine),
            )
        )
        sql = (
            "select application_name, query from pg_stat_activity"
            " where query like %s and pid <> pg_backend_pid()"
        )
        async with asyncio.timeout(20):
            while not (rows := await (await admin.execute(sql, (f"%{mine}%",))).fetchall()):
                await asyncio.sleep(0.02)
        assert rows == [("pgqg", f"/* request_id={mine} */ select pg_sleep(0.5)")]
        assert (await running).status == 200


async def test_error_positions_do_not_count_the_comment(client: GatewayClient) -> None:
    for sql, position in (("select 1 +", 11), ("select nope", 8), ("select 1 from", 14)):
        status, body = await query(client, sql)
        assert status == 400 and body["error"]["position"] == position, (sql, body)
    statements = [{"sql": "select 1"}, {"sql": "select nope"}]
    resp = await client.post("/v1/transaction", json={"statements": statements, "read_only": True})
    assert resp.status == 400 and (await resp.json())["error"]["position"] == 8


async def test_a_named_query_answer_has_its_id_and_timing(demo_client: GatewayClient) -> None:
    resp = await demo_client.get("/v1/queries/book_by_id", params={"id": "7"}, headers=_id("nq-1"))
    assert resp.status == 200 and resp.headers["X-Request-Id"] == "nq-1"
    assert "queue" in timing(resp.headers)


# --- Server-Timing --------------------------------------------------------------------------


async def test_query_answers_carry_server_timing(rw_client: GatewayClient, table: str) -> None:
    resp = await rw_client.post("/v1/query", json={"sql": "select pg_sleep(0.2)"})
    figures = timing(resp.headers)
    assert set(figures) == {"queue", "db", "encode"}
    assert figures["db"] >= 200 and figures["queue"] >= 0 and figures["encode"] >= 0
    body = await resp.json()
    assert figures["queue"] + figures["db"] <= body["elapsed_ms"] + 1
    statements = [{"sql": f"insert into {table} values (1, 'a')"}, {"sql": "select 1"}]
    resp = await rw_client.post("/v1/transaction", json={"statements": statements})
    assert resp.status == 200 and set(timing(resp.headers)) == {"queue", "db", "encode"}


async def test_a_failed_query_and_a_stream_carry_it_too(client: GatewayClient) -> None:
    resp = await client.post("/v1/query", json={"sql": "select 1/0"})
    assert resp.status == 400 and set(timing(resp.headers)) == {"queue", "db"}
    resp = await client.post(
        "/v1/query", json={"sql": "select g from generate_series(1, 3) g"}, params={"format": "csv"}
    )
    assert resp.status == 200 and set(timing(resp.headers)) == {"queue", "db"}  # before its rows
    assert await resp.text() == "g\n1\n2\n3\n"


async def test_a_queued_query_shows_its_wait(gateway_factory: ClientFactory, admin: Any) -> None:
    client = await gateway_factory(pool_size=1)
    async with connection_held(client, admin) as holder:
        second = asyncio.ensure_future(client.post("/v1/query", json={"sql": "select 2"}))
        async with asyncio.timeout(30):  # it waits for the connection
            while (await (await client.get("/v1/stats")).json())["queue"]["depth"] != 1:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # lets the wait last at least 100 ms: asserted below
    resp = await second
    assert timing(resp.headers)["queue"] >= 100
    assert (await holder)[0] == 200


async def test_no_server_timing_without_a_query(client: GatewayClient) -> None:
    for path in ("/healthz", "/readyz", "/v1/stats", "/openapi.json"):
        resp = await client.get(path)
        assert resp.status == 200 and "Server-Timing" not in resp.headers, path


# --- the access log -------------------------------------------------------------------------


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> Callable[[], list[logging.LogRecord]]:
    """The access log's records from now on."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    caplog.clear()
    return lambda: [r for r in caplog.records if r.name == "gateway.access"]


async def test_one_access_line_per_request(
    client: GatewayClient, access_lines: Callable[[], list[logging.LogRecord]]
) -> None:
    await client.post("/v1/query", json={"sql": "select 1 AS a"}, headers=_id("ok-1"))
    await client.post("/v1/query", json={"sql": "select 1/0"}, headers=_id("bad-1"))
    records = {r.fields["request_id"]: r for r in access_lines()}
    ok, bad = records["ok-1"], records["bad-1"]
    assert ok.levelno == logging.INFO and bad.levelno == logging.WARNING
    assert ok.fields["status"] == 200 and ok.fields["rows"] == 1
    assert ok.fields["route"] == "/v1/query" and ok.fields["sqlstate"] is None
    assert bad.fields["status"] == 400 and bad.fields["sqlstate"] == "22012"
    assert bad.fields["code"] == "query_error" and bad.fields["rows"] is None
    assert ok.fields["duration_ms"] >= 0
    line = ok.getMessage()
    assert '"POST /v1/query" 200' in line and "rows=1" in line and "request_id=ok-1" in line
    assert "sqlstate=22012" in bad.getMessage()


async def test_a_line_cannot_be_broken_by_the_path(
    client: GatewayClient, access_lines: Callable[[], list[logging.LogRecord]]
) -> None:
    await client.get("/v1/queries/a%0Ab", headers=_id("nl-1"))
    (record,) = access_lines()
    assert "\n" not in record.getMessage() and record.fields["route"] == "/v1/queries/{name}"
