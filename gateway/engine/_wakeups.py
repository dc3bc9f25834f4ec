"""Which connection worker takes the queue next, and coalescing of cheap jobs.

Of several idle workers, the one idle the shortest time is woken (PgBouncer's
LIFO reuse): the connections that do the work stay few and warm (their
backends' caches, their processes on a CPU), and the others idle until load
needs them.

A job whose statement is known to be quick does not wake an idle worker while
another is already on its way to the queue (woken, or running a batch of quick
jobs that is due back): it rides that worker's next round trip. A batch of
quick jobs that is late hands the queue to idle workers (`drop_late`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math

from ._jobs import Job
from ._pipeline import Session
from ._wire import ConnectionLost, wake_future


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
        #: (worker id: when its batch started); `drop_late` drops the late ones
        self._cheap_batches: dict[int, float] = {}

    def needs_connection(self, queued: int) -> bool:
        """True unless workers already on their way to the queue will take it all."""
        coming = self._woken + len(self._cheap_batches)
        return queued > coming * self._max_batch

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
            self._cheap_batches[worker_id] = self._loop.time()

    def back(self, worker_id: int) -> None:
        """The worker's batch is done."""
        self._cheap_batches.pop(worker_id, None)

    def drop_late(self, started_before: float, queued: int) -> None:
        """Batches of cheap jobs started before `started_before` are late: idle
        workers take the `queued` jobs."""
        if not self._cheap_batches:
            return
        late = [w for w, started in self._cheap_batches.items() if started < started_before]
        for worker_id in late:
            del self._cheap_batches[worker_id]
        if late:
            self.hand_over(queued)
