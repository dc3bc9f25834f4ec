"""Where ``pgqg query`` and ``pgqg run`` send SQL: straight to PostgreSQL, or to a gateway.

Both targets answer with the same `Outcome`: the gateway's JSON values for each cell
(DESIGN §4) and PostgreSQL's own text output for each cell, so every output format
looks the same whichever way the statement went.

* `DirectTarget` holds one autocommit psycopg connection with the gateway's session
  settings (time zone, date and interval styles), so values print as the gateway
  prints them. JSON values come from the gateway's own loaders (`Codec`) through a
  psycopg `Transformer`; text cells are the bytes PostgreSQL sent. Parameters go as
  text of type ``unknown``, typed by PostgreSQL from the statement, as the gateway
  sends them.
* `GatewayTarget` posts to ``/v1/query``. The gateway answers JSON values only, so
  text cells are rebuilt from them and the column types by `value_text`: exact for
  every type, except that a ``json`` (not ``jsonb``) value comes back with jsonb's
  spacing rather than the spacing it was stored with.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import psycopg
from psycopg.adapt import Transformer
from psycopg.pq import ExecStatus, TransactionStatus

from .._errors import DiagnosticError, client_message, parameter_count_message
from .._settings import Settings
from ..engine._pool import session_options
from ..values._encoding import TYPE_QUERY, Codec
from ..values._results import Column, command_name, result_columns
from ._client import (
    GatewayClient,
    GatewayRefused,
    GatewayUnreachable,
    RawNumber,
    StreamCut,
    loads_raw,
)

__all__ = [
    "DirectTarget",
    "GatewayTarget",
    "Outcome",
    "StatementFailed",
    "Target",
    "TargetUnavailable",
    "value_text",
]

_APPLICATION_NAME = "pgqg-cli"


@dataclass(slots=True)
class Outcome:
    """One statement's result, in both forms every output format needs.

    `rows` hold JSON-ready values (DESIGN §4; `RawNumber`/`orjson.Fragment` for
    numbers whose digits must not change), `texts` PostgreSQL's text output (None is
    NULL); both in column order.
    """

    columns: list[Column]
    rows: list[list[Any]]
    texts: list[list[str | None]]
    command: str
    row_count: int | None
    truncated: bool
    elapsed_ms: float

    @property
    def has_rows(self) -> bool:
        """True when the statement returns rows (a SELECT, ``… RETURNING``), even none."""
        return bool(self.columns)


class StatementFailed(DiagnosticError):
    """PostgreSQL (or the gateway) refused or failed the statement.

    `sqlstate`, `detail`, `hint` and `position` (1-based character in the
    statement) are PostgreSQL's when it was PostgreSQL; `code` and `status` are
    the gateway's error code and HTTP status when it went through a gateway.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        **diagnostics: Any,
    ) -> None:
        super().__init__(message, **diagnostics)
        self.code = code
        self.status = status


class TargetUnavailable(Exception):
    """The database or the gateway cannot be reached (or the connection broke)."""


class Target(Protocol):
    """Runs statements one at a time; `close` when done."""

    def run(self, sql: str, params: list[str] | None = None) -> Outcome:
        """Run one statement. With `params` (even empty) only one statement is allowed;
        without, a script statement may also change the session (``SET``, ``BEGIN``).

        Raises:
            StatementFailed: the statement failed.
            TargetUnavailable: the database or gateway cannot be reached.
        """
        ...

    def close(self) -> None: ...


# --- directly ------------------------------------------------------------------------


class DirectTarget:
    """An autocommit connection to `dsn`, set up like the gateway's pooled ones.

    Unlike the gateway's connections it has no statement timeout: a command line
    running a migration must not be cut at 30 s. Each statement commits on its own
    unless the statements themselves open a transaction (``BEGIN`` in a file), as in
    psql.

    Raises:
        TargetUnavailable: the connection failed.
    """

    def __init__(self, dsn: str, settings: Settings) -> None:
        # the gateway's session settings; the later -c statement_timeout=0 wins
        options = session_options(settings) + " -c statement_timeout=0"
        try:
            self._conn: psycopg.Connection[Any] = psycopg.connect(
                dsn,
                autocommit=True,
                application_name=_APPLICATION_NAME,
                options=options,
                client_encoding="UTF8",
                connect_timeout=10,
                cursor_factory=psycopg.RawCursor,  # PostgreSQL's own $1, $2 placeholders
            )
        except psycopg.Error as exc:
            raise TargetUnavailable(f"cannot connect to the database: {_oneline(exc)}") from None
        self._codec = Codec()

    def run(self, sql: str, params: list[str] | None = None) -> Outcome:
        """See `Target.run`. With `params` the statement goes over the extended
        protocol (as the gateway sends it); without, over the simple protocol, whose
        last result is the one kept."""
        started = time.perf_counter()
        try:
            cursor = self._conn.cursor()
            if params is None:
                cursor.execute(sql.encode())
            else:
                cursor.execute(sql.encode(), params)
            while cursor.nextset():  # a script statement gives one result; keep the last
                pass
            result = cursor.pgresult
            if result is None:
                raise StatementFailed("the statement gave no result")
            if result.status == ExecStatus.EMPTY_QUERY:
                raise StatementFailed("the statement is empty")
            oids = [result.ftype(i) for i in range(result.nfields)]
            unknown = sorted({oid for oid in oids if not self._codec.is_known(oid)})
            if unknown:
                self._learn(unknown)
            rows: list[list[Any]] = []
            texts: list[list[str | None]] = []
            if result.status == ExecStatus.TUPLES_OK:
                transformer = Transformer(self._codec.adapters)
                transformer.set_pgresult(result)
                rows = transformer.load_rows(0, result.ntuples, list)
                texts = [
                    [_text(result.get_value(r, c)) for c in range(result.nfields)]
                    for r in range(result.ntuples)
                ]
        except psycopg.OperationalError as exc:
            if self._conn.closed or self._conn.broken:
                raise TargetUnavailable(f"the database connection broke: {_oneline(exc)}") from None
            raise self._failure(exc, sql, params) from None
        except psycopg.Error as exc:
            raise self._failure(exc, sql, params) from None
        return Outcome(
            columns=result_columns(result, self._codec),
            rows=rows,
            texts=texts,
            command=command_name(result.command_status),
            row_count=result.command_tuples,
            truncated=False,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def _failure(self, exc: psycopg.Error, sql: str, params: list[str] | None) -> StatementFailed:
        """The error to report: the gateway's words when the parameter count is wrong.

        psycopg declares one parameter per value it sends, so a count that does
        not fit reaches PostgreSQL as other errors ("could not determine data
        type of parameter $2", "there is no parameter $1"); the statement's own
        count is asked for, as the gateway's unnamed Parse sees it.
        """
        if params is not None:
            needed = self._parameter_count(sql)
            if needed is not None and needed != len(params):
                return StatementFailed(
                    parameter_count_message(needed, len(params)), sqlstate="08P01"
                )
        return _failed(exc)

    def _parameter_count(self, sql: str) -> int | None:
        """How many parameters PostgreSQL finds in `sql`; None if it cannot tell."""
        pgconn = self._conn.pgconn
        if pgconn.transaction_status != TransactionStatus.IDLE:
            return None  # an unnamed statement here would not change the outcome
        if pgconn.prepare(b"", sql.encode(), None).status != ExecStatus.COMMAND_OK:
            return None
        described = pgconn.describe_prepared(b"")
        return described.nparams if described.status == ExecStatus.COMMAND_OK else None

    def _learn(self, oids: list[int]) -> None:
        """Learn names (and array element types) of types the codec does not know."""
        array = "{" + ",".join(str(oid) for oid in oids) + "}"
        found = self._conn.execute(TYPE_QUERY, [array]).fetchall()
        self._codec.learn_asked(found, oids)

    def close(self) -> None:
        self._conn.close()


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _failed(exc: psycopg.Error) -> StatementFailed:
    diag = exc.diag
    position = diag.statement_position
    return StatementFailed(
        client_message(diag.message_primary or _oneline(exc), diag.sqlstate),
        sqlstate=diag.sqlstate,
        detail=diag.message_detail,
        hint=diag.message_hint,
        position=int(position) if position and position.isdigit() else None,
    )


# --- through a gateway --------------------------------------------------------------


class GatewayTarget:
    """A running gateway at `url`: each statement is one ``POST /v1/query``, so each is
    its own transaction and the gateway's ``raw_sql`` mode applies. `hint` is added
    to the message when the gateway cannot be reached.

    Raises:
        ValueError: `url` is not an http(s) URL.
    """

    def __init__(self, url: str, *, hint: str = "") -> None:
        self._client = GatewayClient(url)
        self.url = self._client.url
        self._hint = hint  # appended to "cannot reach" messages

    def run(self, sql: str, params: list[str] | None = None) -> Outcome:
        """See `Target.run` (the gateway always takes exactly one statement)."""
        try:
            body = self._client.query(sql, list(params or []))
        except GatewayRefused as exc:
            raise _refused(exc) from None
        except GatewayUnreachable as exc:
            raise TargetUnavailable(f"{exc}{self._hint}") from None
        try:
            columns = [
                Column(str(c["name"]), str(c["type"]), int(c["type_oid"])) for c in body["columns"]
            ]
            texts = [
                [value_text(v, col.type) for v, col in zip(row, columns, strict=True)]
                for row in body["rows"]
            ]
            rows = [
                [_as_sent(v, col.type) for v, col in zip(row, columns, strict=True)]
                for row in body["rows"]
            ]
            row_count = body.get("row_count")
            elapsed = body.get("elapsed_ms")
            return Outcome(
                columns=columns,
                rows=rows,
                texts=texts,
                command=str(body.get("command") or ""),
                row_count=None if row_count is None else int(row_count),
                truncated=bool(body.get("truncated")),
                elapsed_ms=float(elapsed) if elapsed is not None else 0.0,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TargetUnavailable(
                f"{self.url} answered with a malformed result: {exc!r}"
            ) from None

    def stream(self, sql: str, params: list[str], fmt: str, shape: str) -> Iterator[bytes]:
        """Run one statement with every row streamed (`fmt` ``csv`` or ``ndjson``), as
        ``pgqg query`` prints them directly: CSV with CRLF line ends, NDJSON as is.

        Unlike `run`, not cut at the gateway's ``max_rows``.

        Raises:
            StatementFailed: the statement failed, before its first row or after
                (then once the rows before were yielded).
            TargetUnavailable: the gateway cannot be reached, or the stream broke.
        """
        media_type = "text/csv" if fmt == "csv" else "application/x-ndjson"
        chunks = self._client.stream(sql, params, media_type=media_type, shape=shape)
        try:
            if fmt == "csv":
                yield from crlf_lines(chunks)
            else:
                yield from _rows_then_error(chunks)
        except GatewayRefused as exc:
            raise _refused(exc) from None
        except GatewayUnreachable as exc:
            raise TargetUnavailable(f"{exc}{self._hint}") from None
        except StreamCut as exc:
            raise TargetUnavailable(f"{exc} (the statement may have failed midway)") from None

    def close(self) -> None:
        pass


def _refused(exc: GatewayRefused) -> StatementFailed:
    """The gateway's error (DESIGN §3) as a `StatementFailed`."""
    position = exc.field("position")
    return StatementFailed(
        exc.message,
        sqlstate=exc.field("sqlstate"),
        detail=exc.field("detail"),
        hint=exc.field("hint"),
        position=int(position) if position and position.isdigit() else None,
        code=exc.code,
        status=exc.status,
    )


def _rows_then_error(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """An NDJSON stream's lines; a stream that fails midway ends with the line
    ``{"error": {…}}`` and is then cut: that line becomes a `StatementFailed`.

    The last line is held back until more comes, so it is never printed as a
    row before it is known not to be the error.

    Raises:
        StatementFailed: the stream ended with an error line.
        StreamCut: it was cut without one.
    """
    held = b""
    try:
        for chunk in chunks:
            lines = held + chunk
            end = lines.rfind(b"\n", 0, len(lines) - 1) + 1  # where the last line starts
            if end:
                yield lines[:end]
            held = lines[end:]
    except StreamCut:
        error = _error_line(held)
        if error is None:
            raise
        raise error from None
    yield held


def _error_line(line: bytes) -> StatementFailed | None:
    """The failure an NDJSON stream's last line reports, if it is one."""
    try:
        value = loads_raw(line)
    except ValueError:
        return None
    if (
        not isinstance(value, dict)
        or set(value) != {"error"}
        or not isinstance(value["error"], dict)
    ):
        return None
    return _refused(GatewayRefused(200, value["error"]))


def crlf_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The gateway's CSV (lines end with LF, as ``COPY`` writes) with CRLF line ends,
    as ``pgqg query`` prints CSV; a LF inside a quoted cell stays as it is.

    A quote opens or closes a quoted cell (a doubled quote inside one does both).
    """
    quoted = False
    for chunk in chunks:
        pieces = chunk.split(b'"')
        out = []
        for i, piece in enumerate(pieces):
            if i:
                quoted = not quoted
                out.append(b'"')
            out.append(piece if quoted else piece.replace(b"\n", b"\r\n"))
        yield b"".join(out)


# --- JSON values back to PostgreSQL text ---------------------------------------------

#: the one built-in type whose arrays are not delimited by commas
_DELIMITERS = {"box": ";"}
#: what makes array_out quote an element, besides the delimiter
_ARRAY_SPECIAL = frozenset('{}"\\') | frozenset(" \t\n\r\v\f")


def value_text(value: Any, type_name: str) -> str | None:
    """PostgreSQL's text output for a gateway JSON `value` of type `type_name`.

    The inverse of DESIGN §4: numbers keep the digits they were sent with
    (`RawNumber`), booleans become ``t``/``f``, json/jsonb values are written as
    jsonb writes them, arrays as array literals (quoted as ``array_out`` quotes),
    and every other value already is PostgreSQL's text.
    """
    if value is None:
        return None
    if type_name.endswith("[]"):
        element = type_name[:-2]
        if isinstance(value, list):
            return _array_text(value, element, _DELIMITERS.get(element, ","))
        return str(value)
    if type_name in ("json", "jsonb"):
        return _json_text(value)
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def _as_sent(value: Any, type_name: str) -> Any:
    """A json/jsonb value (or array of them) back as the text the gateway embedded.

    The gateway embeds PostgreSQL's jsonb text unchanged (``{"a": 1}``, with its
    spaces); re-encoding the parsed value would print ``{"a":1}``.
    """
    if value is None:
        return None
    if type_name in ("json", "jsonb"):
        return orjson.Fragment(_json_text(value).encode())
    if type_name in ("json[]", "jsonb[]") and isinstance(value, list):
        return [
            _as_sent(item, type_name if isinstance(item, list) else type_name[:-2])
            for item in value
        ]
    return value


def _array_text(items: list[Any], element: str, delimiter: str) -> str:
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(_array_text(item, element, delimiter))
        else:
            text = value_text(item, element) or ""
            needs_quotes = (
                not text
                or text.upper() == "NULL"
                or any(c in _ARRAY_SPECIAL or c == delimiter for c in text)
            )
            if needs_quotes:
                text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
            parts.append(text)
    return "{" + delimiter.join(parts) + "}"


def _json_text(value: Any) -> str:
    """A JSON value as jsonb prints it: ``{"a": 1, "b": [1, 2]}``."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, RawNumber):
        return str(value)
    if isinstance(value, str):
        # the escapes jsonb uses: \" \\ \b \f \n \r \t, other controls as \u00xx
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_json_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json_text(k)}: {_json_text(v)}" for k, v in value.items()) + "}"
    return str(value)
