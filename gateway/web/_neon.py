"""Neon's SQL over HTTP at ``POST /sql``: the front door of ``@neondatabase/serverless``.

Neon's serverless driver (``neon()``: tagged templates, ``sql.query()``,
``sql.transaction()``) and the ORMs on it (drizzle-orm's ``neon-http``) work
against the gateway unmodified, with ``neonConfig.fetchEndpoint`` pointed here.
A request becomes the same jobs as ``/v1``'s, on the same dispatcher: one more
front door, not a second engine.

The request, as Neon's proxy reads it:

* ``{"query": SQL, "params": [...], "arrayMode"?: bool}`` runs one statement;
* ``{"queries": [{...}, ...]}`` runs them all or nothing, in one transaction.

Headers (a flag is on only when its value is exactly ``true``, as Neon reads it):

* ``Neon-Raw-Text-Output``: every value as PostgreSQL's text output (the driver
  parses them with its type parsers); otherwise values as ``/v1`` writes them;
* ``Neon-Array-Mode``: rows as arrays, else objects (a query's ``arrayMode`` wins);
* ``Neon-Batch-Isolation-Level`` (``ReadUncommitted``, ``ReadCommitted``,
  ``RepeatableRead``, ``Serializable``), ``Neon-Batch-Read-Only`` and
  ``Neon-Batch-Deferrable``: the transaction of a batch (read for batches only,
  where Neon's proxy also refuses a bad isolation level on a single query);
* ``Neon-Connection-String`` is accepted and not used: requests run on the
  gateway's own pool, as its own role; its user, password and database are
  neither used nor checked.

Each result is ``{"rowAsArray", "fields", "rows", "command", "rowCount"}``,
``fields`` as PostgreSQL describes them; a batch answers ``{"results": [...]}``.
Errors have Neon's body (`error_body`). Unknown keys in the body are refused (400),
where Neon's proxy ignores them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .._errors import BadRequest, GatewayError, ResultTooLarge, Timeout
from .._settings import Settings
from ..engine._identity import Identity
from ..engine._jobs import Statement
from ..values._results import DESCRIBED_SHAPE, TEXT_SHAPE, StatementResult
from ._app_keys import DISPATCHER, SETTINGS
from ._observe import exchange_of, sql_comment
from ._requests import Options, check_keys, make_job, read_json_object, sql_statement
from ._routes import _allow_raw_sql, _answer, _identify

routes = web.RouteTableDef()

#: where Neon's driver sends its queries (``https://<host>/sql`` by default)
PATH = "/sql"

_QUERY_KEYS = frozenset({"query", "params", "arrayMode"})
_BATCH_KEYS = frozenset({"queries"})

RAW_TEXT_OUTPUT = "Neon-Raw-Text-Output"
ARRAY_MODE = "Neon-Array-Mode"
ISOLATION_LEVEL = "Neon-Batch-Isolation-Level"
READ_ONLY = "Neon-Batch-Read-Only"
DEFERRABLE = "Neon-Batch-Deferrable"

#: Neon's names of the isolation levels, and PostgreSQL's
ISOLATION_LEVELS = {
    "ReadUncommitted": "read uncommitted",
    "ReadCommitted": "read committed",
    "RepeatableRead": "repeatable read",
    "Serializable": "serializable",
}

#: the SQLSTATE of a statement cancelled for its timeout (query_canceled)
QUERY_CANCELED = "57014"


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """A batch's transaction, from its ``Neon-Batch-*`` headers (read for batches only)."""

    #: PostgreSQL's name of the isolation level; None: the server's default
    isolation: str | None
    read_only: bool
    deferrable: bool

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> BatchOptions:
        """The headers as Neon's proxy reads them: a flag is on only when it is ``true``.

        Raises:
            BadRequest: the isolation level is not one of Neon's four.
        """
        isolation = headers.get(ISOLATION_LEVEL)
        if isolation is not None:
            level = ISOLATION_LEVELS.get(isolation)
            if level is None:
                raise BadRequest(
                    f"{ISOLATION_LEVEL} must be one of {', '.join(ISOLATION_LEVELS)}"
                )
            isolation = level
        return cls(isolation, _flag(headers, READ_ONLY), _flag(headers, DEFERRABLE))

    def headers(self) -> dict[str, str]:
        """The options the answer repeats, as Neon's proxy does."""
        headers = {}
        if self.read_only:
            headers[READ_ONLY] = "true"
        if self.deferrable:
            headers[DEFERRABLE] = "true"
        if self.isolation is not None:
            names = {level: name for name, level in ISOLATION_LEVELS.items()}
            headers[ISOLATION_LEVEL] = names[self.isolation]
        return headers


def _flag(headers: Mapping[str, str], name: str) -> bool:
    """A ``Neon-*`` flag, read as Neon's proxy reads it: on only when exactly ``true``."""
    return headers.get(name) == "true"


@functools.lru_cache(maxsize=8)
def _options(timeout_ms: int, max_rows: int, shape: str) -> Options:
    """A request's options: Neon's protocol sets none, so the gateway's defaults."""
    return Options(timeout_ms, max_rows, shape)


def _query(item: Any, where: str, array_mode: bool) -> tuple[Statement, bool]:
    """One ``{"query", "params", "arrayMode"}``: its statement, and whether its rows
    are arrays (`array_mode` unless it says).

    Raises:
        BadRequest: it is not such an object, or its parts have the wrong types
            (see `sql_statement`).
    """
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object with query and params")
    check_keys(item, _QUERY_KEYS, where)
    asked = item.get("arrayMode")
    if asked is not None:
        if not isinstance(asked, bool):
            raise BadRequest(f"{where}.arrayMode must be true or false")
        array_mode = asked
    return sql_statement(item.get("query"), item.get("params"), where, "query"), array_mode


@routes.post(PATH)
async def post_sql(request: web.Request) -> web.Response:
    """Run one statement, or a batch all or nothing, in Neon's protocol (raw_sql
    mode permitting: a read-only gateway runs every request read-only)."""
    settings = request.app[SETTINGS]
    # the driver's authToken is a Bearer token: verified, and the job runs as its role
    identity = _identify(request)
    _allow_raw_sql(settings, identity)
    headers = request.headers
    array_mode = _flag(headers, ARRAY_MODE)
    # the driver posts its JSON with fetch's default Content-Type, text/plain
    body = await read_json_object(request, any_type=True)
    if "queries" in body:
        batch = BatchOptions.parse(headers)
        check_keys(body, _BATCH_KEYS)
        items = body["queries"]
        if not isinstance(items, list):
            raise BadRequest("queries must be a list of {query, params} objects")
        queries = [_query(item, f"queries[{i}]", array_mode) for i, item in enumerate(items)]
        raw_text = _flag(headers, RAW_TEXT_OUTPUT)
        response = await _run(request, settings, queries, raw_text, identity, batch)
        response.headers.update(batch.headers())
        return response
    query = _query(body, "body", array_mode)
    return await _run(request, settings, [query], _flag(headers, RAW_TEXT_OUTPUT), identity)


async def _run(
    request: web.Request,
    settings: Settings,
    queries: list[tuple[Statement, bool]],
    raw_text: bool,
    identity: Identity | None,
    batch: BatchOptions | None = None,
) -> web.Response:
    """Run `queries` (statements, and whether each one's rows are arrays) as one job,
    their values as PostgreSQL's text when `raw_text`; a `batch` in one transaction
    with its options. Answer as Neon does."""
    exchange = exchange_of(request)
    if not queries:  # an empty batch: nothing to run
        return _answer(exchange, {"results": []}, 0)
    started = time.perf_counter()
    dispatcher = request.app[DISPATCHER]
    read_only = settings.raw_sql == "read-only" or (batch is not None and batch.read_only)
    shape = TEXT_SHAPE if raw_text else DESCRIBED_SHAPE
    job = make_job(
        [statement for statement, _ in queries],
        _options(settings.statement_timeout_ms, settings.max_rows, shape),
        read_only=read_only,
        transaction=batch is not None,
        isolation=None if batch is None else batch.isolation,
        deferrable=batch is not None and batch.deferrable,
        identity=identity,
        loop=dispatcher.loop,
        comment=sql_comment(exchange.request_id),
    )
    exchange.ran(job, started)
    results = await dispatcher.run(job)
    exchange.answered = time.perf_counter()
    answers = [
        _result_body(result, array_mode, committed=not read_only)
        for result, (_, array_mode) in zip(results, queries, strict=True)
    ]
    rows = sum(len(result.rows) for result in results)
    return _answer(exchange, answers[0] if batch is None else {"results": answers}, rows)


def _result_body(result: StatementResult, array_mode: bool, *, committed: bool) -> dict[str, Any]:
    """One statement's result as Neon answers it.

    Raises:
        ResultTooLarge: the result has more rows than ``max_rows``: Neon's answer
            has no way to say it was cut.
    """
    if result.truncated:
        raise ResultTooLarge(
            f"a result has more than max_rows ({len(result.rows)}) rows, and this protocol"
            " cannot answer part of one"
            + ("; the transaction was committed, so any writes took effect" if committed else ""),
            hint="add a LIMIT, or raise PGQG_MAX_ROWS",
        )
    rows = result.rows
    if not array_mode:
        names = [column.name for column in result.columns]
        rows = [dict(zip(names, row, strict=True)) for row in rows]
    return {
        "rowAsArray": array_mode,
        "fields": result.fields_json,  # JSON already, and kept per result description
        "rows": rows,
        "command": result.command,
        "rowCount": result.row_count,
    }


def error_body(error: GatewayError) -> tuple[int, dict[str, Any]]:
    """`error` as Neon's proxy answers one: its status, and a flat body whose ``code``
    is the SQLSTATE (the gateway's own code for an error without one).

    An error PostgreSQL reported is 400, as Neon answers it (the driver raises
    a ``NeonDbError`` with every field only for a 400), unless it says the
    database is unavailable or broken (503, 500). A timeout is PostgreSQL's
    statement timeout: 400 with code 57014. Other errors keep their status.
    """
    code = error.sqlstate or error.code
    status = error.status
    if isinstance(error, Timeout):
        status, code = 400, QUERY_CANCELED
    elif error.sqlstate is not None and status < 500:
        status = 400
    more = error.diagnostics
    return status, {
        "message": error.message,
        "code": code,
        "detail": error.detail,
        "hint": error.hint,
        "position": None if error.position is None else str(error.position),
        "internalPosition": more.get("internal_position"),
        "internalQuery": more.get("internal_query"),
        "severity": more.get("severity"),
        "where": more.get("context"),
        "table": more.get("table_name"),
        "column": more.get("column_name"),
        "schema": more.get("schema_name"),
        "dataType": more.get("datatype_name"),
        "constraint": more.get("constraint_name"),
        "file": more.get("source_file"),
        "line": more.get("source_line"),
        "routine": more.get("source_function"),
    }
