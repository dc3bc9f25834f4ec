"""The connection pool (`gateway.engine._pool`): its reset between leases never trips
over psycopg's automatic preparation, and an idle gateway keeps its connections."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
import pytest
from conftest import ClientFactory
from support import get_stats, settled_stats

from gateway._settings import load_settings
from gateway.engine._pool import make_pool, reset_connection

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
