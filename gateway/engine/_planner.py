"""The batch planner: what a pipelined batch sends for each job, and in which segments.

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
    prepare:    [Close] Parse of a named statement not trusted yet (see `PreparedStatements`)

A read-only job's transaction is ended by the ROLLBACK that opens the next
segment (or a last ``ROLLBACK; Sync`` closing the batch, `Planner.send_trailer`):
ROLLBACK cannot fail, so the next job still starts clean, and a read-only job
costs one Sync.

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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from psycopg.pq.abc import PGconn

from ._jobs import Job
from ._libpq import pipeline_sync
from ._prepared import PreparedStatements

COMMIT = b"COMMIT"
ROLLBACK = b"ROLLBACK"
#: before each statement of a read-only job with several: see the module's docstring
_READ_ONLY_GUARD = b"SELECT pg_catalog.set_config('transaction_read_only', 'on', true)"
#: a job's own cleanup segment, after its ROLLBACK: what a committed transaction can
#: leave in the session. RESET ALL leaves the session user and the role alone; SET
#: SESSION AUTHORIZATION DEFAULT resets both, RESET ROLE then restores a role set
#: for the login role (ALTER ROLE … SET role). DISCARD ALL, which would do nearly
#: all of it, refuses to share a segment, and would drop the named statements.
_CLEANUP = (
    b"RESET ALL",
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


@dataclass(slots=True)
class Plan:
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


def send_cleanup(pg: PGconn) -> int:
    """Queue the commands that reset the session after a job; return how many."""
    for command in _CLEANUP:
        pg.send_query_params(command, None)
    return len(_CLEANUP)


class Planner:
    """Queues each job's segments on one connection (nothing is flushed here)."""

    def __init__(
        self, pg: PGconn, prepared: PreparedStatements, *, statement_timeout_ms: int
    ) -> None:
        self._pg = pg
        self._prepared = prepared
        self._cap_ms = statement_timeout_ms
        #: a read-only job's transaction is still open: the next segment ends it
        self._txn_open = False

    def send(self, job: Job, now: float, *, wrapped: bool, retrying: bool) -> Plan:
        """Queue `job`'s segments; `wrapped`: inside a transaction block of its own."""
        pg = self._pg
        plan = Plan(job, wrapped, retrying)  # positional: a third of the time
        if self._txn_open:
            # the previous read-only job's ROLLBACK opens this job's segment:
            # it cannot fail, and it saves that job a Sync of its own
            pg.send_query_params(ROLLBACK, None)
            plan.rollback_first = True
        self._send_prepares(job, plan)
        if wrapped:
            self._send_begin(job, plan, now)
        plan.guarded = guarded = wrapped and job.read_only and len(job.statements) > 1
        for st in job.statements:
            if guarded:
                pg.send_query_params(_READ_ONLY_GUARD, None)
            self._prepared.send_statement(st, job.comment)
        if wrapped and not job.read_only:
            pg.send_query_params(COMMIT, None)
            plan.commit = True
        pipeline_sync(pg)
        self._txn_open = wrapped
        if guarded or not job.read_only:
            self._send_cleanup(plan)
        return plan

    def _send_prepares(self, job: Job, plan: Plan) -> None:
        for st in job.statements:
            name = self._prepared.send_prepare(st)
            if name is not None:
                plan.prepares += (name,)

    def _send_begin(self, job: Job, plan: Plan, now: float) -> None:
        pg = self._pg
        pg.send_query_params(begin_command(job), None)
        plan.setup = 1
        remaining_ms = int((job.deadline - now) * 1000)
        if remaining_ms < self._cap_ms - _TIMEOUT_SLACK_MS:
            pg.send_query_params(_SET_TIMEOUT, [str(max(remaining_ms, 1)).encode()])
            plan.setup += 1

    def _send_cleanup(self, plan: Plan) -> None:
        """A job's own last segment: end the transaction, reset the session."""
        if self._txn_open:
            self._pg.send_query_params(ROLLBACK, None)
            plan.cleanup += 1
        plan.cleanup += send_cleanup(self._pg)
        pipeline_sync(self._pg)
        self._txn_open = False

    def send_trailer(self) -> bool:
        """End the last read-only job's transaction; True if a ROLLBACK was sent."""
        if not self._txn_open:
            return False
        self._pg.send_query_params(ROLLBACK, None)
        pipeline_sync(self._pg)
        self._txn_open = False
        return True
