"""Running the application: event loop, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .._settings import Settings
from ._app import create_app
from ._app_keys import AUTH, SETTINGS
from ._logs import configure_logging

log = logging.getLogger("gateway.server")


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


class BadRequestsInOneLine(logging.Filter):
    """aiohttp's server log, with a request it could not parse as one INFO line.

    aiohttp answers such a request 400 itself (a NUL byte in a header, a line
    too long), then logs it with a traceback at ERROR, as if the gateway had
    failed. The client's mistake is worth a line, not an alarm. Other records
    pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError) or not 400 <= error.code < 500:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
            return False
        problem = " ".join(error.message.split()) if error.message else "malformed"
        record.msg, record.args = "%s: %d %s", (record.getMessage(), error.code, problem)
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info = record.exc_text = None
        return True


async def reload_keys_on_sighup(app: web.Application) -> None:
    """With a JWKS file, SIGHUP rereads it (a key rotation without a restart)."""
    if app[SETTINGS].jwt_jwks_file is not None and hasattr(signal, "SIGHUP"):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, app[AUTH].reload)


#: how long past the grace the process may take to close its connections before it
#: exits regardless (a connection whose server vanished may not close in time)
SHUTDOWN_SLACK_S = 1.5


def exit_deadline(seconds: float) -> Callable[[web.Application], Awaitable[None]]:
    """An on_shutdown hook: from the shutdown's start, the process has `seconds` to end.

    Every request has been answered by then (the drain), so what is left is closing
    connections; one stuck on a black-holed socket (a task that does not yield to
    its cancellation) must not keep the process alive past its stop. Past the
    deadline it logs one line and exits 0, as a completed shutdown does.
    """

    async def arm(_app: web.Application) -> None:
        def expire() -> None:
            log.warning("shutdown still closing connections after %.1f s: exiting now", seconds)
            logging.shutdown()
            os._exit(0)

        timer = threading.Timer(seconds, expire)
        timer.daemon = True
        timer.start()

    return arm


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
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestsInOneLine) for f in server_log.filters):
        server_log.addFilter(BadRequestsInOneLine())
    install_uvloop()
    app = create_app(settings, dsn)

    async def announce(_app: web.Application) -> None:
        if on_ready is not None:
            on_ready(f"http://{settings.host}:{settings.port}")

    app.on_shutdown.insert(0, exit_deadline(settings.shutdown_grace_s + SHUTDOWN_SLACK_S))
    if worker:
        app.on_startup.append(stop_signals_once)  # after aiohttp installed its handlers
    app.on_startup.append(freeze_startup_objects)  # after the cleanup contexts' start-up
    app.on_startup.append(reload_keys_on_sighup)
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
