"""What a job's client is told when its connection is lost: may the job have taken effect?

The engine knows what it handed to the connection. A job none of which was
sent, and any read-only job (PostgreSQL enforces READ ONLY, so it cannot have
written anything), had no effect: `Unavailable`, 503 with ``Retry-After``,
safe to retry. A write whose statements were sent, so whose COMMIT (or
autocommit statement) may have run, but whose acknowledgement never came
back, may or may not have taken effect: `OutcomeUnknown`, 502 without
``Retry-After``. The gateway never retries a write itself.

libpq may put queued messages on the wire at any time (it flushes a large
pipeline as it grows), so a job counts as sent once its messages were queued.
"""

from __future__ import annotations

from .._errors import GatewayError, OutcomeUnknown, Unavailable
from ._jobs import Job

#: SQLSTATE classes of errors that end the connection: a COMMIT failed with one
#: may have committed (a backend terminated while its COMMIT waited for a
#: synchronous standby, for one, has committed locally)
_CONNECTION_ENDING = ("57P", "08")


LOST = "the database connection was lost"


def lost_error(job: Job, *, sent: bool, why: str = LOST) -> GatewayError:
    """The error for `job`, unresolved when its connection was lost (or, `why`
    says, its run was cut short otherwise); `sent`: its statements were handed
    to the connection."""
    if sent and not job.read_only:
        return OutcomeUnknown(
            f"{why} after the write was sent and before PostgreSQL acknowledged its"
            " commit: it may or may not have been committed; check before retrying"
        )
    return Unavailable(f"{why} before the query could take effect; it is safe to retry")


def ends_connection(sqlstate: str | None) -> bool:
    """Whether an error with `sqlstate` ends the connection (so a COMMIT it
    answers may have committed)."""
    return sqlstate is not None and sqlstate.startswith(_CONNECTION_ENDING)
