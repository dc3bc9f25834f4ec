"""The connection pool: psycopg_pool owns every connection's lifecycle.

Opening, health checks, reconnecting with backoff after the database
restarts and `max_lifetime` recycling are psycopg_pool's; the gateway only
says how a connection must look: autocommit, UTF-8, a fixed session time
zone and date/interval styles, and a statement timeout as a backstop.

psycopg_pool's reconnection backoff doubles without a cap (1 s, 2 s, 4 s, …):
after a minute of outage the next try could be a minute away. So each
reconnection round is kept short (`RECONNECT_ROUND_S`) and, when one gives
up, the next starts at once from the shortest delay: the database is tried
about once a second for as long as it is down, and the gateway is ready
again within about a second of it accepting connections.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from .._settings import Settings

APPLICATION_NAME = "pgqg"
#: one reconnection round: tries after 0 s, ~1 s and ~2 s, then a new round
RECONNECT_ROUND_S = 2.0
#: libpq's own limit for one connection attempt (an unreachable host)
CONNECT_TIMEOUT_S = 5
#: closing the pool: how long its background tasks (a reconnection under way)
#: get to stop; the rest is left to the process's exit
CLOSE_TIMEOUT_S = 0.2


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
    """psycopg_pool's pool; each connection handed back is reset (`reset_connection`),
    and its stats count the resets (``resets``) and those that failed
    (``resets_failed``): each of those discarded a connection, which the pool then
    opened again (psycopg_pool's ``connections_num`` counts every connection opened)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.resets = 0
        self.resets_failed = 0
        super().__init__(*args, reset=self._reset_counted, **kwargs)

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
        # Short rounds, each followed at once by another: an outage must end in
        # recovery within a second or so, not in a pool that gave up or sleeps.
        reconnect_timeout=RECONNECT_ROUND_S,
        reconnect_failed=_reconnect_again,
        connection_class=AsyncConnection,
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


async def _reconnect_again(pool: AsyncConnectionPool[Any]) -> None:
    """A reconnection round gave up: start the next one now.

    `check` lets a pool below its size grow again (one connection at a time,
    the rest follow as soon as one succeeds).
    """
    await pool.check()
