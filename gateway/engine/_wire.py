"""The protocol layer of a pipelined session: the socket, and libpq's results in order.

`Wire` flushes what was queued, waits on the socket without blocking the event
loop, and takes libpq's results one at a time, checking that they come as
they were sent (a result, then the NULL after it; a Sync where one is due):
anything else raises `ConnectionLost`. While the connection is idle it watches
for the server closing it. Before each wait it lets `Cancels` send the cancel
an abandoned head job needs.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus
from psycopg.pq.abc import PGresult

from .._errors import GatewayError, query_error
from ._cancel import Cancels

T = TypeVar("T")

_PIPELINE_SYNC = ExecStatus.PIPELINE_SYNC
_COPY = frozenset({ExecStatus.COPY_IN, ExecStatus.COPY_OUT, ExecStatus.COPY_BOTH})


#: a wait for the socket that saw nothing for this long registers its reader
#: afresh and lets its caller look again: an event loop can drop a registration
#: (uvloop does when the connection is reset), and a wake-up lost that way must
#: cost this much, not the request's deadline
RECHECK_S = 0.5


class ConnectionLost(Exception):
    """The connection broke; the caller fails the jobs not yet resolved."""


class CopyRefused(ConnectionLost):
    """A statement began a COPY, which a pipelined session does not carry."""


def wake_future(fut: asyncio.Future[T], value: T) -> None:
    """Resolve `fut` with `value` unless it is done already."""
    if not fut.done():
        fut.set_result(value)


#: the diagnostic fields an error carries beyond its message, SQLSTATE, detail, hint and
#: position, by psycopg's names (``Diagnostic``): the Neon error body has them all
_MORE_FIELDS = tuple(
    (field, field.name.lower())
    for field in (
        DiagnosticField.SEVERITY,
        DiagnosticField.INTERNAL_POSITION,
        DiagnosticField.INTERNAL_QUERY,
        DiagnosticField.CONTEXT,
        DiagnosticField.SCHEMA_NAME,
        DiagnosticField.TABLE_NAME,
        DiagnosticField.COLUMN_NAME,
        DiagnosticField.DATATYPE_NAME,
        DiagnosticField.CONSTRAINT_NAME,
        DiagnosticField.SOURCE_FILE,
        DiagnosticField.SOURCE_LINE,
        DiagnosticField.SOURCE_FUNCTION,
    )
)


def result_error(res: PGresult, comment: bytes = b"") -> GatewayError:
    """The `QueryError` PostgreSQL's error result `res` describes; its position
    counted in the statement the client sent, without the `comment` sent in
    front of it (`Job.comment`, ASCII: a character a byte)."""
    message = _field(res, DiagnosticField.MESSAGE_PRIMARY)
    if message is None:
        message = (res.error_message or b"query failed").decode(errors="replace").strip()
    position = _field(res, DiagnosticField.STATEMENT_POSITION)
    more = {}
    for code, name in _MORE_FIELDS:
        value = _field(res, code)
        if value is not None:
            more[name] = value
    return query_error(
        message,
        sqlstate=_field(res, DiagnosticField.SQLSTATE),
        detail=_field(res, DiagnosticField.MESSAGE_DETAIL),
        hint=_field(res, DiagnosticField.MESSAGE_HINT),
        position=max(int(position) - len(comment), 1) if position else None,
        diagnostics=more,
    )


def _field(res: PGresult, code: DiagnosticField) -> str | None:
    value = res.error_field(code)
    return value.decode(errors="replace") if value is not None else None


class Wire:
    """One pipelined connection's socket and results, for the session that owns it."""

    def __init__(self, conn: AsyncConnection[Any], cancels: Cancels) -> None:
        #: the libpq connection, in pipeline mode and nonblocking
        self.pg = conn.pgconn
        self._cancels = cancels
        self._loop = asyncio.get_running_loop()
        self._fd = self.pg.socket
        self._waiter: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[bool] | None = None
        self._watching = False
        #: set when the server closed the connection while it was idle
        self.broken = False

    # --- sending and reading -----------------------------------------------------------

    async def flush(self) -> None:
        """Send everything queued."""
        while self.pg.flush():
            await self._wait(writable=True)
            self.pg.consume_input()

    async def result(self) -> PGresult:
        """The one result of a query in the pipeline, consuming the NULL after it."""
        if self.pg.is_busy():
            await self._until_ready()
        return self.take_result()

    def take_result(self) -> PGresult:
        """`result` once libpq holds the result (it is not busy).

        Raises:
            ConnectionLost: the protocol went out of step, or a COPY began.
        """
        pg = self.pg
        res = pg.get_result()
        if res is None:
            raise ConnectionLost("protocol out of step: no result where one was due")
        if res.status in _COPY:
            raise CopyRefused("COPY is not supported here; use format=csv instead")
        # in pipeline mode libpq is idle after a query's result: its NULL is there at once
        if pg.is_busy() or pg.get_result() is not None:
            raise ConnectionLost("protocol out of step: more results than statements")
        return res

    async def sync(self) -> None:
        """Consume the result of a Sync."""
        if self.pg.is_busy():
            await self._until_ready()
        self.take_sync()

    def take_sync(self) -> None:
        """`sync` once libpq holds the Sync's result (it is not busy)."""
        res = self.pg.get_result()
        if res is None or res.status != _PIPELINE_SYNC:
            raise ConnectionLost("protocol out of step: no Sync where one was due")

    async def _until_ready(self) -> None:
        """Wait until libpq holds a whole result (or the end of one)."""
        pg = self.pg
        while pg.is_busy():
            await self._wait(writable=False)
            pg.consume_input()

    # --- waiting on the socket -----------------------------------------------------------

    async def _wait(self, *, writable: bool) -> None:
        """Wait for the socket; also wakes on `wake` (a head job abandoned), and
        after `RECHECK_S` without news (see `_recheck`).

        An abandoned head job is cancelled before waiting for its results.
        The reader stays registered between waits (see `_readable`), so a batch
        costs no epoll_ctl calls per result.
        """
        if self._cancels.wanted:
            await self._cancels.request()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiter = fut
        if writable:
            fd = self._fd
            self._loop.add_writer(fd, wake_future, fut, None)
        else:
            self._watch()
        recheck = self._loop.call_later(RECHECK_S, self._recheck, fut)
        try:
            await fut
        finally:
            recheck.cancel()
            if writable:
                self._loop.remove_writer(fd)
            self._waiter = None

    def _recheck(self, fut: asyncio.Future[None]) -> None:
        """Nothing woke a wait for `RECHECK_S`: register the reader afresh, and
        wake the waiter, whose caller reads the socket (and so sees it broken)."""
        if self._watching:
            self.unwatch()
            self._watch()
        wake_future(fut, None)

    def wake(self) -> None:
        """Wake a wait for results early (it then sends the cancel wanted)."""
        if self._waiter is not None:
            wake_future(self._waiter, None)

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
            self.pg.consume_input()
            while self.pg.notifies() is not None:
                pass
            return bool(self.pg.status == ConnStatus.OK)
        except psycopg.Error:
            return False

    def watch_idle(self, waiter: asyncio.Future[bool] | None) -> None:
        """While idle, wake `waiter` (with False) if the server closes the connection
        (sets `broken`)."""
        self._idle = waiter
        if waiter is not None:
            self._watch()
