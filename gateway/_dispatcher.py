"""The dispatcher: a bounded queue of jobs and one connection worker per connection.

`Dispatcher.run(job)` queues a job and waits for its future; whichever
connection worker is free takes the next jobs (pipelining all that are
queued, up to ``max_batch``), so load spreads across connections by itself.
A full queue is refused at once; a job never waits past its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ._encoding import Codec
from ._errors import Overloaded, Timeout, Unavailable
from ._jobs import Job, JobState, Statement, StatementResult
from ._pipeline import ConnectionLost, Session, wake_future
from ._settings import Settings
from ._stream_exec import run_stream
from ._stream_job import StreamJob

log = logging.getLogger("gateway.dispatcher")

#: a worker hands its connection back to the pool this often, so the pool can
#: check it and recycle it after ``max_lifetime``
LEASE_S = 30.0

#: a worker pipelines the whole queue when it would run within this time
BATCH_BUDGET_S = 0.010
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
        # Jobs whose clients wait for them, queued or in a batch, are bounded by
        # `_capacity`: one running job per connection plus ``queue_size`` waiting.
        # Batches take jobs off the queue, so its own size bounds nothing.
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._capacity = settings.pool_size + settings.queue_size
        self._pending = 0  # admitted jobs not resolved yet
        self._workers = [WorkerStats(i) for i in range(settings.pool_size)]
        self._sessions: dict[int, Session] = {}
        self._batches: dict[int, list[Job]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._connecting = 0  # requests waiting in `_admit` for a first connection
        self._closing = False
        self._running = 0
        #: one future per idle worker, woken in turn as jobs are queued
        self._idle_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: workers in `_wait_idle`, woken or not: each is owed a share of the queue
        self._idle_count = 0
        #: recent seconds per job (a moving average): is the queue cheap to pipeline?
        self._job_cost_s = 0.0

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
                while self._running or not self._queue.empty():  # noqa: ASYNC110
                    await asyncio.sleep(SETTLE_POLL_S)

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
        await self._admit(job)
        try:
            return await self._wait(job)
        except asyncio.CancelledError:
            job.abandon()  # the client went away
            raise

    async def _admit(self, job: Job) -> None:
        if self._closing:
            raise Unavailable("the gateway is shutting down")
        if not self._connected.is_set():
            await self._wait_connected(job)
        if self._pending >= self._capacity:
            raise Overloaded("the gateway's queue is full; retry shortly")
        if self._queue.qsize() >= self._capacity:
            self._drop_abandoned()  # they no longer count, but still take memory
        self._pending += 1
        job.future.add_done_callback(self._settled)
        self._queue.put_nowait(job)
        job.enqueued_at = asyncio.get_running_loop().time()
        self._wake_idle()

    async def _wait_connected(self, job: Job) -> None:
        """Wait for a first database connection, up to ``connect_timeout_ms``.

        Raises:
            Unavailable: no connection came up in time (or before the job's
                deadline), too many requests wait already, or the gateway closed.
        """
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

    def _settled(self, _future: asyncio.Future[list[StatementResult]]) -> None:
        self._pending -= 1

    def _drop_abandoned(self) -> None:
        """Take jobs whose clients gave up off the queue, keeping the others' order."""
        waiting = []
        while (job := self._take()) is not None:
            if not job.done:
                waiting.append(job)
        for job in waiting:
            self._queue.put_nowait(job)
        self._wake_idle()

    async def _wait(self, job: Job) -> list[StatementResult]:
        queue_deadline = job.enqueued_at + self._settings.queue_timeout_ms / 1000
        if queue_deadline < job.deadline:
            try:
                async with asyncio.timeout_at(queue_deadline):
                    return await asyncio.shield(job.future)
            except TimeoutError:
                if job.state is JobState.QUEUED:
                    job.abandon(Overloaded("the job waited too long in the gateway's queue"))
        try:
            async with asyncio.timeout_at(job.deadline):
                return await asyncio.shield(job.future)
        except TimeoutError:
            job.abandon(Timeout("the request's deadline passed"))
            return await job.future

    def stats(self) -> dict[str, Any]:
        """Queue depth and every worker's load, for ``/v1/stats``."""
        jobs = sum(w.jobs for w in self._workers)
        batches = sum(w.batches for w in self._workers)
        return {
            "queue": {"depth": self._queue.qsize(), "capacity": self._settings.queue_size},
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
                log.warning("worker %d lost its connection: %s", worker.id, exc)
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
        loop = asyncio.get_running_loop()
        lease_end = loop.time() + LEASE_S
        while True:
            batch = await self._next_batch(session, lease_end - loop.time())
            if batch is None:
                return
            await self._run_batch(worker, session, batch)

    async def _next_batch(self, session: Session, idle_s: float) -> list[Job] | None:
        """Jobs to run next: the first waited for, then a share of the queue.

        None when the lease ran out while idle. Jobs already resolved (their
        client gave up) are dropped here, never started. A `StreamJob` is
        always a batch of its own.

        Raises:
            ConnectionLost: the idle connection was closed by the server.
        """
        loop = asyncio.get_running_loop()
        lease_end = loop.time() + idle_s
        while (first := self._take()) is None:
            if loop.time() >= lease_end:
                return None
            await self._wait_idle(session, lease_end)
        batch = [first]
        limit = 1 if isinstance(first, StreamJob) else self._batch_limit()
        while len(batch) < limit and not self._queue.empty():
            job = self._queue.get_nowait()
            if isinstance(job, StreamJob):
                self._queue.put_nowait(job)  # a stream runs alone: it heads a later batch
                self._wake_idle()
                break
            batch.append(job)
        return [job for job in batch if job.start(functools.partial(session.abandoned, job))]

    def _batch_limit(self) -> int:
        """How many queued jobs this worker takes: a fair share.

        Cheap jobs (the queue would run in under `BATCH_BUDGET_S`) are shared
        with the idle workers only: pipelining them costs one round trip for
        all. Slow ones are shared across every connection: one connection
        taking them all would run them one after another while others idle.
        """
        queued = self._queue.qsize() + 1
        if queued * self._job_cost_s <= BATCH_BUDGET_S:
            share = math.ceil(queued / (self._idle_count + 1))
        else:
            connected = max(sum(w.connected for w in self._workers), 1)
            share = math.ceil(queued / connected)
        return max(min(share, self._settings.max_batch), 1)

    def _take(self) -> Job | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _wait_idle(self, session: Session, until: float) -> None:
        """Sleep until a job is queued, `until` passes or the server closes the connection.

        A plain future per idle period, woken by `_wake_idle`: cheaper than a
        `Queue.get` task raced against the socket.

        Raises:
            ConnectionLost: the server closed the idle connection.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._idle_waiters.append(waiter)
        session.watch_idle(waiter)
        timer = loop.call_at(until, wake_future, waiter)
        self._idle_count += 1
        try:
            await waiter
        finally:
            self._idle_count -= 1
            timer.cancel()
            session.watch_idle(None)
            with contextlib.suppress(ValueError):
                self._idle_waiters.remove(waiter)
        if session.broken:
            self._wake_idle()  # a job meant for this worker goes to another
            raise ConnectionLost("the server closed the idle connection")

    def _wake_idle(self) -> None:
        """Wake one idle worker, if any, for a job just queued."""
        while self._idle_waiters:
            waiter = self._idle_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _run_batch(self, worker: WorkerStats, session: Session, batch: list[Job]) -> None:
        if not batch:
            return
        self._running += len(batch)
        self._batches[worker.id] = batch
        started = time.perf_counter()
        try:
            await self._execute(session, batch)
        except ConnectionLost:
            for job in batch:
                job.fail(Unavailable("the database connection was lost during the query"))
            raise
        except BaseException:
            for job in batch:
                job.fail(Unavailable("the query was interrupted"))
            await session.interrupt()  # stopped mid-batch: the server must stop too
            raise
        finally:
            del self._batches[worker.id]
            self._running -= len(batch)
            elapsed = time.perf_counter() - started
            self._job_cost_s += (elapsed / len(batch) - self._job_cost_s) / 8  # EWMA
            worker.busy_s += elapsed
            worker.jobs += len(batch)
            worker.batches += 1
            worker.errors += sum(1 for job in batch if _failed(job))

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
        while (job := self._take()) is not None:
            job.fail(error)


def _failed(job: Job) -> bool:
    fut = job.future
    return fut.done() and not fut.cancelled() and fut.exception() is not None


def probe_job(deadline: float) -> Job:
    """A trivial read-only job: ``/readyz`` proves a connection really answers."""
    return Job([Statement(b"SELECT 1")], read_only=True, deadline=deadline, max_rows=1)
