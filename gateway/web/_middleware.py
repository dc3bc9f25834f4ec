"""The one place errors become HTTP responses (DESIGN §3's error shape).

A front door that speaks another protocol (Neon's, at ``POST /sql``) words its
errors in that protocol's body: it registers an `ErrorBody` for its path in
``app[ERROR_BODIES]`` (`error_body_of`), and its errors keep the headers every
error gets here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from .._errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    TooLarge,
)

log = logging.getLogger("gateway.http")

#: an error's status and JSON body in a front door's own protocol
ErrorBody = Callable[[GatewayError], tuple[int, Any]]

#: the error bodies of front doors with a protocol of their own, by path
ERROR_BODIES: web.AppKey[dict[str, ErrorBody]] = web.AppKey("error_bodies")


def error_response(error: GatewayError, body: ErrorBody | None = None) -> web.Response:
    """The JSON error body (DESIGN §3's, or `body`'s), with the headers the error asks
    for (Retry-After, a 405's Allow)."""
    status, content = (error.status, error.to_dict()) if body is None else body(error)
    return web.Response(
        body=orjson.dumps(content),
        status=status,
        content_type="application/json",
        headers=error.headers(),
    )


def error_body_of(request: web.Request) -> ErrorBody | None:
    """The error body of the front door at `request`'s path; None: DESIGN §3's."""
    bodies = request.app.get(ERROR_BODIES)
    return None if bodies is None else bodies.get(request.path)


def gateway_error(request: web.Request, exc: Exception) -> GatewayError:
    """What the client is told of `exc` (raised while handling `request`; an
    HTTPException of 400 or more): a `GatewayError` as it is, aiohttp's errors in
    the same shape, anything else an internal error, logged with its traceback
    (call it where `exc` is being handled)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, web.HTTPException):
        return _from_http_exception(exc)
    log.exception("unexpected error on %s %s", request.method, request.path)
    return GatewayError("internal error; see the gateway's log")


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound("no such endpoint; see /openapi.json")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return MethodNotAllowed(
            f"method not allowed; allowed: {allow}", allow=[allow] if allow else []
        )
    if exc.status == 413:
        return TooLarge(exc.text or "request body too large")
    if exc.status < 500:
        return BadRequest(exc.reason)
    return GatewayError(exc.reason)
