"""The application factory: routes, middleware and the resources' lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from .._settings import Settings
from ..catalog._catalog import Catalog
from ..engine._dispatcher import Dispatcher
from ..engine._pool import CLOSE_TIMEOUT_S, make_pool
from ..values._encoding import Codec
from ._app_keys import CATALOG, CODEC, DISPATCHER, DSN, POOL, SETTINGS
from ._middleware import error_middleware
from ._routes import routes


def create_app(settings: Settings, dsn: str | None = None) -> web.Application:
    """The gateway as an aiohttp application, for `dsn` (default: ``settings.dsn``).

    The catalog is loaded here, so a broken ``sql/queries`` fails at once. The
    pool and dispatcher are opened by a cleanup context: start-up does not
    wait for the database, and they are closed only if they were opened.

    Raises:
        ValueError: no DSN given and none in the settings.
        CatalogError: a named-query file is malformed.
    """
    dsn = dsn or settings.dsn
    if not dsn:
        raise ValueError("no database: pass a DSN or set PGQG_DSN / DATABASE_URL")
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[DSN] = dsn
    app[CATALOG] = Catalog.load(settings.sql_dir / "queries")
    app[CODEC] = Codec()
    app.add_routes(routes)
    app.cleanup_ctx.append(database_ctx)
    app.on_shutdown.append(drain_requests)
    return app


async def drain_requests(app: web.Application) -> None:
    """On shutdown, while aiohttp no longer accepts connections: in-flight
    requests get ``shutdown_grace_s`` to finish, then 503 and their queries
    are cancelled on the server.

    This runs before aiohttp waits for (and then cancels) its handlers, so a
    request cut short still gets an answer rather than a dropped connection.
    """
    dispatcher = app.get(DISPATCHER)
    if dispatcher is not None:
        await dispatcher.drain(app[SETTINGS].shutdown_grace_s)


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the pool and start the workers; on shutdown stop them, then close the pool."""
    settings = app[SETTINGS]
    pool = make_pool(settings, app[DSN])
    await pool.open(wait=False)
    try:
        dispatcher = Dispatcher(pool, app[CODEC], settings)
        dispatcher.start()
        try:
            app[POOL] = pool
            app[DISPATCHER] = dispatcher
            yield
        finally:
            await dispatcher.close(grace=settings.shutdown_grace_s)
    finally:
        await pool.close(timeout=CLOSE_TIMEOUT_S)
