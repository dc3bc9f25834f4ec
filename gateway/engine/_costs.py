"""What the dispatcher knows of each statement's cost: which jobs are cheap.

A job of a statement that recently held its connection for less than
`CHEAP_JOB_S` is cheap: the dispatcher lets it ride a round trip already under
way instead of waking another connection (see `gateway.engine._dispatcher`). A
statement never seen, a transaction or a stream is not cheap, so it is spread
over the connections as slow work must be.
"""

from __future__ import annotations

from ._jobs import Job
from ._stream import StreamJob

#: a statement whose recent runs each took at most this long is cheap
CHEAP_JOB_S = 0.005
#: statements whose cost is remembered; past this the memory starts afresh
#: (a forgotten statement is unknown, so it is spread: never wrong, only slower)
COSTS_REMEMBERED = 4096

_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")


def cost_key(job: Job) -> int | None:
    """What the cost of `job` is learnt and looked up by; None: not learnt (a
    transaction, a stream).

    The hash of the statement's text with every digit read as 0, so a statement
    that spells its values out (``WHERE id = 123``) is known by its shape, not
    by each value, and an entry stays small however long the statement. A
    collision or a value that changes the cost can only place a job on a busy
    connection; a batch that is then late hands the queue over.
    """
    if len(job.statements) != 1 or isinstance(job, StreamJob):
        return None
    return hash(job.statements[0].sql.translate(_DIGITS_AS_ZERO))


class StatementCosts:
    """Seconds each statement recently held its connection: moving averages."""

    def __init__(self) -> None:
        self._costs: dict[int, float] = {}

    def is_cheap(self, job: Job) -> bool:
        """Whether `job`'s statement recently ran in under `CHEAP_JOB_S` (unknown: no).

        Notes the job's `cost_key` for `learn`.
        """
        key = job.cost_key = cost_key(job)
        return key is not None and self._costs.get(key, CHEAP_JOB_S + 1) <= CHEAP_JOB_S

    def learn(self, batch: list[Job]) -> None:
        """Remember how long each job of `batch` held its connection (`Job.cost_s`)."""
        costs = self._costs
        for job in batch:
            key = job.cost_key
            if key is None or job.cost_s is None:
                continue
            known = costs.get(key)
            if known is None:
                if len(costs) >= COSTS_REMEMBERED:
                    costs.clear()
                costs[key] = job.cost_s
            else:
                costs[key] = known + (job.cost_s - known) / 4
