"""The connection workers: each leases a pooled connection after another, for ever.

A worker's loop outlives outages: while the database is down it waits for the
pool (which keeps reconnecting), and a connection lost mid-batch costs that
batch, not the worker. Only cancellation stops it (`stop_workers`).
"""

from __future__ import annotations

import asyncio
import logging

import psycopg
from psycopg_pool import PoolTimeout

from ._crew import Crew
from ._lease import Lease
from ._stats import WorkerStats
from ._wire import ConnectionLost

log = logging.getLogger("gateway.dispatcher")

#: stopping the workers: cancel, wait this long, cancel those still running again…
STOP_ROUND_S = 0.1
STOP_ROUNDS = 50


async def work(worker: WorkerStats, crew: Crew) -> None:
    """Serve jobs on one pooled connection after another until cancelled."""
    while True:
        try:
            async with crew.pool.connection(timeout=crew.lease_s) as conn:
                await Lease(worker, crew, conn).run()
        except PoolTimeout:
            continue  # the database is down; the pool keeps reconnecting
        except (ConnectionLost, psycopg.OperationalError) as exc:
            # debug: the pool logs an outage once per retry, not once per worker
            log.debug("worker %d lost its connection: %s", worker.id, exc)
            crew.connection_lost()
            await asyncio.sleep(0.05)


async def stop_workers(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the workers' tasks, as often as it takes.

    One cancel can be lost: on Python 3.11 ``asyncio.wait_for`` (which
    psycopg_pool waits with) drops a cancellation that arrives as the
    connection it waits for is handed over, and the worker then serves
    that connection as if nothing happened. So cancel again until done.
    """
    for _ in range(STOP_ROUNDS):
        pending = [task for task in tasks if not task.done()]
        if not pending:
            break
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=STOP_ROUND_S)
    else:
        log.warning("connection workers did not stop: %s", pending)
    # retrieve the outcomes, so no "exception was never retrieved" warnings
    await asyncio.gather(*(t for t in tasks if t.done()), return_exceptions=True)
