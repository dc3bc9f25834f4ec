"""Reliability (issue 5): deadlines, disconnects, backpressure, outages, no leaks.

Every test owns what it breaks: outages run on an embedded PostgreSQL of the
test's own (stopped, SIGKILLed and started again on the same port); the rest
use the session database. Loops are bounded by time and stop by themselves.
Graceful shutdown (a subprocess) is in test_shutdown.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from support import GatewayClient, query

from gateway import Codec, Job, Statement
from gateway._pipeline import Session
from gateway._pool import session_options
from gateway._settings import load_settings

# --- helpers ---------------------------------------------------------------------------


def marker() -> str:
    """A unique string to find one test's query in pg_stat_activity."""
    return "pgqg-" + uuid.uuid4().hex[:12]


async def running(admin: psycopg.AsyncConnection[Any], mark: str) -> int:
    """How many backends are running a statement whose text holds `mark`."""
    cur = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
        " AND pid <> pg_backend_pid()",
        (f"%{mark}%",),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def gone_within(admin: psycopg.AsyncConnection[Any], mark: str, limit: float) -> float:
    """Seconds until no backend runs `mark`'s statement; fails after `limit`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await running(admin, mark):
        assert loop.time() - started < limit, f"{mark} still running after {limit} s"
        await asyncio.sleep(0.02)
    return loop.time() - started


async def no_leaks(client: GatewayClient, pool_size: int, timeout: float = 5.0) -> None:
    """The queue is empty, nothing runs, and every pooled connection answers."""
    async with asyncio.timeout(timeout):
        while True:
            stats = await (await client.get("/v1/stats")).json()
            connected = sum(c["connected"] for c in stats["connections"])
            if not stats["running"] and connected == pool_size:
                break
            await asyncio.sleep(0.05)
    assert stats["queue"]["depth"] == 0
    # as many concurrent sleeps as connections: each needs a working connection of its own
    answers = await asyncio.gather(
        *(query(client, "select pg_backend_pid() AS pid, pg_sleep(0.2)") for _ in range(pool_size))
    )
    assert [status for status, _ in answers] == [200] * pool_size
    assert len({body["rows"][0]["pid"] for _, body in answers}) == pool_size


# --- deadlines inside one pipelined batch (Session directly) ---------------------------


@pytest.fixture
async def session(database_dsn: str) -> AsyncIterator[Session]:
    settings = load_settings(dsn=database_dsn)
    conn = await psycopg.AsyncConnection.connect(
        database_dsn, autocommit=True, options=session_options(settings)
    )
    sess = Session(conn, Codec(), statement_timeout_ms=settings.statement_timeout_ms)
    try:
        yield sess
    finally:
        sess.close()
        await conn.close()


def sleep_job(seconds: float, mark: str = "", *, timeout: float = 30.0) -> Job:
    """A read-only job sleeping `seconds`; its deadline is far enough that no
    server-side statement_timeout is sent, so only a cancel can stop it early."""
    loop = asyncio.get_running_loop()
    sql = f"SELECT pg_sleep({seconds}), '{mark}' AS mark"
    return Job([Statement(sql.encode())], read_only=True, deadline=loop.time() + timeout,
               max_rows=10)  # fmt: skip


def started(session: Session, *jobs: Job) -> list[Job]:
    for job in jobs:
        assert job.start(lambda job=job: session.abandoned(job))  # type: ignore[misc]
    return list(jobs)


async def test_every_abandoned_job_of_a_batch_is_cancelled(
    session: Session, admin: Any
) -> None:
    first, second, third = marker(), marker(), marker()
    jobs = started(
        session, sleep_job(10, first), sleep_job(10, second), sleep_job(10, third),
        sleep_job(0, "ok"),
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    batch = asyncio.ensure_future(session.run(jobs))
    await asyncio.sleep(0.2)
    jobs[0].abandon()  # the head, running
    jobs[1].abandon()  # not at the head yet: cancelled once it starts
    await gone_within(admin, first, 1.0)
    await asyncio.sleep(0.3)
    jobs[2].abandon()  # became the head after the first two were cancelled
    await gone_within(admin, third, 1.0)
    await asyncio.wait_for(batch, 2)
    assert loop.time() - t0 < 2
    assert not await running(admin, second)
    assert [j.future.cancelled() for j in jobs[:3]] == [True, True, True]
    assert jobs[3].future.result()[0].rows == [{"pg_sleep": "", "mark": "ok"}]


async def test_a_job_abandoned_behind_a_slow_one_never_runs_long(
    session: Session, admin: Any
) -> None:
    mark = marker()
    slow, victim = started(session, sleep_job(0.5), sleep_job(10, mark))
    batch = asyncio.ensure_future(session.run([slow, victim]))
    await asyncio.sleep(0.1)
    victim.abandon()
    await asyncio.wait_for(batch, 1.5)
    assert slow.future.result()[0].rows[0]["mark"] == ""
    assert victim.future.cancelled()
    assert not await running(admin, mark)
