"""The pool while the database is unreachable: one log line per retry, backing off.

Outages run on an embedded PostgreSQL of the test's own. Every wait is for a
condition (a log line, ``/readyz``), bounded generously; no test measures time.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest
from support import GatewayClient

from gateway.engine._pool import RETRY_FIRST_S, RETRY_MAX_S

UNREACHABLE = re.compile(r"database unreachable: .+; retrying in (?P<delay>[0-9.]+) s")
BACK = re.compile(r"database reachable again, after [0-9.]+ s")
WAIT_S = 60.0  # generous: a loaded two-core machine, a server starting


async def logged(
    caplog: pytest.LogCaptureFixture, wanted: Callable[[list[str]], bool]
) -> list[str]:
    """The WARNING+ messages so far, once `wanted` holds of them; fails after `WAIT_S`.

    The access log is left out: a line per request is its purpose, outage or not.
    """
    async with asyncio.timeout(WAIT_S):
        while True:
            messages = [
                r.getMessage()
                for r in caplog.records
                if r.levelno >= logging.WARNING and r.name != "gateway.access"
            ]
            if wanted(messages):
                return messages
            await asyncio.sleep(0.05)


def retries(messages: list[str]) -> list[float]:
    return [float(m["delay"]) for m in map(UNREACHABLE.fullmatch, messages) if m]


async def ready(client: GatewayClient) -> None:
    async with asyncio.timeout(WAIT_S):
        while (await client.get("/readyz")).status != 200:
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_an_outage_logs_one_line_per_retry_and_one_when_it_ends(
    embedded_factory: Any, gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    pg = embedded_factory()
    client = await gateway_factory(dsn=pg.dsn, pool_size=8)
    await asyncio.to_thread(pg.stop)
    # a request notices the outage at once, the idle connections as the server goes
    await client.post("/v1/query", json={"sql": "select 1"})
    await logged(caplog, lambda ms: len(retries(ms)) >= 4)
    await asyncio.to_thread(pg.start)
    messages = await logged(caplog, lambda ms: any(map(BACK.fullmatch, ms)))
    await ready(client)

    # nothing but the pool's own lines: not psycopg_pool's per connection and
    # attempt, nor one per connection worker
    assert all(UNREACHABLE.fullmatch(m) or BACK.fullmatch(m) for m in messages), messages
    assert sum(1 for m in messages if BACK.fullmatch(m)) == 1
    assert BACK.fullmatch(messages[-1])
    # the delay doubles from the first to the longest, and stays there
    delays = retries(messages)
    expected = [RETRY_FIRST_S]
    while len(expected) < len(delays):
        expected.append(min(expected[-1] * 2, RETRY_MAX_S))
    assert delays == expected
    assert (await client.post("/v1/query", json={"sql": "select 1 AS one"})).status == 200


async def test_closing_the_gateway_stops_its_retries(
    gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    client = await gateway_factory(dsn="postgresql://nobody@127.0.0.1:9/none", wait_ready=False)
    await logged(caplog, lambda ms: len(retries(ms)) >= 1)
    await client.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().endswith("-retry")]
    # a gateway that never reached its database has nothing to say of coming back
    assert not any(BACK.fullmatch(r.getMessage()) for r in caplog.records)
