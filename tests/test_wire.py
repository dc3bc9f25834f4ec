"""The session's protocol layer (gateway/engine/_wire.py): a broken socket is always noticed.

These run a `Session` on uvloop, the event loop ``pgqg serve`` uses, through
the fault-injecting proxy, both in a loop of their own (a thread): the proxy
resets the connection in the same step as it passes on the first bytes of a
result, so the session's next wake-up finds both at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import psycopg.conninfo
import uvloop
from faultproxy import FaultProxy

from gateway import Codec, Job, Statement, Unavailable, load_settings
from gateway.engine._pipeline import Session
from gateway.engine._pool import session_options
from gateway.engine._wire import ConnectionLost

Scenario = Callable[[Session, FaultProxy], Awaitable[Any]]


def on_uvloop(dsn: str, scenario: Scenario) -> Any:
    """Run `scenario` with a session through a proxy to `dsn`, on a uvloop loop of its own."""

    async def main() -> Any:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        proxy = await FaultProxy(int(info.get("port") or 5432), str(info.get("host"))).start()
        settings = load_settings(dsn=dsn)
        try:
            conn = await psycopg.AsyncConnection.connect(
                proxy.dsn(dsn), autocommit=True, options=session_options(settings)
            )
            session = Session(conn, Codec(), statement_timeout_ms=settings.statement_timeout_ms)
            try:
                return await scenario(session, proxy)
            finally:
                session.close()
                await conn.close()
        finally:
            await proxy.close()

    return uvloop.run(main())


def read_job(sql: str) -> Job:
    loop = asyncio.get_running_loop()
    return Job([Statement(sql.encode())], read_only=True, deadline=loop.time() + 30, max_rows=10)


async def test_a_reset_that_comes_with_the_first_bytes_of_a_result_is_noticed(
    database_dsn: str,
) -> None:
    # uvloop closes its poll handle when the socket reports an error, after one
    # last callback: the session, reading the bytes that came with the reset,
    # used to wait on for ever (issue 18)
    marker = "pgqg-" + uuid.uuid4().hex[:8]

    async def scenario(session: Session, proxy: FaultProxy) -> tuple[float, BaseException | None]:
        fired = proxy.cut_after(marker.encode(), "to_client")
        jobs = [read_job(f"select '{marker}' AS m, 1 AS one"), read_job("select 2 AS two")]
        for job in jobs:
            assert job.start(session.abandoned)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(5.0):
                await session.run(jobs)
        except ConnectionLost:
            pass
        except TimeoutError:
            pass  # the session waited on: `took` says so
        assert fired.done()
        took = loop.time() - started
        errors = [job.future.exception() if job.future.done() else None for job in jobs]
        return took, errors[1]

    took, error = await asyncio.to_thread(on_uvloop, database_dsn, scenario)
    print(f"the batch failed {took:.3f} s after it was sent")
    assert took < 1.0
    assert isinstance(error, Unavailable)
