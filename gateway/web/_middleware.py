"""The one place errors become HTTP responses (DESIGN §3's error shape)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from .._errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, TooLarge
from ._observe import exchange_of

log = logging.getLogger("gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: GatewayError) -> web.Response:
    """The JSON error body, with Retry-After when the error suggests one."""
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return web.Response(
        body=orjson.dumps(error.to_dict()),
        status=error.status,
        content_type="application/json",
        headers=headers,
    )


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound("no such endpoint; see /openapi.json")
    if exc.status == 405:
        return MethodNotAllowed(f"method not allowed; allowed: {exc.headers.get('Allow', '')}")
    if exc.status == 413:
        return TooLarge(exc.text or "request body too large")
    if exc.status < 500:
        return BadRequest(exc.reason)
    return GatewayError(exc.reason)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error to the JSON error shape; nothing else formats errors.

    The error answered is noted on the request's `Exchange`, for its access
    log line and ``/metrics``.
    """
    allow = None
    try:
        return await handler(request)
    except GatewayError as exc:
        error = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http_exception(exc)
        if exc.status == 405:
            allow = exc.headers.get("Allow")
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        error = GatewayError("internal error; see the gateway's log")
    exchange_of(request).error = error
    response = error_response(error)
    if allow is not None:
        response.headers["Allow"] = allow
    return response
