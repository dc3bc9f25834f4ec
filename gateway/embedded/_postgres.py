"""An embedded PostgreSQL cluster that we own: `pgqg serve` without a database, and tests.

`EmbeddedPostgres` runs the PostgreSQL 16 server binaries shipped by the `pgserver`
package, but not `pgserver.get_server`: that one listens on a unix socket only, keeps
global state and atexit hooks. Here one object owns one cluster (one data directory):

* the cluster listens on TCP ``127.0.0.1:<port>`` with ``scram-sha-256`` password
  authentication (user ``postgres``, a random password made at initdb time and kept in
  ``<data_dir>/pgqg.password``, mode 0600), plus a unix socket with ``trust``
  authentication in a directory only the server's user (and root) can enter;
* the port is the one given, else a free one chosen at the first start and kept for
  later restarts of the same object; it is also written to ``<data_dir>/pgqg.port`` so
  a later process reusing the data directory tries the same port first;
* the server log goes to ``<data_dir>/postgresql.log``;
* `kill` SIGKILLs the postmaster and its children (to simulate a crash); `start` after it
  recovers the cluster, `stop` always leaves no server process behind.

`start` runs initdb when needed, launches the postmaster with ``pg_ctl start -W`` and
waits for it here (polling ``postmaster.pid`` every 10 ms, failing fast on a FATAL in
the log); `stop` signals the postmaster as ``pg_ctl stop -m <mode>`` would, and waits
for the postmaster and all its children. A stale ``postmaster.pid`` (a killed server)
is removed before starting once no process of the cluster is alive: in containers whose
init reaps orphans late, PostgreSQL would read the dead postmaster's zombie as alive.

PostgreSQL refuses to run as root. When we are root (containers, CI), initdb and pg_ctl
run as the system user ``pgserver`` (created if missing, as `pgserver` itself does; root's
groups are dropped), the data directory is owned by that user, and every parent directory
of it gets the ``o+x`` (search) bit so that user can reach it. Keep data directories out
of places whose parents get reset to 0700 while a server starts (pytest resets
``/tmp/pytest-of-root`` at each new session); one start is retried after a
"Permission denied".

This module does not import the `pgserver` package itself (its import creates a runtime
directory and emits a `RuntimeDirWarning` when ``XDG_RUNTIME_DIR`` is unset); it only
locates the binaries inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil  # type: ignore[import-untyped]

__all__ = ["EmbeddedError", "EmbeddedPostgres", "postgres_bin_dir", "server_processes"]

_log = logging.getLogger(__name__)

SUPERUSER = "postgres"
DATABASE = "postgres"
SYSTEM_USER = "pgserver"  # the system user the server runs as when we are root
PASSWORD_FILE = "pgqg.password"
PORT_FILE = "pgqg.port"
LOG_FILE = "postgresql.log"
MAX_CONNECTIONS = 200
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes, NUL included
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_STOP_MODES = tuple(_STOP_SIGNALS)
_LOG_TAIL_LINES = 30


class EmbeddedError(Exception):
    """The embedded cluster could not be set up, started or stopped.

    When the server itself failed, the message ends with the tail of its log.
    """


def postgres_bin_dir() -> Path:
    """The ``bin`` directory of the PostgreSQL build shipped by the `pgserver` package.

    Raises:
        EmbeddedError: `pgserver` is not installed, or its build has no ``pg_ctl``.
    """
    spec = importlib.util.find_spec("pgserver")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the pgserver package is not installed (pip install pgserver)")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "pg_ctl").is_file():
        raise EmbeddedError(f"no PostgreSQL binaries in {bin_dir}")
    return bin_dir


@dataclasses.dataclass(frozen=True)
class _RunAs:
    """Who initdb, pg_ctl and the server run as; ``None`` ids mean: as ourselves."""

    uid: int | None = None
    gid: int | None = None

    @property
    def switches(self) -> bool:
        return self.uid is not None

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def subprocess_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        # drop root's groups too, not just the uid
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _run_as() -> _RunAs:
    """Ourselves, or the ``pgserver`` system user (created if missing) when we are root."""
    if os.name != "posix" or os.geteuid() != 0:
        return _RunAs()
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        try:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SYSTEM_USER],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedError(
                f"running as root, and the system user {SYSTEM_USER!r} that PostgreSQL would "
                f"run as could not be created: {exc}"
            ) from exc
        entry = pwd.getpwnam(SYSTEM_USER)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _ensure_traversable(path: Path) -> None:
    """Give "others" the search bit on every parent of `path` (pytest's tmp dirs are 0700)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


_install_checked: set[Path] = set()
_install_lock = threading.Lock()


def _ensure_install_readable(bin_dir: Path) -> None:
    """Let other users read the PostgreSQL install (pip may have unpacked it 0700/0600)."""
    install = bin_dir.parent
    with _install_lock:
        if install in _install_checked:
            return
        _ensure_traversable(install)
        dir_bits = stat.S_IROTH | stat.S_IXOTH
        for root, _dirs, files in os.walk(install):
            root_path = Path(root)
            mode = root_path.stat().st_mode
            if mode & dir_bits != dir_bits:
                root_path.chmod(stat.S_IMODE(mode) | dir_bits)
            for name in files:
                file_path = root_path / name
                mode = file_path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    continue
                want = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
                if mode & want != want:
                    file_path.chmod(stat.S_IMODE(mode) | want)
        _install_checked.add(install)


def _port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the postmaster does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _alive(proc: Any) -> bool:
    """A psutil process that still runs: not gone, not reused, not a zombie."""
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Wait until none of `procs` runs; returns those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.01)


def _sigkill(procs: list[Any]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _read_postmaster_pid(data_dir: Path) -> int | None:
    """The pid in ``postmaster.pid``, or None when there is no (readable) pid file."""
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


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
            if proc.info["name"] == "postgres" and _alive(proc) and proc.cwd() == target:
                pids.append(int(proc.pid))
        except psutil.Error:
            continue
    return pids


def _request_fast_shutdown(pid: int, create_time: float, owner_pid: int) -> None:
    """Finalizer: our postmaster outlived its object (or the interpreter is exiting)."""
    if os.getpid() != owner_pid:  # a forked child must not stop its parent's server
        return
    with contextlib.suppress(psutil.Error, OSError):
        proc = psutil.Process(pid)
        if proc.create_time() == create_time and _alive(proc):
            proc.send_signal(signal.SIGINT)  # "fast" shutdown; the postmaster finishes alone


def _guc_list_item(value: str) -> str:
    """Quote one element of a GUC list (unix_socket_directories) if it needs it."""
    if value and not any(c in value for c in ' \t,"'):
        return value
    return '"' + value.replace('"', '""') + '"'


class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`, run with the binaries shipped by `pgserver`.

    The object owns the server it starts: `stop` (or leaving the ``with`` block) shuts it
    down; if the object is garbage-collected or the interpreter exits while the server
    runs, a fast shutdown is requested. Methods are thread-safe; one object per data
    directory at a time (a second one refuses to start while the first one's server runs).

    Args:
        data_dir: the cluster's data directory (PGDATA). Created when missing; initdb
            runs when it holds no ``PG_VERSION`` (it must then be empty).
        port: TCP port on 127.0.0.1. None: the port remembered in the data directory
            if it is free, else any free port, chosen at the first start and kept.
        fast: throwaway cluster for tests: ``fsync``, ``synchronous_commit`` and
            ``full_page_writes`` off (data may be lost on an OS crash; never for data
            you keep).
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, fast: bool = False) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        self._data_dir = Path(os.path.abspath(Path(data_dir).expanduser()))
        self._explicit_port = port
        self._port: int | None = port
        self._fast = fast
        self._password: str | None = None
        self._proc: Any | None = None  # psutil.Process of our postmaster
        self._socket_dir: Path | None = None
        self._initialized_now = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ properties

    @property
    def data_dir(self) -> Path:
        """The data directory (absolute)."""
        return self._data_dir

    @property
    def port(self) -> int:
        """The TCP port. Before the first start, reading it chooses the port then."""
        with self._lock:
            if self._port is None:
                self._port = self._choose_port()
            return self._port

    @property
    def password(self) -> str:
        """The password of user ``postgres``.

        Raises:
            EmbeddedError: the cluster has not been initialized yet (call `start`).
        """
        with self._lock:
            if self._password is None:
                self._password = self._read_password()
            if self._password is None:
                raise EmbeddedError(
                    f"no password yet: {self._data_dir} holds no initialized cluster; call start()"
                )
            return self._password

    @property
    def dsn(self) -> str:
        """``postgresql://postgres:<password>@127.0.0.1:<port>/postgres``.

        Raises:
            EmbeddedError: the cluster has not been initialized yet (call `start`).
        """
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def socket_dir(self) -> Path | None:
        """The unix socket directory of the running server (``trust`` auth), else None."""
        return self._socket_dir if self.is_running() else None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while the server we started runs, else None."""
        with self._lock:
            proc = self._proc
        return int(proc.pid) if proc is not None and _alive(proc) else None

    @property
    def initialized_now(self) -> bool:
        """True when the last effective `start` ran initdb (a new cluster)."""
        return self._initialized_now

    @property
    def log_file(self) -> Path:
        """The server log."""
        return self._data_dir / LOG_FILE

    def is_running(self) -> bool:
        """True while the postmaster this object started runs."""
        return self.pid is not None

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"<EmbeddedPostgres {self._data_dir} port={self._port} {state}>"

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30) -> None:
        """Start the server (initdb first when the data directory holds no cluster).

        Idempotent: does nothing while the server this object started runs. After a
        `kill` (a stale ``postmaster.pid``) the server starts with crash recovery.

        Raises:
            EmbeddedError: the binaries are missing; the data directory is not usable
                (a file, or not empty and not a cluster); another live postmaster (from
                another process or object) already runs on this data directory; the given
                port is taken; initdb or the server failed or did not get ready within
                `timeout` seconds (the message carries the tail of the server log).
        """
        with self._lock:
            if self.is_running():
                return
            self._forget_server()
            self._password = None  # read again: the data directory may have changed
            bin_dir = postgres_bin_dir()
            run_as = _run_as()
            self._prepare_data_dir(bin_dir, run_as)

            self._check_no_other_server()

            try:
                initialized = self._init_and_start(bin_dir, run_as, timeout)
            except EmbeddedError as exc:
                if not run_as.switches or "Permission denied" not in str(exc):
                    raise
                # Something took the search permission away from a parent directory
                # meanwhile (a new pytest session resets its temp root to 0700): once more.
                _log.warning("permission denied for %s; granting it again: %s", SYSTEM_USER, exc)
                self._prepare_data_dir(bin_dir, run_as)
                initialized = self._init_and_start(bin_dir, run_as, timeout)
            self._initialized_now = initialized
            if self._read_password() is None:  # a cluster we did not make, or a lost file
                try:
                    self._reset_password(run_as)
                except EmbeddedError:
                    self.stop()
                    raise

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Shut the server down and wait until no server process is left.

        `mode` is pg_ctl's: ``smart`` (wait for clients to disconnect), ``fast`` (roll
        back open transactions, disconnect clients) or ``immediate`` (no checkpoint; the
        next start runs crash recovery). When the shutdown does not finish within
        `timeout` seconds, the remaining processes are SIGKILLed. Harmless when the server
        is already stopped (or was never started by this object).

        Raises:
            ValueError: unknown `mode`.
            EmbeddedError: server processes are still alive even after SIGKILL.
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(_STOP_MODES)}: {mode!r}")
        with self._lock:
            proc = self._proc
            if proc is None or not _alive(proc):
                self._forget_server()
                return
            procs = self._family(proc)
            # what "pg_ctl stop -m <mode>" does: signal the postmaster, wait for it
            with contextlib.suppress(psutil.Error):
                proc.send_signal(_STOP_SIGNALS[mode])
            socket_dir = self._socket_dir
            left = _wait_gone(procs, timeout)
            if left:
                _log.warning("%s did not shut down in %s s; SIGKILL", self, timeout)
                left = self._family(proc) if _alive(proc) else left
                for pid in server_processes(self._data_dir):
                    with contextlib.suppress(psutil.Error):
                        left.append(psutil.Process(pid))
                _sigkill(left)
                left = _wait_gone(left, 5)
            self._forget_server()
            if left:
                raise EmbeddedError(f"server processes still alive after SIGKILL: {left}")
            if socket_dir is not None and socket_dir != self._data_dir:
                with contextlib.suppress(OSError):
                    socket_dir.rmdir()  # our short socket directory, empty after a shutdown

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a simulated crash), and wait for them.

        ``postmaster.pid`` stays behind, stale; the next `start` recovers. Does nothing
        when the server is not running.

        Raises:
            EmbeddedError: server processes are still alive after SIGKILL.
        """
        with self._lock:
            proc = self._proc
            if proc is None or not _alive(proc):
                self._forget_server()
                return
            procs = self._family(proc)
            _sigkill(procs)  # the postmaster first: it must not restart killed children
            left = _wait_gone(procs, 10)
            self._forget_server()
            if left:
                raise EmbeddedError(f"server processes still alive after SIGKILL: {left}")

    def __enter__(self) -> EmbeddedPostgres:
        """Start the server (see `start`, which may raise EmbeddedError)."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (fast)."""
        self.stop()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _family(proc: Any) -> list[Any]:
        """The postmaster followed by all its descendants."""
        try:
            children = list(proc.children(recursive=True))
        except psutil.Error:
            children = []
        return [proc, *children]

    def _init_and_start(self, bin_dir: Path, run_as: _RunAs, timeout: float) -> bool:
        """initdb if needed, then start; True when initdb ran."""
        initialized = False
        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, run_as, timeout)
            initialized = True
        self._start_server(bin_dir, run_as, timeout)
        return initialized

    def _check_no_other_server(self) -> None:
        """Refuse a data directory that another server uses; clear a dead one's locks.

        A postmaster killed here may stay a zombie for a while (until init reaps it),
        and PostgreSQL reads a zombie pid in ``postmaster.pid`` as a live server. So when
        no process of the cluster is alive any more, the stale lock files are removed
        here rather than left to pg_ctl. (PostgreSQL still refuses to start if the old
        shared memory block is attached somewhere.)
        """
        live = server_processes(self._data_dir)
        pid = _read_postmaster_pid(self._data_dir)
        if live and pid not in live:
            # children of a postmaster that died: they notice and exit on their own
            deadline = time.monotonic() + 5
            while live and time.monotonic() < deadline:
                time.sleep(0.02)
                live = server_processes(self._data_dir)
        if live:
            who = pid if pid in live else live[0]
            raise EmbeddedError(
                f"a PostgreSQL server (pid {who}) already runs on {self._data_dir}, "
                "started by another process or object; stop it first (pg_ctl -D "
                f"{shlex.quote(str(self._data_dir))} stop -m fast, or kill {who})"
            )
        pid_file = self._data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            return
        _log.info("removing the stale postmaster.pid of %s (no server process left)", self)
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the socket lock file carries the same pid: ".s.PGSQL.<port>.lock"
            lock = Path(lines[4].split(",")[0].strip()) / f".s.PGSQL.{int(lines[3])}.lock"
            if lock.read_text().split("\n", 1)[0].strip() == lines[0].strip():
                lock.unlink()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()

    def _forget_server(self) -> None:
        self._proc = None
        self._socket_dir = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def _prepare_data_dir(self, bin_dir: Path, run_as: _RunAs) -> None:
        data_dir = self._data_dir
        if data_dir.exists() and not data_dir.is_dir():
            raise EmbeddedError(f"data directory {data_dir} exists and is not a directory")
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if run_as.switches:
                _ensure_install_readable(bin_dir)
                _ensure_traversable(data_dir)
                if data_dir.stat().st_uid != run_as.uid:
                    if (data_dir / "PG_VERSION").exists():
                        raise EmbeddedError(
                            f"{data_dir} holds a cluster owned by uid {data_dir.stat().st_uid}, "
                            f"not by {SYSTEM_USER!r} that the server runs as"
                        )
                    run_as.chown(data_dir)
        except OSError as exc:
            raise EmbeddedError(f"data directory {data_dir} is not usable: {exc}") from exc

    def _choose_port(self) -> int:
        """The given port; else this object's, the remembered one, or a free one."""
        if self._explicit_port is not None:
            return self._explicit_port
        if self._port is not None:
            if _port_is_free(self._port):
                return self._port
            _log.warning("port %d of %s is taken now; using another one", self._port, self)
        else:
            with contextlib.suppress(OSError, ValueError):
                remembered = int((self._data_dir / PORT_FILE).read_text().strip())
                if 0 < remembered < 65536 and _port_is_free(remembered):
                    return remembered
        return _free_port()

    def _choose_socket_dir(self, port: int, run_as: _RunAs) -> Path:
        """The data directory, or a short private directory when its path is too long."""
        name = f".s.PGSQL.{port}"
        if len(os.fsencode(self._data_dir / name)) <= _SOCKET_PATH_MAX:
            return self._data_dir
        digest = hashlib.sha256(os.fsencode(self._data_dir)).hexdigest()[:16]
        short = Path(tempfile.gettempdir()) / f"pgqg-{digest}"
        if len(os.fsencode(short / name)) > _SOCKET_PATH_MAX:
            short = Path("/tmp") / f"pgqg-{digest}"
        try:
            short.mkdir(mode=0o700, exist_ok=True)
            info = short.lstat()
            owner = run_as.uid if run_as.uid is not None else os.geteuid()
            if stat.S_ISLNK(info.st_mode) or info.st_uid not in (owner, os.geteuid()):
                raise EmbeddedError(f"socket directory {short} exists and is not ours")
            run_as.chown(short)
            short.chmod(0o700)
            if run_as.switches:
                _ensure_traversable(short)
        except OSError as exc:
            raise EmbeddedError(f"socket directory {short} is not usable: {exc}") from exc
        return short

    def _env(self) -> dict[str, str]:
        # libpq/pg_ctl variables of the caller (PGDATA, PGPORT, ...) must not leak in
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def _run(
        self, argv: list[str], run_as: _RunAs, *, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a server program as the server's user; output goes through a temp file
        (pg_ctl's detached postmaster must not inherit a pipe we wait on)."""
        with tempfile.TemporaryFile("w+") as out:
            try:
                done = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    cwd=self._data_dir,
                    env=self._env(),
                    check=False,
                    **run_as.subprocess_kwargs(),
                )
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedError(
                    f"{Path(argv[0]).name} did not finish within {timeout:.0f} s"
                ) from exc
            except OSError as exc:
                raise EmbeddedError(f"cannot run {argv[0]}: {exc}") from exc
            out.seek(0)
            done.stdout = out.read()
        return done

    def _write_private(self, name: str, text: str, run_as: _RunAs) -> None:
        """Write a mode 0600 file into the data directory, owned like the cluster."""
        path = self._data_dir / name
        tmp = path.with_name(f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        run_as.chown(tmp)
        os.replace(tmp, path)

    def _read_password(self) -> str | None:
        try:
            password = (self._data_dir / PASSWORD_FILE).read_text().strip()
        except OSError:
            return None
        return password or None

    def _initdb(self, bin_dir: Path, run_as: _RunAs, timeout: float) -> None:
        if any(self._data_dir.iterdir()):
            raise EmbeddedError(
                f"{self._data_dir} is neither empty nor a PostgreSQL cluster (no PG_VERSION)"
            )
        password = secrets.token_urlsafe(24)
        with tempfile.TemporaryDirectory(prefix="pgqg-initdb-") as tmp:
            pwfile = Path(tmp) / "pw"
            pwfile.write_text(password + "\n")
            pwfile.chmod(0o600)
            if run_as.switches:
                run_as.chown(Path(tmp))
                run_as.chown(pwfile)
                _ensure_traversable(pwfile)
            base = [
                str(bin_dir / "initdb"),
                # relative to the working directory (entered before dropping root), so
                # initdb's own file work does not depend on the parents' search bits
                "-D", ".",
                "-U", SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ]  # fmt: skip
            if self._fast:
                base.append("--no-sync")
            # byte-order collation (fast, deterministic), Unicode-aware upper()/lower();
            # plain C where the system has no C.UTF-8 locale
            done = self._run(
                [*base, "--lc-collate=C", "--lc-ctype=C.UTF-8"], run_as, timeout=timeout
            )
            if done.returncode != 0 and "locale" in done.stdout.lower():
                _log.info("initdb: no C.UTF-8 locale here, using C: %s", done.stdout.strip())
                done = self._run([*base, "--locale=C"], run_as, timeout=timeout)
            if done.returncode != 0:
                self._empty_data_dir()  # initdb cleans up after itself, unless it cannot
                raise EmbeddedError(f"initdb failed in {self._data_dir}:\n{done.stdout.strip()}")
        self._write_private(PASSWORD_FILE, password + "\n", run_as)
        self._password = password
        _log.info("initialized a PostgreSQL cluster in %s", self._data_dir)

    def _empty_data_dir(self) -> None:
        """Remove what a failed initdb left in the (formerly empty) data directory."""
        with contextlib.suppress(OSError):
            for child in self._data_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def _server_options(self, port: int, socket_dir: Path) -> str:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": _guc_list_item(str(socket_dir)),
            "unix_socket_permissions": "0700",
            "max_connections": str(MAX_CONNECTIONS),
        }
        if self._fast:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        # pg_ctl hands -o to /bin/sh: quote every word
        return " ".join(f"-c {shlex.quote(f'{key}={value}')}" for key, value in settings.items())

    def _log_tail(self, since: int = 0) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(since)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return "(no server log)"
        lines = text.strip().splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(server log is empty)"

    def _start_server(self, bin_dir: Path, run_as: _RunAs, timeout: float) -> None:
        attempts = 1 if self._explicit_port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self._choose_port()
            self._port = port
            socket_dir = self._choose_socket_dir(port, run_as)
            try:
                log_offset = self.log_file.stat().st_size
            except OSError:
                log_offset = 0
            # pg_ctl only launches the postmaster (-W): its own wait reads postmaster.pid
            # through the absolute data path as the server's user, and a parent directory
            # losing its search bit meanwhile makes it wait for nothing. We wait here.
            argv = [
                str(bin_dir / "pg_ctl"),
                "-D", str(self._data_dir),
                "-l", str(self.log_file),
                "-W",
                "-o", self._server_options(port, socket_dir),
                "start",
            ]  # fmt: skip
            started = time.time()
            deadline = time.monotonic() + timeout
            try:
                done = self._run(argv, run_as, timeout=timeout + 10)
                failure = None if done.returncode == 0 else done.stdout.strip()
            except EmbeddedError as exc:
                failure = str(exc)
            proc = None
            if failure is None:
                proc, failure = self._wait_ready(started, log_offset, deadline)
            if proc is not None:
                break
            # leave nothing half-started behind
            stray = []
            for pid in server_processes(self._data_dir):
                with contextlib.suppress(psutil.Error):
                    stray.append(psutil.Process(pid))
            _sigkill(stray)
            _wait_gone(stray, 10)
            tail = self._log_tail(log_offset)
            if attempt < attempts and "Address already in use" in tail:
                _log.info("port %d was taken meanwhile; trying another one", port)
                self._port = None
                continue
            if self._explicit_port is not None and not _port_is_free(port):
                failure = f"{failure} (port {port} is taken)"
            raise EmbeddedError(
                f"PostgreSQL in {self._data_dir} did not start: {failure}\n"
                f"--- tail of {self.log_file} ---\n{tail}"
            )
        assert proc is not None  # the loop either broke out with it or raised
        self._proc = proc
        self._socket_dir = socket_dir
        self._finalizer = weakref.finalize(
            self, _request_fast_shutdown, int(proc.pid), float(proc.create_time()), os.getpid()
        )
        try:
            self._write_private(PORT_FILE, f"{port}\n", run_as)
        except OSError as exc:  # only a hint for the next process
            _log.warning("could not remember the port in %s: %s", self._data_dir, exc)
        _log.info("PostgreSQL runs on 127.0.0.1:%d (pid %d), data in %s",
                  port, proc.pid, self._data_dir)  # fmt: skip

    def _wait_ready(
        self, started: float, log_offset: int, deadline: float
    ) -> tuple[Any | None, str]:
        """Wait until the postmaster launched at `started` (wall clock) is ready.

        Returns its psutil process, or None and why it is not coming.
        """
        pid_file = self._data_dir / "postmaster.pid"
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
                if proc is None or not _alive(proc):
                    return None, f"the postmaster (pid {pid}) exited"
                if status in ("ready", "standby"):
                    return proc, ""
            elif self._fatal_logged(log_offset):
                # it failed before completing postmaster.pid, or removed it on its way out
                return None, "the postmaster exited"
            if time.monotonic() >= deadline:
                return None, "the server did not get ready in time"
            time.sleep(0.01)

    def _fatal_logged(self, since: int) -> bool:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(since)
                text = fh.read()
        except OSError:
            return False
        return b"FATAL:" in text or b"PANIC:" in text

    def _reset_password(self, run_as: _RunAs) -> None:
        """Give ``postgres`` a new password over the unix socket (``trust``) and keep it."""
        import psycopg
        from psycopg import sql

        password = secrets.token_urlsafe(24)
        try:
            with psycopg.connect(
                host=str(self._socket_dir), port=self.port, user=SUPERUSER, dbname=DATABASE,
                autocommit=True, connect_timeout=10,
            ) as conn:  # fmt: skip
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(SUPERUSER), sql.Literal(password)
                    )
                )
        except psycopg.Error as exc:
            raise EmbeddedError(
                f"cluster in {self._data_dir} has no {PASSWORD_FILE} and its password "
                f"could not be reset over the unix socket: {exc}"
            ) from exc
        self._write_private(PASSWORD_FILE, password + "\n", run_as)
        self._password = password
        _log.warning("%s was missing: set a new password for %s", PASSWORD_FILE, SUPERUSER)
