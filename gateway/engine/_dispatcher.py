"""The dispatcher: a bounded queue of jobs and one connection worker per connection.

`Dispatcher.run(job)` queues a job and waits for its future; a free
connection worker takes the next jobs (pipelining all that are queued, up to
``max_batch``), so load spreads across connections by itself. Of several idle
workers, the one idle the shortest time is woken (PgBouncer's LIFO reuse).
A full queue is refused at once; a job is refused (and its query cancelled)
within `EXPIRY_SWEEP_S` of its deadline.

Cheap jobs are coalesced. The dispatcher learns how long each statement takes
on the connection; a job whose statement is known to be quick does not wake an
idle connection while another connection is already on its way to the queue
(woken, or running a batch of quick jobs): it rides that connection's next
round trip, if that is due back within `RIDE_S` (see `gateway.engine._wakeups`:
on a database a network hop away it is not). Fewer, fuller round trips cost the
gateway far less CPU per job than one round trip per connection. Unknown and
slow statements still wake a connection each, so slow work spreads; and a batch
of quick jobs that does not come back within `BATCH_BUDGET_S` hands the queue to
idle connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool

from .._errors import Unavailable
from .._settings import Settings
from ..values._encoding import Codec
from ..values._results import StatementResult
from ._admission import JobQueue, expire
from ._costs import StatementCosts
from ._crew import Crew
from ._jobs import Job, Statement
from ._metrics import EngineMetrics
from ._outcome import lost_error
from ._stats import WorkerStats
from ._wakeups import IdleWorkers
from ._worker import stop_workers, work

if TYPE_CHECKING:
    from ._replicas import Replicas

#: a worker hands its connection back to the pool this often (after the batch
#: under way, busy or not), so the pool can reset it, check it and recycle it
#: after ``max_lifetime``
LEASE_S = 30.0

#: a batch of cheap jobs not back after this long hands the queue to idle connections
BATCH_BUDGET_S = 0.010
#: while jobs are pending, queue timeouts and deadlines are checked this often
EXPIRY_SWEEP_S = 0.005
#: on close, after the grace period: how long cancelled queries get to come back
#: before their workers are stopped outright (a cancel lands in milliseconds;
#: one that cannot reach the server must not hold up the exit)
CANCEL_WAIT_S = 0.5
SETTLE_POLL_S = 0.01


class Dispatcher:
    """Owns the job queue and the connection workers; the pool is opened by its owner.

    Its parts: the queue and admission (`JobQueue`), the idle workers' wake-ups
    (`IdleWorkers`), the connection workers' loop (`gateway.engine._worker`) and
    their leases (`Lease`), each worker's counts (`WorkerStats`).
    """

    def __init__(self, pool: AsyncConnectionPool[Any], codec: Codec, settings: Settings) -> None:
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        costs = StatementCosts()  # which statements are quick, learnt from the batches run
        idle = IdleWorkers(settings.max_batch)
        self._queue = JobQueue(settings, costs, idle)
        self._workers = [WorkerStats(i) for i in range(settings.pool_size)]
        self._crew = Crew(pool, codec, settings, self._queue, idle, costs, LEASE_S, self._workers)
        self._tasks: list[asyncio.Task[None]] = []
        self._connecting = 0  # requests waiting in `_wait_connected` for a first connection
        self._closing = False
        #: set by `begin_close`: wakes requests waiting for a first connection
        self._closed = asyncio.Event()
        self._drained = False
        self._sweeper: asyncio.TimerHandle | None = None
        #: read replicas (of the primary's dispatcher): read-only jobs go to one of them
        self.replicas: Replicas | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start one connection worker per pooled connection."""
        self._tasks = [
            asyncio.create_task(work(w, self._crew), name=f"pgqg-worker-{w.id}")
            for w in self._workers
        ]

    def begin_close(self) -> None:
        """Refuse new jobs from now on (503 unavailable); queued and running ones go on."""
        self._closing = True
        self._closed.set()

    async def drain(self, grace: float) -> None:
        """Refuse new jobs; let queued and running ones finish within `grace`.

        After `grace`, queued jobs fail (503 `Unavailable`) and running ones are
        abandoned, which cancels their queries on the server: a read-only one
        answers 503, a write 502 `OutcomeUnknown` (its COMMIT may be under way);
        then up to `CANCEL_WAIT_S` for those to come back.
        """
        self.begin_close()
        await self._settle(grace)
        self._queue.fail_all(Unavailable("the gateway is shutting down"))
        for worker in self._workers:
            for job in list(worker.batch):
                job.abandon(lost_error(job, sent=True, why="the gateway shut down"))
        await self._settle(CANCEL_WAIT_S)
        self._drained = True

    async def close(self, grace: float = 0.0) -> None:
        """`drain` within `grace`, then stop the workers.

        A worker still busy is stopped mid-batch, interrupting its query on the
        server. Closing twice (or after `drain`) is harmless, and does not wait
        for the grace again.
        """
        if not self._drained:
            await self.drain(grace)
        await stop_workers(self._tasks)
        self._tasks = []
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _settle(self, seconds: float) -> None:
        """Wait up to `seconds` until no job is queued or running."""
        # Polled rather than signalled: jobs leave in several ways (run, dropped
        # unstarted, failed), and this runs once, at shutdown.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self._crew.running() or self._queue:  # noqa: ASYNC110
                    await asyncio.sleep(SETTLE_POLL_S)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the dispatcher runs on: jobs' deadlines are on its clock."""
        return self._loop

    @property
    def ready(self) -> bool:
        """True while at least one worker holds a working connection, until closing."""
        return self._crew.connected.is_set() and not self._closing

    # --- the front end's side ------------------------------------------------------------

    async def run(self, job: Job, *, here: bool = False) -> list[StatementResult]:
        """Queue `job` and wait for its results.

        A read-only job goes to the least-loaded healthy read replica, if there
        is one (`replicas`), unless `here` says it must run on this target.

        Raises:
            Overloaded: the queue is full, or the job waited in it longer than
                ``queue_timeout_ms``.
            Unavailable: no database connection came up in ``connect_timeout_ms``,
                or the gateway is shutting down.
            Timeout: the job's deadline passed; a running query is cancelled.
            QueryError: PostgreSQL failed the statement.
        """
        if self.replicas is not None and job.read_only and not here:
            replica = self.replicas.pick()
            if replica is not None:
                return await replica.run(job)
        if self._closing or not self._crew.connected.is_set():
            await self._wait_connected(job)
        self._queue.admit(job, self._loop.time())  # counted in `pending` until this returns
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(EXPIRY_SWEEP_S, self._sweep)
        # The future is awaited as it is: no shield, no timer, no timeout context
        # per request (`_sweep` enforces the deadlines). A cancelled request
        # cancels the future; `abandon` still stops its query.
        future = job.future
        try:
            return await future
        except asyncio.CancelledError:
            job.abandon()  # the client went away
            if future.done() and not future.cancelled():
                future.exception()  # failed as the client left: retrieved, not logged
            raise
        finally:
            self._queue.leave()

    def _sweep(self) -> None:
        """Refuse the jobs past their queue timeout or deadline, every `EXPIRY_SWEEP_S`;
        hand the queue over from late batches of cheap jobs.

        One timer for all pending jobs instead of one per job: a request costs
        no timer, and a deadline is met within `EXPIRY_SWEEP_S`. Abandoning a
        running job cancels its query.
        """
        self._sweeper = None
        now = self._loop.time()
        self._crew.idle.drop_late(BATCH_BUDGET_S, len(self._queue))
        metrics = self._crew.metrics
        metrics.expired_queued += self._queue.expire(now)
        for worker in self._workers:
            for job in worker.batch:
                metrics.expired_running += expire(job, now, None)
        if self._queue.pending:
            self._sweeper = self._loop.call_later(EXPIRY_SWEEP_S, self._sweep)

    async def _wait_connected(self, job: Job) -> None:
        """Wait for a first database connection, up to ``connect_timeout_ms``.

        Raises:
            Unavailable: no connection came up in time (or before the job's
                deadline), too many requests wait already, or the gateway closed.
        """
        if self._closing:
            raise Unavailable("the gateway is shutting down")
        if self._connecting >= self._queue.capacity:  # memory stays bounded during an outage
            raise Unavailable("no database connection is available")
        wait = min(self._settings.connect_timeout_ms / 1000, job.deadline - self._loop.time())
        self._connecting += 1
        waits = [asyncio.ensure_future(e.wait()) for e in (self._crew.connected, self._closed)]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=max(wait, 0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._connecting -= 1
            for waiting in waits:
                waiting.cancel()
        if not done:
            raise Unavailable("no database connection is available")
        if self._closing:
            raise Unavailable("the gateway is shutting down")

    @property
    def metrics(self) -> EngineMetrics:
        """Batch sizes and deadline expiries, for ``/metrics``."""
        return self._crew.metrics

    @property
    def pending(self) -> int:
        """Jobs whose clients wait for them, queued or running."""
        return self._queue.pending

    def stats(self) -> dict[str, Any]:
        """Queue depth and every worker's load, for ``/v1/stats``."""
        jobs = sum(w.jobs for w in self._workers)
        batches = sum(w.batches for w in self._workers)
        return {
            "queue": {"depth": len(self._queue), "capacity": self._settings.queue_size},
            "pending": self._queue.pending,
            "capacity": self._queue.capacity,
            "running": self._crew.running(),
            "ready": self.ready,
            "jobs_per_batch": round(jobs / batches, 2) if batches else 0.0,
            # the shortest recent batch of quick jobs: the network's share of a batch
            "round_trip_ms": round(self._crew.idle.round_trip.seconds * 1000, 3),
            "connections": [w.to_dict() for w in self._workers],
        }


def probe_job(deadline: float) -> Job:
    """A trivial read-only job: ``/readyz`` proves a connection really answers.

    Its statement is the gateway's own, named like the catalog's: raw SQL would
    stop a connection trusting its named statements (see `PreparedStatements`).
    """
    statement = Statement(b"SELECT 1", prepared=b"pgqg:readyz")
    return Job([statement], read_only=True, deadline=deadline, max_rows=1)
