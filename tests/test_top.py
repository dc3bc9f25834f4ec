"""``pgqg top`` (gateway.cli._top): frames from a running gateway's figures."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner, Result
from conftest import ClientFactory
from support import REPO, GatewayClient, free_port, query

from gateway.cli._commands import main
from gateway.cli._top import percentile


def pgqg(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="pgqg")


def url_of(client: GatewayClient) -> str:
    return str(client.make_url("")).rstrip("/")


def test_percentiles_interpolate_inside_their_bucket() -> None:
    # 10 values: 4 at or below 1 ms, 4 more at or below 2 ms, 2 above 10 ms
    buckets = {0.001: 4.0, 0.002: 8.0, 0.01: 8.0, float("inf"): 10.0}
    assert percentile(0.5, buckets) == pytest.approx(0.00125)
    assert percentile(0.2, buckets) == pytest.approx(0.0005)
    assert percentile(0.99, buckets) == 0.01  # in +Inf: the largest finite bound
    assert percentile(0.5, {0.001: 0.0, float("inf"): 0.0}) is None
    assert percentile(0.5, {}) is None


async def test_once_prints_the_queue_connections_and_latencies(
    gateway_factory: ClientFactory,
) -> None:
    client = await gateway_factory(pool_size=2)
    load = asyncio.create_task(_load(client, seconds_of_sleep=0.6))
    result = await asyncio.to_thread(
        pgqg, "top", "--url", url_of(client), "--once", "--interval", "0.5"
    )
    await load
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"pgqg top  {url_of(client)}" in out and "ready" in out
    assert "queue 0/256" in out or "queue " in out
    for word in ("requests/s", "jobs/s", "errors/s", "p50", "p90", "p99", "conn", "busy %"):
        assert word in out, word
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"]  # one row per connection
    assert all(row[1] in ("busy", "idle", "connecting") for row in rows)


async def _load(client: GatewayClient, seconds_of_sleep: float) -> None:
    """Some queries while top samples: quick ones, and one that holds a connection."""
    await asyncio.gather(
        query(client, "select pg_sleep($1::float8)", seconds_of_sleep),
        *(query(client, "select $1::int", i) for i in range(20)),
    )


async def test_without_metrics_it_shows_what_stats_has(gateway_factory: ClientFactory) -> None:
    client = await gateway_factory(metrics=False)
    result = await asyncio.to_thread(
        pgqg, "top", "--url", url_of(client), "--once", "--interval", "0.1"
    )
    assert result.exit_code == 0, result.output
    assert "/metrics is off" in result.stdout and "jobs/s" in result.stdout


def test_an_unreachable_gateway_fails_with_one_line() -> None:
    result = pgqg("top", "--url", f"http://127.0.0.1:{free_port()}", "--once")
    assert result.exit_code == 1
    assert "cannot reach the gateway" in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
async def test_ctrl_c_leaves_cleanly(gateway_factory: ClientFactory) -> None:
    client = await gateway_factory()
    top = _start_top(url_of(client))
    try:
        # it has drawn frames once the gateway has answered it a few times
        async with asyncio.timeout(30):
            while await _stats_requests(client) < 3:
                assert top.poll() is None, top.communicate()
                await asyncio.sleep(0.05)
        top.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(top.communicate, timeout=20)
    finally:
        if top.poll() is None:
            top.kill()
            top.communicate()  # closes the pipes: no ResourceWarning in a later test
    assert top.returncode == 0, err
    assert "Traceback" not in err and "pgqg top" in out  # the last frame stays


def _start_top(url: str) -> subprocess.Popen[str]:
    """``pgqg top`` in a process of its own, its output in pipes (not a terminal)."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "top", "--url", url, "--interval", "0.1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
    )


async def _stats_requests(client: GatewayClient) -> float:
    text = await (await client.get("/metrics")).text()
    prefix = 'pgqg_requests_total{method="GET",route="/v1/stats",status="200"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))
