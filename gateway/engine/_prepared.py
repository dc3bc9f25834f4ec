"""Which named statements a session trusts: only the gateway's own SQL runs by name.

Any statement not from the catalog can drop or replace a named statement,
unseen: ``DO $$BEGIN EXECUTE 'DEALLOCATE pgqg_x'; EXECUTE 'PREPARE pgqg_x AS
...'; END$$`` is a read-only DO, and a prepared statement outlives ROLLBACK.
So a name is trusted only while nothing but catalog SQL has run since the
gateway prepared it; after that it is closed and prepared again (Close and
Parse, in the segment of the job that needs it) before it is run. Where libpq
cannot close a statement in a pipeline (before 17), a name that may exist,
not as ours, runs unnamed: as the catalog's text.
"""

from __future__ import annotations

from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGconn, PGresult

from ._jobs import Statement

_COMMAND_OK = ExecStatus.COMMAND_OK


class PreparedStatements:
    """One connection's named statements, and how each statement is sent."""

    def __init__(self, pg: PGconn, *, close: bool) -> None:
        self._pg = pg
        #: named statements prepared since the last statement not from the catalog
        self._names: set[bytes] = set()
        #: a statement not from the catalog ran since the session began (or DISCARD ALL)
        self._foreign = False
        #: messages (and so results) that prepare one named statement: Close, Parse
        self.messages = 2 if close else 1

    def send_prepare(self, st: Statement) -> bytes | None:
        """Queue what makes `st`'s named statement the catalog's own; return its
        name, or None when nothing was queued (`st` has no name, it is trusted
        already, or it will run unnamed: see `trusted_name`)."""
        name = st.prepared
        if name is None or name in self._names:
            return None
        if self.messages == 2:
            # closing a name that does not exist is not an error
            self._pg.send_close_prepared(name)
        elif self._foreign:
            return None  # it may exist, not as ours: Parse would fail; run it unnamed
        self._pg.send_prepare(name, st.sql)
        self._names.add(name)
        return name

    def trusted_name(self, st: Statement) -> bytes | None:
        """The name `st` runs by; None: it runs as its own text (raw SQL, or a
        named statement this connection does not trust and could not prepare)."""
        name = st.prepared
        return name if name is not None and name in self._names else None

    def send_statement(self, st: Statement, comment: bytes = b"") -> None:
        """Queue `st`: by its name when that is trusted, else as its own text;
        a raw statement (one without a name) after `comment`."""
        if st.prepared is None:
            self._pg.send_query_params(comment + st.sql if comment else st.sql, st.params)
            if self._names:
                self._names.clear()
            self._foreign = True
        elif (name := self.trusted_name(st)) is not None:
            self._pg.send_query_prepared(name, st.params)
        else:
            self._pg.send_query_params(st.sql, st.params)

    def forget_failed(self, names: tuple[bytes, ...], results: list[PGresult]) -> None:
        """Forget the statements whose Parse (the last message of each) failed;
        `results` starts with the first prepare's."""
        step = self.messages
        for name, res in zip(names, results[step - 1 :: step], strict=False):
            if res.status != _COMMAND_OK:
                self._names.discard(name)

    def forget_all(self) -> None:
        """The session was reset (DISCARD ALL): no named statement is left."""
        self._names.clear()
        self._foreign = False
