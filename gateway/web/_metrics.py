"""``GET /metrics``: the gateway's figures in Prometheus' text format, by prometheus-client.

Nothing here is counted on a request's way: the engine keeps plain counters
(`gateway.engine._metrics`, the dispatcher's `stats`, psycopg_pool's), the
front end keeps `HttpMetrics`, and `collect` turns them into metric families
when ``/metrics`` is scraped. prometheus-client's own metric objects would
take a lock and a label lookup per request.

Label values come from bounded sets only: route patterns, HTTP methods and
statuses, the gateway's error codes, PostgreSQL's SQLSTATE classes, output
formats, connection numbers. Never SQL text or anything a client typed.

Several processes (``PGQG_METRICS_DIR``, or prometheus-client's own
``PROMETHEUS_MULTIPROC_DIR``): each writes its figures into prometheus-client's
multiprocess files in that folder every `PUBLISH_INTERVAL_S` and before it
answers a scrape, and answers with the figures of all of them added up by
prometheus-client's `MultiProcessCollector` (counters and histograms summed,
also those of processes that exited; gauges summed over the live ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import AbstractRoute
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from .._errors import GatewayError
from ..engine._dispatcher import Dispatcher
from ..engine._listener import Listener
from ..engine._metrics import LATENCY_BOUNDS_S, Buckets

if TYPE_CHECKING:  # _observe imports this module
    from ._observe import Exchange

#: the one target so far; read replicas (DESIGN §8, Scale) will be others
PRIMARY = "primary"
#: how often a process of several writes its figures for the others' scrapes
PUBLISH_INTERVAL_S = 1.0
#: PostgreSQL's SQLSTATE classes (Appendix A); any other (a RAISE with a code of
#: its own) is counted as "other", so a client cannot make up label values
SQLSTATE_CLASSES = frozenset(
    {
        *("00", "01", "02", "03", "08", "09", "0A", "0B", "0F", "0L", "0P", "0Z"),
        *("20", "21", "22", "23", "24", "25", "26", "27", "28", "2B", "2D", "2F"),
        *("34", "38", "39", "3B", "3D", "3F", "40", "42", "44", "53", "54", "55"),
        *("57", "58", "72", "F0", "HV", "P0", "XX"),
    }
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetrics:
    """The front end's counters, kept by `gateway.web._observe.observe_middleware`.

    A request costs one dict lookup and one histogram observation here: its
    count by (method, route, status) is its histogram's count, and the duration
    histogram by (method, route) is added up over the statuses at scrape time
    (`requests`, `durations`).
    """

    __slots__ = (
        "answers",
        "cancellations",
        "errors",
        "queue_wait",
        "routes",
        "sent_by_format",
        "sqlstate_classes",
    )

    def __init__(self) -> None:
        #: (method, route, status): the durations of the requests answered so, from
        #: each one's arrival to its answer
        self.answers: dict[tuple[str, str, int], Buckets] = {}
        #: from a query's submission until a connection took it
        self.queue_wait = Buckets(LATENCY_BOUNDS_S)
        self.errors: dict[str, int] = {}
        self.sqlstate_classes: dict[str, int] = {}
        self.cancellations = 0
        #: format: [rows, bytes] sent in query answers
        self.sent_by_format: dict[str, list[int]] = {}
        #: the app's routes' labels: two property calls fewer a request than `route_of`
        self.routes: dict[AbstractRoute, str] = {}

    def answered(
        self, request: web.Request, exchange: Exchange, status: int, seconds: float
    ) -> str:
        """Count a request answered with `status` after `seconds`; returns its route.

        Everything metrics cost a request happens in here (bench/run.py's profile
        counts the samples in `HttpMetrics`' methods as that cost).
        """
        matched = request.match_info.route
        route = self.routes.get(matched)
        if route is None:
            route = self._route_of(matched)
        self.request(request.method, route, status, seconds)
        job = exchange.job
        if job is not None and job.started_at:
            self.queue_wait.observe(job.started_at - exchange.submitted)
        if exchange.error is not None:
            self.error(exchange.error)
        if exchange.cancelled:
            self.cancellations += 1
        fmt = exchange.format
        if fmt:  # a query's answer: its rows and bytes (inline: a call costs as much)
            totals = self.sent_by_format.get(fmt)
            if totals is None:
                totals = self.sent_by_format[fmt] = [0, 0]
            totals[0] += exchange.rows
            totals[1] += exchange.bytes
        return route

    def _route_of(self, matched: AbstractRoute) -> str:
        """`route_of` for a route not in `routes` yet; remembers the app's own routes.

        A request no route matched has a route object of its own: never remembered.
        """
        resource = matched.resource
        if resource is None:
            return "unmatched"
        route = self.routes[matched] = resource.canonical
        return route

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        answers = self.answers.get((method, route, status))
        if answers is None:
            answers = self._answers_of(method, route, status)
        answers.observe(seconds)

    def _answers_of(self, method: str, route: str, status: int) -> Buckets:
        """The histogram of a key not seen yet, or of a method no label is made of.

        Such a method is counted as "other" and never becomes a key of its own, so
        a client cannot grow the label set (it takes this slower way each time).
        """
        if method not in _METHODS:
            method = "other"
        key = (method, route, status)
        answers = self.answers.get(key)
        if answers is None:
            answers = self.answers[key] = Buckets(LATENCY_BOUNDS_S)
        return answers

    def requests(self) -> dict[tuple[str, str, int], int]:
        """(method, route, status): requests answered."""
        return {key: answers.count for key, answers in self.answers.items()}

    def durations(self) -> dict[tuple[str, ...], Buckets]:
        """(method, route): the durations of their requests, whatever the status."""
        merged: dict[tuple[str, ...], Buckets] = {}
        for (method, route, _), answers in self.answers.items():
            into = merged.get((method, route))
            if into is None:
                into = merged[method, route] = Buckets(LATENCY_BOUNDS_S)
            into.add(answers)
        return merged

    def error(self, error: GatewayError) -> None:
        self.errors[error.code] = self.errors.get(error.code, 0) + 1
        if error.sqlstate:
            cls = error.sqlstate[:2]
            if cls not in SQLSTATE_CLASSES:
                cls = "other"
            self.sqlstate_classes[cls] = self.sqlstate_classes.get(cls, 0) + 1


def route_of(request: web.Request) -> str:
    """The route's pattern (``/v1/queries/{name}``): a bounded label, never the
    path a client typed; "unmatched" for a path or method no route has."""
    resource = request.match_info.route.resource
    return "unmatched" if resource is None else resource.canonical


# --- the metric families -----------------------------------------------------------------


def collect(
    http: HttpMetrics,
    dispatcher: Dispatcher | None,
    pool_stats: dict[str, int] | None,
    listener: Listener | None = None,
) -> list[Metric]:
    """Every metric family, read from the counters as they are now.

    `dispatcher`, `pool_stats` and `listener` are None until their contexts have started.
    """
    families = list(_http_families(http))
    if dispatcher is not None:
        families.extend(_dispatcher_families(dispatcher))
    if pool_stats is not None:
        families.extend(_pool_families(pool_stats))
    if listener is not None:
        families.extend(_listener_families(listener))
    return families


def _counter(name: str, doc: str, labels: list[str], values: Mapping[Any, float]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric([str(k) for k in (key if isinstance(key, tuple) else (key,))], value)
    return family


def _histogram(
    name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], Buckets]
) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, buckets in sorted(values.items()):
        cumulative = [(_le(bound), count) for bound, count in buckets.cumulative()]
        family.add_metric(list(key), cumulative, sum_value=buckets.sum)
    return family


def _le(bound: float) -> str:
    """A bucket's bound as Prometheus writes it: ``0.005``, ``1.0``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else repr(bound)


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def _http_families(http: HttpMetrics) -> Iterator[Metric]:
    yield _counter(
        "pgqg_requests",
        "HTTP requests answered, by method, route pattern and status"
        " (499: the client went away first).",
        ["method", "route", "status"],
        http.requests(),
    )
    yield _histogram(
        "pgqg_request_duration_seconds",
        "From a request's arrival to its answer (a stream: to its last row).",
        ["method", "route"],
        http.durations(),
    )
    yield _histogram(
        "pgqg_queue_wait_seconds",
        "How long a query waited in the dispatcher's queue for a connection.",
        [],
        {(): http.queue_wait},
    )
    yield _counter(
        "pgqg_errors",
        "Error answers (and streams cut by an error), by the gateway's error code.",
        ["code"],
        http.errors,
    )
    yield _counter(
        "pgqg_sqlstate_errors",
        "Error answers carrying a SQLSTATE, by its class (the first two characters).",
        ["class"],
        http.sqlstate_classes,
    )
    yield _counter(
        "pgqg_cancellations",
        "Requests whose client went away before the whole answer was sent"
        " (their queries are cancelled on the server).",
        [],
        {(): http.cancellations},
    )
    sent = http.sent_by_format
    yield _counter(
        "pgqg_rows_sent",
        "Rows sent in query answers, by format.",
        ["format"],
        {fmt: rows for fmt, (rows, _) in sent.items()},
    )
    yield _counter(
        "pgqg_bytes_sent",
        "Bytes of query answers' bodies, by format.",
        ["format"],
        {fmt: size for fmt, (_, size) in sent.items()},
    )


def _dispatcher_families(dispatcher: Dispatcher) -> Iterator[Metric]:
    stats = dispatcher.stats()
    yield _gauge("pgqg_queue_depth", "Jobs waiting for a connection.", stats["queue"]["depth"])
    yield _gauge(
        "pgqg_queue_capacity",
        "Jobs that may wait beyond the running ones (PGQG_QUEUE_SIZE); more get 503.",
        stats["queue"]["capacity"],
    )
    yield _gauge("pgqg_jobs_running", "Jobs on a connection now.", stats["running"])
    yield _gauge("pgqg_ready", "1 while a pooled connection works (/readyz).", stats["ready"])
    states = GaugeMetricFamily(
        "pgqg_connections",
        "Connection workers by target and state: busy (running a batch), idle,"
        " connecting (no connection yet, or reconnecting).",
        labels=["target", "state"],
    )
    counts = {"busy": 0, "idle": 0, "connecting": 0}
    for conn in stats["connections"]:
        state = "connecting" if not conn["connected"] else "busy" if conn["busy"] else "idle"
        counts[state] += 1
    for state, count in counts.items():
        states.add_metric([PRIMARY, state], count)
    yield states
    per_connection = [
        ("pgqg_connection_jobs", "Jobs run, by connection.", "jobs"),
        ("pgqg_connection_batches", "Round trips (pipelined batches), by connection.", "batches"),
        ("pgqg_connection_errors", "Jobs that ended in an error, by connection.", "errors"),
        ("pgqg_connection_busy_seconds", "Time each connection spent running batches.", "busy_s"),
    ]
    for name, doc, key in per_connection:
        yield _counter(
            name,
            doc,
            ["target", "connection"],
            {(PRIMARY, conn["id"]): conn[key] for conn in stats["connections"]},
        )
    engine = dispatcher.metrics
    yield _histogram(
        "pgqg_batch_jobs",
        "Jobs per pipelined batch (one round trip; a stream runs alone).",
        [],
        {(): engine.batch_jobs},
    )
    yield _counter(
        "pgqg_deadline_expiries",
        "Jobs whose deadline passed, by where they were: queued (never run)"
        " or running (their queries were cancelled).",
        ["stage"],
        {"queued": engine.expired_queued, "running": engine.expired_running},
    )


def _pool_families(pool: dict[str, int]) -> Iterator[Metric]:
    opened = pool.get("connections_num", 0) - pool.get("connections_errors", 0)
    yield _counter(
        "pgqg_pool_reconnects",
        "Connections opened beyond the pool's first fill: to replace one that was"
        " lost, broken or past its lifetime.",
        [],
        {(): max(opened - pool.get("pool_min", 0), 0)},
    )
    yield _counter(
        "pgqg_pool_connect_errors",
        "Connection attempts that failed.",
        [],
        {(): pool.get("connections_errors", 0)},
    )
    yield _counter(
        "pgqg_pool_connections_lost",
        "Connections found broken by the pool (in a check or when handed back).",
        [],
        {(): pool.get("connections_lost", 0) + pool.get("returns_bad", 0)},
    )


# --- several processes ----------------------------------------------------------------------


#: how each gauge adds up over processes (prometheus-client's multiprocess modes)
_GAUGE_MODE = "livesum"


def _listener_families(listener: Listener) -> Iterator[Metric]:
    counts = listener.counters
    yield _gauge(
        "pgqg_listen_subscribers",
        "Event streams open at /v1/listen.",
        listener.subscribers,
    )
    for name, doc, value in (
        ("received", "Notifications received on the LISTEN connection.", counts.received),
        ("delivered", "Notification events sent to a subscriber.", counts.delivered),
        (
            "dropped",
            "Notification events a subscriber did not get (its buffer was full, or its"
            " stream ended with them buffered).",
            counts.dropped,
        ),
        (
            "slow_subscribers",
            "Subscribers dropped because their buffer overflowed.",
            counts.slow_subscribers,
        ),
        (
            "reconnects",
            "Times the LISTEN connection was opened again after it was lost.",
            counts.reconnects,
        ),
    ):
        yield _counter(f"pgqg_listen_{name}", doc, [], {(): value})


class SharedMetrics:
    """This process's figures in prometheus-client's multiprocess files in `directory`.

    One file per metric type, named after `ident` (unique per process:
    prometheus-client reads the part after the last underscore as its id).
    `close` removes the gauges' file: a stopped process no longer counts in
    them, while its counters and histograms stay in the totals.
    """

    def __init__(self, directory: Path, ident: str | None = None) -> None:
        self.directory = directory
        self.ident = ident or f"{os.getpid()}-{secrets.token_hex(3)}"
        self._files: dict[str, MmapedDict] = {}

    def publish(self, families: Iterable[Metric]) -> None:
        """Write every sample of `families` (absolute values) into this process's files."""
        for family in families:
            file = self._file(family.type)
            previous: dict[tuple[tuple[str, str], ...], float] = {}
            for sample in family.samples:
                labels = dict(sample.labels)
                value = sample.value
                if sample.name.endswith("_count") and family.type == "histogram":
                    continue  # prometheus-client counts the buckets itself
                if sample.name.endswith("_bucket"):
                    # the files hold each bucket's own count, not the running total
                    others = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                    value, previous[others] = value - previous.get(others, 0.0), value
                names, values = list(labels), list(labels.values())
                key = mmap_key(family.name, sample.name, names, values, family.documentation)
                file.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]

    def _file(self, kind: str) -> MmapedDict:
        prefix = f"gauge_{_GAUGE_MODE}" if kind == "gauge" else kind
        file = self._files.get(prefix)
        if file is None:
            path = self.directory / f"{prefix}_{self.ident}.db"
            file = self._files[prefix] = MmapedDict(str(path))  # type: ignore[no-untyped-call]
        return file

    def scrape(self, accept: str | None) -> tuple[bytes, str]:
        """All processes' figures added up, encoded as `accept` asks."""
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        return _encode(registry, accept)

    def close(self) -> None:
        """Close the files and remove the gauges'; harmless twice."""
        for file in self._files.values():
            file.close()  # type: ignore[no-untyped-call]
        self._files.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"gauge_{_GAUGE_MODE}_{self.ident}.db").unlink()


def reset_shared_metrics(directory: Path) -> None:
    """Remove earlier runs' multiprocess files from `directory`, as prometheus-client
    asks when the whole service starts (or totals go on from the last run)."""
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)


def forget_process(directory: Path, pid: int) -> None:
    """Remove the gauges of process `pid`, which died without `SharedMetrics.close`
    (its counters and histograms stay in the totals)."""
    for path in directory.glob(f"gauge_{_GAUGE_MODE}_{pid}-*.db"):
        path.unlink(missing_ok=True)


# --- the endpoint ------------------------------------------------------------------------------


class _Families(Collector):
    """A collector of families already collected."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _encode(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def encode_families(families: list[Metric], accept: str | None) -> tuple[bytes, str]:
    """`families` in the exposition format `accept` asks for (text 0.0.4 by default,
    OpenMetrics for a scraper that asks for it); returns (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return _encode(registry, accept)


class MetricsSource:
    """What ``/metrics`` reads: the front end's counters and, while the database
    context runs, the dispatcher and the pool; with several processes, the
    shared folder too."""

    def __init__(self, http: HttpMetrics, shared: SharedMetrics | None = None) -> None:
        self.http = http
        self.shared = shared
        self._dispatcher: Dispatcher | None = None
        self._pool: AsyncConnectionPool[Any] | None = None
        self._listener: Listener | None = None

    def attach(
        self,
        dispatcher: Dispatcher | None,
        pool: AsyncConnectionPool[Any] | None,
        listener: Listener | None = None,
    ) -> None:
        """Read the engine's figures too (None, None: no longer)."""
        self._dispatcher, self._pool, self._listener = dispatcher, pool, listener

    def families(self) -> list[Metric]:
        pool = self._pool.get_stats() if self._pool is not None else None
        return collect(self.http, self._dispatcher, pool, self._listener)

    def scrape(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition, as `accept` asks; returns (body, content type)."""
        families = self.families()
        if self.shared is None:
            return encode_families(families, accept)
        self.shared.publish(families)
        return self.shared.scrape(accept)

    async def publish_periodically(self) -> None:
        """With several processes: publish every `PUBLISH_INTERVAL_S` until cancelled."""
        assert self.shared is not None
        while True:
            self.shared.publish(self.families())
            await asyncio.sleep(PUBLISH_INTERVAL_S)


def start_publishing(source: MetricsSource) -> asyncio.Task[None] | None:
    """With several processes, publish for the others while the app runs (until
    `stop_publishing`); None when this process is alone."""
    if source.shared is None:
        return None
    return asyncio.create_task(source.publish_periodically(), name="pgqg-metrics-publish")


async def stop_publishing(source: MetricsSource, task: asyncio.Task[None] | None) -> None:
    """Publish once more, then close: this process's gauges leave the totals.

    A plain function, not a context manager: an async generator nested in the
    cleanup context's would be closed on its own when the loop shuts down
    (``generator didn't stop after athrow()``)."""
    if task is None or source.shared is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    source.shared.publish(source.families())
    source.shared.close()


def metrics_handler(source: MetricsSource) -> Handler:
    """The ``GET /metrics`` handler reading `source`."""

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = source.scrape(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics
