"""The gateway's own statements between jobs, and the session state jobs leave.

After a batch a session may have to end a transaction a late cancel left open,
run DISCARD ALL because a job left state in the session beyond its transaction
(noted from each statement's command tag), or teach the codec the types of new
columns. Each is a statement of the gateway's own in a segment of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGconn, PGresult

from ..values._encoding import TYPE_QUERY, Codec
from ._libpq import pipeline_sync
from ._prepared import PreparedStatements
from ._wire import Wire, result_error

_DISCARD = b"DISCARD ALL"
#: command tags of statements that leave state in the session beyond their
#: transaction; after one, the connection is cleaned with DISCARD ALL.
_SESSION_TAGS = frozenset(
    b"SET RESET PREPARE DEALLOCATE LISTEN UNLISTEN LOAD DISCARD DECLARE".split()
)


@functools.lru_cache(maxsize=64)
def _leaves_session_state(tag: bytes | None) -> bool:
    """Whether a statement with command tag `tag` may leave state in the session
    (a temporary table is created with the tag ``CREATE TABLE``)."""
    tag = tag or b""
    return tag.split(b" ", 1)[0] in _SESSION_TAGS or tag == b"CREATE TABLE"


class Housekeeping:
    """One session's own statements: ROLLBACK, DISCARD ALL, type lookups."""

    def __init__(self, pg: PGconn, wire: Wire, prepared: PreparedStatements, codec: Codec) -> None:
        self._pg = pg
        self._wire = wire
        self._prepared = prepared
        self._codec = codec
        #: a statement since the last DISCARD ALL may have left state in the session
        self.dirty = False

    def note(self, res: PGresult) -> None:
        """Note whether the statement `res` answers may have left session state."""
        if _leaves_session_state(res.command_status):
            self.dirty = True

    async def run(self, sql: bytes, params: list[bytes | None] | None = None) -> PGresult:
        """Run one statement of the gateway's own in its own segment.

        A late cancel meant for the batch's last job may land on it: then it
        runs once more.
        """
        for _ in range(2):
            self._pg.send_query_params(sql, params)
            pipeline_sync(self._pg)
            await self._wire.flush()
            res = await self._wire.result()
            await self._wire.sync()
            if res.status != ExecStatus.FATAL_ERROR or result_error(res).sqlstate != "57014":
                break
        return res

    async def discard(self) -> None:
        """DISCARD ALL: the session as a new connection's (no named statement either)."""
        await self.run(_DISCARD)
        self._prepared.forget_all()
        self.dirty = False

    async def learn_types_of(self, results: Iterable[PGresult]) -> None:
        """Teach the codec the column types of `results` it does not know yet."""
        known = self._codec.is_known
        oids = {r.ftype(i) for r in results for i in range(r.nfields) if not known(r.ftype(i))}
        if oids:
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
        res = await self.run(TYPE_QUERY, [array.encode()])
        if res.status == ExecStatus.TUPLES_OK:
            rows = [
                [(res.get_value(r, c) or b"").decode() for c in range(res.nfields)]
                for r in range(res.ntuples)
            ]
            self._codec.learn(rows)
        for oid in oids:
            if not self._codec.is_known(oid):
                self._codec.learn([(oid, str(oid), 0, ",", 0)])
