"""Turning HTTP requests into jobs: body parsing, validation, options.

The front end never touches a connection: it validates what the client sent,
fixes the job's deadline and limits, and hands a `Job` to the dispatcher.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pglast import ast
from pglast.parser import ParseError, parse_sql

from .._errors import BadRequest, TooLarge, UnsupportedMediaType
from .._settings import Settings
from ..catalog._catalog import NamedQuery, integral_number
from ..engine._identity import Identity
from ..engine._jobs import Job, Statement
from ..engine._stream import StreamJob
from ..values._encoding import list_params, loads_exact, params_to_text
from ..values._formats import OutputFormat, stream_encoder

SHAPES = ("objects", "arrays")
ISOLATION_LEVELS = ("read committed", "repeatable read", "serializable")
#: query-string keys of GET /v1/queries/{name} that are options, not parameters
RESERVED_QUERY_KEYS = frozenset({"format", "shape", "timeout_ms", "max_rows"})
#: the protocol's limit: a Bind message counts its parameters in 16 bits
MAX_PARAMS = 65535
_STATEMENT_KEYS = frozenset({"sql", "params"})
#: SQL texts whose check is remembered, and the longest remembered (memory stays small)
SQL_CHECKS_REMEMBERED = 1024
SQL_CHECKS_MAX_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Options:
    """Per-request options shared by every endpoint that runs SQL.

    `max_rows` cuts a buffered answer; `row_limit` a streamed one (None: no limit).
    """

    timeout_ms: int
    max_rows: int
    shape: str
    row_limit: int | None = None


async def read_json_object(request: web.Request, *, any_type: bool = False) -> dict[str, Any]:
    """The request body as a JSON object; `any_type`: whatever its Content-Type says.

    Raises:
        UnsupportedMediaType: the Content-Type is not JSON (unless `any_type`).
        BadRequest: the body is not a JSON object.
        TooLarge: the Content-Length announces a body over the limit; (from
            aiohttp, mapped by the middleware) a body read turns out too big.
    """
    if not any_type and not _is_json(request):
        raise UnsupportedMediaType(
            f"send the body as application/json, not {request.content_type or 'nothing'}"
        )
    limit = request.client_max_size
    length = request.content_length
    if length is not None and length > limit:
        # at once: waiting for a body we will refuse anyway would let a client
        # that announces more than it sends hold the request open
        raise _too_large(limit)
    body = _body_at_hand(request)
    if body is None:
        body = await request.read()  # aiohttp refuses more than the limit as it reads
    elif len(body) > limit:
        raise _too_large(limit)
    value = loads_exact(body)
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"the body may hold at most {limit} bytes")


def _body_at_hand(request: web.Request) -> bytes | None:
    """The whole body when it has all arrived and is not compressed (nearly every
    request's), taken without a coroutine; else None.

    ``request.read()`` awaits the stream chunk by chunk even when it is all
    buffered already. A compressed body always goes that way, so aiohttp
    checks its inflated size as it grows.
    """
    content = request.content
    if not content.is_eof() or "Content-Encoding" in request.headers:
        return None
    return content.read_nowait()


def _is_json(request: web.Request) -> bool:
    """Whether the body is declared JSON: ``application/json`` or ``application/*+json``.

    The header as nearly every client sends it is recognised as it is:
    aiohttp's parsing of a Content-Type costs more than the rest of a
    request's validation.
    """
    raw = request.headers.get("Content-Type")
    if raw == "application/json" or (raw is not None and raw.startswith("application/json;")):
        return True
    media = request.content_type
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def check_keys(body: Mapping[str, Any], allowed: Set[str], where: str = "body") -> None:
    """Raises BadRequest naming the first key of `body` not in `allowed`."""
    for key in body:
        if key not in allowed:
            raise BadRequest(f"unknown field {key!r} in the {where}")


def _int_option(value: Any, name: str, *, minimum: int) -> int:
    integral = integral_number(value)  # 1000.0 is an integer, as JSON Schema has it
    if integral is not None:
        value = integral
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadRequest(f"{name} must be an integer >= {minimum}")
    return value


def parse_options(
    source: Mapping[str, Any], settings: Settings, *, streamed: bool = False
) -> Options:
    """timeout_ms (capped by statement_timeout_ms), max_rows and shape.

    ``max_rows`` is capped by ``max_rows`` for a buffered answer and by
    ``stream_max_rows`` (when not 0) for a `streamed` one, which otherwise has
    no row limit.

    Raises:
        BadRequest: an option has the wrong type or value.
    """
    if "timeout_ms" not in source and "max_rows" not in source and "shape" not in source:
        return _default_options(
            settings.statement_timeout_ms,
            settings.max_rows,
            (settings.stream_max_rows or None) if streamed else None,
        )
    timeout_ms = settings.statement_timeout_ms
    if source.get("timeout_ms") is not None:
        timeout_ms = min(_int_option(source["timeout_ms"], "timeout_ms", minimum=1), timeout_ms)
    asked = None
    if source.get("max_rows") is not None:
        asked = _int_option(source["max_rows"], "max_rows", minimum=0)
    max_rows = settings.max_rows if asked is None else min(asked, settings.max_rows)
    shape = source.get("shape")
    if shape is None:
        shape = "objects"
    if not isinstance(shape, str) or shape not in SHAPES:
        raise BadRequest(f"shape must be one of {', '.join(SHAPES)}")
    row_limit = None
    if streamed:
        limits = [n for n in (asked, settings.stream_max_rows or None) if n is not None]
        row_limit = min(limits, default=None)
    return Options(timeout_ms, max_rows, shape, row_limit)


@functools.lru_cache(maxsize=16)
def _default_options(timeout_ms: int, max_rows: int, row_limit: int | None) -> Options:
    """The options of a request that sets none: most requests (built once)."""
    return Options(timeout_ms, max_rows, "objects", row_limit)


def raw_statement(item: Any, where: str) -> Statement:
    """One ``{"sql": ..., "params": [...]}`` as a `Statement`.

    Raises:
        BadRequest: sql is missing or empty, params is not a list, there are
            more parameters than the protocol carries, a parameter cannot be
            sent to PostgreSQL, or the statement is a COPY from or to the client.
    """
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object with sql and params")
    check_keys(item, _STATEMENT_KEYS, where)
    return sql_statement(item.get("sql"), item.get("params"), where)


def sql_statement(sql: Any, params: Any, where: str, sql_key: str = "sql") -> Statement:
    """`sql` and its `params` (None: none) from the body as a `Statement`; the
    body names the SQL `sql_key` (errors say so).

    Raises:
        BadRequest: as `raw_statement`.
    """
    if not isinstance(sql, str):
        raise BadRequest(f"{where}.{sql_key} must be a non-empty string")
    # most requests repeat a few statements: each text is checked once
    text = _sql_text(sql) if len(sql) <= SQL_CHECKS_MAX_CHARS else _check_sql(sql)
    if isinstance(text, str):
        raise BadRequest(f"{where}.{sql_key}{text}")
    if params is None:
        params = []
    if not isinstance(params, list):
        raise BadRequest(f"{where}.params must be a list (PostgreSQL's $1, $2, …)")
    if len(params) > MAX_PARAMS:
        raise BadRequest(f"{where}.params: at most {MAX_PARAMS} parameters")
    return Statement(text, params_to_text(params), None, list_params(params))


def _check_sql(sql: str) -> bytes | str:
    """`sql` encoded for the protocol, or why it is refused (the end of a sentence)."""
    if not sql.strip():
        return " must be a non-empty string"
    if "\x00" in sql:
        return " cannot contain NUL characters"
    copy = client_copy(sql)
    if copy is not None:
        return (
            f": COPY {copy} is not available over HTTP;"
            " use a query (and format=csv) to read, INSERT to write"
        )
    return sql.encode()


_sql_text = functools.lru_cache(maxsize=SQL_CHECKS_REMEMBERED)(_check_sql)


def client_copy(sql: str) -> str | None:
    """``FROM STDIN`` or ``TO STDOUT`` when `sql` holds a COPY from or to the client.

    This is protocol safety, not access control (PostgreSQL enforces
    read-only): the client side of a COPY is the gateway, and in a pipeline
    the server reads the next job's messages as COPY data and drops the
    connection. Only statements mentioning "copy" are parsed (with
    PostgreSQL's own parser); what does not parse is left for the server to refuse.
    """
    if "copy" not in sql.lower():
        return None
    try:
        statements = parse_sql(sql)
    except ParseError:
        return None
    for raw in statements:
        if isinstance(raw.stmt, ast.CopyStmt) and raw.stmt.filename is None:
            return "FROM STDIN" if raw.stmt.is_from else "TO STDOUT"
    return None


def named_statement(
    query: NamedQuery, values: Mapping[str, Any], *, from_query_string: bool
) -> Statement:
    """A named query bound to its parameters, run as a prepared statement."""
    bound = query.bind(values, from_query_string=from_query_string)
    return Statement(
        query.sql.encode(),
        params_to_text(bound),
        prepared=b"pgqg_" + query.name.encode(),
        lists=list_params(bound),
    )


def make_job(
    statements: list[Statement],
    options: Options,
    *,
    read_only: bool,
    transaction: bool = False,
    isolation: str | None = None,
    identity: Identity | None = None,
    deferrable: bool = False,
    loop: asyncio.AbstractEventLoop,
    comment: bytes = b"",
) -> Job:
    """A job whose deadline is `options.timeout_ms` from now on `loop`'s clock;
    `comment` goes in front of its raw statements (see `Job`).

    The caller passes the running loop it holds: asking asyncio for it costs
    a getpid() system call per request.
    """
    return Job(
        statements,
        read_only=read_only,
        deadline=loop.time() + options.timeout_ms / 1000,
        max_rows=options.max_rows,
        shape=options.shape,
        transaction=transaction,
        isolation=isolation,
        identity=identity,
        deferrable=deferrable,
        loop=loop,
        comment=comment,
    )


def make_stream_job(
    statement: Statement,
    options: Options,
    fmt: OutputFormat,
    *,
    read_only: bool,
    comment: bytes = b"",
    identity: Identity | None = None,
) -> StreamJob:
    """A streamed job: `options.timeout_ms` to its first rows, and its longest stall after."""
    loop = asyncio.get_running_loop()
    timeout_s = options.timeout_ms / 1000
    return StreamJob(
        statement,
        encoder=stream_encoder(fmt, options.shape),
        read_only=read_only,
        deadline=loop.time() + timeout_s,
        row_limit=options.row_limit,
        stall_s=timeout_s,
        comment=comment,
        identity=identity,
    )


def parse_isolation(value: Any) -> str | None:
    """The isolation level of a transaction request, normalised.

    Raises:
        BadRequest: not one of PostgreSQL's isolation levels.
    """
    if value is None:
        return None
    if isinstance(value, str):
        level = " ".join(value.lower().replace("_", " ").split())
        if level in ISOLATION_LEVELS:
            return level
    raise BadRequest(f"isolation must be one of {', '.join(ISOLATION_LEVELS)}")
