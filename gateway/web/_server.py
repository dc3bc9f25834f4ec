"""Running the application: event loop, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from aiohttp import web

from .._settings import Settings
from ._app import create_app
from ._logs import configure_logging


def install_uvloop() -> bool:
    """Use uvloop's faster event loop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


#: allocations between young-generation collections (CPython's default is 700):
#: a request allocates a few hundred objects, nearly all freed by reference counting
GC_THRESHOLD = (10_000, 10, 10)


async def freeze_startup_objects(_app: web.Application) -> None:
    """Move everything allocated during start-up out of the cyclic collector's sight.

    Modules, settings, the catalog and the pool live as long as the process;
    without this every full collection walks them again, a pause of tens of
    milliseconds under load (it was the p99 of the benchmark).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def serve(
    settings: Settings,
    dsn: str,
    *,
    on_ready: Callable[[str], None] | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT; in-flight requests get ``shutdown_grace_s``.

    On the signal aiohttp stops accepting connections; the app's shutdown hook
    (`gateway.web._app.drain_requests`) lets in-flight queries finish within the
    grace period, then answers the rest 503 and cancels them on the server;
    aiohttp waits for handlers still writing (cancelling them after another
    grace period at most); the cleanup context stops the workers and closes
    the pool. Then this returns, and the process exits 0.

    `reuse_port` binds with SO_REUSEPORT, for the workers of `gateway.web._supervisor`.
    """
    configure_logging(settings.log_level, settings.log_format)
    install_uvloop()
    app = create_app(settings, dsn)

    async def announce(_app: web.Application) -> None:
        if on_ready is not None:
            on_ready(f"http://{settings.host}:{settings.port}")

    app.on_startup.append(freeze_startup_objects)  # after the cleanup contexts' start-up
    app.on_startup.append(announce)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        reuse_port=reuse_port or None,
        shutdown_timeout=settings.shutdown_grace_s,
        handler_cancellation=True,
        access_log=None,  # the gateway writes its own, with request ids (web/_observe.py)
        print=None,
    )
