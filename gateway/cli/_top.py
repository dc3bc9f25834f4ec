"""``pgqg top``: a live view of a running gateway, redrawn every second.

Each frame comes from two samples of the gateway's own figures, a second
apart: ``/v1/stats`` (the queue, every connection's load) and ``/metrics``
(requests, errors and the request-duration histogram, whose bucket counts
over the second give the latency percentiles, as Prometheus'
``histogram_quantile`` does). Rates are the differences over that second.
Without ``/metrics`` (``PGQG_METRICS=false``) the view shows what
``/v1/stats`` has.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._client import GatewayClient, GatewayRefused, GatewayUnreachable

__all__ = ["Sample", "frame", "percentile", "run_top", "take_sample"]

#: the gateway's own housekeeping routes: not counted as its load
HOUSEKEEPING = frozenset({"/metrics", "/v1/stats", "/healthz", "/readyz", "/openapi.json"})
PERCENTILES = (0.5, 0.9, 0.99)
#: a sample waits at most this long for the gateway
FETCH_TIMEOUT_S = 2.0


@dataclass(slots=True)
class Sample:
    """The gateway's figures at one moment."""

    at: float
    stats: dict[str, Any]
    #: None when ``/metrics`` is off
    requests: float | None = None
    errors: float | None = None
    #: the request-duration histogram over the non-housekeeping routes: le -> count
    durations: dict[float, float] = field(default_factory=dict)


def take_sample(client: GatewayClient) -> Sample:
    """Read ``/v1/stats`` and ``/metrics`` now.

    Raises:
        GatewayUnreachable: the gateway did not answer (or not as a gateway).
        GatewayRefused: ``/v1/stats`` answered with an error.
    """
    try:
        stats = orjson.loads(client.get("/v1/stats"))
    except orjson.JSONDecodeError:
        raise GatewayUnreachable(f"{client.url}/v1/stats is not a gateway's JSON") from None
    sample = Sample(time.monotonic(), stats)
    try:
        text = client.get("/metrics").decode()
    except GatewayRefused:
        return sample  # metrics are off
    _read_metrics(sample, text)
    return sample


def _read_metrics(sample: Sample, text: str) -> None:
    requests = errors = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pgqg_requests_total" and s.labels.get("route") not in HOUSEKEEPING:
                requests += s.value
            elif s.name == "pgqg_errors_total":
                errors += s.value
            elif (
                s.name == "pgqg_request_duration_seconds_bucket"
                and s.labels.get("route") not in HOUSEKEEPING
            ):
                le = float(s.labels["le"])
                sample.durations[le] = sample.durations.get(le, 0.0) + s.value
    sample.requests, sample.errors = requests, errors


def percentile(q: float, buckets: dict[float, float]) -> float | None:
    """The `q` quantile (0..1) of a cumulative histogram {upper bound: count}, by
    linear interpolation inside its bucket; None without observations. A value
    in the ``+Inf`` bucket is given as the largest finite bound."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def _delta(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    return {le: count - old.get(le, 0.0) for le, count in new.items()}


def _rate(new: float | None, old: float | None, seconds: float) -> str:
    if new is None or old is None or seconds <= 0:
        return "-"
    return f"{max(new - old, 0) / seconds:,.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def frame(url: str, old: Sample, new: Sample) -> RenderableType:
    """One screen: the summary, then a row per connection."""
    seconds = new.at - old.at
    stats = new.stats
    queue = stats["queue"]
    jobs_new = sum(c["jobs"] for c in stats["connections"])
    jobs_old = sum(c["jobs"] for c in old.stats["connections"])
    header = Text.assemble((f"pgqg top  {url}   ", "bold"), _readiness(stats["ready"]))
    summary = Table.grid(padding=(0, 3))
    summary.add_row(
        f"queue {queue['depth']}/{queue['capacity']}",
        f"running {stats['running']}",
        f"jobs per batch {stats['jobs_per_batch']}",
    )
    summary.add_row(
        f"requests/s {_rate(new.requests, old.requests, seconds)}",
        f"jobs/s {_rate(jobs_new, jobs_old, seconds)}",
        f"errors/s {_rate(new.errors, old.errors, seconds)}",
    )
    if new.requests is None:
        summary.add_row("latency: /metrics is off on this gateway (PGQG_METRICS)")
    else:
        recent = _delta(new.durations, old.durations)
        summary.add_row(
            *(f"p{round(q * 100)} {_ms(percentile(q, recent))} ms" for q in PERCENTILES)
        )
    return Group(header, summary, Text(""), _connections(old, new, seconds))


def _readiness(ready: bool) -> Text:
    return Text("ready", style="green") if ready else Text("NOT READY", style="red")


def _connections(old: Sample, new: Sample, seconds: float) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for title in ("conn", "state", "backend", "jobs/s", "busy %", "jobs", "batches", "errors"):
        table.add_column(title, justify="left" if title in ("state",) else "right")
    before = {c["id"]: c for c in old.stats["connections"]}
    for conn in new.stats["connections"]:
        prev = before.get(conn["id"], conn)
        state = "connecting" if not conn["connected"] else "busy" if conn.get("busy") else "idle"
        busy = (conn["busy_s"] - prev["busy_s"]) / seconds * 100 if seconds > 0 else 0.0
        table.add_row(
            str(conn["id"]),
            state,
            str(conn["backend_pid"] or "-"),
            _rate(conn["jobs"], prev["jobs"], seconds),
            f"{min(max(busy, 0.0), 100.0):.0f}",
            str(conn["jobs"]),
            str(conn["batches"]),
            str(conn["errors"]),
        )
    return table


def _unreachable(url: str, reason: str) -> RenderableType:
    return Text(f"pgqg top  {url}\n\n{reason}; trying again every second", style="yellow")


def run_top(url: str, *, interval: float = 1.0, once: bool = False, console: Console) -> None:
    """Show the gateway at `url` until Ctrl-C; `once`: print one frame and return.

    Raises:
        GatewayUnreachable, GatewayRefused: with `once`, the gateway did not answer.
    """
    client = GatewayClient(url, timeout=FETCH_TIMEOUT_S)
    if once:
        old = take_sample(client)
        time.sleep(interval)
        console.print(frame(client.url, old, take_sample(client)))
        return
    # Ctrl-C sets a flag the loop reads between frames: a KeyboardInterrupt raised
    # wherever the main thread happens to be (inside the terminal library, say)
    # once left `pgqg top` hanging instead of leaving
    # (a plain flag: an Event set from a handler can deadlock on its own lock)
    stop = _Flag()
    previous = signal.signal(signal.SIGINT, stop.set)
    try:
        with Live(console=console, auto_refresh=False) as live:
            for view in _views(client, interval, stop):
                live.update(view, refresh=True)
    finally:
        signal.signal(signal.SIGINT, previous)


class _Flag:
    """Raised by a signal handler, read by the loop."""

    raised = False

    def set(self, _signum: int, _frame: object) -> None:
        self.raised = True


def _views(client: GatewayClient, interval: float, stop: _Flag) -> Iterable[RenderableType]:
    """A frame every `interval` seconds until `stop` is set (the last sample is
    shown); a gateway that does not answer is shown as such, and sampled again."""
    old: Sample | None = None
    while not stop.raised:
        try:
            new = take_sample(client)
        except (GatewayUnreachable, GatewayRefused) as exc:
            old = None
            yield _unreachable(client.url, str(exc))
        else:
            yield Text("sampling…") if old is None else frame(client.url, old, new)
            old = new
        time.sleep(interval)
