"""The batch planner: what a pipelined batch sends for each job, and in which segments.

Each job gets its own pair of Syncs, so it is its own transaction (DESIGN §2):

    read-only, one statement:
                [ROLLBACK] BEGIN READ ONLY; [timeout]; [identity]; [prepare]; stmt; [last]; Sync
    read-only, several:
                [ROLLBACK] BEGIN READ ONLY; [timeout]; [identity]; [prepare];
                (guard; stmt; [role])… with [last] for the last [role]; Sync
                ROLLBACK; cleanup; Sync
    read-write: [ROLLBACK] BEGIN READ WRITE; [timeout]; [identity]; [prepare];
                (stmt; [role])… with [last] for the last [role]; COMMIT; Sync
                ROLLBACK; cleanup; Sync
    batch end:  [ROLLBACK; Sync]  after a read-only job (`Planner.send_trailer`)

    timeout:    SELECT set_config('statement_timeout', …, true)
    identity:   the role and claims of the job's token (`Identity.commands`)
    cleanup:    RESET ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ROLE;
                DISCARD TEMP; CLOSE ALL; UNLISTEN *; unlock
    prepare:    [Close] Parse of a named statement not trusted yet (see `PreparedStatements`)
    role, last: after each statement of a job with raw SQL: see below
    unlock:     SELECT pg_advisory_unlock_all()

A job with a role (`gateway.engine._identity`) takes it on right after its BEGIN,
for its transaction only: its own statements, and the Parse of its named ones,
run as that role, and the transaction's end gives the next job on the connection
the login role's own role back. Its role checks (below) hold it to that role. Such
a job never runs outside a transaction block (VACUUM and friends are refused with
25001), as its role would not end with it.

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

A raw statement must not change the role it runs as: the login role may be a member
of several roles, and PostgreSQL lets it ``SET ROLE`` (or ``set_config('role', …)``
inside a SELECT) to any of them. So in a job with raw SQL each statement is followed,
in the same segment, by a check (`ROLE_GUARD`) that fails when ``current_user`` or
``session_user`` is not the session's own (`Planner.roles`): the rest of the segment,
COMMIT included, is skipped, the job's results are withheld and its transaction rolls
back (`gateway.engine._reader`). The last one (`LAST_GUARD`) also releases the
session-level advisory locks the job took, before its answer is read. After a read-only
job's last statement nothing is left to skip (its transaction is rolled back): there a
cheaper statement (`LAST_READ`) releases the locks and reads the roles, which the
reader compares. A job that
failed before it did has its locks released by the next job's check, or by an
``unlock`` of the session's own right after the batch; what else a transaction
cannot take back (prepared statements, noted from command tags) goes with DISCARD
ALL there (`gateway.engine._housekeeping`). Neither waits for the next lease.
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
#: Session-level advisory locks outlive every transaction: unlock releases them.
UNLOCK = b"SELECT pg_catalog.pg_advisory_unlock_all()"
_CLEANUP = (
    b"RESET ALL",
    b"SET SESSION AUTHORIZATION DEFAULT",
    b"RESET ROLE",
    b"DISCARD TEMP",
    b"CLOSE ALL",
    b"UNLISTEN *",
    UNLOCK,
)
#: after a raw statement: a division by zero when the role or the session user is not
#: the session's own ($1, $2); everything schema-qualified, as a request may change
#: the search_path. The reader reports its failure as a refusal (42501).
_SAME_ROLE = (
    b"pg_catalog.int4div(1, (current_user OPERATOR(pg_catalog.=) $1"
    b" AND session_user OPERATOR(pg_catalog.=) $2)::pg_catalog.int4)"
)
ROLE_GUARD = b"SELECT " + _SAME_ROLE
#: after a job's last statement: the check, and its advisory locks released
LAST_GUARD = b"SELECT pg_catalog.pg_advisory_unlock_all(), " + _SAME_ROLE
#: after a read-only job's last statement: its advisory locks released, and the roles
#: read for the reader to compare (`Plan.expected`): nothing after it needs stopping,
#: as its transaction is rolled back. Half `LAST_GUARD`'s cost: without parameters or
#: operators PostgreSQL parses and plans it in half the time.
LAST_READ = b"SELECT pg_catalog.pg_advisory_unlock_all(), current_user, session_user"
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
    #: each statement is followed by `ROLE_GUARD` (the last by `LAST_GUARD`)
    checked: bool = False
    #: the last statement is followed by `LAST_READ` instead: the current_user and
    #: session_user it must answer
    expected: list[bytes | None] | None = None
    #: named statements prepared in this job's segment (Close and Parse, or Parse)
    prepares: tuple[bytes, ...] = ()
    #: BEGIN and what follows it before the prepares: timeout, identity
    setup: int = 0
    #: the last messages of the setup set the job's role, the first of them its role
    #: (`Identity.commands`): how many
    identity: int = 0
    commit: bool = False
    cleanup: int = 0
    rollback_first: bool = False
    retry: bool = False


def begin_command(job: Job) -> bytes:
    """The BEGIN that opens `job`'s transaction."""
    return _begin_command(job.isolation, job.read_only, job.deferrable)


@functools.lru_cache(maxsize=32)
def _begin_command(isolation: str | None, read_only: bool, deferrable: bool) -> bytes:
    parts = ["BEGIN"]
    if isolation:
        parts.append(f"ISOLATION LEVEL {isolation.upper()}")
    parts.append("READ ONLY" if read_only else "READ WRITE")
    if deferrable:
        parts.append("DEFERRABLE")
    return " ".join(parts).encode()


def _has_raw_sql(job: Job) -> bool:
    """Whether a statement of `job` is not the catalog's (named queries are trusted)."""
    return any(st.prepared is None for st in job.statements)


def job_roles(job: Job, roles: list[bytes | None]) -> list[bytes | None]:
    """The current_user and session_user `job`'s role checks expect: the session's
    own `roles`, the current_user replaced by the job's role when it has one."""
    if job.identity is None:
        return roles
    return [job.identity.role_bytes, roles[1]]


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
        #: the session's own current_user and session_user, for `ROLE_GUARD`
        self.roles: list[bytes | None] | None = None

    def send(self, job: Job, now: float, *, wrapped: bool, retrying: bool) -> Plan:
        """Queue `job`'s segments; `wrapped`: inside a transaction block of its own."""
        pg = self._pg
        plan = Plan(job, wrapped, retrying)  # positional: a third of the time
        if self._txn_open:
            # the previous read-only job's ROLLBACK opens this job's segment:
            # it cannot fail, and it saves that job a Sync of its own
            pg.send_query_params(ROLLBACK, None)
            plan.rollback_first = True
        if wrapped:
            self._send_begin(job, plan, now)
        self._send_prepares(job, plan)
        plan.guarded = guarded = wrapped and job.read_only and len(job.statements) > 1
        roles = self.roles
        plan.checked = checked = roles is not None and _has_raw_sql(job)
        if checked and roles is not None:
            roles = job_roles(job, roles)
        last = job.statements[-1]
        for st in job.statements:
            if guarded:
                pg.send_query_params(_READ_ONLY_GUARD, None)
            self._prepared.send_statement(st, job.comment)
            if not checked:
                continue
            if st is not last:
                pg.send_query_params(ROLE_GUARD, roles)
            elif job.read_only and wrapped:
                pg.send_query_params(LAST_READ, None)
                plan.expected = roles
            else:
                pg.send_query_params(LAST_GUARD, roles)
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
        identity = job.identity
        if identity is not None:
            plan.identity = identity.send(pg)
            plan.setup += plan.identity

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
