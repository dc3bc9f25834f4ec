"""Running the application: event loop, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import signal
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


async def stop_signals_once(_app: web.Application) -> None:
    """Let only the first SIGTERM or SIGINT stop the server; ignore the ones after.

    aiohttp raises `GracefulExit` at every one, and a second one during the drain
    cuts the shutdown short (the process may then hang). A worker of several gets
    two when every process is signalled (systemd's default stop, a ``kill`` of them
    all) and its supervisor forwards the signal too.
    """
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: None)
        raise web.GracefulExit()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)


def serve(
    settings: Settings,
    dsn: str,
    *,
    on_ready: Callable[[str], None] | None = None,
    worker: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT; in-flight requests get ``shutdown_grace_s``.

    On the signal aiohttp stops accepting connections; the app's shutdown hook
    (`gateway.web._app.drain_requests`) lets in-flight queries finish within the
    grace period, then answers the rest 503 and cancels them on the server;
    aiohttp waits for handlers still writing (cancelling them after another
    grace period at most); the cleanup context stops the workers and closes
    the pool. Then this returns, and the process exits 0.

    A `worker` of `gateway.web._supervisor` binds with SO_REUSEPORT and stops at
    the first of several stop signals (`stop_signals_once`).
    """
    configure_logging(settings.log_level, settings.log_format)
    install_uvloop()
    app = create_app(settings, dsn)

    async def announce(_app: web.Application) -> None:
        if on_ready is not None:
            on_ready(f"http://{settings.host}:{settings.port}")

    if worker:
        app.on_startup.append(stop_signals_once)  # after aiohttp installed its handlers
    app.on_startup.append(freeze_startup_objects)  # after the cleanup contexts' start-up
    app.on_startup.append(announce)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        reuse_port=worker or None,
        shutdown_timeout=settings.shutdown_grace_s,
        handler_cancellation=True,
        access_log=None,  # the gateway writes its own, with request ids (web/_observe.py)
        print=None,
    )
