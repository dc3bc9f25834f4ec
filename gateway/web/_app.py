"""The application factory: routes, middleware and the resources' lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from .._settings import Settings
from ..catalog._catalog import Catalog
from ..engine._dispatcher import Dispatcher
from ..engine._listener import Listener
from ..engine._pool import CLOSE_TIMEOUT_S, make_pool
from ..engine._replicas import Replicas
from ..values._encoding import Codec
from . import _events, _neon
from ._app_keys import (
    AUTH,
    CATALOG,
    CODEC,
    DISPATCHER,
    DSN,
    LISTENER,
    METRICS,
    POOL,
    REPLICAS,
    SETTINGS,
)
from ._auth import Authenticator, keep_tokens_out_of_aiohttp_logs
from ._console import add_console
from ._cors import install_cors
from ._metrics import (
    HttpMetrics,
    MetricsSource,
    SharedMetrics,
    metrics_handler,
    start_publishing,
    stop_publishing,
)
from ._middleware import ERROR_BODIES, ErrorBody
from ._observe import observe_middleware
from ._privileges import check_login_role, connection_check
from ._routes import routes


def create_app(settings: Settings, dsn: str | None = None) -> web.Application:
    """The gateway as an aiohttp application, for `dsn` (default: ``settings.dsn``).

    The catalog is loaded here, so a broken ``sql/queries`` fails at once. The
    pool and dispatcher are opened by a cleanup context: start-up does not
    wait for the database, and they are closed only if they were opened.
    With ``metrics`` on, ``GET /metrics`` reads them (and the front end's counters).

    Raises:
        ValueError: no DSN given and none in the settings.
        CatalogError: a named-query file is malformed.
        ConfigError: the JWKS file is unusable (see `Authenticator`).
    """
    dsn = dsn or settings.dsn
    if not dsn:
        raise ValueError("no database: pass a DSN or set PGQG_DSN / DATABASE_URL")
    http_metrics = HttpMetrics() if settings.metrics else None
    app = web.Application(
        # one middleware: a layer costs every request (aiohttp's, and the call)
        middlewares=[observe_middleware(http_metrics)],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[DSN] = dsn
    app[CATALOG] = Catalog.load(settings.sql_dir / "queries")
    app[CODEC] = Codec()
    app[AUTH] = Authenticator(settings)
    keep_tokens_out_of_aiohttp_logs()
    app.add_routes(routes)
    app.add_routes(_events.routes)
    app.add_routes(_neon.routes)
    error_bodies: dict[str, ErrorBody] = {_neon.PATH: _neon.error_body}
    app[ERROR_BODIES] = error_bodies
    if settings.console:
        add_console(app)
    install_cors(app, settings.cors_origins)
    app.cleanup_ctx.append(database_ctx)
    app.cleanup_ctx.append(listener_ctx)
    app.on_shutdown.append(end_event_streams)
    if http_metrics is not None:
        shared = None
        if settings.metrics_dir is not None:
            settings.metrics_dir.mkdir(parents=True, exist_ok=True)
            shared = SharedMetrics(settings.metrics_dir)
        app[METRICS] = MetricsSource(http_metrics, shared)
        app.router.add_get("/metrics", metrics_handler(app[METRICS]))
        app.cleanup_ctx.append(metrics_ctx)  # after the database's: it reads the engine
    app.on_shutdown.append(drain_requests)
    return app


async def drain_requests(app: web.Application) -> None:
    """On shutdown, while aiohttp no longer accepts connections: in-flight
    requests get ``shutdown_grace_s`` to finish, then 503 and their queries
    are cancelled on the server.

    This runs before aiohttp waits for (and then cancels) its handlers, so a
    request cut short still gets an answer rather than a dropped connection.
    """
    grace = app[SETTINGS].shutdown_grace_s
    dispatcher = app.get(DISPATCHER)
    replicas = app.get(REPLICAS)
    await asyncio.gather(
        *([dispatcher.drain(grace)] if dispatcher is not None else []),
        *([replicas.drain(grace)] if replicas is not None else []),
    )


async def end_event_streams(app: web.Application) -> None:
    """On shutdown, end every live event stream at once: they would never end by
    themselves, and aiohttp waits for its handlers."""
    listener = app.get(LISTENER)
    if listener is not None:
        listener.end_streams()


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    """Check the login role (raw SQL on), open the pool and start the workers, and the
    read replicas' if any; on shutdown stop them, then close the pools.

    Raises:
        PrivilegedRoleError: see `check_login_role` (the primary's login role or a
            replica's); nothing was opened.
    """
    settings = app[SETTINGS]
    for dsn in (app[DSN], *settings.replica_dsns):  # a replica serves raw SQL too
        await check_login_role(dsn, settings)
    pool = make_pool(settings, app[DSN], configure=connection_check(settings))
    await pool.open(wait=False)
    try:
        dispatcher = Dispatcher(pool, app[CODEC], settings)
        dispatcher.start()
        try:
            app[POOL] = pool
            app[DISPATCHER] = dispatcher
            if settings.replica_dsns:
                async with replicas_of(settings, app[CODEC]) as replicas:
                    app[REPLICAS] = dispatcher.replicas = replicas
                    yield
            else:
                yield
        finally:
            dispatcher.replicas = None
            await dispatcher.close(grace=settings.shutdown_grace_s)
    finally:
        await pool.close(timeout=CLOSE_TIMEOUT_S)


@contextlib.asynccontextmanager
async def replicas_of(settings: Settings, codec: Codec) -> AsyncIterator[Replicas]:
    """The read replicas, open; closed at the end (also when opening failed half-way)."""
    replicas = Replicas(settings, codec, configure=connection_check(settings))
    try:
        await replicas.open()
        yield replicas
    finally:
        await replicas.close(grace=settings.shutdown_grace_s)


async def listener_ctx(app: web.Application) -> AsyncIterator[None]:
    """Make the LISTEN connection's owner (it connects on the first subscriber); close it."""
    listener = Listener(app[DSN], app[SETTINGS])
    try:
        app[LISTENER] = listener
        yield
    finally:
        await listener.close()


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Let ``/metrics`` read the dispatcher and the pool while they are open;
    with several processes, publish this one's figures meanwhile."""
    source = app[METRICS]
    source.attach(app[DISPATCHER], app[POOL], app.get(LISTENER))
    publisher = start_publishing(source)
    try:
        yield
    finally:
        await stop_publishing(source, publisher)
        source.attach(None, None)
