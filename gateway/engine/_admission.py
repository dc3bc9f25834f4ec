"""The dispatcher's bounded queue: admission, expiry, and taking a batch off it.

Jobs whose clients wait for them, queued or in a batch, are bounded by
`JobQueue.capacity`: one running job per connection plus ``queue_size``
waiting. Batches take jobs off the queue, so its own length bounds nothing:
`pending` counts them from admission until their request stops waiting. A
full gateway refuses a job at once (`Overloaded`), never buffers it.
"""

from __future__ import annotations

import collections
import math

from .._errors import GatewayError, Overloaded, Timeout
from .._settings import Settings
from ._costs import StatementCosts
from ._jobs import Job
from ._stream import StreamJob
from ._wakeups import IdleWorkers

_WRITE_TIMED_OUT = (
    "the request's deadline passed while the write ran; it was cancelled, but it may"
    " or may not have been committed: check before retrying"
)


def expire(job: Job, now: float, queue_s: float | None) -> bool:
    """Abandon `job` if its deadline passed, or (`queue_s`: queued) it waited that long;
    True when its deadline passed.

    A running write (`queue_s` None) is cancelled on the server, but its COMMIT
    may be under way: the message says so.
    """
    if job.future.done():  # answered, abandoned, or a stream under way
        return False
    if now >= job.deadline:
        unknown = queue_s is None and not job.read_only
        job.abandon(Timeout(_WRITE_TIMED_OUT if unknown else "the request's deadline passed"))
        return True
    if queue_s is not None and now >= job.enqueued_at + queue_s:
        job.abandon(Overloaded("the job waited too long in the gateway's queue"))
    return False


class JobQueue:
    """Jobs waiting for a connection worker, oldest first."""

    def __init__(self, settings: Settings, costs: StatementCosts, idle: IdleWorkers) -> None:
        self.jobs: collections.deque[Job] = collections.deque()
        self.capacity = settings.pool_size + settings.queue_size
        #: admitted jobs whose requests still wait for them
        self.pending = 0
        self._max_batch = settings.max_batch
        self._queue_s = settings.queue_timeout_ms / 1000
        self._costs = costs
        self._idle = idle

    def __len__(self) -> int:
        return len(self.jobs)

    def admit(self, job: Job, now: float) -> None:
        """Queue `job`, waking a connection worker unless one is on its way anyway.
        The job counts in `pending` until its request calls `leave`.

        Raises:
            Overloaded: as many jobs as the gateway holds are waiting already.
        """
        if self.pending >= self.capacity:
            raise Overloaded("the gateway's queue is full; retry shortly")
        if len(self.jobs) >= self.capacity:
            self._drop_abandoned()  # they no longer count, but still take memory
        self.pending += 1
        job.cheap = self._costs.is_cheap(job)
        self.jobs.append(job)
        job.enqueued_at = now
        if not job.cheap or self._idle.needs_connection(len(self.jobs)):
            self._idle.wake_one()

    def leave(self) -> None:
        """A request no longer waits for its job."""
        self.pending -= 1

    def expire(self, now: float) -> int:
        """Refuse the queued jobs past their queue timeout or deadline; return how
        many were past their deadline."""
        return sum(expire(job, now, self._queue_s) for job in self.jobs)

    def take_batch(self, connected: int) -> list[Job]:
        """Jobs to run next, of `connected` workers' share (the queue is not empty).

        Cheap jobs ride together, up to the first that is not cheap; other jobs
        are shared equally among the connections, since one connection taking
        them all would run them one after another while the others idle. A
        `StreamJob` is always a batch of its own.
        """
        queue = self.jobs
        first = queue.popleft()
        batch = [first]
        if first.cheap:
            while len(batch) < self._max_batch and queue and queue[0].cheap:
                batch.append(queue.popleft())
        elif not isinstance(first, StreamJob):
            share = math.ceil((len(queue) + 1) / max(connected, 1))
            limit = max(min(share, self._max_batch), 1)
            while len(batch) < limit and queue and not isinstance(queue[0], StreamJob):
                batch.append(queue.popleft())
        return batch

    def _drop_abandoned(self) -> None:
        """Take jobs whose clients gave up off the queue, keeping the others' order."""
        waiting = [job for job in self.jobs if not job.done]
        self.jobs.clear()
        self.jobs.extend(waiting)
        if waiting:
            self._idle.wake_one()

    def fail_all(self, error: GatewayError) -> None:
        """Fail every queued job with `error`."""
        while self.jobs:
            self.jobs.popleft().fail(error)
