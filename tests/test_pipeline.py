"""Pipelined batches: one job's failure, rollback or timeout never touches another's.

These drive `Session` directly, so each test knows exactly which jobs share
one round trip. They also pin the psycopg/libpq behaviour the pipeline relies on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from conftest import TEST_LOGIN, TEST_REQUEST_ROLE
from psycopg import pq

from gateway import GatewayError, Job, Statement, param_to_text
from gateway.engine._pipeline import Session


def job(sql: str, *params: Any, read_only: bool = True, timeout: float = 10.0) -> Job:
    loop = asyncio.get_running_loop()
    return Job(
        [Statement(sql.encode(), [param_to_text(p) for p in params])],
        read_only=read_only,
        deadline=loop.time() + timeout,
        max_rows=1000,
    )


async def run(session: Session, *jobs: Job) -> list[Any]:
    for j in jobs:
        assert j.start(lambda _job: None)
    await session.run(list(jobs))
    outcomes: list[Any] = []
    for j in jobs:
        exc = j.future.exception()
        outcomes.append(exc if exc is not None else j.future.result()[0].rows)
    return outcomes


async def test_psycopg_versions_are_the_ones_pinned() -> None:
    # The pipeline drives psycopg.pq directly; pyproject pins the minor versions
    # this suite has proven. Upgrading psycopg means re-running it and moving the pin.
    major, minor = (int(p) for p in psycopg.__version__.split(".")[:2])
    assert (major, minor) in {(3, 2), (3, 3)}, psycopg.__version__
    assert pq.version() >= 140000  # libpq pipeline mode


def test_syncs_are_queued_without_a_flush_where_libpq_allows() -> None:
    # libpq >= 17 has PQsendPipelineSync; psycopg does not wrap it, so we call
    # it on psycopg's own libpq. If this fails after an upgrade, the gateway
    # still works, one system call per Sync slower: find the library again.
    from gateway.engine import _libpq

    if pq.version() >= 170000 and pq.__impl__ in ("binary", "c"):
        assert _libpq.DEFERRED_SYNC


async def test_failure_write_and_read_in_one_batch(
    session: Session, admin: Any, table: str
) -> None:
    failing = job("select 1/0")
    write = job(f"insert into {table} values (1, 'w') returning id", read_only=False)
    read = job("select $1::int * 2 AS y", 21)
    write_after = job(f"insert into {table} values (2, 'w2')", read_only=False)
    outcomes = await run(session, failing, write, read, write_after)
    assert isinstance(outcomes[0], GatewayError) and outcomes[0].sqlstate == "22012"
    assert outcomes[1] == [{"id": 1}]
    assert outcomes[2] == [{"y": 42}]
    assert outcomes[3] == []
    rows = await (await admin.execute(f"select id from {table} order by id")).fetchall()
    assert rows == [(1,), (2,)]


async def test_a_failed_write_does_not_undo_its_neighbours(
    session: Session, admin: Any, table: str
) -> None:
    outcomes = await run(
        session,
        job(f"insert into {table} values (1, 'a')", read_only=False),
        job(f"insert into {table} values (1, 'dup')", read_only=False),
        job(f"insert into {table} values (2, 'b')", read_only=False),
    )
    assert outcomes[0] == [] and outcomes[2] == []
    assert isinstance(outcomes[1], GatewayError) and outcomes[1].sqlstate == "23505"
    rows = await (await admin.execute(f"select id, v from {table} order by id")).fetchall()
    assert rows == [(1, "a"), (2, "b")]


async def test_read_only_holds_inside_a_batch(session: Session, admin: Any, table: str) -> None:
    outcomes = await run(
        session,
        job("select set_config('default_transaction_read_only', 'off', false)"),
        job(f"insert into {table} values (1, 'x')"),
        job("set transaction read write"),
        job(f"insert into {table} values (2, 'y')"),
    )
    # a lone SET TRANSACTION READ WRITE succeeds or is refused (25001, once the
    # job's timeout statement took a snapshot): either way its job rolls back
    assert outcomes[2] == [] or outcomes[2].sqlstate == "25001"
    assert [o.sqlstate for o in (outcomes[1], outcomes[3])] == ["25006", "25006"]
    assert await (await admin.execute(f"select count(*) from {table}")).fetchone() == (0,)


async def test_no_select_in_a_batch_can_write(session: Session, admin: Any, table: str) -> None:
    # whatever the job before it changed: each job's transaction begins READ ONLY afresh
    await admin.execute(
        f"create function {table}_writer() returns int language sql as "
        f"$$ insert into {table} values (42, 'w') returning id $$"
    )
    writer = f"select {table}_writer()"
    outcomes = await run(
        session,
        job("select 1"),
        job(writer),
        job("select set_config('transaction_read_only', 'off', false)"),
        job(writer),
        job("select set_config('default_transaction_read_only', 'off', false)"),
        job(writer),
        job("set transaction read write"),
        job(writer),
        job("set session characteristics as transaction read write"),
        job(writer),
    )
    # too late once the SELECT took its snapshot: 25001
    assert isinstance(outcomes[2], GatewayError) and outcomes[2].sqlstate == "25001"
    for i in (1, 3, 5, 7, 9):
        assert isinstance(outcomes[i], GatewayError) and outcomes[i].sqlstate == "25006", i
    assert await (await admin.execute(f"select count(*) from {table}")).fetchone() == (0,)


def transaction_job(*sqls: str, read_only: bool) -> Job:
    loop = asyncio.get_running_loop()
    return Job(
        [Statement(sql.encode()) for sql in sqls],
        read_only=read_only,
        transaction=True,
        deadline=loop.time() + 10.0,
        max_rows=1000,
    )


async def test_no_session_state_reaches_the_next_job_of_a_batch(
    session: Session, admin: Any, table: str
) -> None:
    # The batch's last DISCARD ALL comes too late for the jobs behind the one
    # that left state: each job's own cleanup segment must undo it. A role change
    # is refused before the job's transaction ends: the login role is a member of
    # `role`, so PostgreSQL itself allows SET ROLE.
    role = f"{table}_role"
    await admin.execute(f"create role {role}")
    await admin.execute(f"grant {role} to {TEST_LOGIN}")
    try:
        outcomes = await run(
            session,
            job("create temp table scratch (i int)", read_only=False),
            job("select count(*) AS n from scratch"),
            transaction_job(
                "select set_config('search_path', 'evil', false)", "commit", read_only=True
            ),
            job("show search_path"),
            job(f"set role {role}", read_only=False),
            job("select current_user::text AS who"),
            # hidden from the command tag; allowed to a login role for itself
            transaction_job(
                f"DO $$BEGIN EXECUTE 'SET SESSION AUTHORIZATION {TEST_LOGIN}'; END$$",
                "commit",
                read_only=True,
            ),
            job("select session_user::text AS who, current_user::text AS role"),
        )
    finally:
        await admin.execute(f"drop role {role}")
    assert isinstance(outcomes[1], GatewayError) and outcomes[1].sqlstate == "42P01"
    assert outcomes[3] == [{"search_path": '"$user", public'}]
    assert isinstance(outcomes[4], GatewayError) and outcomes[4].sqlstate == "42501"
    assert outcomes[5] == [{"who": TEST_REQUEST_ROLE}]
    assert isinstance(outcomes[6], GatewayError) and outcomes[6].sqlstate == "42501"
    assert outcomes[7] == [{"who": TEST_LOGIN, "role": TEST_REQUEST_ROLE}]


async def test_what_a_committed_job_started_by_do_is_gone_for_the_next(
    session: Session,
) -> None:
    # A LISTEN or a cursor WITH HOLD lives on once its transaction commits; from
    # a DO its command tag does not show it, so the job's own cleanup ends them.
    def committed(sql: str, read_only: bool) -> Job:
        return transaction_job(f"DO $$BEGIN EXECUTE '{sql}'; END$$", "commit", read_only=read_only)

    listening = job("select count(*) AS n from pg_listening_channels()")
    cursors = job("select count(*) AS n from pg_cursors where name = 'pgqg_cursor'")
    outcomes = await run(
        session,
        committed("LISTEN pgqg_channel", read_only=True),
        listening,
        committed("DECLARE pgqg_cursor CURSOR WITH HOLD FOR SELECT 1", read_only=False),
        cursors,
    )
    assert (outcomes[1], outcomes[3]) == ([{"n": "0"}], [{"n": "0"}])  # bigint: text


async def test_a_read_only_transaction_cannot_commit_a_write_in_a_batch(
    session: Session, admin: Any, table: str
) -> None:
    escape = transaction_job(
        "commit",
        "set transaction read write",
        f"insert into {table} values (1, 'x')",
        "commit",
        read_only=True,
    )
    outcomes = await run(session, job("select 1 AS a"), escape, job("select 2 AS b"))
    assert isinstance(outcomes[1], GatewayError) and outcomes[1].sqlstate == "25001"
    assert (outcomes[0], outcomes[2]) == ([{"a": 1}], [{"b": 2}])
    assert await (await admin.execute(f"select count(*) from {table}")).fetchone() == (0,)


def named_job(n: int) -> Job:
    loop = asyncio.get_running_loop()
    statement = Statement(b"SELECT $1::int AS n", [param_to_text(n)], prepared=b"pgqg_probe")
    return Job([statement], read_only=True, deadline=loop.time() + 10.0, max_rows=1000)


#: a read-only statement that swaps the named statement for its own (DO hides
#: the PREPARE from the command tag; a prepared statement outlives ROLLBACK)
HIJACK = (
    "DO $$BEGIN EXECUTE 'DEALLOCATE pgqg_probe';"
    " EXECUTE 'PREPARE pgqg_probe(int) AS SELECT -1 AS n'; END$$"
)


@pytest.mark.parametrize("close", [True, False], ids=["close-parse", "run-unnamed"])
async def test_raw_sql_cannot_replace_a_named_statement(session: Session, close: bool) -> None:
    # close-parse: libpq 17+ closes and prepares the name again in the job's own
    # segment; run-unnamed: older libpq runs the catalog's text instead.
    if not close:
        session.prepare_messages = 1
    same_batch = await run(session, named_job(1), job(HIJACK), named_job(2), named_job(3))
    assert same_batch == [[{"n": 1}], [], [{"n": 2}], [{"n": 3}]]
    assert await run(session, named_job(4)) == [[{"n": 4}]]  # the next round trip
    dropped = "DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$"
    assert await run(session, job(dropped), named_job(5)) == [[], [{"n": 5}]]
    assert await run(session, named_job(6), named_job(7)) == [[{"n": 6}], [{"n": 7}]]


async def test_a_timeout_inside_a_batch_touches_only_its_job(session: Session) -> None:
    slow = job("select pg_sleep(600)", timeout=0.3)  # ten minutes, had the timeout not cut it
    before = job("select 1 AS a")
    after = job("select 2 AS b")
    outcomes = await run(session, before, slow, after)
    assert outcomes[0] == [{"a": 1}]
    assert isinstance(outcomes[1], GatewayError) and outcomes[1].status == 504
    assert outcomes[2] == [{"b": 2}]


async def test_an_abandoned_running_job_is_cancelled_on_the_server(session: Session) -> None:
    slow = job("select pg_sleep(600)")  # ten minutes, had it not been cancelled
    after = job("select 2 AS b")
    for j in (slow, after):
        j.start(session.abandoned)
    running = asyncio.ensure_future(session.run([slow, after]))
    await asyncio.sleep(0.2)
    slow.abandon()  # the client went away
    await asyncio.wait_for(running, 60)
    assert slow.future.cancelled()
    assert after.future.result()[0].rows == [{"b": 2}]


async def test_the_connection_is_idle_after_every_batch(session: Session) -> None:
    await run(session, job("select 1/0"), job("begin"), job("select 1"))
    assert session._pg.transaction_status == pq.TransactionStatus.IDLE


async def test_a_quick_job_is_answered_before_a_slow_one_behind_it(session: Session) -> None:
    """Each job of a batch is answered as its own results arrive, also when its
    result holds a type of no column seen before (here ``void``, on a fresh codec)."""
    loop = asyncio.get_running_loop()

    def sleep(seconds: float) -> Job:
        sql = f"SELECT pg_sleep({seconds}) AS slept, {seconds}::text AS s".encode()
        return Job([Statement(sql)], read_only=True, deadline=loop.time() + 30, max_rows=1)

    quick, slow = sleep(0.1), sleep(3)
    for job in (quick, slow):
        assert job.start(session.abandoned)
    batch = asyncio.ensure_future(session.run([quick, slow]))
    results = await asyncio.wait_for(asyncio.shield(quick.future), 30)
    assert not slow.future.done()
    assert results[0].rows == [{"slept": "", "s": "0.1"}]
    assert [c.type for c in results[0].columns] == ["void", "text"]
    await batch
    assert (await slow.future)[0].rows == [{"slept": "", "s": "3"}]
