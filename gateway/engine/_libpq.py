"""The one libpq call psycopg does not wrap: ``PQsendPipelineSync``.

``PQpipelineSync`` (psycopg's ``pgconn.pipeline_sync()``) flushes the socket
at every Sync: with a Sync after every job, that is a system call per job.
libpq 17 added ``PQsendPipelineSync``, which only queues the Sync; the batch
is then flushed once. We call it through ctypes on the very libpq psycopg
loaded, via psycopg's public ``PGconn.pgconn_ptr``. Where it cannot be found
(older libpq, another psycopg implementation) `pipeline_sync` falls back to
psycopg's own call: slower, same behaviour. tests/test_pipeline.py checks
which one is in use.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import pq
from psycopg.pq.abc import PGconn

SyncFunc = Callable[[PGconn], None]


def _loaded_libpq() -> ctypes.CDLL | None:
    """The libpq shared library psycopg's implementation is linked to, if findable."""
    if pq.__impl__ == "python":
        from psycopg.pq import _pq_ctypes

        lib = getattr(_pq_ctypes, "pq", None)
        return lib if isinstance(lib, ctypes.CDLL) else None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = set(re.findall(r"(/\S*/libpq[^/\s]*\.so[^/\s]*)", maps))
    if pq.__impl__ == "binary":
        paths = {p for p in paths if "psycopg_binary" in p}
    if len(paths) != 1:
        return None  # ambiguous: better the slow call than the wrong library
    return ctypes.CDLL(paths.pop())


def _make_send_sync() -> SyncFunc | None:
    if pq.version() < 170000:
        return None
    lib = _loaded_libpq()
    func = getattr(lib, "PQsendPipelineSync", None) if lib is not None else None
    if func is None:
        return None
    func.argtypes = [ctypes.c_void_p]
    func.restype = ctypes.c_int

    def send_sync(pgconn: PGconn) -> None:
        # pgconn_ptr is documented on psycopg's PGconn, though not in its abc
        if func(pgconn.pgconn_ptr) != 1:  # type: ignore[attr-defined]
            raise _sync_failed(pgconn)

    return send_sync


def _sync_failed(pgconn: PGconn) -> Exception:
    message = (pgconn.error_message or b"PQsendPipelineSync failed").decode(errors="replace")
    return psycopg.OperationalError(message.strip())


def _psycopg_sync(pgconn: PGconn) -> None:
    pgconn.pipeline_sync()


_send_sync = _make_send_sync()

#: queue a Sync in the pipeline; flushes only where libpq cannot defer it
pipeline_sync: SyncFunc = _send_sync or _psycopg_sync

#: True when Syncs are queued without a flush (libpq >= 17 found)
DEFERRED_SYNC = _send_sync is not None
