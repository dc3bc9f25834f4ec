"""CORS: which web pages on other origins may call the API (``PGQG_CORS_ORIGINS``).

A browser lets a page read a cross-origin answer only when the answer grants
the page's origin (``Access-Control-Allow-Origin``), and sends a JSON POST, or
any request with an ``Authorization`` header, only after a preflight
``OPTIONS`` request was granted. Both sides are here:

* `preflight_middleware` answers a preflight for every path itself (204 with
  the grant, or 403 for an origin not listed), before routing;
* `grant_origin` adds the grant to every other answer as its headers go out, on
  aiohttp's ``on_response_prepare`` signal: streamed answers send their headers
  inside the handler, where no middleware can reach them after the fact.

Every answer says ``Vary: Origin`` (it depends on it), so a cache never hands
one origin's grant to another. No credentials (cookies) are granted: a token
travels in the ``Authorization`` header, which a granted preflight allows.
Nothing is installed when no origin is configured.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .._errors import Forbidden
from ._middleware import error_response

#: what a preflight grants; the Neon-* headers are those of Neon's HTTP API (POST /sql)
ALLOWED_METHODS = "GET, HEAD, POST"
ALLOWED_HEADERS = ", ".join(
    (
        "accept",
        "authorization",
        "content-type",
        "neon-connection-string",
        "neon-raw-text-output",
        "neon-array-mode",
        "neon-batch-isolation-level",
        "neon-batch-read-only",
        "neon-batch-deferrable",
    )
)
#: response headers a page may read beyond the CORS-safelisted ones
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate"
#: seconds a browser may reuse a preflight's answer (Chromium caps it at 7200)
MAX_AGE_S = 3600

_Signal = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


class Cors:
    """The origins granted: a set, or every one (``*``)."""

    __slots__ = ("any_origin", "origins")

    def __init__(self, origins: tuple[str, ...]) -> None:
        """`origins` as the settings hold them: browser-spelled origins, or ``("*",)``."""
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)

    def grant(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for `origin`; None: no grant."""
        if origin is None:
            return None
        if self.any_origin:
            return "*"
        return origin if origin in self.origins else None


def install_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    """Grant `origins` (nothing when empty); call before the app starts.

    The preflight middleware goes after the others (inside the observing one:
    preflights are counted and logged as any request) and answers before the
    route's handler runs, whatever the path.
    """
    if not origins:
        return
    cors = Cors(origins)
    app.middlewares.append(_preflight_middleware(cors))
    app.on_response_prepare.append(_granter(cors))


def _preflight_middleware(cors: Cors) -> Middleware:
    @web.middleware
    async def preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer a CORS preflight; pass every other request on."""
        headers = request.headers
        if request.method != hdrs.METH_OPTIONS or hdrs.ACCESS_CONTROL_REQUEST_METHOD not in headers:
            return await handler(request)
        origin = headers.get(hdrs.ORIGIN)
        if cors.grant(origin) is None:
            return error_response(
                Forbidden(f"origin {origin!r} may not call this gateway (PGQG_CORS_ORIGINS)")
            )
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOWED_METHODS,
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOWED_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: str(MAX_AGE_S),
            },
        )

    return preflight_middleware


def _granter(cors: Cors) -> _Signal:
    async def grant_origin(request: web.Request, response: web.StreamResponse) -> None:
        """Add the grant (if any) and ``Vary: Origin`` to an answer about to be sent."""
        headers = response.headers
        vary = headers.get(hdrs.VARY)
        if vary is None:
            headers[hdrs.VARY] = hdrs.ORIGIN
        elif "origin" not in {name.strip().lower() for name in vary.split(",")}:
            headers[hdrs.VARY] = f"{vary}, {hdrs.ORIGIN}"
        allowed = cors.grant(request.headers.get(hdrs.ORIGIN))
        if allowed is not None:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
            if request.method != hdrs.METH_OPTIONS:
                headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS

    return grant_origin
