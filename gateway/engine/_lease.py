"""A lease: one pooled connection held by a connection worker for a while.

The worker runs batches of the queue on the connection until the lease ends
(`Crew.lease_s`), idle or busy, then hands it back to the pool: a queue that
never empties must not keep a connection from the pool's reset, check and
recycling after ``max_lifetime``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from ._crew import Crew
from ._jobs import Job
from ._outcome import lost_error
from ._pipeline import Session
from ._stats import WorkerStats
from ._stream import StreamJob, run_stream
from ._wire import ConnectionLost


class Lease:
    """One worker's time on one pooled connection."""

    def __init__(self, worker: WorkerStats, crew: Crew, conn: psycopg.AsyncConnection[Any]):
        self._worker = worker
        self._crew = crew
        self._conn = conn
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Serve batches on the connection until the lease ends.

        Raises:
            ConnectionLost: the connection broke (psycopg's OperationalError too).
        """
        crew, worker = self._crew, self._worker
        session = Session(
            self._conn, crew.codec, statement_timeout_ms=crew.settings.statement_timeout_ms
        )
        worker.connected, worker.backend_pid = True, session.backend_pid
        crew.connected.set()
        try:
            await self._serve(session)
        finally:
            session.close()
            worker.connected = False
            if not crew.connected_count():
                crew.connected.clear()

    async def _serve(self, session: Session) -> None:
        lease_end = self._loop.time() + self._crew.lease_s
        while True:
            batch = await self._next_batch(session, lease_end)
            if batch is None:
                return
            await self._run_batch(session, batch)
            if self._loop.time() >= lease_end:
                self._crew.idle.hand_over(len(self._crew.queue))  # back soon, on a new lease
                return

    async def _next_batch(self, session: Session, lease_end: float) -> list[Job] | None:
        """Jobs to run next: the first waited for, then more of the queue.

        None when the lease ran out while idle. Jobs already resolved (their
        client gave up) are dropped here, never started.

        Raises:
            ConnectionLost: the idle connection was closed by the server.
        """
        queue = self._crew.queue
        while not queue:
            if self._loop.time() >= lease_end:
                return None
            await self._crew.idle.wait(session, lease_end)
        batch = queue.take_batch(self._crew.connected_count())
        abandoned = session.abandoned
        return [job for job in batch if job.start(abandoned)]

    async def _run_batch(self, session: Session, batch: list[Job]) -> None:
        if not batch:
            return
        crew, worker = self._crew, self._worker
        worker.batch = batch
        started = time.perf_counter()
        for job in batch:
            job.started_at = started
        crew.metrics.batch_jobs.observe(len(batch))
        crew.idle.expect_back(worker.id, batch)
        try:
            await _execute(session, batch)
        except ConnectionLost:
            for job in batch:  # those the session could not tell about: assume sent
                job.fail(lost_error(job, sent=True))
            crew.idle.hand_over(len(crew.queue))
            raise
        except BaseException:
            for job in batch:
                job.fail(lost_error(job, sent=True, why="the query was interrupted"))
            crew.idle.hand_over(len(crew.queue))
            await session.interrupt()  # stopped mid-batch: the server must stop too
            raise
        finally:
            crew.idle.back(worker.id)
            worker.batch = []
            crew.costs.learn(batch)
            worker.count(batch, time.perf_counter() - started)


async def _execute(session: Session, batch: list[Job]) -> None:
    """A stream holds the connection alone; other jobs share one pipelined batch."""
    if len(batch) == 1 and isinstance(batch[0], StreamJob):
        await run_stream(session, batch[0])
    else:
        await session.run(batch)
