"""The connection pool: psycopg_pool owns every connection's lifecycle.

Opening, health checks, reconnecting after the database restarts and
`max_lifetime` recycling are psycopg_pool's; the gateway only says how a
connection must look: autocommit, UTF-8, a fixed session time zone and
date/interval styles, and a statement timeout as a backstop.

While the database is unreachable, the retries are the gateway's own
(`GatewayPool`). psycopg_pool retries each missing connection on its own,
with a backoff that doubles without a cap (after a minute of outage the next
try could be a minute away), and logs every failed attempt of every
connection: some 40 lines in 6 s for 8 connections. Here psycopg_pool gives
up a connection at once (`reconnect_timeout` 0), and one task tries the
database after 0.5 s, then every second (`RETRY_FIRST_S`, `RETRY_MAX_S`),
logging one line per try with the next delay, and one line when the
database answers again; then the pool fills up again. So the gateway is
ready within about a second of the database accepting connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from .._settings import Settings

log = logging.getLogger("gateway.pool")

APPLICATION_NAME = "pgqg"
#: the first retry once the database is found unreachable, and the longest wait
#: between two (the delay doubles up to it)
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 1.0  # the service is back within about a second of the database
#: libpq's own limit for one connection attempt (an unreachable host)
CONNECT_TIMEOUT_S = 5
#: closing the pool: how long its background tasks (a reconnection under way)
#: get to stop; the rest is left to the process's exit
CLOSE_TIMEOUT_S = 0.2

#: psycopg_pool's warnings that one outage repeats for every connection and every
#: attempt; `GatewayPool` reports the outage itself, once per retry
_OUTAGE_NOISE = frozenset(
    {
        "error connecting in %r: %s",
        "reconnection attempt in pool %r failed after %s sec",
        "discarding closed connection: %s",
        "discarding broken connection: %s",
    }
)


def _not_outage_noise(record: logging.LogRecord) -> bool:
    return record.msg not in _OUTAGE_NOISE


def session_options(settings: Settings) -> str:
    """The ``options`` startup parameter: settings fixed for the session's life.

    Passed at connect time they cost no round trip, and ``RESET ALL`` (run
    after every read-write job) returns to them rather than to the server's
    defaults. Every setting that changes a value's text output is fixed here,
    so the same value always reads the same whatever the server's defaults:
    time zone, date and interval styles from the settings, and the rest
    pinned (``money`` is printed by ``lc_monetary``, ``bytea`` by
    ``bytea_output``, floats by ``extra_float_digits``: 1 gives the shortest
    exact digits).
    """
    gucs = {
        "TimeZone": settings.timezone,
        "DateStyle": settings.datestyle,
        "IntervalStyle": settings.intervalstyle,
        "statement_timeout": str(settings.statement_timeout_ms),
        "extra_float_digits": "1",
        "lc_monetary": "C",
        "bytea_output": "hex",
    }
    return " ".join(f"-c {k}={_escape_option(v)}" for k, v in gucs.items())


def _escape_option(value: str) -> str:
    # libpq splits `options` on spaces; a backslash keeps one in a value
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


class GatewayPool(AsyncConnectionPool[AsyncConnection[Any]]):
    """psycopg_pool's pool, retrying an unreachable database itself (see the module).

    Each connection handed back is reset (`reset_connection`), and the stats count
    the resets (``resets``) and those that failed (``resets_failed``): each of those
    discarded a connection, which the pool then opened again (psycopg_pool's
    ``connections_num`` counts every connection opened). The pool owns its retry
    task: `close` stops it (also when cancelled).
    """

    def __init__(self, conninfo: str, *, kwargs: dict[str, Any], **options: Any) -> None:
        self.resets = 0
        self.resets_failed = 0
        super().__init__(conninfo, kwargs=kwargs, reset=self._reset_counted, **options)
        self._probe_conninfo, self._probe_kwargs = conninfo, kwargs
        self._retrying: asyncio.Task[None] | None = None
        pool_log = logging.getLogger("psycopg.pool")
        if _not_outage_noise not in pool_log.filters:
            pool_log.addFilter(_not_outage_noise)

    async def _reset_counted(self, conn: AsyncConnection[Any]) -> None:
        self.resets += 1
        try:
            await reset_connection(conn)
        except BaseException:
            self.resets_failed += 1
            raise

    def get_stats(self) -> dict[str, int]:
        """psycopg_pool's figures, with ``resets`` and ``resets_failed``."""
        stats = super().get_stats()
        stats["resets"] = self.resets
        stats["resets_failed"] = self.resets_failed
        return stats

    async def reconnect_failed(self) -> None:
        """psycopg_pool gave up a connection: retry the database, in one task for all."""
        if not self.closed and (self._retrying is None or self._retrying.done()):
            self._retrying = asyncio.create_task(self._retry(), name=f"{self.name}-retry")

    async def _retry(self) -> None:
        """Try the database with backoff until it answers, then fill the pool again."""
        loop = asyncio.get_running_loop()
        down_since = loop.time()
        delay, tries = RETRY_FIRST_S, 0
        while True:
            try:
                probe = await AsyncConnection.connect(self._probe_conninfo, **self._probe_kwargs)
            except psycopg.Error as exc:
                tries += 1
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                log.warning("database unreachable: %s; retrying in %.1f s", reason, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            await probe.close()
            break
        if tries:
            log.warning("database reachable again, after %.1f s", loop.time() - down_since)
        await self.check()  # grows the pool back to its size

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - psycopg_pool's
        """Stop retrying, then close the pool (harmless twice)."""
        retrying, self._retrying = self._retrying, None
        if retrying is not None:
            retrying.cancel()
            await asyncio.wait([retrying])  # its cancellation stays in it; ours would not
            if not retrying.cancelled() and (error := retrying.exception()) is not None:
                log.error("retrying the database failed: %r", error)
        await super().close(timeout)


def make_pool(
    settings: Settings,
    dsn: str,
    *,
    name: str = "pgqg",
    configure: Callable[[AsyncConnection[Any]], Awaitable[None]] | None = None,
) -> GatewayPool:
    """A closed pool of `settings.pool_size` connections; the caller opens it.

    `open(wait=False)` returns at once even when the database is down: the
    pool keeps trying in the background and callers wait in `connection()`.
    `configure` runs on each new connection before it is used; when it raises,
    the connection is not used (the pool logs it and tries again later).
    """
    return GatewayPool(
        dsn,
        min_size=settings.pool_size,
        max_size=settings.pool_size,
        open=False,
        name=name,
        kwargs=connect_kwargs(settings, APPLICATION_NAME if name == "pgqg" else f"pgqg-{name}"),
        configure=configure,
        check=AsyncConnectionPool.check_connection,
        max_lifetime=settings.pool_max_lifetime_s,
        max_idle=settings.pool_max_lifetime_s,
        # psycopg_pool gives a connection up after its first quick retry;
        # GatewayPool.reconnect_failed takes over from there
        reconnect_timeout=0,
    )


def connect_kwargs(settings: Settings, application_name: str) -> dict[str, Any]:
    """How every connection of the gateway connects: the pool's and the LISTEN one."""
    return {
        "autocommit": True,
        "application_name": application_name,
        "options": session_options(settings),
        "client_encoding": "UTF8",
        "connect_timeout": CONNECT_TIMEOUT_S,
        **tcp_options(settings),
        # psycopg prepares a statement it has run 5 times (`_pg3_0`, ...); the pool's
        # DISCARD ALL would drop its own, and psycopg's record of them would disagree
        # with the server's. The gateway prepares what it needs itself.
        "prepare_threshold": None,
    }


def tcp_options(settings: Settings) -> dict[str, int]:
    """libpq's TCP options: a server that vanishes without closing the connection
    (a network partition, a host power-off) is noticed in seconds, not hours.

    Keepalive probes find an idle connection dead; ``tcp_user_timeout`` a
    connection whose data goes unacknowledged (and it bounds the probes too).
    A request does not wait for either: its deadline answers it first.
    """
    return {
        "keepalives": 1,
        "keepalives_idle": settings.keepalives_idle_s,
        "keepalives_interval": settings.keepalives_interval_s,
        "keepalives_count": settings.keepalives_count,
        "tcp_user_timeout": settings.tcp_user_timeout_ms,
    }


async def reset_connection(conn: AsyncConnection[Any]) -> None:
    """Called by the pool on every connection handed back to it, so the next
    lease starts clean: its statements prepared for named queries, and any
    session state a job left untracked, are gone; then the role the login role's
    sessions start with is restored (DISCARD ALL leaves none set).

    A connection worker hands its connection back every lease (30 s), so this
    costs two round trips per connection per lease. Both run unprepared: a
    prepared DISCARD ALL would drop itself. Raises whatever psycopg raises; the
    pool then discards the connection.
    """
    await conn.execute("DISCARD ALL", prepare=False)
    await conn.execute("RESET ROLE", prepare=False)
