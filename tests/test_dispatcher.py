"""The dispatcher: load spreads over every connection, futures resolve exactly once."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict
from support import (
    as_gateway,
    assert_error,
    connection_held,
    get_stats,
    query,
    settled_stats,
    until_stats,
    waiting_for_lock,
)

#: the round trip of a database "a network hop away": long enough that no stall of a
#: loaded test machine between a batch leaving and the next job arriving comes near it
ROUND_TRIP_S = 0.5


async def test_500_concurrent_requests_on_4_connections(gateway_factory: Any) -> None:
    client = await gateway_factory(pool_size=4, queue_size=1000)

    async def one(i: int) -> tuple[int, Any]:
        return await query(client, "select $1::int AS i, pg_backend_pid() AS pid", i)

    answers = await asyncio.gather(*(one(i) for i in range(500)))
    assert all(status == 200 for status, _ in answers)
    assert [body["rows"][0]["i"] for _, body in answers] == list(range(500))
    stats = await (await client.get("/v1/stats")).json()
    per_connection = [c["jobs"] for c in stats["connections"]]
    assert len(per_connection) == 4
    assert all(jobs > 0 for jobs in per_connection), per_connection
    assert sum(per_connection) >= 500
    pids = {body["rows"][0]["pid"] for _, body in answers}
    assert len(pids) == 4
    assert stats["queue"]["depth"] == 0


async def test_requests_one_at_a_time_reuse_one_connection(gateway_factory: Any) -> None:
    # last in, first out, as PgBouncer does: the connection idle the shortest
    # time takes the next job, so light load keeps one connection warm and the
    # others idle (first in, first out would rotate through all four). Two at
    # most: a connection that has answered may still be reading the ROLLBACK
    # that ends its batch when the next request comes.
    client = await gateway_factory(pool_size=4)
    await asyncio.gather(*(query(client, "select pg_sleep(0.05)") for _ in range(8)))
    stats = await (await client.get("/v1/stats")).json()
    assert all(c["connected"] for c in stats["connections"])  # all four are up
    pids = set()
    for _ in range(20):
        status, body = await query(client, "select pg_backend_pid() AS pid")
        assert status == 200
        pids.add(body["rows"][0]["pid"])
    assert len(pids) <= 2, pids


async def test_full_queue_is_refused_at_once(gateway_factory: Any, admin: Any) -> None:
    client = await gateway_factory(pool_size=1, queue_size=2)
    async with connection_held(client, admin) as holder:
        queued = [
            asyncio.ensure_future(query(client, "select 1", timeout_ms=60_000)) for _ in range(2)
        ]
        await until_stats(client, lambda stats: stats["queue"]["depth"] == 2, "two queued")
        resp = await client.post("/v1/query", json={"sql": "select 1"})
        assert resp.status == 503  # at once: not once a place came free
    assert resp.headers["Retry-After"] == "1"
    assert_error(await resp.json(), "overloaded")
    statuses = [status for status, _ in await asyncio.gather(holder, *queued)]
    assert statuses == [200, 200, 200]
    status, _ = await query(client, "select 1")
    assert status == 200


async def test_queue_timeout_refuses_a_job_that_waited_too_long(
    gateway_factory: Any, admin: Any
) -> None:
    client = await gateway_factory(pool_size=1, queue_timeout_ms=200)
    async with connection_held(client, admin) as holder:
        status, body = await query(client, "select 1")
    assert status == 503, body
    assert_error(body, "overloaded")
    assert (await holder)[0] == 200


async def test_every_future_resolves_once_under_mixed_outcomes(gateway_factory: Any) -> None:
    client = await gateway_factory(pool_size=2, queue_size=500)
    sqls = ["select 1", "select 1/0", "select pg_sleep(0.3)", "selec", "select $1::int"]

    async def one(i: int) -> int:
        sql = sqls[i % len(sqls)]
        params = [i] if "$1" in sql else []
        status, _ = await query(client, sql, *params, timeout_ms=100)
        return status

    statuses = await asyncio.gather(*(one(i) for i in range(100)))
    assert set(statuses) <= {200, 400, 504}
    assert 200 in statuses and 400 in statuses and 504 in statuses
    assert (await query(client, "select 1"))[0] == 200
    # abandoned jobs still in a batch finish within their (cancelled) timeouts
    await settled_stats(client)


def _totals(stats: Any) -> tuple[int, int]:
    return (
        sum(c["jobs"] for c in stats["connections"]),
        sum(c["batches"] for c in stats["connections"]),
    )


@pytest.mark.parametrize("spelled_out", [False, True], ids=["parameter", "literal"])
async def test_a_quick_statement_rides_round_trips_already_under_way(
    gateway_factory: Any, spelled_out: bool, monkeypatch: Any
) -> None:
    """Concurrent clients of a statement known to be quick share round trips, also
    when each spells its value out in the SQL text instead of sending a parameter."""
    from gateway.engine import _costs, _dispatcher, _wakeups

    # A stall of a busy test machine longer than the batch budget hands the queue
    # to idle connections, as it should (see the next tests); here it would only
    # make the batches smaller, and this test flaky. Likewise a stall while the
    # statement runs would make it look slow (more than 5 ms), so never cheap.
    monkeypatch.setattr(_dispatcher, "BATCH_BUDGET_S", 1.0)
    monkeypatch.setattr(_costs, "CHEAP_JOB_S", 1.0)
    # nor may stalls make the database look a round trip away (see the test after next)
    monkeypatch.setattr(_wakeups, "RIDE_S", 1.0)
    client = await gateway_factory(pool_size=8)

    async def one(i: int) -> int:
        if spelled_out:
            status, body = await query(client, f"select {i}::int AS i")
        else:
            status, body = await query(client, "select $1::int AS i", i)
        assert status == 200, body
        return int(body["rows"][0]["i"])

    for i in range(5):  # the dispatcher learns that this statement is quick
        assert await one(i) == i
    jobs_before, batches_before = _totals(await get_stats(client))

    async def loop(n: int) -> list[int]:
        return [await one(n * 100 + k) for k in range(40)]

    answers = await asyncio.gather(*(loop(n) for n in range(16)))
    assert answers == [[n * 100 + k for k in range(40)] for n in range(16)]
    jobs, batches = _totals(await get_stats(client))
    # one round trip per connection would carry about 16 / 8 = 2 jobs
    assert (jobs - jobs_before) / (batches - batches_before) >= 4


async def test_a_quick_job_waits_for_the_round_trip_under_way_not_an_idle_connection(
    gateway_factory: Any, admin: Any, monkeypatch: Any
) -> None:
    """A job of a quick statement rides the next round trip of the connection
    running quick jobs, though idle connections are there, within the batch budget."""
    from gateway.engine import _costs, _dispatcher, _wakeups

    # generous: a stall of a loaded machine must not hand the queue over, nor make
    # the statement look slow
    monkeypatch.setattr(_dispatcher, "BATCH_BUDGET_S", 60.0)
    monkeypatch.setattr(_costs, "CHEAP_JOB_S", 1.0)
    monkeypatch.setattr(_wakeups, "RIDE_S", 60.0)
    client = await gateway_factory(pool_size=4)
    key = 918_000 + os.getpid() % 1000
    sql = (
        "select pg_advisory_xact_lock_shared($1::bigint)::text, $2::int AS i,"
        " pg_backend_pid() AS pid"
    )
    for i in range(5):  # learnt as quick
        assert (await query(client, sql, key + 1, i))[0] == 200
    await admin.execute("select pg_advisory_lock(%s)", [key])
    try:
        held = asyncio.ensure_future(query(client, sql, key, -1))  # blocks on the lock
        await waiting_for_lock(admin, key)
        rider = asyncio.ensure_future(query(client, sql, key + 1, 1))
        async with asyncio.timeout(30):  # queued behind the batch under way ...
            while (await get_stats(client))["queue"]["depth"] != 1:
                assert not rider.done()  # ... not sent to an idle connection
                await asyncio.sleep(0.01)
    finally:
        await admin.execute("select pg_advisory_unlock(%s)", [key])
    (held_status, held_body), (rider_status, rider_body) = await asyncio.gather(held, rider)
    assert (held_status, held_body["rows"][0]["i"]) == (200, -1)
    assert (rider_status, rider_body["rows"][0]["i"]) == (200, 1)
    # it rode the blocked connection's next round trip
    assert rider_body["rows"][0]["pid"] == held_body["rows"][0]["pid"]


async def test_a_database_a_round_trip_away_sends_a_quick_job_on_an_idle_connection(
    gateway_factory: Any, fault_proxy: Any, database_dsn: str, monkeypatch: Any
) -> None:
    """With the database a round trip away, a quick job that arrives just after a
    batch left does not wait for that batch to come back and then go out after it
    (two round trips): it goes out at once on an idle connection. ``/v1/stats``
    shows the round trip the gateway measured."""
    from gateway.engine import _costs, _dispatcher

    # the round trip decides alone: no late hand-over, and a job that takes a
    # round trip still counts as quick
    monkeypatch.setattr(_dispatcher, "BATCH_BUDGET_S", 60.0)
    monkeypatch.setattr(_costs, "CHEAP_JOB_S", 60.0)
    proxy = await fault_proxy(int(conninfo_to_dict(database_dsn)["port"]))
    # the least-privileged login, through the proxy ("privileged": the DSN as given)
    login = proxy.dsn(as_gateway(database_dsn))
    client = await gateway_factory(dsn=login, privileged=True, pool_size=2)
    await until_stats(
        client, lambda stats: all(c["connected"] for c in stats["connections"]), "connected"
    )
    proxy.round_trip_s = ROUND_TRIP_S
    sql = "select $1::int AS i, pg_backend_pid() AS pid"
    for i in range(3):  # learnt as quick, and the round trip measured
        assert (await query(client, sql, i))[0] == 200
    assert (await get_stats(client))["round_trip_ms"] >= ROUND_TRIP_S * 1000
    # A job is answered before its batch ends (the batch's last ROLLBACK is still on
    # its way back): wait for the end, so the batch seen running next is the new one.
    await until_stats(client, lambda stats: stats["running"] == 0, "the batch ended")
    under_way = asyncio.ensure_future(query(client, sql, 1))
    await until_stats(
        client,
        lambda stats: (stats["running"], stats["queue"]["depth"]) == (1, 0),
        "the first job taken",
    )
    status, body = await query(client, sql, 2)
    assert status == 200, body
    first_status, first = await under_way
    assert first_status == 200, first
    assert body["rows"][0]["pid"] != first["rows"][0]["pid"]


async def test_quick_jobs_do_not_wait_behind_a_slow_one_that_looked_quick(
    gateway_factory: Any,
) -> None:
    """A statement learnt as quick that turns out slow does not hold up the queue."""
    client = await gateway_factory(pool_size=4)
    sql = "select pg_sleep($1::float8), $2::int AS i"
    for i in range(5):
        assert (await query(client, sql, 0, i))[0] == 200
    slow = asyncio.ensure_future(query(client, sql, 3.0, -1))
    # the slow one is running, its batch counted as quick
    await until_stats(client, lambda stats: stats["running"] == 1, "one job running")
    quick = await asyncio.gather(*(query(client, sql, 0, i) for i in range(10)))
    assert [body["rows"][0]["i"] for _, body in quick] == list(range(10))
    assert not slow.done()  # they went to idle connections, not behind the sleep
    status, body = await slow
    assert (status, body["rows"][0]["i"]) == (200, -1)


async def test_a_connection_whose_queue_never_empties_is_still_reset(
    gateway_factory: Any, monkeypatch: Any
) -> None:
    # Its lease ends after the batch under way, busy or not, so the pool resets,
    # checks and recycles it: nothing a job left in the session that the gateway's
    # own cleanup missed outlives the lease (the pool's reset is a backstop).
    from gateway.engine import _dispatcher

    monkeypatch.setattr(_dispatcher, "LEASE_S", 0.3)
    client = await gateway_factory(pool_size=1, max_batch=2)
    assert (await query(client, "select 1"))[0] == 200
    resets = (await get_stats(client))["pool"]["resets"]
    stop = asyncio.Event()

    async def feed() -> None:  # four clients, batches of two: the queue is never empty
        while not stop.is_set():
            assert (await query(client, "select pg_sleep(0.01)"))[0] == 200

    feeders = [asyncio.create_task(feed()) for _ in range(4)]
    try:
        deadline = asyncio.get_running_loop().time() + 5.0
        while asyncio.get_running_loop().time() < deadline:
            if (await get_stats(client))["pool"]["resets"] >= resets + 2:
                break
            await asyncio.sleep(0.02)
        reset_under_load = (await get_stats(client))["pool"]["resets"] >= resets + 2
        assert not any(f.done() for f in feeders)
    finally:
        stop.set()
        await asyncio.gather(*feeders)
    assert reset_under_load
    assert (await get_stats(client))["pool"]["resets_failed"] == 0
