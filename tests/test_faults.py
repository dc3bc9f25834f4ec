"""Faults between the gateway and PostgreSQL (issue 18).

A ``pgqg serve`` subprocess (uvloop, as in production) talks to an embedded
PostgreSQL of the test's own through a fault-injecting proxy
(tests/faultproxy.py), under load from the test (tests/faultload.py: writers
that retry only when told it is safe, readers). Each test breaks the
connection in its own way and then asserts:

* every request was answered, with no 5xx other than 502, 503 and 504, and
  within its deadline plus `faultload.SLACK_S`; a 502 is ``outcome_unknown``
  without ``Retry-After``, a 503 has one;
* nothing was written twice, every acknowledged write is there, and no write
  answered 503 (and then given up) is;
* the service is back within `BACK_S` of the database;
* SIGTERM ends the gateway, exit code 0, within its grace plus 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
from faultload import SLACK_S, Gateway, Load, stored_ids
from faultproxy import FaultProxy
from support import Served

from gateway.embedded._postgres import EmbeddedPostgres

pytestmark = pytest.mark.slow

#: every request's timeout_ms, in seconds
DEADLINE_S = 3.0
#: the service answers again this soon after the database does
BACK_S = 3.0
#: the gateway's shutdown grace; SIGTERM must end it within this plus 2 s
GRACE_S = 1.0
POOL_SIZE = 4
#: a request that hangs fails an assertion instead of the whole run
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=DEADLINE_S + 15)


@dataclass
class Rig:
    """An embedded PostgreSQL, a proxy in front of it and a gateway behind that."""

    pg: EmbeddedPostgres
    proxy: FaultProxy
    served: Served
    gateway: Gateway

    def load(self) -> Load:
        return Load(self.gateway).start()

    async def check(self, load: Load) -> None:
        """The module docstring's assertions about answers and writes."""
        summary = await load.summary(self.pg.dsn)
        print(summary.describe())
        assert summary.problems() == []
        assert 200 in summary.statuses

    async def sigterm(self) -> float:
        """SIGTERM the gateway; seconds until it exited with code 0."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.served.proc.send_signal(signal.SIGTERM)
        code = await self.served.exit_code(GRACE_S + 10)
        took = loop.time() - started
        assert code == 0, self.served.output()
        assert took < GRACE_S + 2, f"exited {took:.2f} s after SIGTERM"
        return took


@pytest.fixture
async def rig(embedded_factory: Any, fault_proxy: Any) -> AsyncIterator[Rig]:
    # durable commits: with fast=True PostgreSQL itself loses acknowledged commits on SIGKILL
    pg = embedded_factory(fast=False)
    table = "w_" + uuid.uuid4().hex[:8]
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as conn:
        await conn.execute(f"CREATE TABLE {table} (id int, v text)")  # no key: duplicates show
    proxy = await fault_proxy(pg.port)
    env = {
        "PGQG_RAW_SQL": "read-write",
        "PGQG_POOL_SIZE": str(POOL_SIZE),
        "PGQG_SHUTDOWN_GRACE_S": str(GRACE_S),
        "PGQG_CONNECT_TIMEOUT_MS": "1000",
    }
    served = Served(proxy.dsn(pg.gateway_dsn), env=env)
    try:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
            await served.ready(http)
            yield Rig(pg, proxy, served, Gateway(served.url, http, table, DEADLINE_S))
    finally:
        served.stop()


async def some_answers(load: Load) -> None:
    """Let the load run until a few requests went through."""
    await load.answered_ok(20, after=asyncio.get_running_loop().time())


# --- the database goes away -------------------------------------------------------------


async def test_the_postmaster_killed_under_load_and_restarted(rig: Rig) -> None:
    load = rig.load()
    await some_answers(load)
    loop = asyncio.get_running_loop()
    assert rig.pg.pid is not None
    os.kill(rig.pg.pid, signal.SIGKILL)  # the postmaster alone: its backends notice and exit
    crash = loop.time()
    await asyncio.sleep(2.0)  # down for 2 s
    await asyncio.to_thread(rig.pg.start)  # crash recovery, same port
    up = loop.time()
    back = await rig.gateway.back_within(BACK_S)
    await load.answered_ok(20, after=up + back)
    await load.stop()
    in_flight = [a.took for a in load.answers if a.sent < crash < a.answered]
    print(f"in flight at the crash answered within {max(in_flight, default=0):.3f} s;"
          f" back {back:.2f} s after the database")  # fmt: skip
    assert max(in_flight, default=0) < 1.0  # not at their deadline
    await rig.check(load)
    await rig.sigterm()


async def test_every_backend_terminated_under_load(rig: Rig) -> None:
    load = rig.load()
    await some_answers(load)
    loop = asyncio.get_running_loop()
    async with await psycopg.AsyncConnection.connect(rig.pg.dsn, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'pgqg'"
        )
        terminated = (await cur.fetchone() or [0])[0]
    assert terminated >= 1
    back = await rig.gateway.back_within(BACK_S)
    await load.answered_ok(20, after=loop.time())
    await load.stop()
    print(f"{terminated} backends terminated; back {back:.2f} s later")
    await rig.check(load)
    await rig.sigterm()


# --- the network goes away ---------------------------------------------------------------


async def test_a_black_hole_for_8_s_then_healed(rig: Rig) -> None:
    load = rig.load()
    await some_answers(load)
    loop = asyncio.get_running_loop()
    rig.proxy.black_hole()
    started = loop.time()
    while True:  # /readyz notices within 10 s
        async with rig.gateway.http.get(rig.served.url + "/readyz") as resp:
            if resp.status == 503:
                break
        assert loop.time() - started < 10.0, "/readyz still 200 in a black hole"
        await asyncio.sleep(0.1)
    noticed = loop.time() - started
    await asyncio.sleep(max(8.0 - noticed, 0))  # the partition lasts 8 s
    rig.proxy.heal()
    healed = loop.time()
    back = await rig.gateway.back_within(BACK_S)
    await load.answered_ok(20, after=healed + back)
    await load.stop()
    print(f"/readyz 503 after {noticed:.2f} s of black hole; back {back:.2f} s after healing")
    await rig.check(load)
    await rig.sigterm()


async def test_sigterm_in_a_black_hole_exits_within_the_grace(rig: Rig) -> None:
    load = rig.load()
    await some_answers(load)
    rig.proxy.black_hole()
    stuck = [asyncio.ensure_future(rig.gateway.read()) for _ in range(3)]
    stuck += [asyncio.ensure_future(rig.gateway.write(-i)) for i in range(1, 4)]
    # The gateway holds them all, its /v1/stats says so: every connection busy, and
    # the load's requests and these all received (on a loaded machine a request can
    # still be on its way when the SIGTERM closes the listening socket; it never got
    # to the gateway, so nothing can answer it).
    held = load.clients + len(stuck)
    async with asyncio.timeout(30.0):
        while True:
            async with rig.gateway.http.get(rig.served.url + "/v1/stats") as resp:
                stats = await resp.json()
            if stats["running"] >= POOL_SIZE and stats["pending"] >= held:
                break
            await asyncio.sleep(0.02)
    took = await rig.sigterm()
    answers = await asyncio.gather(*stuck)
    await load.stop()
    print(f"exited {took:.2f} s after SIGTERM; in flight: {[a.status for a in answers]}")
    assert all(a.status in (502, 503, 504) for a in answers)
    assert all(a.took < DEADLINE_S + SLACK_S for a in answers)


async def test_a_connection_reset_while_results_stream_back_fails_its_batch_at_once(
    rig: Rig,
) -> None:
    """The reset arrives with the first bytes of a result: the connection's batch
    fails within 1 s (it waited for its deadline under uvloop before the fix)."""
    marker = "pgqg-" + uuid.uuid4().hex[:8]
    fired = rig.proxy.cut_after(marker.encode(), "to_client")
    sql = f"select '{marker}' AS m, pg_sleep(0.1), 1 AS one"
    answers = await asyncio.gather(rig.gateway.read(sql), *(rig.gateway.read() for _ in range(6)))
    assert fired.done()
    print([(a.status, a.code, round(a.took, 3)) for a in answers])
    assert answers[0].status == 503 and answers[0].code == "unavailable"
    assert {a.status for a in answers} <= {200, 503}
    assert max(a.took for a in answers) < 0.1 + 1.0
    await rig.gateway.back_within(BACK_S)
    await rig.sigterm()


async def test_a_connection_cut_right_after_a_commit_is_sent(rig: Rig) -> None:
    fired = rig.proxy.cut_after(b"COMMIT\x00", "to_server")
    answer = await rig.gateway.write(1)
    assert fired.done()
    assert (answer.status, answer.code, answer.retry_after) == (502, "outcome_unknown", None)
    assert "may or may not" in answer.message
    async with asyncio.timeout(5.0):  # the server got the COMMIT and ran it
        while (await stored_ids(rig.pg.dsn, rig.gateway.table))[1] != 1:
            await asyncio.sleep(0.02)
    await rig.gateway.back_within(BACK_S)
    for i in range(2, 12):  # the gateway goes on, and never wrote the first one again
        assert (await rig.gateway.write(i)).status == 200
    assert await stored_ids(rig.pg.dsn, rig.gateway.table) == Counter(range(1, 12))
    await rig.sigterm()


async def test_a_connection_cut_in_the_middle_of_a_1m_row_export(rig: Rig) -> None:
    body = {"sql": "select g, repeat('x', 40) AS pad from generate_series(1, 1000000) g"}
    headers = {"Accept": "application/x-ndjson"}
    loop = asyncio.get_running_loop()
    lines: list[bytes] = []
    cut_at = 0.0
    with contextlib.suppress(aiohttp.ClientPayloadError):  # the response is cut short
        async with rig.gateway.http.post(
            rig.served.url + "/v1/query", json=body, headers=headers
        ) as resp:
            assert resp.status == 200
            async for line in resp.content:
                lines.append(line)
                if len(lines) == 20_000:
                    assert rig.proxy.cut() >= 1
                    cut_at = loop.time()
    ended = loop.time() - cut_at
    print(f"{len(lines)} lines; the stream ended {ended:.3f} s after the cut")
    assert cut_at and ended < 1.0
    assert len(lines) < 1_000_000
    last = orjson.loads(lines[-1]) if lines[-1].startswith(b'{"error"') else None
    assert last is None or last["error"]["code"] in {"unavailable", "outcome_unknown"}
    await rig.gateway.back_within(BACK_S)
    await rig.sigterm()
