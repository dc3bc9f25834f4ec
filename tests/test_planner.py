"""What a batch sends for each job (`gateway.engine._planner`): a raw statement cannot
change the role it runs as, and nothing it leaves in the session outlives its round trip.

The login role is made a member of a role that may read a table the request role may
not: PostgreSQL itself then lets a raw statement switch to it, and only the gateway's
check stands in the way.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from conftest import TEST_LOGIN, TEST_REQUEST_ROLE, ClientFactory
from support import GatewayClient, query, settled_stats, transaction

from gateway import GatewayError, Job, Statement
from gateway.engine._pipeline import Session

SECRET = "secret"  # what ts_stat would read of "the secret"


@pytest.fixture
async def other_role(admin: psycopg.AsyncConnection[Any]) -> AsyncIterator[tuple[str, str]]:
    """(role, table): a role the login role may SET ROLE to, alone in reading `table`."""
    name = f"pgqg_other_{uuid.uuid4().hex[:8]}"
    table = f"{name}_secret"
    await admin.execute(f"create role {name}")
    await admin.execute(f"grant {name} to {TEST_LOGIN}")
    await admin.execute(f"create table {table} (s text)")
    await admin.execute(f"insert into {table} values ('the {SECRET}')")
    await admin.execute(f"revoke all on {table} from {TEST_REQUEST_ROLE}")
    await admin.execute(f"revoke pg_read_all_data, pg_write_all_data from {TEST_REQUEST_ROLE}")
    await admin.execute(f"grant select on {table} to {name}")
    try:
        yield name, table
    finally:
        await admin.execute(f"grant pg_read_all_data, pg_write_all_data to {TEST_REQUEST_ROLE}")
        await admin.execute(f"drop table {table}")
        await admin.execute(f"drop role {name}")


def switches(role: str, table: str) -> list[str]:
    """Statements that switch to `role`; the last two would read `table` as it."""
    # ts_stat runs its query when called: as whatever role is current then
    read = f"(select string_agg(word, ' ') from ts_stat('select to_tsvector(s) from {table}'))"
    return [
        f"set role {role}",
        "set role none",
        f"set session authorization {TEST_LOGIN}",
        f"select set_config('role', '{role}', false)",
        f"select set_config('role', '{role}', false), {read}",
        f"select set_config('role', '{role}', true), {read}",
    ]


def assert_refused(status: int, body: Any) -> None:
    assert (status, body["error"]["sqlstate"]) == (403, "42501"), body
    assert SECRET not in json.dumps(body)


async def runs_as(client: GatewayClient) -> list[str]:
    status, body = await query(client, "select current_user::text, session_user::text")
    assert status == 200, body
    return list(body["rows"][0].values())


@pytest.mark.parametrize("raw_sql", ["read-only", "read-write"])
async def test_a_statement_cannot_switch_its_role(
    gateway_factory: ClientFactory, other_role: tuple[str, str], raw_sql: str
) -> None:
    role, table = other_role
    client = await gateway_factory(pool_size=1, raw_sql=raw_sql)
    status, body = await query(client, f"select s from {table}")
    assert (status, body["error"]["sqlstate"]) == (403, "42501")  # not the request role's
    for sql in switches(role, table):
        assert_refused(*await query(client, sql))
        assert await runs_as(client) == [TEST_REQUEST_ROLE, TEST_LOGIN], sql
        read_only = raw_sql == "read-only"
        assert_refused(*await transaction(client, (sql, []), ("select 1", []), read_only=read_only))
        assert await runs_as(client) == [TEST_REQUEST_ROLE, TEST_LOGIN], sql


async def test_reset_role_keeps_the_role_sessions_start_with(client: GatewayClient) -> None:
    status, body = await query(client, "reset role")
    assert status == 200, body
    assert await runs_as(client) == [TEST_REQUEST_ROLE, TEST_LOGIN]


async def test_a_refused_switch_commits_nothing(
    gateway_factory: ClientFactory,
    admin: psycopg.AsyncConnection[Any],
    other_role: tuple[str, str],
    table: str,
) -> None:
    role, _ = other_role
    client = await gateway_factory(pool_size=1, raw_sql="read-write")
    await admin.execute(f"grant all on {table} to {TEST_REQUEST_ROLE}")
    insert = f"insert into {table} values (1, 'x')"
    assert_refused(
        *await query(client, f"with w as ({insert}) select set_config('role', '{role}', false)")
    )
    assert_refused(*await transaction(client, (insert, []), (f"set role {role}", []), (insert, [])))
    assert await (await admin.execute(f"select count(*) from {table}")).fetchone() == (0,)


async def test_a_streamed_statement_that_switches_is_refused(
    client: GatewayClient, other_role: tuple[str, str]
) -> None:
    role, _ = other_role
    resp = await client.post("/v1/query?format=ndjson", json={"sql": f"set role {role}"})
    assert_refused(resp.status, await resp.json())
    assert await runs_as(client) == [TEST_REQUEST_ROLE, TEST_LOGIN]


def job(sql: str, *, read_only: bool = True) -> Job:
    loop = asyncio.get_running_loop()
    return Job(
        [Statement(sql.encode())], read_only=read_only, deadline=loop.time() + 10, max_rows=100
    )


async def test_pipelined_neighbours_of_a_refused_job_are_unaffected(
    session: Session, other_role: tuple[str, str]
) -> None:
    role, table = other_role
    who = "select current_user::text AS who"
    jobs = [job(who), *(job(sql) for sql in switches(role, table)), job(who, read_only=False)]
    jobs.insert(3, job(who))
    await session.run(jobs)
    outcomes = [j.future.exception() or j.future.result()[0].rows for j in jobs]
    refused = [o for o in outcomes if isinstance(o, GatewayError)]
    assert [e.sqlstate for e in refused] == ["42501"] * len(switches(role, table))
    answered = [o for o in outcomes if not isinstance(o, GatewayError)]
    assert answered == [[{"who": TEST_REQUEST_ROLE}]] * 3


# --- nothing a request leaves in the session outlives its round trip -----------------------


HELD = "select count(*) from pg_locks where locktype = 'advisory' and objid = %s"


@pytest.mark.parametrize(
    ("raw_sql", "sql"),
    [
        ("read-only", "select pg_advisory_lock($1::bigint)"),
        ("read-only", "select pg_advisory_lock_shared($1::bigint)"),
        ("read-write", "select pg_advisory_lock($1::bigint)"),
        ("read-write", "do $$begin perform pg_advisory_lock({key}); end$$"),
    ],
)
async def test_a_session_advisory_lock_does_not_outlive_the_request(
    gateway_factory: ClientFactory, admin: psycopg.AsyncConnection[Any], raw_sql: str, sql: str
) -> None:
    client = await gateway_factory(pool_size=1, raw_sql=raw_sql)
    key = 928_000 + uuid.uuid4().int % 1000
    params = [key] if "$1" in sql else []
    status, body = await query(client, sql.format(key=key), *params)
    assert status == 200, body
    assert await (await admin.execute(HELD, [key])).fetchone() == (0,)  # right after the answer


async def test_a_streamed_request_leaves_no_advisory_lock(
    client: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> None:
    key = 929_000 + uuid.uuid4().int % 1000
    resp = await client.post(
        "/v1/query?format=ndjson",
        json={"sql": "select pg_advisory_lock($1::bigint)", "params": [key]},
    )
    assert resp.status == 200
    await resp.read()
    assert await (await admin.execute(HELD, [key])).fetchone() == (0,)


async def test_a_prepared_statement_made_in_a_do_block_is_gone(
    gateway_factory: ClientFactory,
) -> None:
    client = await gateway_factory(pool_size=1)
    status, body = await query(client, "do $$begin execute 'prepare leftover as select 1'; end$$")
    assert status == 200, body
    await settled_stats(client)
    status, body = await query(
        client, "select count(*) AS n from pg_prepared_statements where from_sql"
    )
    assert (status, body["rows"]) == (200, [{"n": "0"}])
