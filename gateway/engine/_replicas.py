"""Read replicas: further targets for read-only jobs (DESIGN §8, Scale).

Each replica (``replica_dsns``) is a target of its own: a pool and a `Dispatcher`,
as the primary has, and a health check on a connection outside the pool. The
primary's dispatcher hands a read-only job to `Replicas.pick`'s target, the
least-loaded healthy replica, and runs everything else itself; with no healthy
replica, reads run on the primary too.

A replica is healthy while its check answers, PostgreSQL says it is in recovery
(a promoted replica is a primary no longer kept in step: it is skipped), its
replay lag is at most ``replica_max_lag_ms``, and its dispatcher holds a working
connection. The check runs every `CHECK_INTERVAL_S`; a replica that fails it is
skipped from then on and rejoins at the first check it passes.

Replay lag is how far the replica's replay is behind what it received: zero when
it replayed all it received (an idle primary sends nothing, and nothing is
behind), else the age of the last transaction it replayed. A replica cut off from
its primary shows no lag this way; the primary's ``pg_stat_replication`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg.conninfo

from .._settings import Settings
from ..values._encoding import Codec
from ._dispatcher import Dispatcher
from ._pool import CLOSE_TIMEOUT_S, connect_kwargs, make_pool

log = logging.getLogger("gateway.replicas")

#: how often each replica's health and lag are checked
CHECK_INTERVAL_S = 0.5
#: a check that takes longer than this fails (a replica that hangs is down)
CHECK_TIMEOUT_S = 2.0
#: the replica's replay lag in ms, and whether it is in recovery at all
LAG_SQL = (
    "SELECT pg_is_in_recovery(),"
    " CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()"
    " THEN 0"
    " ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000, 0)"
    " END::float8"
)


def describe_dsn(dsn: str) -> str:
    """Host, port and database of `dsn`, without its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "?"
    return f"{info.get('host') or 'local'}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


@dataclass(eq=False)
class Replica:
    """One replica: its dispatcher, its pool and what its last check found."""

    name: str
    dsn: str
    dispatcher: Dispatcher
    pool: Any
    checked: bool = False
    in_recovery: bool = False
    lag_ms: float | None = None
    error: str | None = "not checked yet"
    healthy: bool = False
    _conn: psycopg.AsyncConnection[Any] | None = field(default=None, repr=False)

    def load(self) -> int:
        """Jobs this replica's clients wait for (queued or running)."""
        return self.dispatcher.pending

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": "replica",
            "address": describe_dsn(self.dsn),
            "healthy": self.healthy,
            "lag_ms": None if self.lag_ms is None else round(self.lag_ms, 1),
            "reason": None if self.healthy else self.error,
            "pending": self.dispatcher.pending,
            "ready": self.dispatcher.ready,
        }


class Replicas:
    """The read replicas of one gateway process; `open` and `close` are its owner's."""

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._codec = codec
        #: each new pooled connection's check, as the primary's (`make_pool`)
        self._configure = configure
        self._max_lag_ms = settings.replica_max_lag_ms
        self.replicas: list[Replica] = []
        self._checker: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open every replica's pool (without waiting for it) and start the checks."""
        for i, dsn in enumerate(self._settings.replica_dsns, start=1):
            name = f"replica{i}"
            pool = make_pool(self._settings, dsn, name=name, configure=self._configure)
            await pool.open(wait=False)
            dispatcher = Dispatcher(pool, self._codec, self._settings)
            dispatcher.start()
            self.replicas.append(Replica(name, dsn, dispatcher, pool))
        self._checker = asyncio.create_task(self._check_forever(), name="pgqg-replica-checks")

    async def drain(self, grace: float) -> None:
        """Let every replica's jobs finish within `grace` (see `Dispatcher.drain`)."""
        await asyncio.gather(*(r.dispatcher.drain(grace) for r in self.replicas))

    async def close(self, grace: float = 0.0) -> None:
        """Stop the checks, close every dispatcher and pool; harmless twice."""
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        replicas, self.replicas = self.replicas, []
        for replica in replicas:
            try:
                await replica.dispatcher.close(grace)
            finally:
                await replica.pool.close(timeout=CLOSE_TIMEOUT_S)
                await _close(replica)

    def pick(self) -> Dispatcher | None:
        """The least-loaded healthy replica's dispatcher; None: none is healthy."""
        best: Replica | None = None
        for replica in self.replicas:
            usable = replica.healthy and replica.dispatcher.ready
            if usable and (best is None or replica.load() < best.load()):
                best = replica
        return None if best is None else best.dispatcher

    def stats(self) -> list[dict[str, Any]]:
        return [replica.to_dict() for replica in self.replicas]

    # --- the checks ------------------------------------------------------------------

    async def _check_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._check(r) for r in self.replicas))
            await asyncio.sleep(CHECK_INTERVAL_S)

    async def _check(self, replica: Replica) -> None:
        """Check `replica` once and set its health; never raises (but cancellation)."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                if replica._conn is None or replica._conn.closed:
                    replica._conn = await psycopg.AsyncConnection.connect(
                        replica.dsn, **connect_kwargs(self._settings, f"pgqg-{replica.name}-check")
                    )
                cur = await replica._conn.execute(LAG_SQL)
                row = await cur.fetchone()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await _close(replica)
            self._set(
                replica, healthy=False, error=f"down: {str(exc).strip() or type(exc).__name__}"
            )
            replica.lag_ms = None
            return
        assert row is not None
        replica.in_recovery, replica.lag_ms = bool(row[0]), float(row[1])
        if not replica.in_recovery:
            self._set(replica, healthy=False, error="not in recovery (promoted?): not a replica")
        elif replica.lag_ms > self._max_lag_ms:
            self._set(
                replica,
                healthy=False,
                error=f"replay lag {replica.lag_ms:.0f} ms over {self._max_lag_ms} ms",
            )
        elif not replica.dispatcher.ready:
            self._set(replica, healthy=False, error="no pooled connection yet")
        else:
            self._set(replica, healthy=True, error=None)

    @staticmethod
    def _set(replica: Replica, *, healthy: bool, error: str | None) -> None:
        if healthy != replica.healthy or not replica.checked:
            if healthy:
                log.info(
                    "%s (%s) is healthy: reads go to it", replica.name, describe_dsn(replica.dsn)
                )
            else:
                log.warning(
                    "%s (%s) is skipped: %s", replica.name, describe_dsn(replica.dsn), error
                )
        replica.checked = True
        replica.healthy, replica.error = healthy, error


async def _close(replica: Replica) -> None:
    conn, replica._conn = replica._conn, None
    if conn is not None:
        with contextlib.suppress(psycopg.Error, OSError):
            await conn.close()
