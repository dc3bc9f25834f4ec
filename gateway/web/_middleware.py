"""The one place errors become HTTP responses (DESIGN §3's error shape)."""

from __future__ import annotations

import logging

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


def error_response(error: GatewayError) -> web.Response:
    """The JSON error body, with the headers the error asks for (Retry-After, a
    405's Allow)."""
    return web.Response(
        body=orjson.dumps(error.to_dict()),
        status=error.status,
        content_type="application/json",
        headers=error.headers(),
    )


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
