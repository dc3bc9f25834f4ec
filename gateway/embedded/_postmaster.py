"""Starting, adopting and stopping the server process.

`start_postmaster` runs ``pg_ctl start -W`` and waits for the postmaster here (polling
``postmaster.pid`` every 10 ms, failing fast on a FATAL in the log), on another free port
when its port was taken meanwhile. The `Postmaster` it returns owns the process:
`Postmaster.stop` signals it as ``pg_ctl stop -m <mode>`` would and waits for it and all
its children; `Postmaster.kill` SIGKILLs them (a simulated crash).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import weakref
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from ._config import PortChoice, choose_socket_dir, port_is_free, server_options
from ._datadir import PORT_FILE, DataDir
from ._errors import EmbeddedError
from ._install import RunAs, run_program
from ._processes import alive, family, kill_cluster, request_fast_shutdown, sigkill, wait_gone

__all__ = ["STOP_MODES", "Postmaster", "start_postmaster"]

_log = logging.getLogger(__name__)

_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
STOP_MODES = tuple(_STOP_SIGNALS)


class Postmaster:
    """A postmaster we started, and its unix socket directory.

    If `owner` is garbage-collected (or the interpreter exits) while the postmaster
    runs, a fast shutdown is requested. The port it runs on is remembered in the data
    directory for the next process.
    """

    def __init__(
        self, owner: object, proc: Any, port: int, socket_dir: Path, data: DataDir, run_as: RunAs
    ) -> None:
        self.proc = proc
        self.socket_dir = socket_dir
        self._data_dir = data.path
        self._finalizer = weakref.finalize(
            owner, request_fast_shutdown, int(proc.pid), float(proc.create_time()), os.getpid()
        )
        try:
            data.write_private(PORT_FILE, f"{port}\n", run_as)
        except OSError as exc:  # only a hint for the next process
            _log.warning("could not remember the port in %s: %s", data.path, exc)
        _log.info("PostgreSQL runs on 127.0.0.1:%d (pid %d), data in %s",
                  port, proc.pid, data.path)  # fmt: skip

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        return int(self.proc.pid) if alive(self.proc) else None

    def release(self) -> None:
        """No more shutdown when the owner goes away. Harmless when done before."""
        self._finalizer.detach()

    def stop(self, mode: str, timeout: float) -> None:
        """What ``pg_ctl stop -m <mode>`` does: signal the postmaster, wait for it and its
        children; SIGKILL whatever of the cluster is left after `timeout` seconds.

        Raises:
            EmbeddedError: server processes are still alive even after SIGKILL.
        """
        self.release()
        procs = family(self.proc)
        with contextlib.suppress(psutil.Error):
            self.proc.send_signal(_STOP_SIGNALS[mode])
        left = wait_gone(procs, timeout)
        if left:
            _log.warning("PostgreSQL in %s did not shut down in %s s; SIGKILL", self._data_dir,
                         timeout)  # fmt: skip
            left = kill_cluster(self._data_dir, 5, family(self.proc) if alive(self.proc) else left)
        if left:
            raise EmbeddedError(f"server processes still alive after SIGKILL: {left}")
        if self.socket_dir != self._data_dir:
            with contextlib.suppress(OSError):
                self.socket_dir.rmdir()  # our short socket directory, empty after a shutdown

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, and wait for them.

        Raises:
            EmbeddedError: server processes are still alive after SIGKILL.
        """
        self.release()
        procs = family(self.proc)
        sigkill(procs)  # the postmaster first: it must not restart killed children
        left = wait_gone(procs, 10)
        if left:
            raise EmbeddedError(f"server processes still alive after SIGKILL: {left}")


def start_postmaster(
    owner: object,
    data: DataDir,
    bin_dir: Path,
    run_as: RunAs,
    ports: PortChoice,
    *,
    fast: bool,
    timeout: float,
) -> Postmaster:
    """Start the cluster in `data` on a port from `ports`; another free port (twice at
    most) when one was taken meanwhile, unless the port was given.

    Raises:
        EmbeddedError: it did not start (with the tail of the server log).
    """
    attempts = 1 if ports.explicit is not None else 3
    attempt = 1
    while True:
        port = ports.choose(data)
        socket_dir = choose_socket_dir(data.path, port, run_as)
        options = server_options(port, socket_dir, fast=fast)
        proc, failure, log_offset = _launch(data, bin_dir, run_as, options, timeout)
        if proc is not None:
            return Postmaster(owner, proc, port, socket_dir, data, run_as)
        tail = data.log_tail(log_offset)
        if attempt < attempts and "Address already in use" in tail:
            _log.info("port %d was taken meanwhile; trying another one", port)
            ports.current = None
            attempt += 1
            continue
        if ports.explicit is not None and not port_is_free(port):
            failure = f"{failure} (port {port} is taken)"
        raise EmbeddedError(
            f"PostgreSQL in {data.path} did not start: {failure}\n"
            f"--- tail of {data.log_file} ---\n{tail}"
        )


def _launch(
    data: DataDir, bin_dir: Path, run_as: RunAs, options: str, timeout: float
) -> tuple[Any | None, str, int]:
    """Start the postmaster with `options` and wait until it is ready.

    Returns its psutil process (else None, why it is not coming, and nothing of the
    cluster left running) and the offset in the server log where this start's lines
    begin. Never raises for a server that did not start.
    """
    log_offset = data.log_size()
    # pg_ctl only launches the postmaster (-W): its own wait reads postmaster.pid
    # through the absolute data path as the server's user, and a parent directory
    # losing its search bit meanwhile makes it wait for nothing. We wait here.
    argv = [
        str(bin_dir / "pg_ctl"),
        "-D", str(data.path),
        "-l", str(data.log_file),
        "-W",
        "-o", options,
        "start",
    ]  # fmt: skip
    started = time.time()
    deadline = time.monotonic() + timeout
    try:
        done = run_program(argv, run_as, cwd=data.path, timeout=timeout + 10)
        failure = None if done.returncode == 0 else done.stdout.strip()
    except EmbeddedError as exc:
        failure = str(exc)
    proc = None
    if failure is None:
        proc, failure = _wait_ready(data, started, log_offset, deadline)
    if proc is None:
        kill_cluster(data.path, 10)  # leave nothing half-started behind
    return proc, failure, log_offset


def _wait_ready(
    data: DataDir, started: float, log_offset: int, deadline: float
) -> tuple[Any | None, str]:
    """Wait until the postmaster launched at `started` (wall clock) is ready.

    Returns its psutil process, or None and why it is not coming.
    """
    pid_file = data.path / "postmaster.pid"
    while True:
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            lines = []
        # pid, data dir, start time, port, sockets, listen address, shm key, status
        try:
            pid, pm_started = int(lines[0]), int(lines[2])
            status = lines[7].strip()
        except (IndexError, ValueError):
            pid, pm_started, status = 0, 0, ""
        if pid > 0 and pm_started >= started - 2:  # this postmaster's file, complete
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                proc = None
            if proc is None or not alive(proc):
                return None, f"the postmaster (pid {pid}) exited"
            if status in ("ready", "standby"):
                return proc, ""
        elif data.fatal_logged(log_offset):
            # it failed before completing postmaster.pid, or removed it on its way out
            return None, "the postmaster exited"
        if time.monotonic() >= deadline:
            return None, "the server did not get ready in time"
        time.sleep(0.01)
