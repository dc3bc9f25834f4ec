"""The gateway's own statements between jobs, and the session state jobs leave.

After a batch a session may have to end a transaction a late cancel left open,
run DISCARD ALL because a job left state in the session beyond its transaction
(noted from each statement's command tag), or teach the codec the types of new
columns. Each is a statement of the gateway's own in a segment of its own. At its
start a session learns the roles it runs as (`roles`).

A list parameter goes as an array literal, and what separates its elements is
the element type's delimiter (pg_type.typdelim: ";" for box, "," for nearly all
others). Parameters go with type unknown, so only a describe of the statement
tells: a batch with a list parameter of two or more elements is preceded by one
round trip that describes those statements (`describe_lists`); other batches
(nearly all) are not.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from psycopg.pq import DiagnosticField, ExecStatus
from psycopg.pq.abc import PGconn, PGresult

from ..values._encoding import TYPE_QUERY, Codec, param_to_text
from ._jobs import Statement
from ._libpq import pipeline_sync
from ._planner import UNLOCK
from ._prepared import PreparedStatements
from ._wire import ConnectionLost, Wire, result_error

_DISCARD = b"DISCARD ALL"
#: DISCARD ALL leaves no role set (it runs SET SESSION AUTHORIZATION DEFAULT), not
#: even one the login role's sessions start with (ALTER ROLE … SET role): RESET ROLE
#: restores that one, as at the start of the session.
RESET_ROLE = b"RESET ROLE"
_ROLES = b"SELECT current_user, session_user"
#: command tags of statements that leave state in the session beyond their
#: transaction; after one, the connection is cleaned with DISCARD ALL. DO and CALL
#: may PREPARE by EXECUTE, and a prepared statement outlives ROLLBACK.
_SESSION_TAGS = frozenset(
    b"SET RESET PREPARE DEALLOCATE LISTEN UNLISTEN LOAD DISCARD DECLARE DO CALL".split()
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
        #: a job with raw SQL failed before its check released its advisory locks
        self.unlock_due = False

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

    async def after_batch(self) -> None:
        """Clean what the batch's jobs may have left: DISCARD ALL when `dirty`, else the
        advisory locks when `unlock_due`."""
        if self.dirty:
            await self.discard()  # its unlock included
        elif self.unlock_due:
            await self.run(UNLOCK)
        self.unlock_due = False

    async def discard(self) -> None:
        """DISCARD ALL: the session as a new connection's (no named statement either)."""
        await self.run(_DISCARD)
        await self.run(RESET_ROLE)
        self._prepared.forget_all()
        self.dirty = False

    async def roles(self) -> list[bytes | None]:
        """The session's current_user and session_user, as text.

        Raises:
            ConnectionLost: the query failed, or the protocol went out of step.
            psycopg.OperationalError: the connection broke.
        """
        res = await self.run(_ROLES)
        if res.status != ExecStatus.TUPLES_OK or res.ntuples != 1:
            raise ConnectionLost(f"the session's roles could not be read: {result_error(res)}")
        return [res.get_value(0, 0), res.get_value(0, 1)]

    async def describe_lists(self, statements: list[Statement]) -> None:
        """Describe `statements` (one round trip) and write their list parameters
        again with their types' delimiters.

        Must be called between jobs, with nothing of this session in flight. A
        statement that does not parse (its error is the job's to report) or names a
        type that an earlier statement of its transaction creates keeps ``,``.

        Raises:
            ConnectionLost: the protocol went out of step.
            psycopg.OperationalError: the connection broke.
        """
        described: list[tuple[Statement, PGresult]] = []
        pending = statements
        for _ in range(2):  # a late cancel meant for the last batch may land on one
            for st in pending:
                self._pg.send_prepare(b"", st.sql)
                self._pg.send_describe_prepared(b"")
                pipeline_sync(self._pg)
            await self._wire.flush()
            cancelled = []
            for st in pending:
                parsed, res = await self._wire.result(), await self._wire.result()
                await self._wire.sync()
                if res.status == ExecStatus.COMMAND_OK:
                    described.append((st, res))
                elif parsed.error_field(DiagnosticField.SQLSTATE) == b"57014":
                    cancelled.append(st)
            if not cancelled:
                break
            pending = cancelled
        await self.fit_lists(described)

    async def fit_lists(self, described: list[tuple[Statement, PGresult]]) -> None:
        """Write each statement's list parameters with the delimiter of the array type
        its description gives them; learn the types the codec does not know yet.

        Raises:
            ConnectionLost: the protocol went out of step.
            psycopg.OperationalError: the connection broke.
        """
        codec = self._codec
        typed = [
            (st, index, res.param_type(index))
            for st, res in described
            for index in st.lists or ()
            if index < res.nparams
        ]
        unknown = {oid for _, _, oid in typed if not codec.is_known(oid)}
        if unknown:
            await self.learn_types(unknown)
        for st, index, oid in typed:
            delimiter = codec.array_delimiter(oid)
            if delimiter is not None and delimiter != "," and st.lists:
                st.params[index] = param_to_text(st.lists[index], delimiter)

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
        rows: list[list[str]] = []
        if res.status == ExecStatus.TUPLES_OK:
            rows = [
                [(res.get_value(r, c) or b"").decode() for c in range(res.nfields)]
                for r in range(res.ntuples)
            ]
        self._codec.learn_asked(rows, oids)
