"""What the gateway tells about each request: its id, its timing, its access log line.

`observe_middleware` is the gateway's one middleware: it turns an error
into its answer (`gateway.web._middleware`, the one place that knows how) and
sees every answer the client gets:

* ``X-Request-Id``: the client's own when it sends a sane one (`sane_request_id`),
  else one made here; it goes back on the response, into the access log line and,
  as a SQL comment in front of the statement, into ``pg_stat_activity``.
* ``Server-Timing: queue;dur=…, db;dur=…, encode;dur=…`` (milliseconds) on every
  answer of a request that ran a job, from the timestamps the handler and the job keep.
* one access log line per request, at INFO (WARNING for 4xx, ERROR for 5xx),
  so ``PGQG_LOG_LEVEL=warning`` logs only the failures.
* the request's figures for ``/metrics`` (`gateway.web._metrics.HttpMetrics`),
  unless metrics are off.

A handler that runs a job notes it on the request's `Exchange` (`exchange_of`):
the job, when the handler submitted it, when its answer came back and when the
body was encoded, and the rows and bytes it sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import secrets
import time
from typing import Any, TypeGuard

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .._errors import GatewayError
from ..engine._jobs import Job
from ._metrics import HttpMetrics
from ._middleware import error_body_of, error_response, gateway_error

REQUEST_ID_HEADER = "X-Request-Id"
SERVER_TIMING_HEADER = "Server-Timing"
#: the status an access log line and ``/metrics`` give a request whose client went
#: away before its answer (nginx's "client closed request")
CLIENT_GONE = 499
#: a client's request id longer than this, or with other characters, is replaced
MAX_REQUEST_ID = 128
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]+")

access_log = logging.getLogger("gateway.access")


class Exchange:
    """One request as the gateway observes it; see the module docstring.

    Times are `time.perf_counter` seconds: the event loop's clock (uvloop's)
    counts whole milliseconds.
    """

    __slots__ = (
        "answered",
        "bytes",
        "cancelled",
        "encoded",
        "error",
        "format",
        "job",
        "request_id",
        "rows",
        "submitted",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        #: the job the request ran, if any, and when the handler submitted it
        self.job: Job | None = None
        self.submitted = 0.0
        #: when the job's results (or a stream's first rows) came back; 0: not yet
        self.answered = 0.0
        #: when the answer's body was encoded (a buffered answer only)
        self.encoded = 0.0
        #: the output format of a query's answer (json, ndjson, csv); "" when no query
        self.format = ""
        self.rows = 0
        self.bytes = 0
        #: the error the answer reports (or that cut a stream midway)
        self.error: GatewayError | None = None
        #: the client went away before the whole answer was sent
        self.cancelled = False

    def ran(self, job: Job, submitted: float) -> None:
        """The handler submitted `job` at `submitted` (perf_counter)."""
        self.job = job
        self.submitted = submitted

    def sent(self, fmt: str, rows: int, size: int) -> None:
        """A query's answer: `rows` rows in `size` bytes of `fmt`."""
        self.format = fmt
        self.rows += rows
        self.bytes += size


# aiohttp 3.14 warns of a str key on a request (once a process: the suite's first
# request then fails, warnings being errors there) and brings RequestKey for it
_EXCHANGE: Any = (
    web.RequestKey("pgqg.exchange", Exchange) if hasattr(web, "RequestKey") else "pgqg.exchange"
)


def exchange_of(request: web.Request) -> Exchange:
    """The request's `Exchange`, made by `observe_middleware`."""
    exchange: Exchange = request[_EXCHANGE]
    return exchange


# --- request ids ---------------------------------------------------------------------


def sane_request_id(given: str | None) -> TypeGuard[str]:
    """Whether a client's ``X-Request-Id`` is kept: at most `MAX_REQUEST_ID`
    characters of letters, digits and ``. _ : -`` (it goes into logs and SQL)."""
    return given is not None and len(given) <= MAX_REQUEST_ID and bool(_SANE_ID.fullmatch(given))


class _Ids:
    """Request ids made here: a random prefix per process, then a counter.

    Unique across processes without a random draw per request (uuid4 costs a
    system call); the prefix is drawn again in a forked child.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


_ids = _Ids()
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_ids.reset)


def new_request_id() -> str:
    """A fresh request id, unique across the gateway's processes."""
    return _ids.next()


def sql_comment(request_id: str) -> bytes:
    """What goes in front of a statement sent as text, for ``pg_stat_activity``."""
    return f"/* request_id={request_id} */ ".encode()


# --- Server-Timing ---------------------------------------------------------------------


def server_timing(exchange: Exchange, now: float) -> str:
    """``queue;dur=…, db;dur=…, encode;dur=…`` in milliseconds.

    queue: from the handler's submission until a connection took the job;
    db: from then until its results were back (for a stream: its first rows;
    such an answer has no encode figure, its headers leave before its rows are
    encoded); encode: turning the results into the body. A job that failed is
    timed up to `now`.
    """
    job = exchange.job
    assert job is not None
    answered = exchange.answered or now
    started = job.started_at or answered
    timing = (
        f"queue;dur={(started - exchange.submitted) * 1000:.3f}, "
        f"db;dur={(answered - started) * 1000:.3f}"
    )
    if exchange.encoded:
        timing += f", encode;dur={(exchange.encoded - answered) * 1000:.3f}"
    return timing


# --- the middleware --------------------------------------------------------------------


def observe_middleware(metrics: HttpMetrics | None) -> Middleware:
    """The gateway's one middleware; `metrics` None: ``/metrics`` is off, nothing is counted."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        given = request.headers.get(REQUEST_ID_HEADER)
        exchange = Exchange(given if sane_request_id(given) else new_request_id())
        request[_EXCHANGE] = exchange
        try:
            response = await handler(request)
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            exchange.cancelled = True
            _done(request, exchange, CLIENT_GONE, started, metrics)
            raise
        except Exception as exc:
            if isinstance(exc, web.HTTPException) and exc.status < 400:  # a redirect
                exc.headers[REQUEST_ID_HEADER] = exchange.request_id
                _done(request, exchange, exc.status, started, metrics)
                raise
            exchange.error = gateway_error(request, exc)
            response = error_response(exchange.error, error_body_of(request))
        if not response.prepared:  # a stream sets its headers itself, before its rows
            headers = response.headers
            headers[REQUEST_ID_HEADER] = exchange.request_id
            if exchange.job is not None:
                headers[SERVER_TIMING_HEADER] = server_timing(exchange, time.perf_counter())
        status = CLIENT_GONE if exchange.cancelled else response.status
        _done(request, exchange, status, started, metrics)
        return response

    return observe


def stream_headers(exchange: Exchange) -> dict[str, str]:
    """The headers a streamed answer sends before its rows."""
    return {
        REQUEST_ID_HEADER: exchange.request_id,
        SERVER_TIMING_HEADER: server_timing(exchange, time.perf_counter()),
    }


def route_of(request: web.Request) -> str:
    """The route's pattern (``/v1/queries/{name}``): a bounded label, never the
    path a client typed; "unmatched" for a path or method no route has."""
    resource = request.match_info.route.resource
    return "unmatched" if resource is None else resource.canonical


def _done(
    request: web.Request,
    exchange: Exchange,
    status: int,
    started: float,
    metrics: HttpMetrics | None,
) -> None:
    seconds = time.perf_counter() - started
    route = ""
    if metrics is not None:
        route = route_of(request)
        metrics.request(request.method, route, status, seconds)
        job = exchange.job
        if job is not None and job.started_at:
            metrics.queue_wait.observe(job.started_at - exchange.submitted)
        if exchange.error is not None:
            metrics.error(exchange.error)
        if exchange.cancelled:
            metrics.cancellations += 1
        if exchange.format:
            metrics.sent(exchange.format, exchange.rows, exchange.bytes)
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    if access_log.isEnabledFor(level):
        _log_access(request, exchange, level, status, seconds, route or route_of(request))


def _log_access(
    request: web.Request,
    exchange: Exchange,
    level: int,
    status: int,
    seconds: float,
    route: str,
) -> None:
    """One line per request: readable as text, its fields as they are in JSON."""
    error = exchange.error
    fields = {
        "request_id": exchange.request_id,
        "remote": request.remote,
        "method": request.method,
        "path": request.rel_url.raw_path,
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "rows": exchange.rows if exchange.format else None,
        "code": error.code if error is not None else None,
        "sqlstate": error.sqlstate if error is not None else None,
    }
    # the path as it was sent (percent-encoded): a decoded one could hold a line break
    line = f'{request.remote} "{request.method} {fields["path"]}" {status} {seconds * 1000:.2f} ms'
    if exchange.format:
        line += f" rows={exchange.rows}"
    if error is not None:
        line += f" code={error.code}" + (f" sqlstate={error.sqlstate}" if error.sqlstate else "")
    line += f" request_id={exchange.request_id}"
    access_log.log(level, "%s", line, extra={"fields": fields})
