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

#: generous bounds for a loaded machine: waits end on a condition, not on a clock
WAIT_S = 30.0


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
    async with asyncio.timeout(WAIT_S):
        while left := await backends(database_dsn, datname):
            print("left:", left)
            await asyncio.sleep(0.02)


async def post_query(http: aiohttp.ClientSession, url: str, sql: str) -> tuple[int, Any]:
    async with http.post(url + "/v1/query", json={"sql": sql}) as resp:
        return resp.status, await resp.json()


async def running(database_dsn: str, datname: str, mark: str) -> None:
    """Until a backend on `datname` runs the statement holding `mark`."""
    async with asyncio.timeout(WAIT_S):
        while not [s for s, _ in await backends(database_dsn, datname, mark) if s == "active"]:
            await asyncio.sleep(0.02)


async def until_refused(url: str) -> None:
    """Until nothing accepts a new connection at `url` any more."""
    async with asyncio.timeout(WAIT_S):
        while not await refuses_connections(url):
            await asyncio.sleep(0.02)


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
    # a grace far longer than the query: the gateway exits when it is done, not after it
    gateway = serve("--shutdown-grace-s", "300")
    await gateway.ready(http)
    mark = "pgqg-" + uuid.uuid4().hex[:8]
    loop = asyncio.get_running_loop()
    sql = f"select pg_sleep(1) AS slept, '{mark}' AS mark"
    request = asyncio.ensure_future(post_query(http, gateway.url, sql))
    await running(database_dsn, own_database[0], mark)
    gateway.proc.send_signal(signal.SIGTERM)
    signalled = loop.time()
    await until_refused(gateway.url)
    status, body = await request
    assert status == 200, body
    assert body["rows"] == [{"slept": "", "mark": mark}]
    assert await gateway.exit_code(WAIT_S) == 0, gateway.output()
    took = loop.time() - signalled
    print(f"exited {took:.2f} s after SIGTERM (the query had under 1 s to go)")
    await no_backends_left(database_dsn, own_database[0])


async def test_sigterm_cancels_a_query_still_running_after_the_grace(
    serve: Any, http: aiohttp.ClientSession, database_dsn: str, own_database: tuple[str, str]
) -> None:
    gateway = serve("--shutdown-grace-s", "1")
    await gateway.ready(http)
    mark = "pgqg-" + uuid.uuid4().hex[:8]
    loop = asyncio.get_running_loop()
    sql = f"select pg_sleep(600), '{mark}'"  # ten minutes, had it not been cancelled
    request = asyncio.ensure_future(post_query(http, gateway.url, sql))
    await running(database_dsn, own_database[0], mark)
    gateway.proc.send_signal(signal.SIGTERM)
    signalled = loop.time()
    status, body = await request
    answered = loop.time() - signalled
    assert status == 503
    assert_error(body, "unavailable")
    assert answered > 0.9  # not before the grace ran out
    assert await gateway.exit_code(WAIT_S) == 0, gateway.output()
    took = loop.time() - signalled
    print(f"answered 503 {answered:.2f} s and exited {took:.2f} s after SIGTERM (grace 1 s)")
    await no_backends_left(database_dsn, own_database[0])


async def test_sigint_on_an_idle_gateway_exits_0_at_once(
    serve: Any, http: aiohttp.ClientSession, database_dsn: str, own_database: tuple[str, str]
) -> None:
    # at once: not after a grace of five minutes, though nothing is in flight
    gateway = serve("--shutdown-grace-s", "300")
    await gateway.ready(http)
    gateway.proc.send_signal(signal.SIGINT)
    assert await gateway.exit_code(WAIT_S) == 0, gateway.output()
    await no_backends_left(database_dsn, own_database[0])
