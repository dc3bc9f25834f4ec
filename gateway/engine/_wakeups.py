"""Which connection worker takes the queue next, and coalescing of cheap jobs.

Of several idle workers, the one idle the shortest time is woken (PgBouncer's
LIFO reuse): the connections that do the work stay few and warm (their
backends' caches, their processes on a CPU), and the others idle until load
needs them.

A job whose statement is known to be quick does not wake an idle worker while
another is already on its way to the queue (woken, or running a batch of quick
jobs that is due back): it rides that worker's next round trip. A batch of
quick jobs that is late hands the queue to idle workers (`drop_late`).

"Due back" depends on how far the database is. On a local one the shortest
recent batch of quick jobs is under `RIDE_S` even when the gateway is saturated
(0.3-1.4 ms on a 2-core machine at full load, busy loops beside it or not), and
riding always beats a second round trip. A network hop away it is not: a job
that arrives just after a batch left would wait for all of that round trip and
then all of its own, so it wakes an idle worker unless the batch under way is due
back within `RIDE_S`. When a batch is due is estimated from the shortest recent
batch of quick jobs (`RoundTrip`, shown as ``round_trip_ms`` in ``/v1/stats``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time

from ._jobs import Job
from ._pipeline import Session
from ._wire import ConnectionLost, wake_future

#: a job rides a batch of quick jobs under way only if it is due back within this:
#: the wait worth a round trip saved, and above a local database's shortest batch
RIDE_S = 0.002
#: the round trip is the shortest of the last this many (to twice as many) batches
ROUND_TRIP_WINDOW = 256


class RoundTrip:
    """A connection's round trip, near enough: the shortest recent batch of quick jobs.

    A minimum, not a mean: a big batch or a busy server makes a batch longer,
    never shorter, and only the network's part of it decides whether riding pays.
    Windows of `ROUND_TRIP_WINDOW` batches let it follow a change (a new route).
    """

    __slots__ = ("_before", "_count", "_shortest", "seconds")

    def __init__(self) -> None:
        #: 0 until a batch was measured: ride, as on a local database
        self.seconds = 0.0
        self._count = 0
        self._shortest = math.inf
        self._before = math.inf

    def add(self, seconds: float) -> None:
        """Count a batch of quick jobs that took `seconds`, start to end."""
        self._shortest = min(self._shortest, seconds)
        self._count += 1
        if self._count >= ROUND_TRIP_WINDOW:
            self._before, self._shortest, self._count = self._shortest, math.inf, 0
        self.seconds = min(self._before, self._shortest)


class IdleWorkers:
    """The idle connection workers' wake-ups, and the workers on their way back."""

    def __init__(self, max_batch: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._max_batch = max_batch
        #: one future per idle worker, woken in turn as jobs are queued
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        #: workers woken for the queue that have not taken their batch yet
        self._woken = 0
        #: workers running a batch of cheap jobs, due back at the queue soon
        #: (worker id: when its batch started); `drop_late` drops the late ones.
        #: time.monotonic(), not the loop's time: uvloop's counts whole milliseconds,
        #: too coarse for a round trip on this machine
        self._cheap_batches: dict[int, float] = {}
        self.round_trip = RoundTrip()

    def needs_connection(self, queued: int) -> bool:
        """True unless workers already on their way to the queue will take it all."""
        coming = self._woken + self._due_back()
        return queued > coming * self._max_batch

    def _due_back(self) -> int:
        """Batches of quick jobs under way that are due back within `RIDE_S`."""
        batches = self._cheap_batches
        if self.round_trip.seconds <= RIDE_S or not batches:
            return len(batches)  # a local database: every batch is
        started_by = time.monotonic() + RIDE_S - self.round_trip.seconds
        return sum(1 for started in batches.values() if started <= started_by)

    def wake_one(self) -> None:
        """Wake one idle worker, if any, for the queue: the one idle the shortest time."""
        while self._waiters:
            waiter = self._waiters.pop()
            if not waiter.done():
                waiter.set_result(True)
                self._woken += 1
                return

    def hand_over(self, queued: int) -> None:
        """Wake enough idle workers for `queued` jobs: the caller is late, or leaving."""
        for _ in range(math.ceil(queued / self._max_batch)):
            self.wake_one()

    async def wait(self, session: Session, until: float) -> None:
        """Sleep until woken for the queue, `until` passes or the server closes the connection.

        A plain future per idle period, woken by `wake_one`: cheaper than a
        `Queue.get` task raced against the socket.

        Raises:
            ConnectionLost: the server closed the idle connection.
        """
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiters.append(waiter)
        session.watch_idle(waiter)
        timer = self._loop.call_at(until, wake_future, waiter, False)
        try:
            await waiter
        finally:
            timer.cancel()
            session.watch_idle(None)
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._woken -= 1  # this worker takes its batch now, without awaiting
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        if session.broken:
            self.wake_one()  # a job meant for this worker goes to another
            raise ConnectionLost("the server closed the idle connection")

    def expect_back(self, worker_id: int, batch: list[Job]) -> None:
        """Count a batch of cheap jobs as on its way back to the queue, until `drop_late`."""
        if all(job.cheap for job in batch):
            self._cheap_batches[worker_id] = time.monotonic()

    def back(self, worker_id: int) -> None:
        """The worker's batch is done."""
        started = self._cheap_batches.pop(worker_id, None)
        if started is not None:
            self.round_trip.add(time.monotonic() - started)

    def drop_late(self, budget_s: float, queued: int) -> None:
        """Batches of cheap jobs under way for more than `budget_s` are late: idle
        workers take the `queued` jobs."""
        if not self._cheap_batches:
            return
        started_before = time.monotonic() - budget_s
        late = [w for w, started in self._cheap_batches.items() if started < started_before]
        for worker_id in late:
            del self._cheap_batches[worker_id]
        if late:
            self.hand_over(queued)
