"""What the connection workers share: the pool, the queue, the wake-ups, the costs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from .._errors import Unavailable
from .._settings import Settings
from ..values._encoding import Codec
from ._admission import JobQueue
from ._costs import StatementCosts
from ._metrics import EngineMetrics
from ._stats import WorkerStats
from ._wakeups import IdleWorkers


@dataclass(slots=True)
class Crew:
    """The connection workers' shared state; the dispatcher owns it."""

    pool: AsyncConnectionPool[Any]
    codec: Codec
    settings: Settings
    queue: JobQueue
    idle: IdleWorkers
    costs: StatementCosts
    #: how long a worker holds a pooled connection (see `gateway.engine._lease`)
    lease_s: float
    workers: list[WorkerStats]
    #: set while at least one worker holds a working connection
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    #: batch sizes and deadline expiries, for ``/metrics``
    metrics: EngineMetrics = field(default_factory=EngineMetrics)

    def connected_count(self) -> int:
        return sum(w.connected for w in self.workers)

    def running(self) -> int:
        """Jobs in the batches under way."""
        return sum(len(w.batch) for w in self.workers)

    def connection_lost(self) -> None:
        """With no connection left, queued jobs fail fast instead of waiting."""
        if not self.connected_count():
            self.queue.fail_all(Unavailable("the database is unavailable"))
