"""What the front end hands the dispatcher: a `Job`, and what comes back.

A job is one unit of isolation: one statement, or one all-or-nothing
transaction. Its future is resolved exactly once (result, error, timeout or
cancellation); whoever comes second is ignored.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._errors import GatewayError
from ..values._results import StatementResult
from ._identity import Identity


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(slots=True)
class Statement:
    """One SQL statement with its parameters already in PostgreSQL text form.

    Not frozen: one is made per request (a frozen dataclass takes three times
    as long to build), and the connection that runs it writes a list parameter
    again once the parameter's type shows its array delimiter (see `lists`).
    """

    sql: bytes
    params: list[bytes | None] = field(default_factory=list)
    #: name of a prepared statement to use instead of `sql` (named queries)
    prepared: bytes | None = None
    #: list parameters (by position) whose array literal in `params` separates
    #: elements with ``,``, which box[] and a few other types do not take
    #: (`gateway.values.list_params`); None: there is none
    lists: dict[int, list[Any]] | None = None


class Job:
    """A request for the dispatcher: statements, how to run them, and a future.

    `read_only` runs the job in a READ ONLY transaction (PostgreSQL enforces it).
    `transaction` runs several statements all or nothing; `isolation` names its
    isolation level, and `deferrable` makes it DEFERRABLE (PostgreSQL heeds it
    only in a serializable read-only transaction). `deadline` is on the event
    loop's clock. `comment` (a SQL comment such as ``/* request_id=… */ ``) goes
    in front of each statement sent as text, where ``pg_stat_activity`` shows
    it; error positions are given without it. `identity` is the role (and the
    token's claims) its transaction runs as; None: the login role's own, as when
    the gateway verifies no tokens.

    The dispatcher marks a job `cheap` when its statement (known by
    `cost_key`) recently ran quickly; `cost_s` is how long it held its
    connection, once run. `started_at` (`time.perf_counter`) is when a
    connection took it, 0.0 before.
    """

    __slots__ = (
        "_on_abandon",
        "cheap",
        "comment",
        "cost_key",
        "cost_s",
        "deadline",
        "deferrable",
        "enqueued_at",
        "failed",
        "future",
        "identity",
        "isolation",
        "max_rows",
        "read_only",
        "shape",
        "started_at",
        "state",
        "statements",
        "transaction",
    )

    def __init__(
        self,
        statements: list[Statement],
        *,
        read_only: bool,
        deadline: float,
        max_rows: int,
        shape: str = "objects",
        transaction: bool = False,
        isolation: str | None = None,
        identity: Identity | None = None,
        deferrable: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        comment: bytes = b"",
    ) -> None:
        if loop is None:
            loop = asyncio.get_running_loop()
        self.statements = statements
        self.identity = identity
        self.read_only = read_only
        self.deadline = deadline
        self.max_rows = max_rows
        self.shape = shape
        self.transaction = transaction
        self.isolation = isolation
        self.deferrable = deferrable
        self.comment = comment
        self.future: asyncio.Future[list[StatementResult]] = loop.create_future()
        self.state = JobState.QUEUED
        self.enqueued_at = 0.0  # set by the dispatcher as it queues the job
        self.started_at = 0.0  # set by the dispatcher as a connection takes the job
        self._on_abandon: Callable[[Job], None] | None = None
        self.cheap = False
        self.cost_key: int | None = None
        self.cost_s: float | None = None
        #: the job ended with an error (not a result, not a cancellation)
        self.failed = False

    @property
    def done(self) -> bool:
        return self.state is JobState.DONE

    def start(self, on_abandon: Callable[[Job], None]) -> bool:
        """Mark the job running; False when it was already resolved (skip it).

        `on_abandon` is called with the job if it is failed or cancelled while
        running, so its connection worker can cancel the query on the server.
        """
        if self.state is not JobState.QUEUED:
            return False
        self.state = JobState.RUNNING
        self._on_abandon = on_abandon
        return True

    def resolve(self, results: list[StatementResult]) -> None:
        """Deliver the results; ignored if the job is already resolved."""
        self._on_abandon = None
        if self._finish():
            self.future.set_result(results)

    def fail(self, error: GatewayError) -> None:
        """Deliver an error; ignored if the job is already resolved."""
        self._on_abandon = None
        if self._finish():
            self.future.set_exception(error)
            self.failed = True

    def abandon(self, error: GatewayError | None = None) -> None:
        """The client stops waiting: its deadline passed (`error`) or it went away.

        A queued job is then skipped; a running one has its query cancelled on
        the server by its connection worker.
        """
        if self.state is JobState.DONE:
            return
        was_running = self.state is JobState.RUNNING
        self.state = JobState.DONE
        # the future may be cancelled already: by the task that awaited it
        if not self.future.done():
            if error is None:
                self.future.cancel()
            else:
                self.future.set_exception(error)
                self.failed = True
        callback, self._on_abandon = self._on_abandon, None
        if was_running and callback is not None:
            callback(self)

    def _finish(self) -> bool:
        if self.state is JobState.DONE:
            return False
        self.state = JobState.DONE
        return not self.future.done()
