"""Streamed results: a job whose rows go to the client chunk by chunk, and how a
connection runs it.

The connection worker runs a `StreamJob` alone on its connection. Its future
resolves as soon as the first chunk of rows is ready (with the columns and no
rows), so an error before that still becomes an ordinary error response. The
chunks then pass through a small bounded buffer: when the client reads slowly,
the worker waits, stops reading from PostgreSQL, and the server waits in turn,
so memory does not grow with the result.

Either side may stop: the worker `finish`es (end of rows, or an error midway),
or the client goes away and the handler `abandon`s, which sets `stopped` so the
worker cancels the query and gives its connection back at once.

A stream holds its connection alone for its whole life (the dispatcher never
batches it with other jobs) and stays in pipeline mode, in two round trips:

    describe:  [BEGIN; identity] [Close] [Parse] Describe; Sync  [ROLLBACK; Sync]
               column types, taught to the codec if new, and list parameters' array
               delimiters
    execute:   BEGIN …; set_config(statement_timeout, 0, local); [identity]; Flush;
               statement (libpq chunked-rows mode); [last]; [COMMIT]; Sync
               ROLLBACK; cleanup or unlock; Sync

A job with a role (``identity``: `gateway.engine._identity`) takes it on in both
round trips, inside a transaction: its statement is parsed and described as that
role (its schemas, not the login role's), and runs as it. Only a named query
streams with a role: a raw statement could take on another role of the login
role's in the middle of its rows (``set_config('role', …)`` in an expression, then a
function that runs SQL of its own, such as ``ts_stat``), and those rows would be out
before its role check, which a buffered answer waits for. Such a stream would need
a check between chunks (a cursor, FETCH and the check per chunk); until then it is
refused (406).

The transaction is the same as a buffered job's (DESIGN §2: read-only enforced
by PostgreSQL, nothing left behind; a raw statement's role checked after it, its
advisory locks released: see `gateway.engine._planner`). Rows go out while the
statement runs, so a raw statement that changes its role gets its stream ended
with the refusal and its transaction rolled back, but the rows it sent before that
are gone. Instead of ``statement_timeout``, which
would cut a long export however fast it flows, the stream is bounded by the
request's timeout three ways: the first chunk must come within it (the
dispatcher's deadline), and afterwards neither the database (no bytes) nor the
client (no reading) may stall for longer.

libpq (17+) hands over ``CHUNK_ROWS`` rows at a time; the job's bounded buffer
makes the worker stop reading when the client is slow, and the server waits on
its socket: memory stays flat whatever the result's size. When the client goes
away, or the row limit is reached in a read-only stream, the query is cancelled
on the server and the rest of its output discarded, so the connection is free
again at once.

`_StreamRun` shares the session's parts (`Wire`, `PreparedStatements`,
`Housekeeping`, `Cancels`) rather than copies of them.
"""

from __future__ import annotations

import asyncio
import collections

import psycopg
from psycopg.adapt import Transformer
from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGresult

from .._errors import BadRequest, GatewayError, NotAcceptable, Timeout
from ..values._formats import StreamEncoder
from ..values._results import Column, StatementResult
from ._identity import Identity, identity_error
from ._jobs import Job, JobState, Statement
from ._outcome import lost_error
from ._pipeline import Session
from ._planner import (
    COMMIT,
    LAST_GUARD,
    ROLLBACK,
    UNLOCK,
    begin_command,
    job_roles,
    send_cleanup,
)
from ._reader import role_changed
from ._wire import ConnectionLost, CopyRefused, result_error, wake_future

#: encoded chunks a stream may hold between the connection worker and the client
BUFFERED_CHUNKS = 4


class StreamJob(Job):
    """One statement whose rows are streamed; see the module docstring.

    `row_limit` cuts the stream (None: no limit); `stall_s` is how long either
    side may keep the other waiting once the stream has begun.

    Raises:
        NotAcceptable: the statement is raw SQL and the job runs as a token's role
            (`identity`): its rows would go out before its role check, and the login
            role may take on other roles than the token's (see the module docstring).
    """

    __slots__ = (
        "_chunks",
        "_ended",
        "_error",
        "_readable",
        "_writable",
        "encoder",
        "row_limit",
        "rows_sent",
        "stall_s",
        "stopped",
    )

    def __init__(
        self,
        statement: Statement,
        *,
        encoder: StreamEncoder,
        read_only: bool,
        deadline: float,
        row_limit: int | None,
        stall_s: float,
        comment: bytes = b"",
        identity: Identity | None = None,
    ) -> None:
        if identity is not None and statement.prepared is None:
            raise NotAcceptable(
                "NDJSON and CSV of raw SQL are not available to a request with a role: its"
                " rows would go out before the check that it kept its role; use JSON, or a"
                " named query"
            )
        super().__init__(
            [statement],
            read_only=read_only,
            deadline=deadline,
            max_rows=0,
            comment=comment,
            identity=identity,
        )
        self.encoder = encoder
        #: rows handed to the client so far
        self.rows_sent = 0
        self.row_limit = row_limit
        self.stall_s = stall_s
        #: set when nobody will read the rest: the worker stops and cancels the query
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._ended = False
        self._error: GatewayError | None = None

    # --- the connection worker's side ---------------------------------------------------

    def begin(self, columns: list[Column]) -> bool:
        """Hand the columns to the client: the response can start. False if it is gone."""
        if self.state is not JobState.RUNNING or self.future.done():
            return False
        self.future.set_result([StatementResult(columns, [], "", None)])
        return True

    async def put(self, chunk: bytes) -> bool:
        """Queue a chunk for the client, waiting while the buffer is full.

        False when the client is gone, or did not read for `stall_s` (the
        stream then ends with a `Timeout` for it): stop producing.
        """
        try:
            async with asyncio.timeout(self.stall_s):
                while len(self._chunks) >= BUFFERED_CHUNKS and not self.stopped.done():
                    self._writable.clear()
                    await self._writable.wait()
        except TimeoutError:
            ms = round(self.stall_s * 1000)
            self.finish(Timeout(f"the client read nothing for {ms} ms; the stream was cut"))
            self._stop()
            return False
        if self.stopped.done():
            return False
        self._chunks.append(chunk)
        self._readable.set()
        return True

    def finish(self, error: GatewayError | None = None) -> None:
        """No more chunks: the client reads what is buffered, then the end (or `error`)."""
        if self._ended:
            return
        self._ended, self._error = True, error
        self.state = JobState.DONE
        self._readable.set()

    def fail(self, error: GatewayError) -> None:
        """Before the stream began: an error response. After: the stream ends with `error`."""
        if self.future.done():
            self.finish(error)
        else:
            super().fail(error)
            self._stop()

    def abandon(self, error: GatewayError | None = None) -> None:
        """The client stopped waiting (deadline before the first row) or went away."""
        if not self.future.done():
            super().abandon(error)
        self.finish(error)
        self._stop()

    def _stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)
        self._writable.set()

    # --- the client's side -------------------------------------------------------------

    async def next_chunk(self) -> bytes | None:
        """The next chunk of the response; None at its end.

        Raises:
            GatewayError: the stream failed after it began.
        """
        while not self._chunks and not self._ended:
            self._readable.clear()
            await self._readable.wait()
        if self._chunks:
            chunk = self._chunks.popleft()
            self._writable.set()
            return chunk
        if self._error is not None:
            raise self._error
        return None


#: rows per libpq result; with the job's buffer this bounds a stream's memory
CHUNK_ROWS = 1000

_NO_TIMEOUT = b"SELECT pg_catalog.set_config('statement_timeout', '0', true)"
_ROWS = frozenset({ExecStatus.TUPLES_CHUNK, ExecStatus.SINGLE_TUPLE, ExecStatus.TUPLES_OK})
_COPY = frozenset({ExecStatus.COPY_IN, ExecStatus.COPY_OUT, ExecStatus.COPY_BOTH})


async def run_stream(session: Session, job: StreamJob) -> None:
    """Run `job` alone on `session`: its rows go to the job chunk by chunk.

    On return the job is finished or failed; on `ConnectionLost` too, with
    `lost_error` (a write whose statement was sent: 502 `outcome_unknown`).

    Raises:
        ConnectionLost: the connection broke or the protocol went out of step.
    """
    run = _StreamRun(session, job)
    try:
        await run.run()
    except (psycopg.OperationalError, ConnectionLost) as exc:
        session.wire.unwatch()
        if isinstance(exc, CopyRefused):
            job.fail(BadRequest(str(exc)))
        job.fail(lost_error(job, sent=run.executing))
        if isinstance(exc, ConnectionLost):
            raise
        raise ConnectionLost(str(exc)) from exc


class _StreamRun:
    """One stream's pass over the connection; see the module docstring."""

    def __init__(self, session: Session, job: StreamJob) -> None:
        self._session = session
        self._wire = session.wire
        self._pg = session.wire.pg
        self._prepared = session.prepared
        self._housekeeping = session.housekeeping
        self._codec = session.codec
        self._job = job
        self._tx = Transformer(session.codec.adapters)
        self._loop = asyncio.get_running_loop()
        self._columns: list[Column] | None = None
        self._begun = False
        self._sent = 0
        self._cut = False  # the row limit was reached: rows left are discarded
        self._stopping = False  # nobody reads any more: drain without watching the client
        self._cancelled = False
        self._checked = False  # the statement is raw: a role check follows it
        self._error: GatewayError | None = None
        #: the statement was queued: from here a write may take effect
        self.executing = False

    async def run(self) -> None:
        statement = self._job.statements[0]
        roles = await self._session.roles()
        if not await self._describe(statement) or self._job.stopped.done():
            return
        closing = self._send(statement, roles)
        self.executing = True
        await self._wire.flush()
        if await self._read_setup():
            self._chunked_rows_mode()
        await self._read_statement()
        if self._checked:
            self._note_check(await self._one_result())
        if not self._job.read_only:
            self._note_error(await self._one_result())
        await self._wire.sync()
        for _ in range(closing):
            if (await self._wire.result()).status == ExecStatus.FATAL_ERROR:
                self._housekeeping.dirty = True  # a cancel cut the clean-up short
        await self._wire.sync()
        if self._cancelled:
            await self._after_cancel()
        await self._housekeeping.after_batch()
        await self._end()

    async def _after_cancel(self) -> None:
        """Make sure the cancel did not break the clean-up it may have landed on.

        By now the backend has taken the cancel (it was signalled before the
        rest was drained): a ROLLBACK it interrupted is run again, and a read-write
        job's cleanup is redone by DISCARD ALL.
        """
        self._pg.send_query_params(ROLLBACK, None)
        self._pg.pipeline_sync()
        await self._wire.flush()
        await self._wire.result()
        await self._wire.sync()
        if not self._job.read_only:
            self._housekeeping.dirty = True

    # --- round trip 1: what the columns are ------------------------------------------------

    async def _describe(self, statement: Statement) -> bool:
        """Parse and describe the statement; learn new column types. False if it failed."""
        wire, prepared, pg = self._wire, self._prepared, self._pg
        setup = self._send_identity(begin=True)
        name = prepared.send_prepare(statement)
        prepares = () if name is None else (name,)
        queued = len(prepares) * prepared.messages
        name = prepared.trusted_name(statement)
        if name is None:  # raw, or a name run unnamed: describe its text
            name = b""
            pg.send_prepare(name, statement.sql)
            queued = 1
        pg.send_describe_prepared(name)
        pg.pipeline_sync()
        if setup:  # the role's transaction ends, whatever failed in it
            pg.send_query_params(ROLLBACK, None)
            pg.pipeline_sync()
        await wire.flush()
        results = [await wire.result() for _ in range(setup + queued + 1)]
        await wire.sync()
        if setup:
            await wire.result()
            await wire.sync()
        if prepares:
            prepared.forget_failed(prepares, results[setup:])
        for i, res in enumerate(results):
            if res.status == ExecStatus.FATAL_ERROR:
                error = result_error(res)
                self._job.fail(identity_error(error) if setup and i == 1 else error)
                return False
        described = results[-1]
        if statement.lists:  # the description has the parameters' types too
            await self._housekeeping.fit_lists([(statement, described)])
        await self._housekeeping.learn_types_of([described])
        return True

    def _send_identity(self, *, begin: bool) -> int:
        """Queue what makes the job's role its own, after a BEGIN when `begin`;
        return how many results that is (0: the job has no role)."""
        identity = self._job.identity
        if identity is None:
            return 0
        if begin:
            self._pg.send_query_params(begin_command(self._job), None)
        return identity.send(self._pg) + begin

    # --- round trip 2: the rows ------------------------------------------------------------

    def _send(self, statement: Statement, roles: list[bytes | None]) -> int:
        """Queue the execute round trip; return how many results its closing segment has."""
        pg, job = self._pg, self._job
        pg.send_query_params(begin_command(job), None)
        pg.send_query_params(_NO_TIMEOUT, None)
        self._send_identity(begin=False)
        # without this the server would hold BEGIN's answer until the statement ends
        pg.send_flush_request()
        self._prepared.send_statement(statement, job.comment)
        self._checked = statement.prepared is None
        if self._checked:
            pg.send_query_params(LAST_GUARD, job_roles(job, roles))
        if not job.read_only:
            pg.send_query_params(COMMIT, None)
        pg.pipeline_sync()
        pg.send_query_params(ROLLBACK, None)
        if job.read_only:
            pg.send_query_params(UNLOCK, None)
            closing = 2
        else:
            closing = 1 + send_cleanup(pg)
        pg.pipeline_sync()
        return closing

    async def _read_setup(self) -> bool:
        """Read BEGIN and what follows it up to the statement; False if one failed."""
        identity = self._job.identity
        # BEGIN, set_config, [identity]
        setup = 2 + (0 if identity is None else len(identity.commands))
        results = [await self._one_result() for _ in range(setup)]
        for i, res in enumerate(results):
            if res.status == ExecStatus.FATAL_ERROR:
                error = result_error(res)
                self._note(identity_error(error) if i == 2 else error)
        return self._error is None

    def _chunked_rows_mode(self) -> None:
        try:
            self._pg.set_chunked_rows_mode(CHUNK_ROWS)
        except psycopg.NotSupportedError:  # libpq before 17: one row per result
            self._pg.set_single_row_mode()

    async def _read_statement(self) -> None:
        """Every result of the statement, up to the NULL that ends them."""
        while (res := await self._next()) is not None:
            if res.status in _COPY:
                raise CopyRefused("COPY is not supported here; use format=csv instead")
            if res.status in _ROWS:
                await self._rows(res)
            elif res.status == ExecStatus.COMMAND_OK:
                self._columns = self._columns or []
                self._housekeeping.note(res)
            elif res.status == ExecStatus.EMPTY_QUERY:
                self._note(BadRequest("the statement is empty"))
            else:
                self._note_error(res)

    async def _rows(self, res: PGresult) -> None:
        if self._stopping:
            return
        if self._cut:
            if res.ntuples:  # there is more than the limit: stop the server producing it
                await self._stop(cancel=self._job.read_only)
            return
        head = b""
        if not self._begun:
            head = self._begin(self._columns_of(res))
            if not self._begun:
                await self._stop()
                return
        take = res.ntuples
        if self._job.row_limit is not None:
            take = min(take, self._job.row_limit - self._sent)
        body = self._job.encoder.rows(res, self._tx, take) if take else b""
        self._sent += take
        self._job.rows_sent = self._sent
        if (head or body) and not await self._job.put(head + body):
            await self._stop()
        elif self._job.row_limit is not None and self._sent >= self._job.row_limit:
            self._cut = True
            self._job.finish()

    def _begin(self, columns: list[Column]) -> bytes:
        """Let the response start; the bytes before the first row (empty if it could not)."""
        self._columns = columns
        self._begun = self._job.begin(columns)
        return self._job.encoder.head(columns) if self._begun else b""

    def _columns_of(self, res: PGresult) -> list[Column]:
        return [
            Column(
                (res.fname(i) or b"").decode(),
                self._codec.type_name(res.ftype(i)),
                res.ftype(i),
            )
            for i in range(res.nfields)
        ]

    async def _end(self) -> None:
        """Close the stream: its error, or (a result with no rows yet) its head and end."""
        job = self._job
        if self._error is not None:
            job.fail(self._error)
            return
        if not self._begun and not self._stopping:
            head = self._begin(self._columns or [])
            if head and not await job.put(head):
                return
        job.finish()

    # --- errors -------------------------------------------------------------------------

    def _note_error(self, res: PGresult) -> None:
        if res.status == ExecStatus.FATAL_ERROR:
            self._note(result_error(res, self._job.comment))

    def _note_check(self, res: PGresult) -> None:
        """The role check after the statement: a failure is a refusal (42501)."""
        if res.status == ExecStatus.FATAL_ERROR:
            self._note(role_changed(res) or result_error(res, self._job.comment))

    def _note(self, error: GatewayError) -> None:
        """Keep the first error; after a stop, errors are the cancel's echo."""
        if self._error is None and not self._stopping:
            self._error = error

    # --- waiting ------------------------------------------------------------------------

    async def _next(self) -> PGresult | None:
        while self._pg.is_busy():
            await self._wait()
            self._pg.consume_input()
        return self._pg.get_result()

    async def _one_result(self) -> PGresult:
        """The one result of a plain query (BEGIN, COMMIT), consuming the NULL after it."""
        res = await self._next()
        if res is None or await self._next() is not None:
            raise ConnectionLost("protocol out of step: one result was due")
        return res

    async def _wait(self) -> None:
        """Wait for the socket; watch the client and the stall limit unless stopping."""
        ready: asyncio.Future[None] = self._loop.create_future()
        fd = self._pg.socket
        self._wire.unwatch()  # one reader per fd: the session's gives way to ours
        self._loop.add_reader(fd, wake_future, ready, None)
        watched: set[asyncio.Future[None]] = {ready}
        if not self._stopping:
            watched.add(self._job.stopped)
        try:
            done, _ = await asyncio.wait(
                watched,
                timeout=None if self._stopping else self._job.stall_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            self._loop.remove_reader(fd)
            ready.cancel()
        if self._stopping:
            return
        if self._job.stopped.done():
            await self._stop()
        elif not done:
            ms = round(self._job.stall_s * 1000)
            self._note(Timeout(f"the database sent nothing for {ms} ms; the stream was cut"))
            await self._stop()

    async def _stop(self, *, cancel: bool = True) -> None:
        """Read the rest without passing it on; cancel the query on the server first."""
        if self._stopping:
            return
        self._stopping = True
        if cancel:
            self._cancelled = True
            # best effort: if the cancel is lost, the rest is read and dropped
            await self._session.cancels.send()
