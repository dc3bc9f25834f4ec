"""Read replicas (engine/_replicas.py): a real streaming replica of a cluster of this module.

The primary is an embedded cluster of its own (its WAL and pg_hba are this module's
to use); the replica is made from it with ``pg_basebackup -R`` (pgserver ships it)
and started on another port. Lag is made by pausing the replica's replay
(``pg_wal_replay_pause()``) while the primary writes. Every wait is for a condition,
with a generous bound.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ClientFactory
from support import JWT_SECRET, GatewayClient, bearer, get_stats, query, sign, transaction

from gateway.embedded._install import server_user
from gateway.embedded._postgres import EmbeddedPostgres, postgres_bin_dir
from gateway.web._privileges import PrivilegedRoleError

pytestmark = pytest.mark.slow

WAIT_S = 60.0
#: the embedded clusters' login role (least privileged), and a role a token names
LOGIN = "pgqg_authenticator"
READER = "pgqg_replica_reader"
QUERIES = """\
-- name: where_am_i
SELECT pg_is_in_recovery() AS replica;

-- name: add_row!
-- params: n int
INSERT INTO seen (n) VALUES (:n) RETURNING pg_is_in_recovery() AS replica;
"""


class Pair:
    def __init__(self, primary: EmbeddedPostgres, replica: EmbeddedPostgres) -> None:
        self.primary = primary
        self.replica = replica


@pytest.fixture(scope="module")
def pair(embedded_root: Path) -> Iterator[Pair]:
    """A primary and its streaming replica, both embedded clusters, stopped at the end."""
    primary = EmbeddedPostgres(embedded_root / "replicas-primary", fast=True)
    primary.start()
    replica_dir = embedded_root / "replicas-standby"
    run_as = server_user()
    replica_dir.mkdir(mode=0o700)
    run_as.chown(replica_dir)  # pg_basebackup runs as the server's user
    try:
        done = subprocess.run(
            [
                str(postgres_bin_dir() / "pg_basebackup"),
                "-D",
                str(replica_dir),
                "-R",  # standby.signal and primary_conninfo, password included
                "-X",
                "stream",
                "-c",
                "fast",
                "-d",
                primary.dsn,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=embedded_root,
            **run_as.subprocess_kwargs(),
        )
        assert done.returncode == 0, done.stdout + done.stderr
        (replica_dir / "pgqg.port").unlink(missing_ok=True)  # the primary's
        replica = EmbeddedPostgres(replica_dir, fast=True)
        replica.start()
        try:
            with psycopg.connect(primary.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE seen (n int PRIMARY KEY)")  # pgqg_anon may use it
                # a role a token may name, which the login role may take on
                conn.execute(f"CREATE ROLE {READER} NOLOGIN")
                conn.execute(f"GRANT {READER} TO {LOGIN}")
            yield Pair(primary, replica)
        finally:
            replica.stop()
    finally:
        primary.stop()


def wait_for(condition: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


async def replica_target(client: GatewayClient) -> dict[str, Any]:
    stats = await get_stats(client)
    assert [t["role"] for t in stats["targets"]] == ["primary", "replica"], stats["targets"]
    target: dict[str, Any] = stats["targets"][1]
    return target


async def until_replica(client: GatewayClient, healthy: bool) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while (target := await replica_target(client))["healthy"] != healthy:
        assert time.monotonic() < deadline, target
        await asyncio.sleep(0.05)
    return target


async def on_replica(client: GatewayClient) -> bool:
    """Where a read-only raw statement ran: True on the replica."""
    status, body = await query(client, "select pg_is_in_recovery() as replica", read_only=True)
    assert status == 200, body
    return bool(body["rows"][0]["replica"])


@pytest.fixture
async def routed(pair: Pair, gateway_factory: ClientFactory, tmp_path: Path) -> GatewayClient:
    """A read-write gateway on the primary with the replica, both through the
    least-privileged login role; the replica healthy."""
    return await routed_gateway(gateway_factory, pair, tmp_path)


async def routed_gateway(
    gateway_factory: ClientFactory, pair: Pair, tmp_path: Path, **overrides: Any
) -> GatewayClient:
    """A gateway as `routed`'s, with `overrides`, once the replica is healthy."""
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "q.sql").write_text(QUERIES)
    client = await gateway_factory(
        dsn=pair.primary.gateway_dsn,
        replica_dsns=(pair.replica.gateway_dsn,),
        replica_max_lag_ms=1000,
        raw_sql="read-write",
        sql_dir=tmp_path,
        **overrides,
    )
    await until_replica(client, healthy=True)
    return client


async def test_reads_go_to_the_replica_and_writes_to_the_primary(
    routed: GatewayClient, pair: Pair
) -> None:
    assert await on_replica(routed)
    status, body = await query(routed, "select pg_is_in_recovery() as replica")
    assert (status, body["rows"]) == (200, [{"replica": False}])  # read-write: the primary
    resp = await routed.get("/v1/queries/where_am_i")  # a read-only named query
    assert (await resp.json())["rows"] == [{"replica": True}]
    status, body = await transaction(
        routed, ("select pg_is_in_recovery() as replica", []), read_only=True
    )
    assert body["results"][0]["rows"] == [{"replica": True}]
    resp = await routed.post("/v1/queries/add_row", json={"params": {"n": 1}})
    assert (await resp.json())["rows"] == [{"replica": False}]  # a write: the primary
    status, body = await query(
        routed, "insert into seen values (2) returning pg_is_in_recovery() as replica"
    )
    assert (status, body["rows"]) == (200, [{"replica": False}])

    async def replicated() -> bool:
        _, body = await query(routed, "select count(*) as c from seen where n <= 2", read_only=True)
        return bool(body["rows"] == [{"c": "2"}])

    deadline = time.monotonic() + WAIT_S
    while not await replicated():  # the writes reach the replica, and reads see them there
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    targets = (await get_stats(routed))["targets"]
    assert targets[0] == {**targets[0], "name": "primary", "healthy": True}
    assert targets[1]["lag_ms"] is not None and targets[1]["reason"] is None
    resp = await routed.get("/readyz")
    ready = await resp.json()
    assert resp.status == 200 and [t["role"] for t in ready["targets"]] == ["primary", "replica"]


async def test_a_lagging_replica_is_skipped_until_it_catches_up(
    routed: GatewayClient, pair: Pair
) -> None:
    with psycopg.connect(pair.replica.dsn, autocommit=True) as replica:
        replica.execute("select pg_wal_replay_pause()")
        try:
            with psycopg.connect(pair.primary.dsn, autocommit=True) as primary:
                n = 100
                deadline = time.monotonic() + WAIT_S
                # write until the replica is over the lag bound
                while "lag" not in str((await replica_target(routed))["reason"]):
                    primary.execute("insert into seen values (%s)", (n,))
                    n += 1
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            target = await replica_target(routed)
            assert not target["healthy"] and target["lag_ms"] > 1000, target
            assert not await on_replica(routed)  # reads fall back to the primary
        finally:
            replica.execute("select pg_wal_replay_resume()")
    await until_replica(routed, healthy=True)
    assert await on_replica(routed)


async def test_a_replica_down_is_skipped_and_rejoins(routed: GatewayClient, pair: Pair) -> None:
    pair.replica.stop()
    try:
        target = await until_replica(routed, healthy=False)
        assert target["reason"].startswith("down"), target
        for _ in range(20):  # every read answers, from the primary
            assert not await on_replica(routed)
    finally:
        pair.replica.start()
    await until_replica(routed, healthy=True)
    deadline = time.monotonic() + WAIT_S
    while not await on_replica(routed):  # its pool reconnected too
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_without_replicas_there_is_one_target(client: GatewayClient) -> None:
    stats = await get_stats(client)
    assert [(t["name"], t["role"], t["healthy"]) for t in stats["targets"]] == [
        ("primary", "primary", True)
    ]
    assert stats["pid"] == os.getpid()


async def test_a_token_s_role_applies_on_the_replica_as_on_the_primary(
    pair: Pair, gateway_factory: ClientFactory, tmp_path: Path
) -> None:
    """The replica's pool logs in as the same login role and takes on each request's
    role in its transaction, as the primary's does."""
    client = await routed_gateway(gateway_factory, pair, tmp_path, jwt_secret=JWT_SECRET)
    who = "select current_user as who, pg_is_in_recovery() as replica"
    token = bearer(sign({"role": READER}))
    for read_only, replica in ((True, True), (False, False)):
        resp = await client.post(
            "/v1/query", json={"sql": who, "read_only": read_only}, headers=token
        )
        body = await resp.json()
        assert (resp.status, body["rows"]) == (200, [{"who": READER, "replica": replica}]), body
    resp = await client.post(
        "/v1/query", json={"sql": who, "read_only": True}, headers=bearer(sign({"role": "nobody"}))
    )
    assert resp.status == 403, await resp.text()  # refused on the replica as on the primary


async def test_a_privileged_replica_login_is_refused_with_raw_sql_on(
    pair: Pair, gateway_factory: ClientFactory
) -> None:
    """The least-privilege check at start-up reads every replica's login role too."""
    with pytest.raises(PrivilegedRoleError, match="is a superuser"):
        await gateway_factory(
            dsn=pair.primary.gateway_dsn, replica_dsns=(pair.replica.dsn,), raw_sql="read-only"
        )
