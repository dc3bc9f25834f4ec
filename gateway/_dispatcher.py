"""The dispatcher: a bounded queue of jobs and one connection worker per connection.

`Dispatcher.run(job)` queues a job and waits for its future; whichever
connection worker is free takes the next jobs (pipelining all that are
queued, up to ``max_batch``), so load spreads across connections by itself.
A full queue is refused at once; a job never waits past its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ._encoding import Codec
from ._errors import Overloaded, Timeout, Unavailable
from ._jobs import Job, JobState, Statement, StatementResult
from ._pipeline import BrokenWatch, ConnectionLost, Session
from ._settings import Settings
from ._stream_exec import run_stream
from ._stream_job import StreamJob

log = logging.getLogger("gateway.dispatcher")

#: a worker hands its connection back to the pool this often, so the pool can
#: check it and recycle it after ``max_lifetime``
LEASE_S = 30.0


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
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max(settings.queue_size, 1))
        self._workers = [WorkerStats(i) for i in range(settings.pool_size)]
        self._sessions: dict[int, Session] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._closing = False
        self._running = 0
        self._idle = asyncio.Event()  # set whenever no job is running

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start one connection worker per pooled connection."""
        self._tasks = [
            asyncio.create_task(self._work(w), name=f"pgqg-worker-{w.id}") for w in self._workers
        ]

    async def close(self, grace: float = 0.0) -> None:
        """Stop taking jobs, let running ones finish within `grace`, cancel the rest.

        Queued jobs left after `grace` fail with `Unavailable`; running queries
        are cancelled on the server. Closing twice is harmless.
        """
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._running or not self._queue.empty():
                    self._idle.clear()
                    await self._idle.wait()
        self._fail_queued(Unavailable("the gateway is shutting down"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    @property
    def ready(self) -> bool:
        """True while at least one worker holds a working connection."""
        return self._connected.is_set()

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
            wait = self._settings.connect_timeout_ms / 1000
            try:
                async with asyncio.timeout(wait):
                    await self._connected.wait()
            except TimeoutError:
                raise Unavailable("no database connection is available") from None
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded("the gateway's queue is full; retry shortly") from None
        job.enqueued_at = asyncio.get_running_loop().time()

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
            "queue": {"depth": self._queue.qsize(), "capacity": self._queue.maxsize},
            "running": self._running,
            "ready": self.ready,
            "jobs_per_batch": round(jobs / batches, 2) if batches else 0.0,
            "connections": [w.to_dict() for w in self._workers],
        }

    # --- the connection workers' side ----------------------------------------------------

    async def _work(self, worker: WorkerStats) -> None:
        while not self._closing:
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
            session.close()
        finally:
            worker.connected = False
            del self._sessions[worker.id]
            if not any(w.connected for w in self._workers):
                self._connected.clear()

    async def _serve(self, worker: WorkerStats, session: Session) -> None:
        loop = asyncio.get_running_loop()
        lease_end = loop.time() + LEASE_S
        while not self._closing:
            batch = await self._next_batch(session, lease_end - loop.time())
            if batch is None:
                return
            await self._run_batch(worker, session, batch)

    async def _next_batch(self, session: Session, idle_s: float) -> list[Job] | None:
        """Jobs to run next: the first waited for, then all queued up to max_batch.

        None when the lease ran out while idle. Jobs already resolved (their
        client gave up) are dropped here, never started. A `StreamJob` is
        always a batch of its own.

        Raises:
            ConnectionLost: the idle connection was closed by the server.
        """
        first = self._take() if not self._queue.empty() else None
        if first is None:
            first = await self._wait_idle(session, idle_s)
            if first is None:
                return None
        batch = [first]
        while (
            not isinstance(first, StreamJob)
            and len(batch) < self._settings.max_batch
            and not self._queue.empty()
        ):
            job = self._queue.get_nowait()
            if isinstance(job, StreamJob):
                self._queue.put_nowait(job)  # a stream runs alone: it heads a later batch
                break
            batch.append(job)
        return [job for job in batch if job.start(functools.partial(session.abandoned, job))]

    def _take(self) -> Job | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _wait_idle(self, session: Session, idle_s: float) -> Job | None:
        watch = BrokenWatch(session)
        get = asyncio.ensure_future(self._queue.get())
        waits: set[asyncio.Future[Any]] = {get, watch.broken}
        try:
            await asyncio.wait(waits, timeout=max(idle_s, 0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.stop()
            if not get.done():
                get.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            job = await get
            if watch.broken.done():
                self._requeue_or_fail(job)
            else:
                return job
        if watch.broken.done():
            raise ConnectionLost("the server closed the idle connection")
        return None

    async def _run_batch(self, worker: WorkerStats, session: Session, batch: list[Job]) -> None:
        if not batch:
            return
        self._running += len(batch)
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
            raise
        finally:
            self._running -= len(batch)
            if not self._running:
                self._idle.set()
            worker.busy_s += time.perf_counter() - started
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

    def _requeue_or_fail(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            job.fail(Unavailable("the database connection was lost"))

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
