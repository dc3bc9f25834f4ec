"""Run a batch of jobs on one connection in one round trip (libpq pipeline mode).

Each job is its own transaction, between Syncs of its own (DESIGN §2); the
segments a batch sends for each job are described in `gateway.engine._planner`.
A `Session` is made of named parts, each in a module of its own:

* `Planner` (``_planner``) queues each job's segments;
* `Wire` (``_wire``) flushes them and reads the results back in order;
* `BatchReader` (``_reader``) resolves each job from its own results;
* `Cancels` (``_cancel``) cancels an abandoned job's statement on the server;
* `PreparedStatements` (``_prepared``) decides which named statements are trusted;
* `Housekeeping` (``_housekeeping``) runs the gateway's own statements between
  jobs: ending a transaction left open, DISCARD ALL, learning new types, and
  learning the roles the session runs as, which raw statements must not change.

The session drives `psycopg.pq` (libpq) directly because psycopg's public
``Pipeline.sync()`` waits for results, which would cost a round trip per job.
`psycopg.pq` is a documented psycopg interface; tests/test_pipeline.py pins
the behaviour we rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg
from psycopg import AsyncConnection, pq
from psycopg.pq import ConnStatus, ExecStatus, TransactionStatus

from .._errors import GatewayError
from ..values._encoding import Codec
from ..values._results import ResultConverter
from ._cancel import Cancels
from ._housekeeping import Housekeeping
from ._jobs import Job
from ._outcome import lost_error
from ._planner import ROLLBACK, Plan, Planner
from ._prepared import PreparedStatements
from ._reader import BatchReader
from ._wire import ConnectionLost, Wire

#: libpq can close a named statement in a pipeline (PQsendClosePrepared, libpq 17).
#: Without it a named query whose statement may have been tampered with runs unnamed.
CLOSE_PREPARED = pq.version() >= 170000 and pq.__build_version__ >= 170000


class Session:
    """One pooled connection, held by one connection worker, driven in pipeline mode.

    `run` sends a batch and resolves every job's future. It raises
    `ConnectionLost` when the connection breaks; the jobs of that batch that
    are not resolved are then the caller's to fail. The parts are public for
    the stream executor (`gateway.engine._stream`), which shares them.
    """

    def __init__(
        self,
        conn: AsyncConnection[Any],
        codec: Codec,
        *,
        statement_timeout_ms: int,
        role_checks: bool = True,
    ) -> None:
        self._conn = conn
        #: False only for bench/unguarded.py: the cost of the role checks, measured
        self._role_checks = role_checks
        self._pg = conn.pgconn
        self.codec = codec
        self.cancels = Cancels(conn)
        self.wire = Wire(conn, self.cancels)
        self.prepared = PreparedStatements(self._pg, close=CLOSE_PREPARED)
        self.housekeeping = Housekeeping(self._pg, self.wire, self.prepared, codec)
        self._planner = Planner(self._pg, self.prepared, statement_timeout_ms=statement_timeout_ms)
        self._reader = BatchReader(
            self.wire, self.cancels, self.prepared, self.housekeeping, ResultConverter(codec)
        )
        #: the plans of the batch under way whose messages were queued, retries too
        self._sent: list[Plan] = []
        self._loop = asyncio.get_running_loop()
        self._roles: list[bytes | None] | None = None
        self.backend_pid = self._pg.backend_pid
        self._pg.nonblocking = 1
        self._pg.enter_pipeline_mode()

    @property
    def prepare_messages(self) -> int:
        """Messages (and so results) that prepare one named statement: Close, Parse."""
        return self.prepared.messages

    @prepare_messages.setter
    def prepare_messages(self, value: int) -> None:
        self.prepared.messages = value

    async def roles(self) -> list[bytes | None]:
        """The session's own current_user and session_user, as learnt once; the role
        checks after raw statements compare with them.

        Raises:
            ConnectionLost: the connection broke, or the query failed.
        """
        if self._roles is None:
            try:
                self._roles = await self.housekeeping.roles()
            except psycopg.OperationalError as exc:
                self.wire.unwatch()
                raise ConnectionLost(str(exc)) from exc
        return self._roles

    @property
    def broken(self) -> bool:
        """The server closed the connection while it was idle."""
        return self.wire.broken

    # --- the batch -------------------------------------------------------------

    async def run(self, jobs: list[Job]) -> None:
        """Run `jobs` in one round trip and resolve each one's future.

        A job hit by a cancel meant for another job of the batch, or refused
        inside a transaction block (VACUUM and friends, read-write only), had no
        effect: it runs once more on its own. When the connection breaks, every
        job not yet resolved fails with `lost_error`: 503 if it cannot have taken
        effect, 502 `outcome_unknown` if it is a write that was sent.

        Raises:
            ConnectionLost: the connection broke.
        """
        self._sent = []
        try:
            return await self._run(jobs)
        except (psycopg.OperationalError, ConnectionLost) as exc:
            self.wire.unwatch()  # libpq may have closed the socket already
            for job in jobs:
                job.fail(lost_error(job, sent=self._was_sent(job)))
            if isinstance(exc, ConnectionLost):
                raise
            raise ConnectionLost(str(exc)) from exc
        finally:
            self._sent = []

    def _was_sent(self, job: Job) -> bool:
        """Whether `job`'s messages were queued, other than a run of it that had no
        effect (marked to run again)."""
        return any(plan.job is job and not plan.retry for plan in self._sent)

    async def _run(self, jobs: list[Job]) -> None:
        if self._planner.roles is None and self._role_checks:
            self._planner.roles = await self.roles()
        listed = [st for job in jobs for st in job.statements if st.lists]
        if listed:
            await self.housekeeping.describe_lists(listed)
        plans = await self._run_batch(jobs)
        for plan in plans:
            if plan.retry and not plan.job.done:
                await self._run_batch([plan.job], wrapped=plan.wrapped, retrying=True)

    async def _run_batch(
        self, jobs: list[Job], *, wrapped: bool = True, retrying: bool = False
    ) -> list[Plan]:
        now = self._loop.time()
        plans: list[Plan] = []
        for job in jobs:
            plan = self._planner.send(job, now, wrapped=wrapped, retrying=retrying)
            plans.append(plan)
            self._sent.append(plan)
        trailer = self._planner.send_trailer()
        self.cancels.sent = []
        await self.wire.flush()
        deferred = await self._reader.read(plans)
        if trailer:
            res = await self.wire.result()
            await self.wire.sync()
            if res.status == ExecStatus.FATAL_ERROR:  # a late cancel landed on it
                await self.housekeeping.run(ROLLBACK)
        if deferred:
            await self.housekeeping.learn_types_of(r for _, raw in deferred for r in raw)
            for plan, raw in deferred:
                if not self._reader.deliver(plan.job, raw):  # learnt as text when not found
                    plan.job.fail(GatewayError("a result type could not be learnt"))
        if self._pg.transaction_status != TransactionStatus.IDLE:
            await self.housekeeping.run(ROLLBACK)  # a cleanup was cancelled (see _reader)
        await self.housekeeping.after_batch()
        return plans

    def close(self) -> None:
        """Leave pipeline mode so the pool gets a plain idle connection back.

        After an interrupted batch results are still due: the connection stays
        as it is and the pool, seeing it busy, discards it. Closing twice is harmless.
        """
        self.wire.unwatch()
        if self._pg.status == ConnStatus.OK and self._pg.pipeline_status:
            with contextlib.suppress(psycopg.OperationalError):
                self._pg.exit_pipeline_mode()

    # --- the connection worker's side --------------------------------------------------

    def watch_idle(self, waiter: asyncio.Future[bool] | None) -> None:
        """While idle, wake `waiter` (with False) if the server closes the connection
        (sets `broken`)."""
        self.wire.watch_idle(waiter)

    def abandoned(self, job: Job) -> None:
        """Called when a running job is abandoned: cancel it if it is executing.

        A job still waiting behind others of its batch is cancelled when its
        turn comes (see `BatchReader.read`).
        """
        if self.cancels.want(job):
            self.wire.wake()

    async def interrupt(self) -> None:
        """Cancel whatever the server runs for this connection now (best effort).

        For a worker stopped in the middle of a batch: the server must not go
        on running a query nobody will read.
        """
        await self.cancels.interrupt()
