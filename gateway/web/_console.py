"""The query console: a static page of the package, served at ``GET /`` (``PGQG_CONSOLE``).

The page (``console/index.html``, ``console.js``, ``console.css``; package
data) is plain HTML, JavaScript and CSS with no build step, and it calls only
the public API, as any other page could. It is read once, at start-up, and
served from memory:

* the script and style sheet under names holding a hash of their content
  (``console/console.<hash>.js``), cached for a year as immutable: a new
  version of the package has new names, so a browser never mixes versions;
* the page itself revalidated on every load (``no-cache`` with an ETag), so a
  new version is picked up at once.

Every answer carries a Content-Security-Policy that runs only the page's own
script file: no inline script or event handler, no ``eval``, nothing from
another origin, and (Trusted Types) no string ever assigned as HTML, so a
value in a result cannot become markup.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import hdrs, web

#: the console's own files, under this package
FILES = resources.files(__package__) / "console"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
PAGE_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=31536000, immutable"


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file as it is served: its bytes, media type, ETag and caching."""

    body: bytes
    content_type: str
    etag: str
    cache_control: str

    @classmethod
    def of(cls, body: bytes, suffix: str, cache_control: str) -> StaticFile:
        digest = hashlib.sha256(body).hexdigest()[:16]
        return cls(body, _TYPES[suffix], f'"{digest}"', cache_control)

    def response(self, request: web.Request) -> web.Response:
        """The file, or 304 when the browser holds this version."""
        headers = {
            **SECURITY_HEADERS,
            hdrs.ETAG: self.etag,
            hdrs.CACHE_CONTROL: self.cache_control,
        }
        if self.etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=self.body, content_type=self.content_type, charset="utf-8", headers=headers
        )


class Console:
    """The console's page and files, read from the package once."""

    __slots__ = ("assets", "page")

    def __init__(self, page: StaticFile, assets: dict[str, StaticFile]) -> None:
        self.page = page
        #: the script and style sheet by their served (hashed) names
        self.assets = assets

    @classmethod
    def load(cls) -> Console:
        """The files of the installed package, the page pointing at the hashed names.

        Raises:
            OSError: a file of the console is missing from the package.
        """
        html = FILES.joinpath("index.html").read_text(encoding="utf-8")
        assets = {}
        for name in ("console.js", "console.css"):
            body = FILES.joinpath(name).read_bytes()
            stem, _, suffix = name.rpartition(".")
            served = f"{stem}.{hashlib.sha256(body).hexdigest()[:12]}.{suffix}"
            html = html.replace(f'"console/{name}"', f'"console/{served}"')
            assets[served] = StaticFile.of(body, "." + suffix, ASSET_CACHE)
        return cls(StaticFile.of(html.encode(), ".html", PAGE_CACHE), assets)

    async def serve_page(self, request: web.Request) -> web.Response:
        """The console page."""
        return self.page.response(request)

    async def serve_asset(self, request: web.Request) -> web.Response:
        """A file of the console, by its hashed name.

        Raises:
            HTTPNotFound: no such file in this version (the error middleware's 404).
        """
        asset = self.assets.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound()
        return asset.response(request)


def add_console(app: web.Application) -> None:
    """Serve the console at ``/`` and its files under ``/console/``.

    Raises:
        OSError: as `Console.load`.
    """
    console = Console.load()
    app.router.add_get("/", console.serve_page)
    app.router.add_get("/console/{name}", console.serve_asset)
