"""pgqg through PgBouncer (docs/scaling.md, PgBouncer).

PgBouncer (Debian's ``pgbouncer``; installed by `pgbouncer_bin` when missing and we are
root) is started by these tests in front of the test database. What works and what does
not is what docs/scaling.md says:

* PgBouncer refuses the ``options`` startup parameter pgqg sends its session settings
  in, unless ``ignore_startup_parameters = options``; then the settings must come from
  the role (``ALTER ROLE ... SET``), as `bouncer_role` does;
* in session mode, the one docs/scaling.md recommends, pipelined raw SQL, transactions,
  writes and named queries answer under load as they do directly;
* in transaction mode, with fewer server connections than the gateway has, a request at a
  time answers, and a named query fails with 26000 once PgBouncer replaced the server
  connection its statement was prepared on. Under load PgBouncer 1.18 can pass later
  messages of a pipelined batch to another server connection (pgbouncer#759), so no load
  test runs in transaction mode: it would test PgBouncer's race, not the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
from conftest import ClientFactory
from support import GatewayClient, free_port, get_stats, query, transaction

from gateway import load_settings
from gateway.embedded._install import server_user
from gateway.engine._pool import connect_kwargs, session_options

pytestmark = pytest.mark.slow

ROLE = "pgqg_bouncer"
PASSWORD = "bouncer-secret"
DATABASE = "pgqg_bouncer"
#: server connections PgBouncer opens; the gateways here have more than that
SERVER_CONNECTIONS = 2
GATEWAY_CONNECTIONS = 4
WAIT_S = 30.0


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")


@pytest.fixture(scope="session")
def pgbouncer_bin() -> str:
    """The pgbouncer program; installed from Debian's package when missing (as root)."""
    found = find_pgbouncer()
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("pgbouncer is not installed: run apt-get install -y pgbouncer as root")
    done = subprocess.run(
        "apt-get update -q && apt-get install -y -q pgbouncer",
        shell=True,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = find_pgbouncer()
    if not found:
        pytest.fail(f"apt-get install -y pgbouncer failed:\n{done.stdout}\n{done.stderr}")
    return found


@pytest.fixture(scope="module")
def bouncer_role(database_dsn: str) -> Iterator[str]:
    """A login role owning a database of its own, with pgqg's session settings as the
    role's defaults (what PgBouncer drops from the startup packet); yields its DSN."""
    settings = load_settings(dsn=database_dsn)
    gucs = dict(
        option.removeprefix("-c ").split("=", 1)
        for option in session_options(settings).split(" -c ")
    )
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
        conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        for name, value in gucs.items():
            conn.execute(f"ALTER ROLE {ROLE} SET {name} = '{value.replace(chr(92), '')}'")
        conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
    dsn = psycopg.conninfo.make_conninfo(
        database_dsn, user=ROLE, password=PASSWORD, dbname=DATABASE
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY, name text NOT NULL)")
    yield dsn
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"DROP ROLE IF EXISTS {ROLE}")


BouncerFactory = Callable[..., str]


@pytest.fixture
def start_bouncer(pgbouncer_bin: str, bouncer_role: str) -> Iterator[BouncerFactory]:
    """Start PgBouncer in front of the role's database with extra ``[pgbouncer]`` settings;
    returns a DSN through it. Every one started is stopped after the test."""
    started: list[tuple[subprocess.Popen[str], Path]] = []
    run_as = server_user()  # PgBouncer refuses to run as root, as PostgreSQL does

    def start(**extra: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(bouncer_role)
        folder = Path(tempfile.mkdtemp(prefix="pgqg-pgbouncer-"))
        folder.chmod(0o755)
        port = free_port()
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": str(folder / "userlist.txt"),
            "pool_mode": "transaction",
            "default_pool_size": str(SERVER_CONNECTIONS),
            "max_client_conn": "200",
            **extra,
        }
        (folder / "userlist.txt").write_text(f'"{ROLE}" "{PASSWORD}"\n')
        (folder / "pgbouncer.ini").write_text(
            f"[databases]\n{DATABASE} = host={info.get('host') or '127.0.0.1'}"
            f" port={info.get('port') or 5432} dbname={DATABASE}\n"
            "[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        for path in folder.iterdir():
            path.chmod(0o644)
        log = (folder / "pgbouncer.log").open("w")
        proc = subprocess.Popen(
            [pgbouncer_bin, str(folder / "pgbouncer.ini")],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            **run_as.subprocess_kwargs(),
        )
        log.close()
        started.append((proc, folder))
        dsn = psycopg.conninfo.make_conninfo(bouncer_role, host="127.0.0.1", port=port)
        deadline = time.monotonic() + WAIT_S
        while True:  # until it listens (a plain psycopg connection is always accepted)
            assert proc.poll() is None, (folder / "pgbouncer.log").read_text()
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(dsn, connect_timeout=2).close()
                return dsn
            assert time.monotonic() < deadline, (folder / "pgbouncer.log").read_text()
            time.sleep(0.05)

    yield start
    for proc, folder in started:
        proc.terminate()
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def through_bouncer(
    start_bouncer: BouncerFactory, gateway_factory: ClientFactory, tmp_path: Path
) -> GatewayClient:
    """A read-write gateway of 4 connections through PgBouncer in session mode (as many
    server connections), with named queries."""
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "items.sql").write_text(
        "-- name: item_by_id\n-- params: id int\nSELECT id, name FROM item WHERE id = :id;\n\n"
        "-- name: echo\n-- params: n int\nSELECT :n AS n;\n\n"
        "-- name: add_item!\n-- params: id int, name text\n"
        "INSERT INTO item (id, name) VALUES (:id, :name) RETURNING id;\n"
    )
    dsn = start_bouncer(
        ignore_startup_parameters="options",
        pool_mode="session",
        default_pool_size=str(GATEWAY_CONNECTIONS),
    )
    return await gateway_factory(
        dsn=dsn, raw_sql="read-write", pool_size=GATEWAY_CONNECTIONS, sql_dir=tmp_path
    )


def test_pgbouncer_refuses_the_options_pgqg_connects_with(start_bouncer: BouncerFactory) -> None:
    dsn = start_bouncer()
    kwargs = connect_kwargs(load_settings(dsn=dsn), "pgqg")
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        psycopg.connect(dsn, **kwargs).close()


async def test_session_settings_come_from_the_role(through_bouncer: GatewayClient) -> None:
    sql = (
        "select current_setting('TimeZone') as tz, current_setting('statement_timeout') as st,"
        " current_setting('extra_float_digits') as efd, '2024-01-02 03:04:05+00'::timestamptz"
        " as ts, 0.1::float8 + 0.2::float8 as f"
    )
    status, body = await query(through_bouncer, sql)
    assert status == 200, body
    assert body["rows"] == [
        {
            "tz": "UTC",
            "st": "30s",
            "efd": "1",
            "ts": "2024-01-02 03:04:05+00",
            "f": 0.30000000000000004,
        }
    ]


async def test_pipelined_statements_through_pgbouncer(through_bouncer: GatewayClient) -> None:
    """Pipelined raw SQL through PgBouncer in session mode: every job answers its own
    row, several jobs per round trip."""

    async def one(n: int) -> tuple[int, Any]:
        return await query(through_bouncer, "select $1::int as n", n)

    before = await get_stats(through_bouncer)
    answers = await asyncio.gather(*(one(n) for n in range(300)))
    assert [(status, body["rows"]) for status, body in answers] == [
        (200, [{"n": n}]) for n in range(300)
    ]
    stats = await get_stats(through_bouncer)
    jobs = sum(c["jobs"] for c in stats["connections"]) - sum(
        c["jobs"] for c in before["connections"]
    )
    batches = sum(c["batches"] for c in stats["connections"]) - sum(
        c["batches"] for c in before["connections"]
    )
    assert jobs >= 300 and batches < jobs, (jobs, batches)  # several jobs per round trip


async def test_a_request_at_a_time_through_transaction_mode(
    start_bouncer: BouncerFactory, gateway_factory: ClientFactory
) -> None:
    """In transaction mode, with fewer server connections than the gateway has, requests
    sent one at a time answer (docs/scaling.md says why not more at once)."""
    dsn = start_bouncer(ignore_startup_parameters="options")
    client = await gateway_factory(dsn=dsn, pool_size=GATEWAY_CONNECTIONS)
    for n in range(20):
        status, body = await query(client, "select $1::int as n", n)
        assert (status, body["rows"]) == (200, [{"n": n}])


async def test_named_queries_through_pgbouncer(through_bouncer: GatewayClient) -> None:
    """In session mode a named query's statement stays on the server connection it was
    prepared on: 1,000 concurrent calls all answer."""

    async def echo(n: int) -> int:
        resp = await through_bouncer.get("/v1/queries/echo", params={"n": str(n)})
        body = await resp.json()
        assert resp.status == 200, body
        return int(body["rows"][0]["n"])

    answers = await asyncio.gather(*(echo(n) for n in range(1000)))
    assert answers == list(range(1000))


async def test_a_named_query_fails_once_pgbouncer_replaced_its_server_connection(
    start_bouncer: BouncerFactory, gateway_factory: ClientFactory, tmp_path: Path, database_dsn: str
) -> None:
    """What does not work with PgBouncer before 1.21 (no ``max_prepared_statements``):
    a named query's statement, prepared on the server connection PgBouncer lent once,
    is missing from the next one (PgBouncer replaced it: server_lifetime, a restart,
    or another client's DISCARD ALL); the gateway still runs it by name."""
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "q.sql").write_text("-- name: echo\n-- params: n int\nSELECT :n AS n;\n")
    dsn = start_bouncer(ignore_startup_parameters="options", default_pool_size="1")
    client = await gateway_factory(dsn=dsn, pool_size=1, sql_dir=tmp_path)
    resp = await client.get("/v1/queries/echo", params={"n": "1"})
    assert resp.status == 200, await resp.text()
    with psycopg.connect(database_dsn, autocommit=True) as admin:
        admin.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where usename = %s and pid <> pg_backend_pid()",
            (ROLE,),
        )
    deadline = time.monotonic() + WAIT_S
    while True:  # PgBouncer opens a new server connection; the gateway's stays
        resp = await client.get("/v1/queries/echo", params={"n": "2"})
        body = await resp.json()
        if resp.status != 200 and body["error"]["sqlstate"] == "26000":
            break  # prepared statement "pgqg_..." does not exist
        assert resp.status in (200, 502, 503), body  # the kill itself, seen by the gateway
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)
    assert "does not exist" in body["error"]["message"]


async def test_transactions_and_writes_through_pgbouncer(through_bouncer: GatewayClient) -> None:
    async def add(n: int) -> None:
        status, body = await transaction(
            through_bouncer,
            ("insert into item (id, name) values ($1, $2)", [n, f"item {n}"]),
            ("select count(*) as c from item where id = $1", [n]),
        )
        assert status == 200, body
        assert body["results"][1]["rows"] == [{"c": "1"}]  # bigint as a string

    await asyncio.gather(*(add(n) for n in range(1000, 1100)))
    status, body = await query(through_bouncer, "select count(*) as c from item where id >= 1000")
    assert (status, body["rows"]) == (200, [{"c": "100"}])
    resp = await through_bouncer.post(
        "/v1/queries/add_item", json={"params": {"id": 5000, "name": "x"}}
    )
    assert resp.status == 200, await resp.text()
    resp = await through_bouncer.get("/v1/queries/item_by_id", params={"id": "5000"})
    assert (await resp.json())["rows"] == [{"id": 5000, "name": "x"}]
