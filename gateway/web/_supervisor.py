"""Several front-end processes on one port (``pgqg serve --workers N``, DESIGN §8 Scale).

One Python process tops out near one core's worth of HTTP. The supervisor forks
`Settings.workers` processes; each runs the whole gateway (`serve`: its own event
loop, dispatcher and pool of ``pool_size`` connections) on a socket of its own bound
with SO_REUSEPORT, and the kernel spreads new connections over them. The supervisor
itself serves nothing and opens no connection:

* it prints the ready line once every worker is ready;
* a worker that dies is started again, unless workers keep dying (more than
  `MAX_RESTARTS` within `RESTART_WINDOW_S`, or one dies before it ever got ready):
  then it stops the others and `supervise` raises `WorkersKeepDying`. A worker that
  exits 0 was stopped on purpose (SIGTERM to it drains it, as to one process) and is
  not replaced; when none is left, `supervise` returns;
* SIGTERM, SIGINT or SIGHUP to the supervisor becomes one SIGTERM to each worker,
  which drains as a single process does (``shutdown_grace_s``); `supervise` returns
  once all have exited. With a JWKS file (``jwt_jwks_file``) SIGHUP is passed on
  instead, and each worker rereads the keys, as a single process does;
* ``/metrics`` adds the workers up through prometheus-client's multiprocess files in
  a folder the supervisor empties at start (``metrics_dir``, else a temporary one it
  removes at the end); a dead worker's gauges are removed from it.

The workers run in a process group of their own, so a Ctrl-C in the terminal reaches
only the supervisor (which forwards it once), and they get SIGTERM when the
supervisor dies (Linux' parent-death signal). Linux only: elsewhere SO_REUSEPORT
does not spread connections.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from .._settings import Settings
from ._metrics import forget_process, reset_shared_metrics
from ._privileges import PrivilegedRoleError
from ._server import serve

#: restarts allowed within `RESTART_WINDOW_S` before the supervisor gives up
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
#: how often the supervisor looks at its readiness pipe when no signal comes
_POLL_S = 0.1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_SIGNALS = {signal.SIGCHLD, *_STOP_SIGNALS}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkersKeepDying(Exception):
    """Workers died more often than the supervisor restarts them; the message says how."""


def supervise(
    settings: Settings, dsn: str, *, on_ready: Callable[[str], None] | None = None
) -> None:
    """Run ``settings.workers`` gateway processes on one port until a stop signal.

    `on_ready` is called (in this process) with the URL once every worker is ready.
    Returns when every worker has exited after a stop signal.

    Raises:
        WorkersKeepDying: a worker died before it was ready, or workers died more
            than `MAX_RESTARTS` times within `RESTART_WINDOW_S`; the others are
            stopped first.
        ValueError: ``port`` is 0 (each worker would get a port of its own).
    """
    if settings.port == 0:
        raise ValueError("--workers needs a fixed port: with port 0 each would get its own")
    with _metrics_folder(settings.metrics_dir) as metrics_dir:
        worker_settings = settings.model_copy(update={"metrics_dir": metrics_dir})
        _Supervisor(worker_settings, dsn, metrics_dir, on_ready).run()


@contextlib.contextmanager
def _metrics_folder(configured: Path | None) -> Iterator[Path]:
    """The workers' shared metrics folder: `configured`, emptied of earlier runs'
    files, or a temporary folder removed at the end."""
    if configured is not None:
        configured.mkdir(parents=True, exist_ok=True)
        reset_shared_metrics(configured)
        yield configured
        return
    folder = Path(tempfile.mkdtemp(prefix="pgqg-metrics-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Supervisor:
    """The loop of `supervise`: start, watch, restart and stop the workers."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        metrics_dir: Path,
        on_ready: Callable[[str], None] | None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.metrics_dir = metrics_dir
        self.on_ready = on_ready
        self.workers: dict[int, bool] = {}  # pid -> ready
        self.announced = False
        self.stopping = False
        self.restarts: list[float] = []
        self.failure: str | None = None
        self._ready_r, self._ready_w = os.pipe()
        self._pending = b""

    def run(self) -> None:
        """Raises `WorkersKeepDying` as `supervise` says."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for _ in range(self.settings.workers):
                self._start()
            while self.workers:
                self._step()
        finally:
            self._stop_all()  # only after an unexpected error: the loop waits for them
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            os.close(self._ready_r)
            os.close(self._ready_w)
        if self.failure is not None:
            raise WorkersKeepDying(self.failure)

    def _step(self) -> None:
        readable, _, _ = select.select([self._ready_r], [], [], _POLL_S)
        if readable:
            self._read_ready()
        while (info := signal.sigtimedwait(_SIGNALS, 0)) is not None:
            if info.si_signo == signal.SIGHUP and self.settings.jwt_jwks_file is not None:
                self._signal_all(signal.SIGHUP)  # each worker rereads its keys, as one does
            elif info.si_signo != signal.SIGCHLD:
                self._stop("stop signal")
        self._reap()

    def _read_ready(self) -> None:
        self._pending += os.read(self._ready_r, 4096)
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            pid = int(line)
            if pid in self.workers:
                self.workers[pid] = True
        if not self.announced and all(self.workers.values()) and not self.stopping:
            self.announced = True
            if self.on_ready is not None:
                self.on_ready(f"http://{self.settings.host}:{self.settings.port}")

    def _reap(self) -> None:
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            ready = self.workers.pop(pid, None)
            if ready is None:
                continue  # not a worker (a child of the embedded server's start, say)
            forget_process(self.metrics_dir, pid)
            if self.stopping:
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                # it drained and stopped after a stop signal of its own: someone meant it
                print(f"pgqg: worker {pid} was stopped; not replaced", file=sys.stderr, flush=True)
                continue
            self._died(pid, status, ready=ready)

    def _died(self, pid: int, status: int, *, ready: bool) -> None:
        how = _describe_exit(status)
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S]
        if not ready:
            self._stop(f"worker {pid} {how} before it was ready", failed=True)
        elif len(self.restarts) >= MAX_RESTARTS:
            self._stop(
                f"worker {pid} {how}; {len(self.restarts) + 1} workers died within"
                f" {RESTART_WINDOW_S:.0f} s",
                failed=True,
            )
        else:
            print(f"pgqg: worker {pid} {how}; starting another", file=sys.stderr, flush=True)
            self.restarts.append(now)
            self._start()

    def _stop(self, why: str, *, failed: bool = False) -> None:
        if failed and self.failure is None:
            self.failure = why
        if not self.stopping:
            self.stopping = True
            self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _stop_all(self) -> None:
        """Stop and wait for any worker still running (an error cut the loop short)."""
        if not self.workers:
            return
        self._signal_all(signal.SIGTERM)
        for pid in list(self.workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            forget_process(self.metrics_dir, pid)
        self.workers.clear()

    def _start(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()  # or the child would print what is buffered here once more
        pid = os.fork()
        if pid:
            self.workers[pid] = False
            return
        code = 1
        try:
            self._become_worker()
            code = 0
        except PrivilegedRoleError as exc:  # as one process says it (pgqg serve)
            print(f"pgqg: refusing to serve: {exc}", file=sys.stderr)
        except BaseException:  # whatever happens, the child must not return into the supervisor
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _become_worker(self) -> None:
        """In the forked child: signals as a single process has them, then serve."""
        supervisor = os.getppid()
        os.setpgid(0, 0)  # the terminal's Ctrl-C goes to the supervisor only
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _die_with(supervisor)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        os.close(self._ready_r)
        ready_w = self._ready_w

        def ready(_url: str) -> None:
            os.write(ready_w, f"{os.getpid()}\n".encode())

        serve(self.settings, self.dsn, on_ready=ready, worker=True)


def _die_with(supervisor: int) -> None:
    """SIGTERM this process when the supervisor dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
