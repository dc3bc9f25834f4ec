"""Read-only mode is enforced by PostgreSQL, and no session state leaks between jobs.

Every attack runs through a one-connection gateway, so the request that
follows an attack lands on the very connection the attack used.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import TEST_REQUEST_ROLE
from support import GatewayClient, assert_error, query, transaction


@pytest.fixture
async def one_conn(gateway_factory: Any) -> GatewayClient:
    return await gateway_factory(pool_size=1)


@pytest.fixture
async def one_conn_rw(gateway_factory: Any) -> GatewayClient:
    return await gateway_factory(pool_size=1, raw_sql="read-write")


async def count(admin: Any, table: str) -> int:
    row = await (await admin.execute(f"select count(*) from {table}")).fetchone()
    return int(row[0])


@pytest.mark.parametrize(
    "attack",
    [
        "with w as (insert into {t} values (1, 'x') returning id) select * from w",
        "insert into {t} values (1, 'x')",
        "update {t} set v = 'y'",
        "delete from {t}",
        "alter table {t} add column evil int",
        "drop table {t}",
        "create table evil_{t} (i int)",
        "create temp table evil (i int)",
        "select {t}_writer()",
        "truncate {t}",
    ],
)
async def test_writes_answer_403_25006(
    one_conn: GatewayClient, admin: Any, table: str, attack: str
) -> None:
    await admin.execute(
        f"create function {table}_writer() returns int language sql as "
        f"$$ insert into {table} values (42, 'w') returning id $$"
    )
    await admin.execute(f"insert into {table} values (7, 'seed')")
    status, body = await query(one_conn, attack.format(t=table))
    assert status == 403, body
    assert_error(body, "query_error", "25006")
    assert await count(admin, table) == 1
    cols = await admin.execute(
        "select count(*) from information_schema.columns where table_name = %s", [table]
    )
    assert (await cols.fetchone()) == (2,)


async def test_set_transaction_read_write_unlocks_nothing(
    one_conn: GatewayClient, admin: Any, table: str
) -> None:
    # Alone, it is the only statement of its READ ONLY transaction, which is
    # rolled back: it succeeds and changes nothing, the next write is refused.
    status, body = await query(one_conn, "set transaction read write")
    assert status == 200
    status, body = await query(one_conn, f"insert into {table} values (1, 'x')")
    assert status == 403
    assert_error(body, "query_error", "25006")
    # Followed by a write in one read-only transaction, PostgreSQL refuses it
    # (25001, inside the job's savepoint) before anything can write.
    status, body = await transaction(
        one_conn,
        ("set transaction read write", []),
        (f"insert into {table} values (1, 'x')", []),
        read_only=True,
    )
    assert status == 400
    assert_error(body, "query_error", "25001")
    assert await count(admin, table) == 0


async def test_commit_then_insert_in_one_request(
    one_conn: GatewayClient, admin: Any, table: str
) -> None:
    # The extended protocol refuses two statements in one: nothing runs at all.
    status, body = await query(one_conn, f"commit; insert into {table} values (1, 'x')")
    assert status == 400
    assert_error(body, "query_error", "42601")
    # A lone COMMIT ends only its own job's transaction; the next job is read-only again.
    status, _ = await query(one_conn, "commit")
    assert status == 200
    status, body = await query(one_conn, f"insert into {table} values (1, 'x')")
    assert status == 403
    assert_error(body, "query_error", "25006")
    assert await count(admin, table) == 0


@pytest.mark.parametrize(
    "escape",
    [
        ["savepoint mine", "release savepoint mine", "set transaction read write"],
        ["savepoint mine", "rollback", "set transaction read write"],
        ["commit", "set transaction read write"],
        ["rollback", "set transaction read write"],
        ["commit", "begin read write"],
        ["commit and chain", "set transaction read write"],
        ["commit", "set default_transaction_read_only = off"],
        ["commit"],
        ["rollback"],
        ["end", "begin isolation level read committed read write"],
    ],
    ids=lambda steps: "; ".join(steps),
)
async def test_a_read_only_transaction_cannot_end_its_way_out(
    one_conn: GatewayClient, admin: Any, table: str, escape: list[str]
) -> None:
    # Ending the transaction (or leaving its guard) inside a read-only request
    # must not let a later statement of the same request write, nor commit
    # anything: PostgreSQL refuses the write, whatever came before it.
    steps = [*escape, f"insert into {table} values (1, 'x')", "commit"]
    status, body = await transaction(one_conn, *[(sql, []) for sql in steps], read_only=True)
    assert status in (400, 403), body
    assert body["error"]["sqlstate"] in ("25001", "25006"), body
    assert await count(admin, table) == 0
    status, body = await query(one_conn, f"insert into {table} values (2, 'y')")
    assert status == 403
    assert await count(admin, table) == 0


@pytest.mark.parametrize(
    ("change", "probe", "expected"),
    [
        ("select set_config('search_path', 'evil', false)", "show search_path", '"$user", public'),
        (
            "select set_config('default_transaction_read_only', 'on', false)",
            "show default_transaction_read_only",
            "off",
        ),
        # a role change is refused (tests/test_privileges.py); RESET ROLE keeps the role
        # the login role's sessions start with
        ("reset role", "select current_user::text AS who", TEST_REQUEST_ROLE),
    ],
)
async def test_a_committed_read_only_transaction_leaves_no_settings(
    one_conn: GatewayClient, change: str, probe: str, expected: Any
) -> None:
    status, body = await transaction(one_conn, (change, []), ("commit", []), read_only=True)
    assert status == 200, body
    status, body = await query(one_conn, probe)
    assert status == 200, body
    assert next(iter(body["rows"][0].values())) == expected


async def test_set_config_does_not_unlock_later_requests(
    one_conn: GatewayClient, admin: Any, table: str
) -> None:
    status, _ = await query(
        one_conn, "select set_config('default_transaction_read_only', 'off', false)"
    )
    assert status == 200
    status, body = await query(one_conn, f"insert into {table} values (1, 'x')")
    assert status == 403
    assert_error(body, "query_error", "25006")
    _, body = await query(one_conn, "show default_transaction_read_only")
    assert body["rows"] == [{"default_transaction_read_only": "off"}]
    assert await count(admin, table) == 0


@pytest.mark.parametrize(
    ("change", "probe", "expected"),
    [
        ("set search_path = evil", "show search_path", '"$user", public'),
        ("select set_config('search_path', 'evil', false)", "show search_path", '"$user", public'),
        ("set timezone = 'Asia/Tokyo'", "show timezone", "UTC"),
        ("set statement_timeout = 1", "select 1 AS one", None),
        ("set role none", "select current_user = session_user AS same", None),
    ],
)
@pytest.mark.parametrize("mode", ["read-only", "read-write"])
async def test_no_settings_carry_over(
    gateway_factory: Any, mode: str, change: str, probe: str, expected: str | None
) -> None:
    client = await gateway_factory(pool_size=1, raw_sql=mode)
    await query(client, change)
    status, body = await query(client, probe)
    assert status == 200, body
    if expected is not None:
        assert next(iter(body["rows"][0].values())) == expected


async def test_no_temp_table_or_prepared_statement_carries_over(one_conn_rw: GatewayClient) -> None:
    status, _ = await query(one_conn_rw, "create temp table scratch (i int)")
    assert status == 200
    status, body = await query(one_conn_rw, "select * from scratch")
    assert status == 400
    assert_error(body, "query_error", "42P01")
    status, _ = await query(one_conn_rw, "prepare p as select 1")
    assert status == 200
    status, body = await query(one_conn_rw, "execute p")
    assert status == 400
    assert_error(body, "query_error", "26000")


async def test_read_write_mode_writes(one_conn_rw: GatewayClient, admin: Any, table: str) -> None:
    status, body = await query(one_conn_rw, f"insert into {table} values ($1, $2)", 1, "a")
    assert status == 200
    assert body["command"] == "INSERT"
    assert body["row_count"] == 1
    assert await count(admin, table) == 1


async def test_statements_that_refuse_transaction_blocks_run(
    one_conn_rw: GatewayClient, table: str
) -> None:
    status, body = await query(one_conn_rw, f"vacuum {table}")
    assert status == 200, body
    assert body["command"] == "VACUUM"
