"""``GET /metrics`` (gateway.web._metrics, gateway.engine._metrics): parsed with
prometheus-client's own parser, its counters watched as requests, errors,
cancellations and reconnections happen."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import ClientFactory
from prometheus_client.parser import text_string_to_metric_families
from support import (
    GatewayClient,
    get_stats,
    moved,
    query,
    scrape,
    settled_stats,
    value,
    wait_for_metric,
    wait_until_ready,
)

from gateway import create_app, load_settings
from gateway.engine._metrics import LATENCY_BOUNDS_S, Buckets
from gateway.web._metrics import HttpMetrics, SharedMetrics, collect

QUERY = {"method": "POST", "route": "/v1/query"}


# --- the engine's counters, as numbers ---------------------------------------------------


def test_buckets_count_each_value_once_at_its_upper_bound() -> None:
    buckets = Buckets((0.001, 0.01, 1.0))
    for v in (0.0005, 0.001, 0.002, 0.5, 7.0):
        buckets.observe(v)
    assert buckets.counts == [2, 1, 1, 1]  # 0.001 falls in "le 0.001"
    assert list(buckets.cumulative()) == [(0.001, 2), (0.01, 3), (1.0, 4), (float("inf"), 5)]
    assert buckets.count == 5 and buckets.sum == pytest.approx(7.5035)


def test_latency_buckets_span_sub_millisecond_to_thirty_seconds() -> None:
    assert LATENCY_BOUNDS_S[0] <= 0.0001 and LATENCY_BOUNDS_S[-1] == 30.0
    assert list(LATENCY_BOUNDS_S) == sorted(set(LATENCY_BOUNDS_S))


# --- the endpoint --------------------------------------------------------------------------


async def test_every_name_has_the_prefix_and_a_type(client: GatewayClient) -> None:
    resp = await client.get("/metrics")
    families = list(text_string_to_metric_families(await resp.text()))
    names = {f.name for f in families}
    assert all(name.startswith("pgqg_") for name in names), names
    assert {
        "pgqg_requests",
        "pgqg_request_duration_seconds",
        "pgqg_queue_wait_seconds",
        "pgqg_queue_depth",
        "pgqg_queue_capacity",
        "pgqg_connections",
        "pgqg_batch_jobs",
        "pgqg_errors",
        "pgqg_sqlstate_errors",
        "pgqg_rows_sent",
        "pgqg_bytes_sent",
        "pgqg_cancellations",
        "pgqg_deadline_expiries",
        "pgqg_pool_reconnects",
    } <= names
    types = {f.name: f.type for f in families}
    assert types["pgqg_requests"] == "counter"
    assert types["pgqg_request_duration_seconds"] == "histogram"
    assert types["pgqg_queue_depth"] == "gauge"


async def test_openmetrics_for_a_scraper_that_asks(client: GatewayClient) -> None:
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).endswith("# EOF\n")


async def test_requests_durations_queue_waits_and_rows_move(client: GatewayClient) -> None:
    before = await scrape(client)
    for i in range(5):
        status, _ = await query(client, "select g from generate_series(1, $1::int) g", i)
        assert status == 200
    resp = await client.post(
        "/v1/query", json={"sql": "select 1 AS one"}, headers={"Accept": "application/x-ndjson"}
    )
    assert resp.status == 200 and await resp.read() == b'{"one":1}\n'
    after = await scrape(client)
    assert moved(before, after, "pgqg_requests_total", **QUERY, status="200") == 6
    assert moved(before, after, "pgqg_request_duration_seconds_count", **QUERY) == 6
    assert moved(before, after, "pgqg_request_duration_seconds_bucket", **QUERY, le="+Inf") == 6
    assert moved(before, after, "pgqg_request_duration_seconds_sum", **QUERY) > 0
    assert moved(before, after, "pgqg_queue_wait_seconds_count") == 6
    assert moved(before, after, "pgqg_rows_sent_total", format="json") == 0 + 1 + 2 + 3 + 4
    assert moved(before, after, "pgqg_rows_sent_total", format="ndjson") == 1
    assert moved(before, after, "pgqg_bytes_sent_total", format="ndjson") == len(b'{"one":1}\n')
    assert moved(before, after, "pgqg_bytes_sent_total", format="json") > 0
    # the scrape before counts too: /metrics is a route like the others
    assert moved(before, after, "pgqg_requests_total", method="GET", route="/metrics", status="200")


async def test_errors_by_code_and_sqlstate_class(client: GatewayClient) -> None:
    before = await scrape(client)
    assert (await query(client, "select 1/0"))[0] == 400  # 22012
    assert (await query(client, "select * from no_such_table"))[0] == 400  # 42P01
    raise_custom = "do $$ begin raise exception 'mine' using errcode = 'ZZ123'; end $$"
    assert (await query(client, raise_custom))[0] == 500
    assert (await client.post("/v1/query", data=b"{", headers=_JSON)).status == 400
    assert (await client.get("/no/such/path")).status == 404
    after = await scrape(client)
    assert moved(before, after, "pgqg_errors_total", code="query_error") == 3
    assert moved(before, after, "pgqg_errors_total", code="bad_request") == 1
    assert moved(before, after, "pgqg_errors_total", code="not_found") == 1
    assert moved(before, after, "pgqg_sqlstate_errors_total", **{"class": "22"}) == 1
    assert moved(before, after, "pgqg_sqlstate_errors_total", **{"class": "42"}) == 1
    # a code PostgreSQL does not define is no label value of its own
    assert moved(before, after, "pgqg_sqlstate_errors_total", **{"class": "other"}) == 1
    assert moved(before, after, "pgqg_requests_total", **QUERY, status="400") == 3
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert moved(before, after, "pgqg_requests_total", **unmatched) == 1


_JSON = {"Content-Type": "application/json"}


async def test_labels_hold_route_patterns_never_what_a_client_sent(
    demo_client: GatewayClient,
) -> None:
    marker = f"m{uuid.uuid4().hex[:10]}"
    assert (await demo_client.get("/v1/queries/book_by_id", params={"id": "7"})).status == 200
    assert (await demo_client.get(f"/v1/queries/{marker}")).status == 404
    assert (await query(demo_client, f"select '{marker}' AS x"))[0] == 200
    assert (await demo_client.request("PROPFIND", f"/v1/query?{marker}=1")).status == 405
    text = await (await demo_client.get("/metrics")).text()
    assert marker not in text and "book_by_id" not in text
    samples = await scrape(demo_client)
    named = {"method": "GET", "route": "/v1/queries/{name}"}
    assert value(samples, "pgqg_requests_total", **named, status="200") == 1
    assert value(samples, "pgqg_requests_total", **named, status="404") == 1
    assert value(samples, "pgqg_requests_total", method="other", route="unmatched", status="405")


async def test_queue_and_connection_gauges(gateway_factory: ClientFactory) -> None:
    client = await gateway_factory(pool_size=3, queue_size=17)
    await settled_stats(client)
    samples = await scrape(client)
    assert value(samples, "pgqg_queue_capacity") == 17
    assert value(samples, "pgqg_queue_depth") == 0
    assert value(samples, "pgqg_ready") == 1
    states = {
        state: value(samples, "pgqg_connections", target="primary", state=state)
        for state in ("busy", "idle", "connecting")
    }
    assert sum(states.values()) == 3 and states["busy"] == 0


async def test_busy_connections_and_the_queue_while_queries_run(
    gateway_factory: ClientFactory,
) -> None:
    client = await gateway_factory(pool_size=1)
    slow = [asyncio.create_task(query(client, "select pg_sleep(1.5)"))]
    await wait_for_metric(client, "pgqg_jobs_running", 1)
    # the connection is taken: these wait in the queue
    slow += [asyncio.create_task(query(client, "select pg_sleep(0.1)")) for _ in range(2)]
    samples = await wait_for_metric(client, "pgqg_queue_depth", 2)
    assert value(samples, "pgqg_connections", target="primary", state="busy") == 1
    assert value(samples, "pgqg_jobs_running") == 1
    assert [(await t)[0] for t in slow] == [200, 200, 200]


async def test_batches_are_counted_by_their_jobs(gateway_factory: ClientFactory) -> None:
    client = await gateway_factory(pool_size=1)
    before = await scrape(client)
    # a statement seen once is known as quick after: the next ones ride together
    await asyncio.gather(*(query(client, "select $1::int", i) for i in range(40)))
    after = await scrape(client)
    jobs = moved(before, after, "pgqg_batch_jobs_sum")
    batches = moved(before, after, "pgqg_batch_jobs_count")
    assert jobs >= 40 and 1 <= batches <= jobs  # /metrics' own scrape runs no job
    stats = await get_stats(client)
    assert (
        value(after, "pgqg_connection_jobs_total", target="primary", connection="0")
        == (stats["connections"][0]["jobs"])
    )


async def test_deadline_expiries_queued_and_running(gateway_factory: ClientFactory) -> None:
    # with the cap close above the request's timeout, no server-side timeout is sent:
    # the gateway's own deadline sweep stops the query
    client = await gateway_factory(pool_size=1, statement_timeout_ms=3000)
    before = await scrape(client)
    running = asyncio.create_task(query(client, "select pg_sleep(10)", timeout_ms=2700))
    await wait_for_metric(client, "pgqg_jobs_running", 1)
    status, body = await query(client, "select 1", timeout_ms=200)  # waits behind it
    assert status == 504 and body["error"]["code"] == "timeout"
    status, body = await running
    assert status == 504 and body["error"]["code"] == "timeout"
    after = await scrape(client)
    assert moved(before, after, "pgqg_deadline_expiries_total", stage="queued") == 1
    assert moved(before, after, "pgqg_deadline_expiries_total", stage="running") == 1
    assert moved(before, after, "pgqg_errors_total", code="timeout") == 2


async def test_a_client_that_goes_away_is_a_cancellation(
    gateway_dsn: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    # as `pgqg serve` runs it: a handler is cancelled when its client disconnects
    settings = load_settings(dsn=gateway_dsn, pool_size=2)
    client = TestClient(TestServer(create_app(settings), handler_cancellation=True))
    await client.start_server()
    try:
        await wait_until_ready(client)
        before = await scrape(client)
        marker = f"gone_{uuid.uuid4().hex[:8]}"
        request = asyncio.create_task(
            client.post("/v1/query", json={"sql": f"select pg_sleep(30), '{marker}'"})
        )
        await _wait_for_backend(admin, marker, running=True)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await _wait_for_backend(admin, marker, running=False)  # cancelled on the server
        after = await wait_for_metric(client, "pgqg_cancellations_total", 1)
        assert moved(before, after, "pgqg_cancellations_total") == 1
        assert moved(before, after, "pgqg_requests_total", **QUERY, status="499") == 1
    finally:
        await client.close()


async def _wait_for_backend(
    admin: psycopg.AsyncConnection[Any], marker: str, *, running: bool, timeout: float = 20.0
) -> None:
    sql = "select count(*) from pg_stat_activity where query like %s and pid <> pg_backend_pid()"
    async with asyncio.timeout(timeout):
        while True:
            row = await (await admin.execute(sql, (f"%{marker}%",))).fetchone()
            if bool(row and row[0]) == running:
                return
            await asyncio.sleep(0.05)


async def test_pool_reconnects_after_its_connections_are_killed(
    gateway_factory: ClientFactory, admin: psycopg.AsyncConnection[Any]
) -> None:
    client = await gateway_factory(pool_size=2)
    before = await scrape(client)
    pids = [c["backend_pid"] for c in (await settled_stats(client))["connections"]]
    await admin.execute("select pg_terminate_backend(pid) from unnest(%s::int[]) pid", (pids,))
    async with asyncio.timeout(20):
        while (await query(client, "select 1"))[0] != 200:
            await asyncio.sleep(0.05)
    after = await wait_for_metric(client, "pgqg_pool_reconnects_total", 1)
    assert moved(before, after, "pgqg_pool_reconnects_total") >= 1


async def test_metrics_off(gateway_factory: ClientFactory) -> None:
    client = await gateway_factory(metrics=False)
    assert (await client.get("/metrics")).status == 404
    status, body = await query(client, "select 1 AS one")
    assert status == 200 and body["rows"] == [{"one": 1}]


# --- several processes --------------------------------------------------------------------


async def test_several_gateways_add_up_in_one_folder(
    gateway_factory: ClientFactory, tmp_path: Path
) -> None:
    first = await gateway_factory(pool_size=2, metrics_dir=tmp_path)
    second = await gateway_factory(pool_size=3, metrics_dir=tmp_path)
    for client, n in ((first, 3), (second, 2)):
        for _ in range(n):
            assert (await query(client, "select 1"))[0] == 200
    for client in (first, second):  # either one answers for both, within a second
        samples = await wait_for_metric(client, "pgqg_requests_total", 5, **QUERY, status="200")
        assert value(samples, "pgqg_requests_total", **QUERY, status="200") == 5
        assert value(samples, "pgqg_request_duration_seconds_count", **QUERY) == 5
        assert value(samples, "pgqg_queue_capacity") == 2 * 256
        live = sum(
            value(samples, "pgqg_connections", target="primary", state=state)
            for state in ("busy", "idle", "connecting")
        )
        assert live == 5
    await second.close()
    samples = await scrape(first)
    # a stopped process's counts stay in the totals; its connections leave the gauges
    assert value(samples, "pgqg_requests_total", **QUERY, status="200") == 5
    assert value(samples, "pgqg_queue_capacity") == 256


def test_shared_files_hold_each_bucket_once(tmp_path: Path) -> None:
    http = HttpMetrics()
    for seconds in (0.0002, 0.0002, 0.02, 50.0):
        http.request("POST", "/v1/query", 200, seconds)
    shared = [SharedMetrics(tmp_path, ident) for ident in ("a", "b")]
    for one in shared:
        one.publish(collect(http, None, None))
    text = shared[0].scrape(None)[0].decode()
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("pgqg_request_duration_seconds")
    }
    assert samples["pgqg_request_duration_seconds_bucket", "0.00025"] == 4
    assert samples["pgqg_request_duration_seconds_bucket", "0.025"] == 6
    assert samples["pgqg_request_duration_seconds_bucket", "30.0"] == 6
    assert samples["pgqg_request_duration_seconds_bucket", "+Inf"] == 8
    assert samples["pgqg_request_duration_seconds_count", None] == 8
    for one in shared:
        one.close()
        one.close()  # harmless twice
    assert not list(tmp_path.glob("gauge_*"))
