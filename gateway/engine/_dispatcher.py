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
round trip. Fewer, fuller round trips cost the gateway far less CPU per job
than one round trip per connection. Unknown and slow statements still wake a
connection each, so slow work spreads; and a batch of quick jobs that does not
come back within `BATCH_BUDGET_S` hands the queue to idle connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .._errors import Overloaded, Timeout, Unavailable
from .._settings import Settings
from ..values._encoding import Codec
from ..values._results import StatementResult
from ._costs import StatementCosts
from ._jobs import Job, Statement
from ._pipeline import ConnectionLost, Session, wake_future
from ._stream import StreamJob, run_stream

log = logging.getLogger("gateway.dispatcher")

#: a worker hands its connection back to the pool this often (after the batch
#: under way, busy or not), so the pool can reset it, check it and recycle it
#: after ``max_lifetime``
LEASE_S = 30.0

#: a batch of cheap jobs not back after this long hands the queue to idle connections
BATCH_BUDGET_S = 0.010
#: while jobs are pending, queue timeouts and deadlines are checked this often
EXPIRY_SWEEP_S = 0.005
#: on close, after the grace period: how long cancelled queries get to come back
#: before their workers are stopped outright
CANCEL_WAIT_S = 2.0
SETTLE_POLL_S = 0.01
#: stopping the workers: cancel, wait this long, cancel those still running again…
STOP_ROUND_S = 0.1
STOP_ROUNDS = 50


@dataclass(slots=True)
class WorkerStats:
    """One connection worker's own load, for ``/v1/stats``."""

    id: int
    jobs: int = 0
    batches: int = 0
    busy_s: float = 0.0
    errors: int = 0
    connected: bool = False
    backend_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "jobs": self.jobs,
            "batches": self.batches,
            "jobs_per_batch": round(self.jobs / self.batches, 2) if self.batches else 0.0,
            "busy_s": round(self.busy_s, 6),
            "errors": self.errors,
            "connected": self.connected,
            "backend_pid": self.backend_pid,
        }


class Dispatcher:
    """Owns the job queue and the connection workers; the pool is opened by its owner."""

    def __init__(self, pool: AsyncConnectionPool[Any], codec: Codec, settings: Settings) -> None:
        self._pool = pool
        self._codec = codec
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        # Jobs whose clients wait for them, queued or in a batch, are bounded by
        # `_capacity`: one running job per connection plus ``queue_size`` waiting.
        # Batches take jobs off the queue, so its own size bounds nothing.
        self._queue: collections.deque[Job] = collections.deque()
        self._capacity = settings.pool_size + settings.queue_size
        self._pending = 0  # admitted jobs whose requests still wait for them
        self._workers = [WorkerStats(i) for i in range(settings.pool_size)]
        self._sessions: dict[int, Session] = {}
        self._batches: dict[int, list[Job]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._connecting = 0  # requests waiting in `_admit` for a first connection
        self._closing = False
        self._running = 0
        #: one future per idle worker, woken in turn as jobs are queued
        self._idle_waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        #: workers woken for the queue that have not taken their batch yet
        self._woken = 0
        #: workers running a batch of cheap jobs, due back at the queue soon
        #: (worker id: when its batch started); `_sweep` drops the late ones
        self._cheap_batches: dict[int, float] = {}
        #: which statements are quick, learnt from the batches run
        self._costs = StatementCosts()
        self._sweeper: asyncio.TimerHandle | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start one connection worker per pooled connection."""
        self._tasks = [
            asyncio.create_task(self._work(w), name=f"pgqg-worker-{w.id}") for w in self._workers
        ]

    def begin_close(self) -> None:
        """Refuse new jobs from now on (503 unavailable); queued and running ones go on."""
        self._closing = True

    async def drain(self, grace: float) -> None:
        """Refuse new jobs; let queued and running ones finish within `grace`.

        After `grace`, queued jobs fail and running ones are abandoned (their
        clients get 503 `Unavailable`), which cancels their queries on the
        server; then up to `CANCEL_WAIT_S` for those to come back.
        """
        self.begin_close()
        await self._settle(grace)
        self._fail_queued(Unavailable("the gateway is shutting down"))
        for batch in list(self._batches.values()):
            for job in batch:
                job.abandon(Unavailable("the gateway is shutting down"))
        await self._settle(CANCEL_WAIT_S)

    async def close(self, grace: float = 0.0) -> None:
        """`drain` within `grace`, then stop the workers.

        A worker still busy is stopped mid-batch, interrupting its query on the
        server. Closing twice (or after `drain`) is harmless.
        """
        await self.drain(grace)
        await self._stop_workers()
        self._tasks = []
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _stop_workers(self) -> None:
        """Cancel the workers, as often as it takes.

        One cancel can be lost: on Python 3.11 ``asyncio.wait_for`` (which
        psycopg_pool waits with) drops a cancellation that arrives as the
        connection it waits for is handed over, and the worker then serves
        that connection as if nothing happened. So cancel again until done.
        """
        for _ in range(STOP_ROUNDS):
            pending = [task for task in self._tasks if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=STOP_ROUND_S)
        else:
            log.warning("connection workers did not stop: %s", pending)
        # retrieve the outcomes, so no "exception was never retrieved" warnings
        await asyncio.gather(*(t for t in self._tasks if t.done()), return_exceptions=True)

    async def _settle(self, seconds: float) -> None:
        """Wait up to `seconds` until no job is queued or running."""
        # Polled rather than signalled: jobs leave in several ways (run, dropped
        # unstarted, failed), and this runs once, at shutdown.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self._running or self._queue:  # noqa: ASYNC110
                    await asyncio.sleep(SETTLE_POLL_S)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the dispatcher runs on: jobs' deadlines are on its clock."""
        return self._loop

    @property
    def ready(self) -> bool:
        """True while at least one worker holds a working connection, until closing."""
        return self._connected.is_set() and not self._closing

    # --- the front end's side ------------------------------------------------------------

    async def run(self, job: Job) -> list[StatementResult]:
        """Queue `job` and wait for its results.

        Raises:
            Overloaded: the queue is full, or the job waited in it longer than
                ``queue_timeout_ms``.
            Unavailable: no database connection came up in ``connect_timeout_ms``,
                or the gateway is shutting down.
            Timeout: the job's deadline passed; a running query is cancelled.
            QueryError: PostgreSQL failed the statement.
        """
        if self._closing or not self._connected.is_set():
            await self._wait_connected(job)
        self._admit(job)  # counted in `_pending` until this returns
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
            self._pending -= 1

    def _admit(self, job: Job) -> None:
        """Queue `job`, waking a connection worker unless one is on its way anyway.

        Raises:
            Overloaded: as many jobs as the gateway holds are waiting already.
        """
        if self._pending >= self._capacity:
            raise Overloaded("the gateway's queue is full; retry shortly")
        if len(self._queue) >= self._capacity:
            self._drop_abandoned()  # they no longer count, but still take memory
        self._pending += 1
        job.cheap = self._costs.is_cheap(job)
        self._queue.append(job)
        job.enqueued_at = self._loop.time()
        if not job.cheap or self._needs_connection():
            self._wake_idle()
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(EXPIRY_SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        """Refuse the jobs past their queue timeout or deadline, every `EXPIRY_SWEEP_S`;
        hand the queue over from late batches of cheap jobs.

        One timer for all pending jobs instead of one per job: a request costs
        no timer, and a deadline is met within `EXPIRY_SWEEP_S`. Abandoning a
        running job cancels its query.
        """
        self._sweeper = None
        now = self._loop.time()
        if self._cheap_batches:
            self._drop_late_batches(now)
        queue_s = self._settings.queue_timeout_ms / 1000
        for job in self._queue:
            self._expire(job, now, queue_s)
        for batch in self._batches.values():
            for job in batch:
                self._expire(job, now, None)
        if self._pending:
            self._sweeper = self._loop.call_later(EXPIRY_SWEEP_S, self._sweep)

    @staticmethod
    def _expire(job: Job, now: float, queue_s: float | None) -> None:
        if job.future.done():  # answered, abandoned, or a stream under way
            return
        if now >= job.deadline:
            job.abandon(Timeout("the request's deadline passed"))
        elif queue_s is not None and now >= job.enqueued_at + queue_s:
            job.abandon(Overloaded("the job waited too long in the gateway's queue"))

    def _needs_connection(self) -> bool:
        """True unless connections already on their way to the queue will take it all."""
        coming = self._woken + len(self._cheap_batches)
        return len(self._queue) > coming * self._settings.max_batch

    async def _wait_connected(self, job: Job) -> None:
        """Wait for a first database connection, up to ``connect_timeout_ms``.

        Raises:
            Unavailable: no connection came up in time (or before the job's
                deadline), too many requests wait already, or the gateway closed.
        """
        if self._closing:
            raise Unavailable("the gateway is shutting down")
        if self._connecting >= self._capacity:  # memory stays bounded during an outage
            raise Unavailable("no database connection is available")
        loop = asyncio.get_running_loop()
        wait = min(self._settings.connect_timeout_ms / 1000, job.deadline - loop.time())
        self._connecting += 1
        try:
            async with asyncio.timeout(max(wait, 0)):
                await self._connected.wait()
        except TimeoutError:
            raise Unavailable("no database connection is available") from None
        finally:
            self._connecting -= 1
        if self._closing:
            raise Unavailable("the gateway is shutting down")

    def _drop_abandoned(self) -> None:
        """Take jobs whose clients gave up off the queue, keeping the others' order."""
        waiting = [job for job in self._queue if not job.done]
        self._queue.clear()
        self._queue.extend(waiting)
        if waiting:
            self._wake_idle()

    def stats(self) -> dict[str, Any]:
        """Queue depth and every worker's load, for ``/v1/stats``."""
        jobs = sum(w.jobs for w in self._workers)
        batches = sum(w.batches for w in self._workers)
        return {
            "queue": {"depth": len(self._queue), "capacity": self._settings.queue_size},
            "pending": self._pending,
            "capacity": self._capacity,
            "running": self._running,
            "ready": self.ready,
            "jobs_per_batch": round(jobs / batches, 2) if batches else 0.0,
            "connections": [w.to_dict() for w in self._workers],
        }

    # --- the connection workers' side ----------------------------------------------------

    async def _work(self, worker: WorkerStats) -> None:
        """Serve jobs on one pooled connection after another until cancelled (`close`)."""
        while True:
            try:
                async with self._pool.connection(timeout=LEASE_S) as conn:
                    await self._lease(worker, conn)
            except PoolTimeout:
                continue  # the database is down; the pool keeps reconnecting
            except (ConnectionLost, psycopg.OperationalError) as exc:
                # debug: the pool logs an outage once per retry, not once per worker
                log.debug("worker %d lost its connection: %s", worker.id, exc)
                self._connection_lost()
                await asyncio.sleep(0.05)

    async def _lease(self, worker: WorkerStats, conn: psycopg.AsyncConnection[Any]) -> None:
        session = Session(
            conn, self._codec, statement_timeout_ms=self._settings.statement_timeout_ms
        )
        self._sessions[worker.id] = session
        worker.connected, worker.backend_pid = True, session.backend_pid
        self._connected.set()
        try:
            await self._serve(worker, session)
        finally:
            session.close()
            worker.connected = False
            del self._sessions[worker.id]
            if not any(w.connected for w in self._workers):
                self._connected.clear()

    async def _serve(self, worker: WorkerStats, session: Session) -> None:
        """Run batches until the lease ends, idle or busy: a queue that never
        empties must not keep a connection from its reset and recycling."""
        loop = asyncio.get_running_loop()
        lease_end = loop.time() + LEASE_S
        while True:
            batch = await self._next_batch(session, lease_end - loop.time())
            if batch is None:
                return
            await self._run_batch(worker, session, batch)
            if loop.time() >= lease_end:
                self._hand_over_queue()  # back in a moment, with a fresh lease
                return

    async def _next_batch(self, session: Session, idle_s: float) -> list[Job] | None:
        """Jobs to run next: the first waited for, then more of the queue.

        None when the lease ran out while idle. Jobs already resolved (their
        client gave up) are dropped here, never started. A `StreamJob` is
        always a batch of its own.

        Raises:
            ConnectionLost: the idle connection was closed by the server.
        """
        lease_end = self._loop.time() + idle_s
        while not self._queue:
            if self._loop.time() >= lease_end:
                return None
            await self._wait_idle(session, lease_end)
        queue = self._queue
        first = queue.popleft()
        batch = [first]
        if first.cheap:
            # cheap jobs ride together, up to the first job that is not cheap
            while len(batch) < self._settings.max_batch and queue and queue[0].cheap:
                batch.append(queue.popleft())
        elif not isinstance(first, StreamJob):
            limit = self._slow_share()
            while len(batch) < limit and queue and not isinstance(queue[0], StreamJob):
                batch.append(queue.popleft())
        abandoned = session.abandoned
        return [job for job in batch if job.start(abandoned)]

    def _slow_share(self) -> int:
        """How many jobs a worker takes when they are not known to be cheap.

        An equal share per connection: one connection taking them all would
        run them one after another while the others idle.
        """
        connected = max(sum(w.connected for w in self._workers), 1)
        share = math.ceil((len(self._queue) + 1) / connected)
        return max(min(share, self._settings.max_batch), 1)

    async def _wait_idle(self, session: Session, until: float) -> None:
        """Sleep until woken for the queue, `until` passes or the server closes the connection.

        A plain future per idle period, woken by `_wake_idle`: cheaper than a
        `Queue.get` task raced against the socket.

        Raises:
            ConnectionLost: the server closed the idle connection.
        """
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._idle_waiters.append(waiter)
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
                    self._idle_waiters.remove(waiter)
        if session.broken:
            self._wake_idle()  # a job meant for this worker goes to another
            raise ConnectionLost("the server closed the idle connection")

    def _wake_idle(self) -> None:
        """Wake one idle worker, if any, for the queue: the one idle the shortest time.

        Last in, first out, as PgBouncer reuses server connections: the
        connections that do the work stay few and warm (their backends' caches,
        their processes on a CPU), and the others idle until load needs them.
        """
        while self._idle_waiters:
            waiter = self._idle_waiters.pop()
            if not waiter.done():
                waiter.set_result(True)
                self._woken += 1
                return

    async def _run_batch(self, worker: WorkerStats, session: Session, batch: list[Job]) -> None:
        if not batch:
            return
        self._running += len(batch)
        self._batches[worker.id] = batch
        started = time.perf_counter()
        self._expect_back(worker.id, batch)
        try:
            await self._execute(session, batch)
        except ConnectionLost:
            for job in batch:
                job.fail(Unavailable("the database connection was lost during the query"))
            self._hand_over_queue()
            raise
        except BaseException:
            for job in batch:
                job.fail(Unavailable("the query was interrupted"))
            self._hand_over_queue()
            await session.interrupt()  # stopped mid-batch: the server must stop too
            raise
        finally:
            self._back(worker.id)
            del self._batches[worker.id]
            self._running -= len(batch)
            self._costs.learn(batch)
            elapsed = time.perf_counter() - started
            worker.busy_s += elapsed
            worker.jobs += len(batch)
            worker.batches += 1
            worker.errors += sum(job.failed for job in batch)

    def _expect_back(self, worker_id: int, batch: list[Job]) -> None:
        """Count a batch of cheap jobs as on its way back to the queue, for `BATCH_BUDGET_S`.

        Past that, the jobs queued behind it go to idle connections.
        """
        if all(job.cheap for job in batch):
            self._cheap_batches[worker_id] = self._loop.time()

    def _back(self, worker_id: int) -> None:
        self._cheap_batches.pop(worker_id, None)

    def _drop_late_batches(self, now: float) -> None:
        """Batches of cheap jobs late by `BATCH_BUDGET_S`: idle connections take the queue."""
        late = [w for w, started in self._cheap_batches.items() if now - started > BATCH_BUDGET_S]
        for worker_id in late:
            del self._cheap_batches[worker_id]
        if late:
            self._hand_over_queue()

    def _hand_over_queue(self) -> None:
        """Wake enough idle workers for the queue: this one is late, or leaving."""
        for _ in range(math.ceil(len(self._queue) / self._settings.max_batch)):
            self._wake_idle()

    @staticmethod
    async def _execute(session: Session, batch: list[Job]) -> None:
        """A stream holds the connection alone; other jobs share one pipelined batch."""
        if len(batch) == 1 and isinstance(batch[0], StreamJob):
            await run_stream(session, batch[0])
        else:
            await session.run(batch)

    def _connection_lost(self) -> None:
        """With no connection left, queued jobs fail fast instead of waiting."""
        if not any(w.connected for w in self._workers):
            self._fail_queued(Unavailable("the database is unavailable"))

    def _fail_queued(self, error: Unavailable) -> None:
        while self._queue:
            self._queue.popleft().fail(error)


def probe_job(deadline: float) -> Job:
    """A trivial read-only job: ``/readyz`` proves a connection really answers.

    Its statement is the gateway's own, named like the catalog's: raw SQL would
    stop a connection trusting its named statements (see `Session.send_prepare`).
    """
    statement = Statement(b"SELECT 1", prepared=b"pgqg:readyz")
    return Job([statement], read_only=True, deadline=deadline, max_rows=1)
