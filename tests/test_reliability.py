"""Reliability (issue 5): deadlines, disconnects, backpressure, outages, no leaks.

Every test owns what it breaks: outages run on an embedded PostgreSQL of the
test's own (stopped, SIGKILLed and started again on the same port); the rest
use the session database. Loops are bounded by time and stop by themselves.
Graceful shutdown (a subprocess) is in test_shutdown.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
import pytest
from support import GatewayClient, assert_error, query

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


async def test_every_abandoned_job_of_a_batch_is_cancelled(session: Session, admin: Any) -> None:
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


# --- 1. deadlines over HTTP --------------------------------------------------------------


async def test_a_deadline_answers_504_and_cancels_the_query(
    client: GatewayClient, admin: Any
) -> None:
    mark = marker()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, body = await query(client, f"select pg_sleep(10), '{mark}'", timeout_ms=300)
    answered = loop.time() - t0
    assert status == 504
    assert_error(body, "timeout")
    assert 0.29 < answered < 0.6
    await gone_within(admin, mark, 1.0)
    await no_leaks(client, 4)


async def test_the_statement_timeout_caps_the_deadline(gateway_factory: Any, admin: Any) -> None:
    client = await gateway_factory(statement_timeout_ms=400)
    mark = marker()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, body = await query(client, f"select pg_sleep(10), '{mark}'", timeout_ms=60_000)
    assert status == 504
    assert_error(body, "timeout")
    assert loop.time() - t0 < 0.8
    await gone_within(admin, mark, 1.0)


async def test_a_deadline_counts_the_queue_wait(gateway_factory: Any, admin: Any) -> None:
    # one connection, busy: the second query's deadline passes while it waits
    # (queued, or pipelined behind the first); it never runs long after its 504
    client = await gateway_factory(pool_size=1)
    mark = marker()
    loop = asyncio.get_running_loop()
    blocker = asyncio.ensure_future(query(client, "select pg_sleep(0.8)", timeout_ms=5000))
    await asyncio.sleep(0.05)
    t0 = loop.time()
    status, body = await query(client, f"select pg_sleep(10), '{mark}'", timeout_ms=300)
    assert status == 504
    assert_error(body, "timeout")
    assert loop.time() - t0 < 0.6
    assert (await blocker)[0] == 200
    await gone_within(admin, mark, 1.0)
    await no_leaks(client, 1)


# --- 2. clients that hang up ------------------------------------------------------------


async def hang_up_after(client: GatewayClient, seconds: float, body: dict[str, Any]) -> None:
    """POST /v1/query on a connection of its own, and drop it after `seconds`."""
    async with aiohttp.ClientSession() as http:
        request = asyncio.ensure_future(http.post(client.make_url("/v1/query"), json=body))
        await asyncio.sleep(seconds)
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request


async def test_a_client_that_hangs_up_cancels_its_running_query(
    client: GatewayClient, admin: Any
) -> None:
    mark = marker()
    await hang_up_after(client, 0.3, {"sql": f"select pg_sleep(10), '{mark}'"})
    took = await gone_within(admin, mark, 1.0)
    assert took < 1.0
    await no_leaks(client, 4)


async def test_a_client_that_hangs_up_while_queued_writes_nothing(
    gateway_factory: Any, admin: Any, table: str
) -> None:
    client = await gateway_factory(pool_size=1, raw_sql="read-write")
    blocker = asyncio.ensure_future(query(client, "select pg_sleep(0.6)"))
    await asyncio.sleep(0.1)
    await hang_up_after(client, 0.2, {"sql": f"insert into {table} values (1, 'x')"})
    assert (await blocker)[0] == 200
    await no_leaks(client, 1)
    cur = await admin.execute(f"select count(*) from {table}")
    assert await cur.fetchone() == (0,)


# --- 3. backpressure -----------------------------------------------------------------------


async def test_30_slow_queries_on_2_connections_and_a_queue_of_4(gateway_factory: Any) -> None:
    client = await gateway_factory(pool_size=2, queue_size=4)
    loop = asyncio.get_running_loop()

    async def one(i: int) -> tuple[int, float, Any]:
        await asyncio.sleep(i * 0.005)  # arrivals spread over 150 ms
        t0 = loop.time()
        resp = await client.post("/v1/query", json={"sql": "select pg_sleep(0.5)"})
        return resp.status, loop.time() - t0, (resp.headers.get("Retry-After"), await resp.json())

    t0 = loop.time()
    answers = await asyncio.gather(*(one(i) for i in range(30)))
    total = loop.time() - t0
    ok = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] != 200]
    assert len(ok) == 6  # 2 running + 4 waiting
    for status, took, (retry_after, body) in refused:
        assert status == 503 and retry_after == "1"
        assert_error(body, "overloaded")
        assert took < 0.1
    # the six accepted share both connections: three rounds of 0.5 s, not six
    assert total < 2.0
    await no_leaks(client, 2)
