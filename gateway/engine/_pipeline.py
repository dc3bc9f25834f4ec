"""Run a batch of jobs on one connection in one round trip (libpq pipeline mode).

Each job gets its own pair of Syncs, so it is its own transaction (DESIGN §2):

    read-only, one statement:
                [ROLLBACK] [prepare] BEGIN READ ONLY; [set_config(timeout)]; stmt; Sync
    read-only, several:
                [ROLLBACK] [prepare] BEGIN READ ONLY; [set_config(timeout)]; (guard; stmt)…; Sync
                ROLLBACK; cleanup; Sync
    read-write: [ROLLBACK] [prepare] BEGIN READ WRITE; [set_config(timeout)]; stmt…; COMMIT; Sync
                ROLLBACK; cleanup; Sync

    cleanup:    RESET ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ROLE;
                DISCARD TEMP; CLOSE ALL; UNLISTEN *
    prepare:    [Close] Parse of a named statement not trusted yet (see `Session.send_prepare`)

A batch with a list parameter of two or more elements is preceded by a round
trip that describes its statements (Parse; Describe; Sync each), so each array
literal is written with its type's delimiter (see `Session._describe_lists`).

A read-only job's transaction is ended by the ROLLBACK that opens the next
segment (or a last ``ROLLBACK; Sync`` closing the batch): ROLLBACK cannot
fail, so the next job still starts clean, and a read-only job costs one Sync.

An error inside the first segment makes PostgreSQL skip the rest of that
segment only; the second segment's ROLLBACK then ends the failed transaction,
so the next job starts clean. A lone read-only statement never commits: its
ROLLBACK reverts any ``set_config``/``SET`` it ran, and a ``SET TRANSACTION
READ WRITE`` (or ``COMMIT``) has no statement after it to use it.

Several read-only statements could end the transaction themselves (``COMMIT``,
``RELEASE``, ``COMMIT AND CHAIN``) and open a read-write one. So each is
preceded by a guard, a SELECT that makes the current transaction READ ONLY and
takes its snapshot: after it PostgreSQL refuses to make that transaction read
write (25001), whatever ran before. Their cleanup segment then reverts what a
transaction they committed left in the session. A read-write job commits, and
its cleanup reverts the settings, role and temporary tables it left behind.

This module drives `psycopg.pq` (libpq) directly because psycopg's public
``Pipeline.sync()`` waits for results, which would cost a round trip per job.
`psycopg.pq` is a documented psycopg interface; tests/test_pipeline.py pins
the behaviour we rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, pq
from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus, TransactionStatus
from psycopg.pq.abc import PGconn, PGresult

from .._errors import GatewayError, Timeout, query_error
from ..values._encoding import TYPE_QUERY, Codec, param_to_text
from ..values._results import ResultConverter
from ._jobs import Job, Statement
from ._libpq import pipeline_sync

_COMMIT = b"COMMIT"
_ROLLBACK = b"ROLLBACK"
_RESET = b"RESET ALL"
_DISCARD = b"DISCARD ALL"
#: before each statement of a read-only job with several: see the module's docstring
_READ_ONLY_GUARD = b"SELECT pg_catalog.set_config('transaction_read_only', 'on', true)"
#: a job's own cleanup segment, after its ROLLBACK: what a committed transaction can
#: leave in the session. RESET ALL leaves the session user and the role alone; SET
#: SESSION AUTHORIZATION DEFAULT resets both, RESET ROLE then restores a role set
#: for the login role (ALTER ROLE … SET role). DISCARD ALL, which would do nearly
#: all of it, refuses to share a segment, and would drop the named statements.
_CLEANUP = (
    _RESET,
    b"SET SESSION AUTHORIZATION DEFAULT",
    b"RESET ROLE",
    b"DISCARD TEMP",
    b"CLOSE ALL",
    b"UNLISTEN *",
)
_SET_TIMEOUT = b"SELECT pg_catalog.set_config('statement_timeout', $1, true)"

#: a per-job server-side timeout is sent only when it is this much shorter than
#: the connection's own statement_timeout: otherwise the cap does the job.
_TIMEOUT_SLACK_MS = 500

#: command tags of statements that leave state in the session beyond their
#: transaction; after one, the connection is cleaned with DISCARD ALL.
_SESSION_TAGS = frozenset(
    b"SET RESET PREPARE DEALLOCATE LISTEN UNLISTEN LOAD DISCARD DECLARE".split()
)
_USER_CANCEL = "canceling statement due to user request"
#: how long a cancel request may take; the server-side statement_timeout backs it up
CANCEL_TIMEOUT_S = 5.0
# ExecStatus members as plain constants: an enum attribute costs a lookup per result
_COMMAND_OK = ExecStatus.COMMAND_OK
_FATAL_ERROR = ExecStatus.FATAL_ERROR
_PIPELINE_SYNC = ExecStatus.PIPELINE_SYNC
_COPY = frozenset({ExecStatus.COPY_IN, ExecStatus.COPY_OUT, ExecStatus.COPY_BOTH})

#: libpq can close a named statement in a pipeline (PQsendClosePrepared, libpq 17).
#: Without it a named query whose statement may have been tampered with runs unnamed.
CLOSE_PREPARED = pq.version() >= 170000 and pq.__build_version__ >= 170000


@functools.lru_cache(maxsize=64)
def _leaves_session_state(tag: bytes | None) -> bool:
    """Whether a statement with command tag `tag` may leave state in the session
    (a temporary table is created with the tag ``CREATE TABLE``)."""
    tag = tag or b""
    return tag.split(b" ", 1)[0] in _SESSION_TAGS or tag == b"CREATE TABLE"


T = TypeVar("T")


class ConnectionLost(Exception):
    """The connection broke; the caller fails the jobs not yet resolved."""


@dataclass(slots=True)
class _Plan:
    """What was sent for one job, so its results can be read back in order."""

    job: Job
    wrapped: bool = True
    retrying: bool = False
    #: each statement is preceded by `_READ_ONLY_GUARD`
    guarded: bool = False
    #: named statements prepared in this job's segment (Close and Parse, or Parse)
    prepares: tuple[bytes, ...] = ()
    setup: int = 0
    commit: bool = False
    cleanup: int = 0
    rollback_first: bool = False
    retry: bool = False


def begin_command(job: Job) -> bytes:
    """The BEGIN that opens `job`'s transaction."""
    return _begin_command(job.isolation, job.read_only)


@functools.lru_cache(maxsize=16)
def _begin_command(isolation: str | None, read_only: bool) -> bytes:
    parts = ["BEGIN"]
    if isolation:
        parts.append(f"ISOLATION LEVEL {isolation.upper()}")
    parts.append("READ ONLY" if read_only else "READ WRITE")
    return " ".join(parts).encode()


class Session:
    """One pooled connection, held by one connection worker, driven in pipeline mode.

    `run` sends a batch and resolves every job's future. It raises
    `ConnectionLost` when the connection breaks; the jobs of that batch that
    are not resolved are then the caller's to fail.
    """

    def __init__(
        self,
        conn: AsyncConnection[Any],
        codec: Codec,
        *,
        statement_timeout_ms: int,
    ) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._codec = codec
        self._results = ResultConverter(codec)
        self._cap_ms = statement_timeout_ms
        #: named statements prepared since the last statement not from the catalog
        self._prepared: set[bytes] = set()
        #: a statement not from the catalog ran since the session began (or DISCARD ALL)
        self._foreign = False
        #: messages (and so results) that prepare one named statement: Close, Parse
        self.prepare_messages = 2 if CLOSE_PREPARED else 1
        self._dirty = False
        #: a read-only job's transaction is still open: the next segment ends it
        self._txn_open = False
        self._waiter: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[bool] | None = None
        self._watching = False
        #: set when the server closed the connection while it was idle
        self.broken = False
        #: the job whose own results are being awaited: the one a cancel would hit
        self._head: Job | None = None
        self._cancel_wanted = False
        #: jobs of the current batch a cancel was sent for (one each, at most)
        self._cancelled: list[Job] = []
        self._loop = asyncio.get_running_loop()
        self._fd = self._pg.socket
        self.backend_pid = self._pg.backend_pid
        self._pg.nonblocking = 1
        self._pg.enter_pipeline_mode()

    # --- the batch -------------------------------------------------------------

    async def run(self, jobs: list[Job]) -> None:
        """Run `jobs` in one round trip and resolve each one's future.

        A job hit by a cancel meant for another job of the batch, or refused
        inside a transaction block (VACUUM and friends, read-write only), had no
        effect: it runs once more on its own.

        Raises:
            ConnectionLost: the connection broke.
        """
        try:
            return await self._run(jobs)
        except psycopg.OperationalError as exc:
            self.unwatch()  # libpq may have closed the socket already
            raise ConnectionLost(str(exc)) from exc

    async def _run(self, jobs: list[Job]) -> None:
        listed = [st for job in jobs for st in job.statements if st.lists]
        if listed:
            await self._describe_lists(listed)
        plans = await self._run_batch(jobs)
        for plan in plans:
            if plan.retry and not plan.job.done:
                await self._run_batch([plan.job], wrapped=plan.wrapped, retrying=True)

    async def _run_batch(
        self, jobs: list[Job], *, wrapped: bool = True, retrying: bool = False
    ) -> list[_Plan]:
        now = self._loop.time()
        plans = [self._send(job, now, wrapped=wrapped, retrying=retrying) for job in jobs]
        trailer = self._send_trailer()
        self._cancelled = []
        await self._flush()
        deferred = await self._read_batch(plans)
        if trailer:
            res = await self._result()
            await self._sync()
            if res.status == ExecStatus.FATAL_ERROR:  # a late cancel landed on it
                await self._housekeeping(_ROLLBACK)
        if deferred:
            await self._learn_types(deferred)
            for plan, raw in deferred:
                if not self._deliver(plan.job, raw):  # learnt as text when not found
                    plan.job.fail(GatewayError("a result type could not be learnt"))
        if self._pg.transaction_status != TransactionStatus.IDLE:
            await self._housekeeping(_ROLLBACK)  # a cleanup was cancelled (see _should_retry)
        if self._dirty:
            await self._discard()
        return plans

    def close(self) -> None:
        """Leave pipeline mode so the pool gets a plain idle connection back.

        After an interrupted batch results are still due: the connection stays
        as it is and the pool, seeing it busy, discards it. Closing twice is harmless.
        """
        self.unwatch()
        if self._pg.status == ConnStatus.OK and self._pg.pipeline_status:
            with contextlib.suppress(psycopg.OperationalError):
                self._pg.exit_pipeline_mode()

    # --- sending -------------------------------------------------------------------

    def _send(self, job: Job, now: float, *, wrapped: bool, retrying: bool) -> _Plan:
        pg = self._pg
        plan = _Plan(job, wrapped, retrying)  # positional: a third of the time
        if self._txn_open:
            # the previous read-only job's ROLLBACK opens this job's segment:
            # it cannot fail, and it saves that job a Sync of its own
            pg.send_query_params(_ROLLBACK, None)
            plan.rollback_first = True
        self._send_prepares(job, plan)
        if wrapped:
            self._send_begin(job, plan, now)
        plan.guarded = guarded = wrapped and job.read_only and len(job.statements) > 1
        for st in job.statements:
            if guarded:
                pg.send_query_params(_READ_ONLY_GUARD, None)
            self.send_statement(st)
        if wrapped and not job.read_only:
            pg.send_query_params(_COMMIT, None)
            plan.commit = True
        pipeline_sync(pg)
        self._txn_open = wrapped
        if guarded or not job.read_only:
            self._send_cleanup(plan)
        return plan

    def _send_prepares(self, job: Job, plan: _Plan) -> None:
        for st in job.statements:
            name = self.send_prepare(st)
            if name is not None:
                plan.prepares += (name,)

    # --- named statements: only the gateway's own SQL runs by their names ---------------
    #
    # Any statement not from the catalog can drop or replace a named statement,
    # unseen: ``DO $$BEGIN EXECUTE 'DEALLOCATE pgqg_x'; EXECUTE 'PREPARE pgqg_x AS
    # ...'; END$$`` is a read-only DO, and a prepared statement outlives ROLLBACK.
    # So a name is trusted only while nothing but catalog SQL has run since the
    # gateway prepared it; after that it is closed and prepared again (Close and
    # Parse, in the segment of the job that needs it) before it is run.

    def send_prepare(self, st: Statement) -> bytes | None:
        """Queue what makes `st`'s named statement the catalog's own; return its
        name, or None when nothing was queued (`st` has no name, it is trusted
        already, or it will run unnamed: see `trusted_name`)."""
        name = st.prepared
        if name is None or name in self._prepared:
            return None
        if self.prepare_messages == 2:
            # closing a name that does not exist is not an error
            self._pg.send_close_prepared(name)
        elif self._foreign:
            return None  # it may exist, not as ours: Parse would fail; run it unnamed
        self._pg.send_prepare(name, st.sql)
        self._prepared.add(name)
        return name

    def trusted_name(self, st: Statement) -> bytes | None:
        """The name `st` runs by; None: it runs as its own text (raw SQL, or a
        named statement this connection does not trust and could not prepare)."""
        name = st.prepared
        return name if name is not None and name in self._prepared else None

    def send_statement(self, st: Statement) -> None:
        """Queue `st`: by its name when that is trusted, else as its own text."""
        if st.prepared is None:
            self._pg.send_query_params(st.sql, st.params)
            if self._prepared:
                self._prepared.clear()
            self._foreign = True
        elif (name := self.trusted_name(st)) is not None:
            self._pg.send_query_prepared(name, st.params)
        else:
            self._pg.send_query_params(st.sql, st.params)

    def _send_begin(self, job: Job, plan: _Plan, now: float) -> None:
        pg = self._pg
        pg.send_query_params(begin_command(job), None)
        plan.setup = 1
        remaining_ms = int((job.deadline - now) * 1000)
        if remaining_ms < self._cap_ms - _TIMEOUT_SLACK_MS:
            pg.send_query_params(_SET_TIMEOUT, [str(max(remaining_ms, 1)).encode()])
            plan.setup += 1

    def _send_cleanup(self, plan: _Plan) -> None:
        """A job's own last segment: end the transaction, reset the session."""
        if self._txn_open:
            self._pg.send_query_params(_ROLLBACK, None)
            plan.cleanup += 1
        plan.cleanup += send_cleanup(self._pg)
        pipeline_sync(self._pg)
        self._txn_open = False

    def _send_trailer(self) -> bool:
        """End the last read-only job's transaction; True if a ROLLBACK was sent."""
        if not self._txn_open:
            return False
        self._pg.send_query_params(_ROLLBACK, None)
        pipeline_sync(self._pg)
        self._txn_open = False
        return True

    async def _flush(self) -> None:
        while self._pg.flush():
            await self._wait(writable=True)
            self._pg.consume_input()

    # --- reading -------------------------------------------------------------------

    async def _read_batch(self, plans: list[_Plan]) -> list[tuple[_Plan, list[PGresult]]]:
        """Read the jobs' results in order, resolving each job as soon as its own
        segment is read; return the jobs held (with their statements' results)
        while one of their types is unknown.

        A job is settled before its cleanup: a write whose COMMIT succeeded is
        reported done even if the connection breaks right after. Results libpq
        holds already (most of a batch's) are taken without a coroutine each.
        """
        pg = self._pg
        deferred = []
        mark = time.perf_counter()
        for plan in plans:
            job = self._head = plan.job
            # abandoned while waiting behind other jobs of the batch: cancelled if
            # we have to wait for it, that is while the server may still run it
            self._cancel_wanted = job.done
            before = plan.rollback_first + len(plan.prepares) * self.prepare_messages + plan.setup
            results = []
            try:
                for _ in range(before + len(job.statements) * (1 + plan.guarded) + plan.commit):
                    results.append(await self._result() if pg.is_busy() else self._take_result())
            finally:
                self._head = None
                self._cancel_wanted = False
            if pg.is_busy():
                await self._sync()
            else:
                self._take_sync()
            raw = self._settle(plan, results, before)
            if raw is not None:
                deferred.append((plan, raw))
            for _ in range(plan.cleanup):
                await self._result()
            if plan.cleanup:
                await self._sync()
            # how long the connection was held by this job: results that came
            # in one packet with the previous job's cost (nearly) nothing
            now = time.perf_counter()
            job.cost_s, mark = now - mark, now
        return deferred

    def _settle(self, plan: _Plan, results: list[PGresult], before: int) -> list[PGresult] | None:
        """Resolve the job from its segment's results, the statements' from `before` on;
        return the statements' results instead while one of their types is unknown."""
        if plan.prepares:
            self._prepared_results(plan.prepares, results[plan.rollback_first :])
        step = 1 + plan.guarded  # guarded, each statement's result follows its guard's
        raw = results[before + step - 1 : before + step * len(plan.job.statements) : step]
        for res in raw:
            self._note_session_state(res)
        # after an error PostgreSQL skips the rest of the segment: one error at most
        for res in results:
            if res.status == _FATAL_ERROR:
                self._fail(plan, res, first=res is results[0])
                return None
        return None if self._deliver(plan.job, raw) else raw

    def _prepared_results(self, names: tuple[bytes, ...], results: list[PGresult]) -> None:
        """Forget the statements whose Parse (the last message of each) failed."""
        step = self.prepare_messages
        for name, res in zip(names, results[step - 1 :: step], strict=False):
            if res.status != _COMMAND_OK:
                self._prepared.discard(name)

    def _fail(self, plan: _Plan, res: PGresult, *, first: bool) -> None:
        """Fail the job with `res`'s error, or mark it to run again; `first`: the
        error came from the job's very first message, before anything of it ran."""
        error = _query_error(res)
        job = plan.job
        if not plan.retrying and not job.done and self._should_retry(plan, error, first):
            plan.retry = True
        elif error.sqlstate == "57014" and _USER_CANCEL not in error.message:
            job.fail(Timeout("the query ran past its timeout and was cancelled", sqlstate="57014"))
        else:
            job.fail(error)

    def _should_retry(self, plan: _Plan, error: GatewayError, first: bool) -> bool:
        """Whether the failed job had no effect and can simply run again."""
        job = plan.job
        if error.sqlstate == "57014" and self._cancelled and _USER_CANCEL in error.message:
            return job not in self._cancelled  # hit by a cancel meant for another job
        if error.sqlstate == "25P02" and first:
            # A cancel meant for the job before landed on that job's cleanup
            # ROLLBACK, leaving its transaction aborted: this one never started
            # (and its own cleanup ROLLBACK ends that transaction).
            return True
        if error.sqlstate == "25001" and plan.wrapped and not job.read_only:
            # VACUUM and friends refuse a transaction block: run alone, unwrapped
            plan.wrapped = False
            return not job.transaction and len(job.statements) == 1
        return False

    def _deliver(self, job: Job, raw: list[PGresult]) -> bool:
        """Resolve `job` from its statements' results; False, with nothing done,
        while one of their types is unknown."""
        if job.done:
            return True
        results = []
        try:
            for res in raw:
                converted = self._results.convert(res, job.shape, job.max_rows)
                if converted is None:
                    return False
                results.append(converted)
        except GatewayError as exc:
            job.fail(exc)
        else:
            job.resolve(results)
        return True

    def _note_session_state(self, res: PGresult) -> None:
        if _leaves_session_state(res.command_status):
            self._dirty = True

    async def _result(self) -> PGresult:
        """The one result of a query in the pipeline, consuming the NULL after it."""
        if self._pg.is_busy():
            await self._until_ready()
        return self._take_result()

    def _take_result(self) -> PGresult:
        """`_result` once libpq holds the result (it is not busy).

        Raises:
            ConnectionLost: the protocol went out of step, or a COPY began.
        """
        pg = self._pg
        res = pg.get_result()
        if res is None:
            raise ConnectionLost("protocol out of step: no result where one was due")
        if res.status in _COPY:
            raise ConnectionLost("COPY is not supported here; use format=csv instead")
        # in pipeline mode libpq is idle after a query's result: its NULL is there at once
        if pg.is_busy() or pg.get_result() is not None:
            raise ConnectionLost("protocol out of step: more results than statements")
        return res

    async def _sync(self) -> None:
        if self._pg.is_busy():
            await self._until_ready()
        self._take_sync()

    def _take_sync(self) -> None:
        """`_sync` once libpq holds the Sync's result (it is not busy)."""
        res = self._pg.get_result()
        if res is None or res.status != _PIPELINE_SYNC:
            raise ConnectionLost("protocol out of step: no Sync where one was due")

    async def _until_ready(self) -> None:
        """Wait until libpq holds a whole result (or the end of one)."""
        pg = self._pg
        while pg.is_busy():
            await self._wait(writable=False)
            pg.consume_input()

    async def _wait(self, *, writable: bool) -> None:
        """Wait for the socket; also wakes when the head job is abandoned.

        An abandoned head job is cancelled before waiting for its results.
        The reader stays registered between waits (see `_readable`), so a batch
        costs no epoll_ctl calls per result.
        """
        if self._cancel_wanted:
            await self._request_cancel()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiter = fut
        if writable:
            fd = self._fd
            self._loop.add_writer(fd, wake_future, fut, None)
        else:
            self._watch()
        try:
            await fut
        finally:
            if writable:
                self._loop.remove_writer(fd)
            self._waiter = None

    def _watch(self) -> None:
        if not self._watching:
            self._loop.add_reader(self._fd, self._readable)
            self._watching = True

    def unwatch(self) -> None:
        """Stop watching the socket, for code that waits on it by itself. Idempotent.

        Uses the fd noted at start: once libpq has closed a broken socket,
        ``pgconn.socket`` raises, and the number must leave the event loop
        before anything else can be given it.
        """
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False

    def _readable(self) -> None:
        """The socket has data: wake whoever waits for results or for a job.

        Idle, data means a notice (ignored) or the server closing the connection.
        With nobody waiting, the reader is removed, so level-triggered polling
        does not spin while the data waits to be read.
        """
        if self._waiter is not None:
            wake_future(self._waiter, None)
        elif self._idle is not None:
            if not self._alive():
                self.broken = True
                self.unwatch()
                wake_future(self._idle, False)
        else:
            self.unwatch()

    def _alive(self) -> bool:
        try:
            self._pg.consume_input()
            while self._pg.notifies() is not None:
                pass
            return bool(self._pg.status == ConnStatus.OK)
        except psycopg.Error:
            return False

    def watch_idle(self, waiter: asyncio.Future[bool] | None) -> None:
        """While idle, wake `waiter` (with False) if the server closes the connection
        (sets `broken`)."""
        self._idle = waiter
        if waiter is not None:
            self._watch()

    # --- cancellation -----------------------------------------------------------------

    def abandoned(self, job: Job) -> None:
        """Called when a running job is abandoned: cancel it if it is executing.

        A job still waiting behind others of its batch is cancelled when its
        turn comes (see `_read_batch`).
        """
        if job is self._head:
            self._cancel_wanted = True
            if self._waiter is not None:
                wake_future(self._waiter, None)

    async def _request_cancel(self) -> None:
        """Cancel the head job's statement on the server, once per job.

        Only called while waiting for the head job's own results, so the
        server is running it (or has just finished it: a cancel that lands on
        a later job makes that job run again, see `_should_retry`).
        """
        self._cancel_wanted = False
        job = self._head
        if job is None or job in self._cancelled:
            return
        self._cancelled.append(job)
        # best effort: the server-side statement_timeout still applies
        with contextlib.suppress(psycopg.Error, OSError):
            await self._conn.cancel_safe(timeout=CANCEL_TIMEOUT_S)

    async def interrupt(self) -> None:
        """Cancel whatever the server runs for this connection now (best effort).

        For a worker stopped in the middle of a batch: the server must not go
        on running a query nobody will read.
        """
        pg = self._pg
        if pg.status == ConnStatus.OK and pg.transaction_status != TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.cancel_safe(timeout=CANCEL_TIMEOUT_S)

    # --- housekeeping -----------------------------------------------------------------

    async def _housekeeping(self, sql: bytes, params: list[bytes | None] | None = None) -> PGresult:
        """Run one statement of the gateway's own in its own segment.

        A late cancel meant for the batch's last job may land on it: then it
        runs once more.
        """
        for _ in range(2):
            self._pg.send_query_params(sql, params)
            pipeline_sync(self._pg)
            await self._flush()
            res = await self._result()
            await self._sync()
            if res.status != ExecStatus.FATAL_ERROR or _query_error(res).sqlstate != "57014":
                break
        return res

    async def _discard(self) -> None:
        await self._housekeeping(_DISCARD)
        self._prepared.clear()
        self._foreign = False
        self._dirty = False

    # --- list parameters: each array type's own delimiter ---------------------------
    #
    # A list parameter goes as an array literal, and what separates its elements
    # is the element type's delimiter (pg_type.typdelim: ";" for box, "," for
    # nearly all others). Parameters go with type unknown, so only a describe of
    # the statement tells. Statements without a list of two or more elements
    # (nearly all) are not described.

    async def _describe_lists(self, statements: list[Statement]) -> None:
        """Describe `statements` (one round trip) and write their list parameters
        again with their types' delimiters.

        Must be called between jobs, with nothing of this session in flight. A
        statement that does not parse (its error is the job's to report) or names a
        type that an earlier statement of its transaction creates keeps ``,``.

        Raises:
            ConnectionLost: the protocol went out of step.
            psycopg.OperationalError: the connection broke.
        """
        described: list[tuple[Statement, PGresult]] = []
        pending = statements
        for _ in range(2):  # a late cancel meant for the last batch may land on one
            for st in pending:
                self._pg.send_prepare(b"", st.sql)
                self._pg.send_describe_prepared(b"")
                pipeline_sync(self._pg)
            await self._flush()
            cancelled = []
            for st in pending:
                parsed, res = await self._result(), await self._result()
                await self._sync()
                if res.status == _COMMAND_OK:
                    described.append((st, res))
                elif _field(parsed, DiagnosticField.SQLSTATE) == "57014":
                    cancelled.append(st)
            if not cancelled:
                break
            pending = cancelled
        await self.fit_lists(described)

    async def fit_lists(self, described: list[tuple[Statement, PGresult]]) -> None:
        """Write each statement's list parameters with the delimiter of the array type
        its description gives them; learn the types the codec does not know yet.

        Raises:
            ConnectionLost: the protocol went out of step.
            psycopg.OperationalError: the connection broke.
        """
        codec = self._codec
        typed = [
            (st, index, res.param_type(index))
            for st, res in described
            for index in st.lists or ()
            if index < res.nparams
        ]
        unknown = {oid for _, _, oid in typed if not codec.is_known(oid)}
        if unknown:
            await self.learn_types(unknown)
        for st, index, oid in typed:
            delimiter = codec.array_delimiter(oid)
            if delimiter is not None and delimiter != "," and st.lists:
                st.params[index] = param_to_text(st.lists[index], delimiter)

    async def _learn_types(self, deferred: list[tuple[_Plan, list[PGresult]]]) -> None:
        oids = {
            r.ftype(i)
            for _, raw in deferred
            for r in raw
            for i in range(r.nfields)
            if not self._codec.is_known(r.ftype(i))
        }
        await self.learn_types(oids)

    async def learn_types(self, oids: set[int]) -> None:
        """Teach the codec `oids` (and what they are made of) in one round trip.

        Must be called between jobs, with nothing of this session in flight.
        A type not found (dropped meanwhile) is learnt as plain text.

        Raises:
            ConnectionLost: the protocol went out of step.
            psycopg.OperationalError: the connection broke.
        """
        array = "{" + ",".join(str(o) for o in sorted(oids)) + "}"
        res = await self._housekeeping(TYPE_QUERY, [array.encode()])
        if res.status == ExecStatus.TUPLES_OK:
            rows = [
                [(res.get_value(r, c) or b"").decode() for c in range(res.nfields)]
                for r in range(res.ntuples)
            ]
            self._codec.learn(rows)
        for oid in oids:
            if not self._codec.is_known(oid):
                self._codec.learn([(oid, str(oid), 0, ",", 0)])


def send_cleanup(pg: PGconn) -> int:
    """Queue the commands that reset the session after a job; return how many."""
    for command in _CLEANUP:
        pg.send_query_params(command, None)
    return len(_CLEANUP)


def wake_future(fut: asyncio.Future[T], value: T) -> None:
    """Resolve `fut` with `value` unless it is done already."""
    if not fut.done():
        fut.set_result(value)


def _field(res: PGresult, code: DiagnosticField) -> str | None:
    value = res.error_field(code)
    return value.decode(errors="replace") if value is not None else None


def _query_error(res: PGresult) -> GatewayError:
    message = _field(res, DiagnosticField.MESSAGE_PRIMARY)
    if message is None:
        message = (res.error_message or b"query failed").decode(errors="replace").strip()
    position = _field(res, DiagnosticField.STATEMENT_POSITION)
    return query_error(
        message,
        sqlstate=_field(res, DiagnosticField.SQLSTATE),
        detail=_field(res, DiagnosticField.MESSAGE_DETAIL),
        hint=_field(res, DiagnosticField.MESSAGE_HINT),
        position=int(position) if position else None,
    )
