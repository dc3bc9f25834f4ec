"""The v1 HTTP API (DESIGN §3): each handler builds a job and encodes its result."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from typing import Any

import orjson
from aiohttp import web

from .._errors import (
    BadRequest,
    Forbidden,
    ForbiddenRole,
    GatewayError,
    MethodNotAllowed,
    NotAcceptable,
    QueryError,
    RawSqlDisabled,
    Timeout,
    Unavailable,
    query_error,
)
from .._settings import Settings
from ..catalog._catalog import NamedQuery
from ..engine._dispatcher import probe_job
from ..engine._identity import Identity
from ..engine._jobs import Statement
from ..values._formats import OutputFormat, negotiate
from ..values._results import StatementResult
from ._app_keys import AUTH, CATALOG, DISPATCHER, LISTENER, POOL, REPLICAS, SETTINGS
from ._observe import Exchange, exchange_of, sql_comment, stream_headers
from ._openapi import openapi_document
from ._requests import (
    RESERVED_QUERY_KEYS,
    Options,
    check_keys,
    make_job,
    make_stream_job,
    named_statement,
    parse_isolation,
    parse_options,
    raw_statement,
    read_json_object,
    sql_statement,
)

routes = web.RouteTableDef()

_OPTION_KEYS = frozenset({"timeout_ms", "max_rows", "shape"})
_QUERY_KEYS = _OPTION_KEYS | {"sql", "params", "read_only"}
_TRANSACTION_KEYS = _OPTION_KEYS | {"statements", "isolation", "read_only"}
_NAMED_QUERY_KEYS = _OPTION_KEYS | {"params"}


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _result_body(result: StatementResult) -> dict[str, Any]:
    return {
        # the columns as JSON already when the connection has met the result's shape
        "columns": result.columns if result.columns_json is None else result.columns_json,
        "rows": result.rows,
        "row_count": result.row_count if result.row_count is not None else len(result.rows),
        "command": result.command,
        "truncated": result.truncated,
    }


def _answer(exchange: Exchange, body: dict[str, Any], rows: int) -> web.Response:
    """A query's JSON answer, its encoding timed and its size noted for the exchange."""
    payload = orjson.dumps(body)
    exchange.encoded = time.perf_counter()
    exchange.sent("json", rows, len(payload))
    return web.Response(body=payload, content_type="application/json")


def _elapsed_ms(started: float) -> float:
    # round(x, 3) goes through decimal digits: twice as slow as this
    return round((time.perf_counter() - started) * 1_000_000) / 1000


def _output_format(request: web.Request) -> OutputFormat:
    """The format the request asks for (``?format=`` or ``Accept``); JSON by default.

    Raises:
        NotAcceptable: it asks for a format we do not produce.
    """
    # the query string is parsed only when there is one: most requests have none
    fmt = request.query.get("format") if "?" in request.raw_path else None
    return negotiate(fmt, request.headers.get("Accept"))


def _json_only(request: web.Request) -> None:
    """Refuse a streamed format where only a buffered JSON answer exists.

    Raises:
        NotAcceptable: ``?format=`` or ``Accept`` asks for another format.
    """
    fmt = _output_format(request)
    if fmt is not OutputFormat.JSON:
        raise NotAcceptable(f"{fmt.media_type} is not available here; use application/json")


async def _run_one(
    request: web.Request,
    fmt: OutputFormat,
    statement: Statement,
    options: Options,
    *,
    read_only: bool,
    identity: Identity | None,
) -> web.StreamResponse:
    """Run one statement as `identity`; answer its result as JSON, or stream its rows."""
    exchange = exchange_of(request)
    # raw SQL carries the request id into pg_stat_activity; a named query's text is
    # prepared once, and its name says what it is
    comment = sql_comment(exchange.request_id) if statement.prepared is None else b""
    if fmt.streamed:
        return await _stream_one(
            request,
            fmt,
            statement,
            options,
            read_only=read_only,
            comment=comment,
            identity=identity,
        )
    started = time.perf_counter()
    dispatcher = request.app[DISPATCHER]
    job = make_job(
        [statement],
        options,
        read_only=read_only,
        identity=identity,
        loop=dispatcher.loop,
        comment=comment,
    )
    exchange.ran(job, started)
    results = await dispatcher.run(job)
    exchange.answered = time.perf_counter()
    body = _result_body(results[0])
    body["elapsed_ms"] = _elapsed_ms(started)
    return _answer(exchange, body, len(results[0].rows))


async def _stream_one(
    request: web.Request,
    fmt: OutputFormat,
    statement: Statement,
    options: Options,
    *,
    read_only: bool,
    comment: bytes,
    identity: Identity | None,
) -> web.StreamResponse:
    """Stream one statement's rows as NDJSON or CSV (see `gateway.values._formats`).

    Raises:
        GatewayError: the statement failed before its first row (an ordinary
            error response); a failure after it ends the stream instead.
    """
    exchange = exchange_of(request)
    job = make_stream_job(
        statement, options, fmt, read_only=read_only, comment=comment, identity=identity
    )
    exchange.ran(job, time.perf_counter())
    await request.app[DISPATCHER].run(job)  # returns once the first rows are ready
    exchange.answered = time.perf_counter()
    content_type = fmt.media_type + ("; charset=utf-8" if fmt is OutputFormat.CSV else "")
    response = web.StreamResponse(
        headers={"Content-Type": content_type, **stream_headers(exchange)}
    )
    # the worker gave up on a client that stopped reading: drop it, unsent bytes too
    cut = functools.partial(_end_incomplete, request, abort=True)
    job.stopped.add_done_callback(cut)
    sent = 0
    try:
        await response.prepare(request)
        while (chunk := await job.next_chunk()) is not None:
            await response.write(chunk)
            sent += len(chunk)
    except GatewayError as exc:
        exchange.error = exc
        with contextlib.suppress(ConnectionError):
            await response.write(job.encoder.error(exc))
        _end_incomplete(request)
    except ConnectionError:
        exchange.cancelled = True  # the client went away before its cancellation reached us
    finally:
        job.stopped.remove_done_callback(cut)
        job.abandon()  # no-op when the stream ended; otherwise its query is cancelled
        exchange.sent(fmt.value, job.rows_sent, sent)
    return response


def _end_incomplete(request: web.Request, *_: object, abort: bool = False) -> None:
    """Close the connection without HTTP's last chunk: the client sees a cut response.

    `abort` drops what is still buffered for a client that stopped reading;
    otherwise it is sent first (NDJSON's error line).
    """
    transport = request.transport
    if transport is None:
        return
    if abort:
        transport.abort()
    else:
        transport.close()


def _identify(request: web.Request) -> Identity | None:
    """The role (and claims) the request runs as; None: the login role's own.

    Raises:
        Unauthorized: no token, and no anonymous role.
        InvalidToken: the token does not verify.
        ForbiddenRole: the token names something that cannot be a role.
    """
    return request.app[AUTH].identify(request.headers.get("Authorization"))


def _allow_raw_sql(settings: Settings, identity: Identity | None) -> None:
    """Raises RawSqlDisabled when raw SQL is off on this gateway, ForbiddenRole when
    it is limited to roles (``raw_sql_roles``) the request's is not one of."""
    if settings.raw_sql == "off":
        raise RawSqlDisabled("raw SQL is disabled on this gateway; use the named queries")
    allowed = settings.raw_sql_roles
    if allowed is not None and (identity is None or identity.role not in allowed):
        role = "no role" if identity is None else f"role {identity.role!r}"
        raise ForbiddenRole(f"raw SQL is not allowed for {role}; use the named queries")


def _allow_query(query: NamedQuery, identity: Identity | None) -> None:
    """Raises ForbiddenRole when `query` declares its roles and the request's is not one."""
    if query.roles is None:
        return
    if identity is None:
        raise ForbiddenRole(
            f"query {query.name!r} is for some roles only, and this gateway runs no request"
            " as a role (set PGQG_JWT_SECRET, PGQG_JWT_JWKS_FILE or PGQG_ANON_ROLE)"
        )
    if identity.role not in query.roles:
        raise ForbiddenRole(f"role {identity.role!r} may not run query {query.name!r}")


#: what a client refused a write on a read-only gateway is told to change
_ALLOW_WRITES = "writes need PGQG_RAW_SQL=read-write (pgqg serve --raw-sql read-write)"
_READ_ONLY_SQL_TRANSACTION = "25006"


def _on_read_only_gateway(error: QueryError) -> QueryError:
    """PostgreSQL's refusal of a write that the gateway's mode made read-only,
    saying so and what would allow it (the SQLSTATE and status stay 25006, 403)."""
    if error.sqlstate != _READ_ONLY_SQL_TRANSACTION:
        return error
    return query_error(
        f"{error.message}: raw SQL is read-only on this gateway",
        sqlstate=error.sqlstate,
        detail=error.detail,
        hint=error.hint or _ALLOW_WRITES,
        position=error.position,
    )


def _read_only(body: dict[str, Any], settings: Settings) -> bool:
    """Whether raw SQL runs read-only: as the body's ``read_only`` says, else as the
    gateway's mode decides (read-only jobs may go to a read replica).

    Raises:
        BadRequest: ``read_only`` is not a boolean.
        Forbidden: ``read_only: false`` on a read-only gateway.
    """
    forced = settings.raw_sql == "read-only"
    read_only = body.get("read_only")
    if read_only is None:
        return forced
    if not isinstance(read_only, bool):
        raise BadRequest("read_only must be true or false")
    if forced and not read_only:
        raise Forbidden(f"raw SQL is read-only on this gateway; {_ALLOW_WRITES}")
    return read_only


@routes.post("/v1/query")
async def post_query(request: web.Request) -> web.StreamResponse:
    """Run one raw SQL statement (raw_sql mode permitting)."""
    settings = request.app[SETTINGS]
    identity = _identify(request)
    fmt = _output_format(request)
    _allow_raw_sql(settings, identity)
    body = await read_json_object(request)
    check_keys(body, _QUERY_KEYS)
    statement = sql_statement(body.get("sql"), body.get("params"), "body")
    options = parse_options(body, settings, streamed=fmt.streamed)
    read_only = _read_only(body, settings)
    if settings.raw_sql != "read-only":
        return await _run_one(
            request, fmt, statement, options, read_only=read_only, identity=identity
        )
    try:
        return await _run_one(request, fmt, statement, options, read_only=True, identity=identity)
    except QueryError as exc:
        raise _on_read_only_gateway(exc) from None


@routes.post("/v1/transaction")
async def post_transaction(request: web.Request) -> web.Response:
    """Run several raw statements all or nothing, on one connection."""
    settings = request.app[SETTINGS]
    identity = _identify(request)
    _json_only(request)
    _allow_raw_sql(settings, identity)
    body = await read_json_object(request)
    check_keys(body, _TRANSACTION_KEYS)
    items = body.get("statements")
    if not isinstance(items, list) or not items:
        raise BadRequest("statements must be a non-empty list")
    statements = [raw_statement(item, f"statements[{i}]") for i, item in enumerate(items)]
    read_only = _read_only(body, settings)
    started = time.perf_counter()
    dispatcher = request.app[DISPATCHER]
    exchange = exchange_of(request)
    job = make_job(
        statements,
        parse_options(body, settings),
        read_only=read_only,
        transaction=True,
        isolation=parse_isolation(body.get("isolation")),
        identity=identity,
        loop=dispatcher.loop,
        comment=sql_comment(exchange.request_id),
    )
    exchange.ran(job, started)
    try:
        results = await dispatcher.run(job)
    except QueryError as exc:
        forced = settings.raw_sql == "read-only"
        raise (_on_read_only_gateway(exc) if forced else exc) from None
    exchange.answered = time.perf_counter()
    answer = {"results": [_result_body(r) for r in results], "elapsed_ms": _elapsed_ms(started)}
    return _answer(exchange, answer, sum(len(r.rows) for r in results))


@routes.get("/v1/queries")
async def list_queries(request: web.Request) -> web.Response:
    """The catalog of named queries with their parameters."""
    return json_response({"queries": [q.describe() for q in request.app[CATALOG]]})


@routes.get("/v1/queries/{name}")
async def get_named_query(request: web.Request) -> web.StreamResponse:
    """Run a read-only named query, parameters from the query string."""
    identity = _identify(request)
    fmt = _output_format(request)
    query = request.app[CATALOG].get(request.match_info["name"])
    _allow_query(query, identity)
    if not query.read_only:
        raise MethodNotAllowed(f"{query.name} writes; call it with POST", allow=("POST",))
    if len(set(request.query)) != len(request.query):
        raise BadRequest("a query-string key is given more than once")
    values = {k: v for k, v in request.query.items() if k not in RESERVED_QUERY_KEYS}
    statement = named_statement(query, values, from_query_string=True)
    options = parse_options(request.query, request.app[SETTINGS], streamed=fmt.streamed)
    return await _run_one(request, fmt, statement, options, read_only=True, identity=identity)


@routes.post("/v1/queries/{name}")
async def post_named_query(request: web.Request) -> web.StreamResponse:
    """Run a named query, parameters from the JSON body."""
    identity = _identify(request)
    fmt = _output_format(request)
    query = request.app[CATALOG].get(request.match_info["name"])
    _allow_query(query, identity)
    body = await read_json_object(request)
    check_keys(body, _NAMED_QUERY_KEYS)
    values = body.get("params") or {}
    if not isinstance(values, dict):
        raise BadRequest("params must be an object of name: value")
    statement = named_statement(query, values, from_query_string=False)
    options = parse_options(body, request.app[SETTINGS], streamed=fmt.streamed)
    return await _run_one(
        request, fmt, statement, options, read_only=query.read_only, identity=identity
    )


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers, whatever the database does."""
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only when a pooled connection answers a query.

    Raises:
        Unavailable: no connection, or the probe did not answer within 2 s (the
            connections are stuck: a network partition, say).
    """
    dispatcher = request.app[DISPATCHER]
    if not dispatcher.ready:
        raise Unavailable("no working database connection yet")
    loop = asyncio.get_running_loop()
    try:
        await dispatcher.run(probe_job(loop.time() + 2.0), here=True)  # the primary
    except Timeout:
        raise Unavailable("the database did not answer within 2 s") from None
    return json_response({"status": "ready", "targets": _targets(request.app)})


def _targets(app: web.Application) -> list[dict[str, Any]]:
    """The primary and each read replica: role, health, what waits for it."""
    dispatcher = app[DISPATCHER]
    primary = {
        "name": "primary",
        "role": "primary",
        "healthy": dispatcher.ready,
        "pending": dispatcher.pending,
    }
    replicas = app.get(REPLICAS)
    return [primary, *(replicas.stats() if replicas is not None else [])]


@routes.get("/v1/stats")
async def stats(request: web.Request) -> web.Response:
    """Dispatcher and pool figures: queue depth, per-connection load; live event streams.

    ``pid`` is the answering process's: with ``--workers`` each has its own figures.
    """
    body = request.app[DISPATCHER].stats()
    body["pid"] = os.getpid()
    body["targets"] = _targets(request.app)
    body["pool"] = request.app[POOL].get_stats()
    body["subscribers"] = request.app[LISTENER].subscribers
    body["listen"] = request.app[LISTENER].stats()
    return json_response(body)


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 description of this API."""
    return json_response(openapi_document(request.app[CATALOG]))
