"""What each connection worker counts of its own load, for ``/v1/stats``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._jobs import Job


@dataclass(slots=True)
class WorkerStats:
    """One connection worker's load, and the batch it runs now."""

    id: int
    jobs: int = 0
    batches: int = 0
    busy_s: float = 0.0
    errors: int = 0
    connected: bool = False
    backend_pid: int | None = None
    #: the jobs of the batch under way (empty between batches)
    batch: list[Job] = field(default_factory=list)

    def count(self, batch: list[Job], elapsed: float) -> None:
        """Count a batch that held the connection for `elapsed` seconds."""
        self.busy_s += elapsed
        self.jobs += len(batch)
        self.batches += 1
        self.errors += sum(job.failed for job in batch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "jobs": self.jobs,
            "batches": self.batches,
            "jobs_per_batch": round(self.jobs / self.batches, 2) if self.batches else 0.0,
            "busy_s": round(self.busy_s, 6),
            "errors": self.errors,
            "connected": self.connected,
            "busy": bool(self.batch),
            "backend_pid": self.backend_pid,
        }
