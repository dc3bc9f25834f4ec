"""The engine: jobs, the dispatcher's bounded queue, pipelined connection sessions, the pool.

Imports ``gateway.values``, ``gateway._errors`` and ``gateway._settings``; never HTTP or the CLI.
"""

from ._dispatcher import Dispatcher, probe_job
from ._jobs import Job, JobState, Statement
from ._pool import make_pool, session_options
from ._stream import StreamJob

__all__ = [
    "Dispatcher",
    "Job",
    "JobState",
    "Statement",
    "StreamJob",
    "make_pool",
    "probe_job",
    "session_options",
]
