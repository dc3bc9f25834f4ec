"""Finding, watching and killing the processes of a cluster (through psutil)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

__all__ = [
    "alive",
    "family",
    "kill_cluster",
    "request_fast_shutdown",
    "server_processes",
    "sigkill",
    "wait_gone",
]


def alive(proc: Any) -> bool:
    """A psutil process that still runs: not gone, not reused, not a zombie."""
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Wait until none of `procs` runs; returns those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.01)


def sigkill(procs: list[Any]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def family(proc: Any) -> list[Any]:
    """The postmaster followed by all its descendants."""
    try:
        children = list(proc.children(recursive=True))
    except psutil.Error:
        children = []
    return [proc, *children]


def server_processes(data_dir: Path) -> list[int]:
    """Pids of the live (non-zombie) server processes of the cluster in `data_dir`.

    Every PostgreSQL process (postmaster, backends, auxiliary processes) runs with the
    data directory as its working directory, so this finds orphaned backends of a
    killed postmaster too. Processes we may not inspect (another user's, when we are
    not root) are not seen.
    """
    target = os.path.realpath(data_dir)
    pids = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "postgres" and alive(proc) and proc.cwd() == target:
                pids.append(int(proc.pid))
        except psutil.Error:
            continue
    return pids


def kill_cluster(data_dir: Path, timeout: float, also: Sequence[Any] = ()) -> list[Any]:
    """SIGKILL `also` and every server process of `data_dir`; return those still alive
    after `timeout` seconds."""
    procs = list(also)
    for pid in server_processes(data_dir):
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    sigkill(procs)
    return wait_gone(procs, timeout)


def request_fast_shutdown(pid: int, create_time: float, owner_pid: int) -> None:
    """Finalizer: our postmaster outlived its object (or the interpreter is exiting)."""
    if os.getpid() != owner_pid:  # a forked child must not stop its parent's server
        return
    with contextlib.suppress(psutil.Error, OSError):
        proc = psutil.Process(pid)
        if proc.create_time() == create_time and alive(proc):
            proc.send_signal(signal.SIGINT)  # "fast" shutdown; the postmaster finishes alone
