"""What requests may do as the role they run as (`gateway.web._privileges`): the
probes of issue 26 against the default configuration, and the start-up check of
the login role with its opt-in (``allow_privileged_role``)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import TEST_LOGIN, TEST_REQUEST_ROLE, ClientFactory
from support import GatewayClient, Served, as_gateway, query, settled_stats

from gateway._settings import DEFAULT_SQL_DIR, load_settings
from gateway.cli._demo import load_demo
from gateway.embedded import EmbeddedPostgres
from gateway.web._privileges import PrivilegedRoleError, connection_check, role_problems

#: each reads the server's files, or reaches beyond the database, as a superuser can
PROBES = [
    "select pg_read_file('/etc/hostname')",
    "select count(*) from pg_ls_dir('/')",
    "select pg_reload_conf()",
    "copy (select 1) to program 'true'",
]


@pytest.fixture(scope="module")
def embedded_demo(embedded_root: Path) -> Iterator[EmbeddedPostgres]:
    """``pgqg serve``'s own database: an embedded cluster with the demo, loaded as
    its superuser."""
    with EmbeddedPostgres(embedded_root / "privileges", fast=True) as pg:
        load_demo(pg.dsn, DEFAULT_SQL_DIR)
        yield pg


@pytest.fixture(params=["embedded", "tests"])
async def default_gateway(
    request: pytest.FixtureRequest, gateway_factory: ClientFactory
) -> tuple[GatewayClient, str, str]:
    """A gateway with default settings as ``pgqg serve`` runs one on its embedded
    server, and as the tests run theirs; with its request role and a superuser DSN."""
    if request.param == "embedded":
        pg: EmbeddedPostgres = request.getfixturevalue("embedded_demo")
        return await gateway_factory(dsn=pg.gateway_dsn), pg.request_role, pg.dsn
    database_dsn: str = request.getfixturevalue("database_dsn")
    return await gateway_factory(), TEST_REQUEST_ROLE, database_dsn


# --- the probes, as the default configuration ------------------------------------------


async def test_requests_do_not_run_as_a_superuser(
    default_gateway: tuple[GatewayClient, str, str],
) -> None:
    client, role, _ = default_gateway
    sql = "select current_user, (select rolsuper from pg_roles where rolname = current_user)"
    status, body = await query(client, sql, shape="arrays")
    assert (status, body["rows"]) == (200, [[role, False]])


@pytest.mark.parametrize("sql", PROBES)
async def test_the_servers_files_and_settings_are_out_of_reach(
    default_gateway: tuple[GatewayClient, str, str], sql: str
) -> None:
    client, _, _ = default_gateway
    status, body = await query(client, sql)
    assert (status, body["error"]["sqlstate"]) == (403, "42501"), body


async def test_other_sessions_cannot_be_signalled(
    default_gateway: tuple[GatewayClient, str, str],
) -> None:
    client, _, superuser = default_gateway
    async with await psycopg.AsyncConnection.connect(superuser, autocommit=True) as other:
        pid = other.info.backend_pid
        for signal in ("pg_terminate_backend", "pg_cancel_backend"):
            status, body = await query(client, f"select {signal}($1)", pid)
            assert (status, body["error"]["sqlstate"]) == (403, "42501"), body
        assert await (await other.execute("select 1")).fetchone() == (1,)


async def test_a_session_advisory_lock_is_released_with_the_answer(
    default_gateway: tuple[GatewayClient, str, str],
) -> None:
    client, _, superuser = default_gateway
    key = 926_000 + uuid.uuid4().int % 1000
    status, body = await query(client, "select pg_advisory_lock($1::bigint)", key)
    assert status == 200, body
    async with await psycopg.AsyncConnection.connect(superuser, autocommit=True) as other:
        held = "select count(*) from pg_locks where locktype = 'advisory' and objid = %s"
        assert await (await other.execute(held, [key])).fetchone() == (0,)
        # and another session takes it at once
        await other.execute("select pg_advisory_lock(%s)", [key])
        await other.execute("select pg_advisory_unlock(%s)", [key])


# --- the start-up check ------------------------------------------------------------------


async def test_a_superuser_login_role_is_refused_with_raw_sql_on(
    gateway_factory: ClientFactory, database_dsn: str
) -> None:
    for raw_sql in ("read-only", "read-write"):
        with pytest.raises(PrivilegedRoleError) as refused:
            await gateway_factory(dsn=database_dsn, privileged=True, raw_sql=raw_sql)
        message = str(refused.value)
        assert "is a superuser" in message
        assert "docs/security.md" in message  # the least-privileged role, authenticator style
        assert "PGQG_ALLOW_PRIVILEGED_ROLE=true" in message
        assert "--allow-privileged-role" in message


async def test_the_opt_in_serves_a_superuser_with_one_warning(
    gateway_factory: ClientFactory, database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.web._privileges"):
        client = await gateway_factory(
            dsn=database_dsn, privileged=True, allow_privileged_role=True
        )
        status, body = await query(client, "select rolsuper from pg_roles where rolname = user")
    assert (status, body["rows"]) == (200, [{"rolsuper": True}])
    warnings = [r for r in caplog.records if r.name == "gateway.web._privileges"]
    assert len(warnings) == 1, warnings
    assert "is a superuser" in warnings[0].getMessage()


async def test_named_queries_alone_start_under_any_role(
    gateway_factory: ClientFactory, database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.web._privileges"):
        client = await gateway_factory(dsn=database_dsn, privileged=True, raw_sql="off")
        assert (await client.get("/readyz")).status == 200
    assert not [r for r in caplog.records if r.name == "gateway.web._privileges"]


async def test_a_least_privileged_login_role_starts_with_or_without_the_opt_in(
    gateway_factory: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.web._privileges"):
        for allowed in (False, True):
            client = await gateway_factory(allow_privileged_role=allowed)
            assert (await query(client, "select 1"))[0] == 200
    assert not [r for r in caplog.records if r.name == "gateway.web._privileges"]


@pytest.fixture
async def login_role(admin: psycopg.AsyncConnection[Any]) -> AsyncIterator[tuple[str, str]]:
    """A login role of the test's own, not a superuser; (name, password)."""
    name, password = f"pgqg_t_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    await admin.execute(f"create role {name} login password '{password}'")
    try:
        yield name, password
    finally:
        await admin.execute(f"drop role {name}")


def dsn_as(database_dsn: str, role: tuple[str, str]) -> str:
    return psycopg.conninfo.make_conninfo(database_dsn, user=role[0], password=role[1])


@pytest.mark.parametrize(
    ("grant", "problem"),
    [
        ("grant pg_read_server_files to {role}", "is a member of pg_read_server_files"),
        ("grant pg_write_server_files to {role}", "is a member of pg_write_server_files"),
        ("grant pg_execute_server_program to {role}", "is a member of pg_execute_server_program"),
        ("grant pg_signal_backend to {role}", "is a member of pg_signal_backend"),
        ("alter role {role} replication", "it has REPLICATION"),
        ("alter role {role} bypassrls", "it has BYPASSRLS"),
        ("grant {superuser} to {role}", "may SET ROLE to the superuser"),
    ],
)
async def test_a_login_role_that_reaches_beyond_the_database_is_refused(
    gateway_factory: ClientFactory,
    admin: psycopg.AsyncConnection[Any],
    database_dsn: str,
    login_role: tuple[str, str],
    grant: str,
    problem: str,
) -> None:
    superuser = admin.info.user
    await admin.execute(grant.format(role=login_role[0], superuser=superuser))
    dsn = dsn_as(database_dsn, login_role)
    with pytest.raises(PrivilegedRoleError, match=problem):
        await gateway_factory(dsn=dsn, privileged=True)
    client = await gateway_factory(dsn=dsn, privileged=True, allow_privileged_role=True)
    assert (await query(client, "select 1"))[0] == 200


async def test_a_connection_opened_later_is_checked_too(
    admin: psycopg.AsyncConnection[Any], database_dsn: str, login_role: tuple[str, str]
) -> None:
    # the database was not there at start-up; now it is, and the role is a superuser's
    await admin.execute(f"grant pg_signal_backend to {login_role[0]}")
    check = connection_check(load_settings(dsn=database_dsn))
    assert check is not None
    conn = await psycopg.AsyncConnection.connect(dsn_as(database_dsn, login_role), autocommit=True)
    with pytest.raises(PrivilegedRoleError, match="pg_signal_backend"):
        await check(conn)
    assert conn.closed
    assert connection_check(load_settings(dsn=database_dsn, allow_privileged_role=True)) is None
    assert connection_check(load_settings(dsn=database_dsn, raw_sql="off")) is None


def test_role_problems_name_each_problem() -> None:
    # rows: name, is the login role, super, replication, bypassrls, createrole (< 16)
    assert role_problems([("app", True, False, False, False, False)]) == []
    assert role_problems([("postgres", True, True, False, False, False)]) == ["is a superuser"]
    assert role_problems(
        [
            ("app", True, False, False, True, True),
            ("admin", False, True, False, False, False),
            ("pg_signal_backend", False, False, False, False, False),
            ("repl", False, False, True, False, False),
        ]
    ) == [
        "it has BYPASSRLS",
        "it has CREATEROLE (before PostgreSQL 16: a way to the above)",
        "may SET ROLE to the superuser admin",
        "is a member of pg_signal_backend",
        "its role repl has REPLICATION",
    ]


# --- pgqg serve ------------------------------------------------------------------------


@pytest.mark.slow
async def test_pgqg_serve_refuses_a_superuser_and_serves_it_when_allowed(
    database_dsn: str,
) -> None:
    refused = Served(database_dsn, privileged=True)
    try:
        assert await refused.exit_code(60) == 1, refused.output()
        out = refused.output()
    finally:
        refused.stop()
    assert "pgqg: refusing to serve: the database role" in out
    assert "is a superuser" in out and "--allow-privileged-role" in out

    allowed = Served(database_dsn, "--allow-privileged-role", privileged=True)
    try:
        await asyncio.to_thread(allowed.ready_sync)
    finally:
        allowed.stop()
    least = Served(database_dsn)  # the tests' least-privileged role
    try:
        await asyncio.to_thread(least.ready_sync)
    finally:
        least.stop()
    assert as_gateway(database_dsn) != database_dsn
    assert TEST_LOGIN in as_gateway(database_dsn)


async def test_a_failed_request_leaves_no_advisory_lock_once_its_round_trip_ends(
    client: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> None:
    key = 927_000 + uuid.uuid4().int % 1000
    status, body = await query(client, "select pg_advisory_lock($1::bigint), 1/0", key)
    assert (status, body["error"]["sqlstate"]) == (400, "22012")
    await settled_stats(client)  # the round trip, and what the session does after it, ended
    held = "select count(*) from pg_locks where locktype = 'advisory' and objid = %s"
    assert await (await admin.execute(held, [key])).fetchone() == (0,)
