"""The pool: connections reset unprepared lease after lease, and, while the database is
unreachable, one log line per retry, backing off.

Outages run on an embedded PostgreSQL of the test's own. Every wait is for a
condition (a log line, ``/readyz``), bounded generously; no test measures time.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from conftest import ClientFactory
from support import GatewayClient, get_stats, settled_stats

from gateway._settings import load_settings
from gateway.engine._pool import RETRY_FIRST_S, RETRY_MAX_S, make_pool, reset_connection

LEASE_S = 0.2


async def test_the_reset_runs_unprepared(gateway_dsn: str) -> None:
    # psycopg prepares what it ran prepare_threshold times (here: once, the default is
    # 5); a prepared DISCARD ALL drops itself, and psycopg then runs a statement that
    # is gone: the pool would discard the connection at its third reset
    async with await psycopg.AsyncConnection.connect(
        gateway_dsn, autocommit=True, prepare_threshold=1
    ) as conn:
        for _ in range(10):
            await reset_connection(conn)
        assert await (await conn.execute("select current_user::text")).fetchone() is not None


async def test_psycopg_prepares_nothing_the_gateways_discard_could_drop(gateway_dsn: str) -> None:
    # the session's own DISCARD ALL goes past psycopg (straight to libpq)
    pool = make_pool(load_settings(dsn=gateway_dsn, pool_size=1), gateway_dsn)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            for _ in range(10):
                await conn.execute("select 1")
            conn.pgconn.exec_(b"DISCARD ALL")
            assert await (await conn.execute("select 1")).fetchone() == (1,)
    finally:
        await pool.close()


async def test_an_idle_gateway_keeps_its_connections_lease_after_lease(
    gateway_factory: ClientFactory, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.engine import _dispatcher

    monkeypatch.setattr(_dispatcher, "LEASE_S", LEASE_S)
    caplog.set_level(logging.WARNING)
    client = await gateway_factory(pool_size=2)
    deadline = asyncio.get_running_loop().time() + 30
    while (await settled_stats(client))["pool"]["connections_num"] < 2:  # both opened
        assert asyncio.get_running_loop().time() < deadline, await get_stats(client)
        await asyncio.sleep(0.05)
    caplog.clear()  # from here on the gateway is idle: nothing to say
    before = (await get_stats(client))["pool"]
    # psycopg used to prepare the reset's DISCARD ALL at its 6th run: 10 leases each
    while (await get_stats(client))["pool"]["resets"] < before["resets"] + 20:
        assert asyncio.get_running_loop().time() < deadline, await get_stats(client)
        await asyncio.sleep(LEASE_S)
    after = (await get_stats(client))["pool"]
    assert after["resets_failed"] == 0
    assert after["connections_num"] == before["connections_num"] == 2  # none opened again
    assert after.get("connections_lost", 0) == after.get("returns_bad", 0) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


UNREACHABLE = re.compile(r"database unreachable: .+; retrying in (?P<delay>[0-9.]+) s")
BACK = re.compile(r"database reachable again, after [0-9.]+ s")
WAIT_S = 60.0  # generous: a loaded two-core machine, a server starting


async def logged(
    caplog: pytest.LogCaptureFixture, wanted: Callable[[list[str]], bool]
) -> list[str]:
    """The WARNING+ messages so far, once `wanted` holds of them; fails after `WAIT_S`.

    The access log is left out: a line per request is its purpose, outage or not.
    """
    async with asyncio.timeout(WAIT_S):
        while True:
            messages = [
                r.getMessage()
                for r in caplog.records
                if r.levelno >= logging.WARNING and r.name != "gateway.access"
            ]
            if wanted(messages):
                return messages
            await asyncio.sleep(0.05)


def retries(messages: list[str]) -> list[float]:
    return [float(m["delay"]) for m in map(UNREACHABLE.fullmatch, messages) if m]


async def ready(client: GatewayClient) -> None:
    async with asyncio.timeout(WAIT_S):
        while (await client.get("/readyz")).status != 200:
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_an_outage_logs_one_line_per_retry_and_one_when_it_ends(
    embedded_factory: Any, gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    pg = embedded_factory()
    client = await gateway_factory(dsn=pg.gateway_dsn, pool_size=8)
    await asyncio.to_thread(pg.stop)
    # a request notices the outage at once, the idle connections as the server goes
    await client.post("/v1/query", json={"sql": "select 1"})
    await logged(caplog, lambda ms: len(retries(ms)) >= 4)
    await asyncio.to_thread(pg.start)
    messages = await logged(caplog, lambda ms: any(map(BACK.fullmatch, ms)))
    await ready(client)

    # nothing but the pool's own lines: not psycopg_pool's per connection and
    # attempt, nor one per connection worker
    assert all(UNREACHABLE.fullmatch(m) or BACK.fullmatch(m) for m in messages), messages
    assert sum(1 for m in messages if BACK.fullmatch(m)) == 1
    assert BACK.fullmatch(messages[-1])
    # the delay doubles from the first to the longest, and stays there
    delays = retries(messages)
    expected = [RETRY_FIRST_S]
    while len(expected) < len(delays):
        expected.append(min(expected[-1] * 2, RETRY_MAX_S))
    assert delays == expected
    assert (await client.post("/v1/query", json={"sql": "select 1 AS one"})).status == 200


async def test_closing_the_gateway_stops_its_retries(
    gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    client = await gateway_factory(dsn="postgresql://nobody@127.0.0.1:9/none", wait_ready=False)
    await logged(caplog, lambda ms: len(retries(ms)) >= 1)
    await client.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().endswith("-retry")]
    # a gateway that never reached its database has nothing to say of coming back
    assert not any(BACK.fullmatch(r.getMessage()) for r in caplog.records)


async def test_every_connection_has_keepalives_and_a_tcp_user_timeout(gateway_dsn: str) -> None:
    settings = load_settings(
        dsn=gateway_dsn,
        pool_size=1,
        keepalives_idle_s=7,
        keepalives_interval_s=2,
        keepalives_count=4,
        tcp_user_timeout_ms=9000,
    )
    pool = make_pool(settings, gateway_dsn)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            options = {o.keyword: o.val for o in conn.pgconn.info}
    finally:
        await pool.close()
    assert options[b"keepalives"] == b"1"
    assert options[b"keepalives_idle"] == b"7"
    assert options[b"keepalives_interval"] == b"2"
    assert options[b"keepalives_count"] == b"4"
    assert options[b"tcp_user_timeout"] == b"9000"
