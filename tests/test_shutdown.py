"""Graceful shutdown (issue 5, point 5): ``pgqg serve`` as a subprocess, signalled.

On SIGTERM or SIGINT the gateway stops accepting, lets in-flight requests
finish within ``--shutdown-grace-s`` (then answers them 503 and cancels their
queries on the server), closes the pool and exits 0. Each test gets a database
of its own, so ``pg_stat_activity`` shows exactly the gateway's connections.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import psycopg
import psycopg.conninfo
import pytest
from support import Served, assert_error

pytestmark = pytest.mark.slow


@pytest.fixture
def own_database(database_dsn: str) -> Iterator[tuple[str, str]]:
    """(name, DSN) of a fresh database, dropped after the test."""
    name = "pgqg_shutdown_" + uuid.uuid4().hex[:8]
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield name, psycopg.conninfo.make_conninfo(database_dsn, dbname=name)
    finally:
        with psycopg.connect(database_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def serve(own_database: tuple[str, str]) -> Iterator[Any]:
    started: list[Served] = []

    def start(*args: str) -> Served:
        served = Served(own_database[1], *args)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


async def backends(database_dsn: str, datname: str, mark: str = "") -> list[tuple[str, str]]:
    """(state, query) of every other backend on `datname` (whose query holds `mark`)."""
    async with await psycopg.AsyncConnection.connect(database_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT state, query FROM pg_stat_activity WHERE datname = %s AND query LIKE %s"
            " AND pid <> pg_backend_pid()",
            (datname, f"%{mark}%"),
        )
        return [(str(s), str(q)) for s, q in await cur.fetchall()]


async def no_backends_left(database_dsn: str, datname: str) -> None:
    """The gateway's connections are gone (a closed connection's backend exits
    a moment after the client's Terminate message)."""
    async with asyncio.timeout(1.0):
        while left := await backends(database_dsn, datname):
            print("left:", left)
            await asyncio.sleep(0.02)


async def post_query(http: aiohttp.ClientSession, url: str, sql: str) -> tuple[int, Any]:
    async with http.post(url + "/v1/query", json={"sql": sql}) as resp:
        return resp.status, await resp.json()


async def refuses_connections(url: str) -> bool:
    """True when nothing accepts a new connection at `url` any more."""
    async with aiohttp.ClientSession() as fresh:
        try:
            async with fresh.get(url + "/healthz"):
                return False
        except aiohttp.ClientConnectionError:
            return True


async def test_sigterm_lets_a_running_query_finish(
    serve: Any, http: aiohttp.ClientSession, database_dsn: str, own_database: tuple[str, str]
) -> None:
    gateway = serve("--shutdown-grace-s", "5")
    await gateway.ready(http)
    loop = asyncio.get_running_loop()
    request = asyncio.ensure_future(post_query(http, gateway.url, "select pg_sleep(1) AS slept"))
    await asyncio.sleep(0.3)
    gateway.proc.send_signal(signal.SIGTERM)
    signalled = loop.time()
    await asyncio.sleep(0.1)
    assert await refuses_connections(gateway.url)
    status, body = await request
    assert status == 200, body
    assert body["rows"] == [{"slept": ""}]
    assert await gateway.exit_code(5) == 0, gateway.output()
    took = loop.time() - signalled
    print(f"exited {took:.2f} s after SIGTERM (the query had 0.7 s to go)")
    assert took < 2.0
    await no_backends_left(database_dsn, own_database[0])


async def test_sigterm_cancels_a_query_still_running_after_the_grace(
    serve: Any, http: aiohttp.ClientSession, database_dsn: str, own_database: tuple[str, str]
) -> None:
    gateway = serve("--shutdown-grace-s", "1")
    await gateway.ready(http)
    mark = "pgqg-" + uuid.uuid4().hex[:8]
    loop = asyncio.get_running_loop()
    request = asyncio.ensure_future(post_query(http, gateway.url, f"select pg_sleep(30), '{mark}'"))
    await asyncio.sleep(0.3)
    assert await backends(database_dsn, own_database[0], mark)
    gateway.proc.send_signal(signal.SIGTERM)
    signalled = loop.time()
    status, body = await request
    answered = loop.time() - signalled
    assert status == 503
    assert_error(body, "unavailable")
    assert 0.9 < answered < 1.5
    assert await gateway.exit_code(5) == 0, gateway.output()
    took = loop.time() - signalled
    print(f"answered 503 {answered:.2f} s and exited {took:.2f} s after SIGTERM (grace 1 s)")
    assert took < 2.5
    await no_backends_left(database_dsn, own_database[0])


async def test_sigint_on_an_idle_gateway_exits_0_at_once(
    serve: Any, http: aiohttp.ClientSession, database_dsn: str, own_database: tuple[str, str]
) -> None:
    gateway = serve()
    await gateway.ready(http)
    loop = asyncio.get_running_loop()
    gateway.proc.send_signal(signal.SIGINT)
    signalled = loop.time()
    assert await gateway.exit_code(5) == 0, gateway.output()
    assert loop.time() - signalled < 1.0
    await no_backends_left(database_dsn, own_database[0])
