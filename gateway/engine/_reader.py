"""The batch reader: a pipelined batch's results read back, each job resolved from its own.

Results come in the order `Planner` sent them. Each job is resolved as soon
as its own segment is read, before its cleanup segment: a write whose COMMIT
succeeded is reported done even if the connection breaks right after. A job
whose result holds a column type the codec does not know yet is held back
until the batch's end, when the session learns the types.

A job with raw SQL whose role check failed, or whose last statement's roles
(`Plan.expected`) are not the session's own (see `gateway.engine._planner`), gets a
refusal (42501) instead of its results: its COMMIT was skipped with the rest of its
segment, and its transaction rolls back.

A failed job that had no effect runs once more on its own (`Plan.retry`): one
hit by a cancel meant for another job of the batch, one whose transaction a
late cancel left aborted, and VACUUM and friends, which refuse a transaction
block (read-write jobs only).
"""

from __future__ import annotations

import time

from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGresult

from .._errors import BadRequest, GatewayError, Timeout, query_error
from ..values._results import ResultConverter
from ._cancel import Cancels
from ._housekeeping import Housekeeping
from ._identity import identity_error
from ._jobs import Job
from ._outcome import ends_connection, lost_error
from ._planner import Plan
from ._prepared import PreparedStatements
from ._wire import CopyRefused, Wire, result_error

_USER_CANCEL = "canceling statement due to user request"
#: how the role check fails (a division by zero), and what the client is told instead
_CHECK_FAILED = "22012"
_ROLE_CHANGED = (
    "a statement changed the role it runs as (SET ROLE, SET SESSION AUTHORIZATION or "
    "set_config('role', …)): refused; its results are withheld and its transaction rolled back"
)
# ExecStatus members as plain constants: an enum attribute costs a lookup per result
_FATAL_ERROR = ExecStatus.FATAL_ERROR


def role_changed(res: PGresult) -> GatewayError | None:
    """The refusal when `res`, a failed role check, failed as the check fails; None when
    something else stopped it (a cancel)."""
    if result_error(res).sqlstate != _CHECK_FAILED:
        return None
    return _refusal()


def _refusal() -> GatewayError:
    return query_error(_ROLE_CHANGED, sqlstate="42501")


def _roles_differ(res: PGresult, expected: list[bytes | None]) -> bool:
    """Whether `res`, `LAST_READ`'s answer, names roles other than `expected`."""
    return res.ntuples != 1 or [res.get_value(0, 1), res.get_value(0, 2)] != expected


class BatchReader:
    """Reads one session's batches back and resolves their jobs."""

    def __init__(
        self,
        wire: Wire,
        cancels: Cancels,
        prepared: PreparedStatements,
        housekeeping: Housekeeping,
        results: ResultConverter,
    ) -> None:
        self._wire = wire
        self._pg = wire.pg
        self._cancels = cancels
        self._prepared = prepared
        self._housekeeping = housekeeping
        self._results = results

    async def read(self, plans: list[Plan]) -> list[tuple[Plan, list[PGresult]]]:
        """Read the jobs' results in order, resolving each job as soon as its own
        segment is read; return the jobs held (with their statements' results)
        while one of their types is unknown.

        Results libpq holds already (most of a batch's) are taken without a
        coroutine each.
        """
        pg, wire, cancels = self._pg, self._wire, self._cancels
        deferred = []
        mark = time.perf_counter()
        for plan in plans:
            job = cancels.head = plan.job
            # abandoned while waiting behind other jobs of the batch: cancelled if
            # we have to wait for it, that is while the server may still run it
            cancels.wanted = job.done
            before = plan.rollback_first + len(plan.prepares) * self._prepared.messages + plan.setup
            results = []
            try:
                step = 1 + plan.guarded + plan.checked
                for _ in range(before + len(job.statements) * step + plan.commit):
                    results.append(await wire.result() if pg.is_busy() else wire.take_result())
            except CopyRefused as exc:
                job.fail(BadRequest(str(exc)))
                raise
            finally:
                cancels.head = None
                cancels.wanted = False
            if pg.is_busy():
                await wire.sync()
            else:
                wire.take_sync()
            raw = self._settle(plan, results, before)
            if raw is not None:
                deferred.append((plan, raw))
            for _ in range(plan.cleanup):
                if (await wire.result()).status == _FATAL_ERROR:
                    self._housekeeping.dirty = True  # a late cancel cut it short
            if plan.cleanup:
                await wire.sync()
            # how long the connection was held by this job: results that came
            # in one packet with the previous job's cost (nearly) nothing
            now = time.perf_counter()
            job.cost_s, mark = now - mark, now
        return deferred

    def _settle(self, plan: Plan, results: list[PGresult], before: int) -> list[PGresult] | None:
        """Resolve the job from its segment's results, the statements' from `before` on;
        return the statements' results instead while one of their types is unknown."""
        setup_end = plan.rollback_first + plan.setup
        if plan.prepares:
            self._prepared.forget_failed(plan.prepares, results[setup_end:])
        # per statement: [read-only guard] statement [role check]
        step = 1 + plan.guarded + plan.checked
        end = before + step * len(plan.job.statements)
        raw = results[before + plan.guarded : end : step]
        for res in raw:
            self._housekeeping.note(res)
        # the result that commits a write: its COMMIT, or a statement run unwrapped
        commits = -1 if plan.wrapped else end - 1 - plan.checked
        if plan.commit:
            commits = len(results) - 1
        # after an error PostgreSQL skips the rest of the segment: one error at most
        for i, res in enumerate(results):
            if res.status == _FATAL_ERROR:
                if plan.checked:  # its check, which releases its advisory locks, did not run
                    self._housekeeping.unlock_due = True
                if plan.checked and before <= i < end and (i - before) % step == step - 1:
                    self._role_check_failed(plan, res)
                else:
                    at_identity = bool(plan.identity) and i == setup_end - plan.identity
                    self._fail(
                        plan, res, first=i == 0, commits=i == commits, at_identity=at_identity
                    )
                return None
        if plan.expected is not None and _roles_differ(results[end - 1], plan.expected):
            plan.job.fail(_refusal())
            return None
        return None if self.deliver(plan.job, raw) else raw

    def _role_check_failed(self, plan: Plan, res: PGresult) -> None:
        """A role check after a statement failed: refused, unless it was a cancel's."""
        if (refusal := role_changed(res)) is not None:
            plan.job.fail(refusal)
        else:
            self._fail(plan, res, first=False, commits=False, at_identity=False)

    def _fail(
        self, plan: Plan, res: PGresult, *, first: bool, commits: bool, at_identity: bool
    ) -> None:
        """Fail the job with `res`'s error, or mark it to run again; `first`: the
        error came from the job's very first message, before anything of it ran;
        `commits`: from the one that commits a write (its COMMIT, or the statement
        of a write run unwrapped); `at_identity`: from the statement that sets its role."""
        job = plan.job
        error = result_error(res, job.comment)
        if commits and not job.read_only and ends_connection(error.sqlstate):
            job.fail(lost_error(job, sent=True))  # the server went down as it committed
        elif not plan.retrying and not job.done and self._should_retry(plan, error, first):
            plan.retry = True
        elif error.sqlstate == "57014" and _USER_CANCEL not in error.message:
            job.fail(Timeout("the query ran past its timeout and was cancelled", sqlstate="57014"))
        elif at_identity:
            job.fail(identity_error(error))
        else:
            job.fail(error)

    def _should_retry(self, plan: Plan, error: GatewayError, first: bool) -> bool:
        """Whether the failed job had no effect and can simply run again."""
        job = plan.job
        sent = self._cancels.sent
        if error.sqlstate == "57014" and sent and _USER_CANCEL in error.message:
            return job not in sent  # hit by a cancel meant for another job
        if error.sqlstate == "25P02" and first:
            # A cancel meant for the job before landed on that job's cleanup
            # ROLLBACK, leaving its transaction aborted: this one never started
            # (and its own cleanup ROLLBACK ends that transaction).
            return True
        if error.sqlstate == "25001" and plan.wrapped and not job.read_only and not plan.identity:
            # VACUUM and friends refuse a transaction block: run alone, unwrapped
            # (not with a role of a token's: it is taken on inside the transaction only)
            plan.wrapped = False
            return not job.transaction and len(job.statements) == 1
        return False

    def deliver(self, job: Job, raw: list[PGresult]) -> bool:
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
