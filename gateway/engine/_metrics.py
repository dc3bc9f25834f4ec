"""The engine's own counters: plain numbers, cheap to keep on the request path.

`/v1/stats`, ``/metrics`` and ``Server-Timing`` all read these (and the job's
timestamps); none keeps figures of its own. Turning them into Prometheus
metric families happens at scrape time, in the front end (``gateway.web._metrics``),
so a job costs an addition or two here, never a lock or a label lookup.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

#: latency buckets (seconds), sub-millisecond to 30 s: a pipelined point select
#: takes tens of microseconds on the server, a statement may run up to its timeout
LATENCY_BOUNDS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: jobs per pipelined batch: 1 up to ``max_batch``'s upper bound (1024)
BATCH_BOUNDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)


class Buckets:
    """A histogram as plain counts: how many values fell at or below each bound.

    `counts[i]` counts the values in (bounds[i-1], bounds[i]]; the last count
    is the values above every bound (Prometheus' ``+Inf``). Not cumulative:
    an observation is one bisection and two additions.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add(self, other: Buckets) -> None:
        """Count `other`'s values too (the same bounds)."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> Iterator[tuple[float, int]]:
        """(upper bound, values at or below it), ending with (inf, all of them)."""
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            yield bound, total


class EngineMetrics:
    """What only the dispatcher sees: batch sizes and deadline expiries."""

    __slots__ = ("batch_jobs", "expired_queued", "expired_running")

    def __init__(self) -> None:
        #: jobs per pipelined batch (a round trip; a stream is a batch of one)
        self.batch_jobs = Buckets(BATCH_BOUNDS)
        #: jobs whose deadline passed while they waited for a connection
        self.expired_queued = 0
        #: jobs whose deadline passed while they ran (their queries were cancelled)
        self.expired_running = 0
