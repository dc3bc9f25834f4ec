"""Cancelling a batch's running statement on the server, at most once per job.

The batch reader names the head job: the one whose own results it awaits,
so the one a cancel request would hit. A head job that is abandoned (its
client went away, its deadline passed) is cancelled before the next wait for
its results; a job abandoned while waiting behind others of its batch is
cancelled when it becomes the head, if its results then have to be waited
for. A cancel that arrives late lands on a later job, which then runs again
(see `BatchReader`): `sent` says which jobs a cancel was meant for.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import ConnStatus, TransactionStatus

from ._jobs import Job

#: how long a cancel request may take; the server-side statement_timeout backs it up
CANCEL_TIMEOUT_S = 5.0


class Cancels:
    """The cancel requests of one session's connection."""

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn
        #: the job whose own results are being awaited: the one a cancel would hit
        self.head: Job | None = None
        #: the head job was abandoned: cancel it before the next wait
        self.wanted = False
        #: jobs of the current batch a cancel was sent for (one each, at most)
        self.sent: list[Job] = []

    def want(self, job: Job) -> bool:
        """`job` was abandoned: True if it is the head, whose cancel is now wanted."""
        if job is not self.head:
            return False
        self.wanted = True
        return True

    async def request(self) -> None:
        """Cancel the head job's statement on the server, once per job.

        Only called while waiting for the head job's own results, so the
        server is running it (or has just finished it: a cancel that lands on
        a later job makes that job run again).
        """
        self.wanted = False
        job = self.head
        if job is None or job in self.sent:
            return
        self.sent.append(job)
        await self.send()  # the server-side statement_timeout still applies

    async def interrupt(self) -> None:
        """Cancel whatever the server runs for this connection now (best effort).

        For a worker stopped in the middle of a batch: the server must not go
        on running a query nobody will read.
        """
        pg = self._conn.pgconn
        if pg.status == ConnStatus.OK and pg.transaction_status != TransactionStatus.IDLE:
            await self.send()

    async def send(self) -> None:
        """Send a cancel request for the connection's current statement; best effort."""
        with contextlib.suppress(psycopg.Error, OSError):
            await self._conn.cancel_safe(timeout=CANCEL_TIMEOUT_S)
