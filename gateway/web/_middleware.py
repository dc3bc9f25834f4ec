"""The one place errors become HTTP responses (DESIGN §3's error shape)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from .._errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, TooLarge

log = logging.getLogger("gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: GatewayError) -> web.Response:
    """The JSON error body, with the headers the error asks for (Retry-After, Allow)."""
    return web.Response(
        body=orjson.dumps(error.to_dict()),
        status=error.status,
        content_type="application/json",
        headers=error.headers(),
    )


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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error to the JSON error shape; nothing else formats errors."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc))
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(GatewayError("internal error; see the gateway's log"))
