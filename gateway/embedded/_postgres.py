"""An embedded PostgreSQL cluster that we own: `pgqg serve` without a database, and tests.

`EmbeddedPostgres` runs the PostgreSQL 16 server binaries shipped by the `pgserver`
package, but not `pgserver.get_server`: that one listens on a unix socket only, keeps
global state and atexit hooks. Here one object owns one cluster (one data directory):

* the cluster listens on TCP ``127.0.0.1:<port>`` with ``scram-sha-256`` password
  authentication (user ``postgres``, a random password made at initdb time and kept in
  ``<data_dir>/pgqg.password``, mode 0600), plus a unix socket with ``trust``
  authentication in a directory only the server's user (and root) can enter
  (`gateway.embedded._initdb`, `gateway.embedded._config`);
* requests run as ``pgqg_anon``, not as the superuser: the gateway logs in as
  ``pgqg_authenticator`` (`gateway_dsn`; its password in ``<data_dir>/pgqg.gateway.password``),
  created with the cluster, or added to a cluster made before it on its next start
  (`upgraded_now`); the superuser (`dsn`) is for administration (`gateway.embedded._roles`);
* the port is the one given, else a free one chosen at the first start and kept for
  later restarts of the same object; it is also written to ``<data_dir>/pgqg.port`` so
  a later process reusing the data directory tries the same port first;
* the server log goes to ``<data_dir>/postgresql.log`` (`gateway.embedded._datadir`);
* `kill` SIGKILLs the postmaster and its children (to simulate a crash); `start` after it
  recovers the cluster, `stop` always leaves no server process behind
  (`gateway.embedded._postmaster`).

When we are root the server runs as the system user ``pgserver``
(`gateway.embedded._install`). Keep data directories out of places whose parents get
reset to 0700 while a server starts (pytest resets ``/tmp/pytest-of-root`` at each new
session); one start is retried after a "Permission denied".
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import TracebackType

from ._admin import Admin
from ._config import PortChoice
from ._datadir import GATEWAY_PASSWORD_FILE, PASSWORD_FILE, DataDir
from ._errors import EmbeddedError
from ._initdb import DATABASE, SUPERUSER, initdb
from ._install import SYSTEM_USER, RunAs, postgres_bin_dir, server_user
from ._postmaster import STOP_MODES, Postmaster, start_postmaster
from ._processes import server_processes
from ._roles import LOGIN_ROLE, REQUEST_ROLE

__all__ = ["EmbeddedError", "EmbeddedPostgres", "postgres_bin_dir", "server_processes"]

_log = logging.getLogger(__name__)


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
        self._ports = PortChoice(port)
        self._data = DataDir(Path(os.path.abspath(Path(data_dir).expanduser())))
        self._fast = fast
        self._password: str | None = None
        self._server: Postmaster | None = None
        self._initialized_now = False
        self._upgraded_now = False
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ properties

    @property
    def data_dir(self) -> Path:
        """The data directory (absolute)."""
        return self._data.path

    @property
    def port(self) -> int:
        """The TCP port. Before the first start, reading it chooses the port then."""
        with self._lock:
            return self._ports.get(self._data)

    @property
    def password(self) -> str:
        """The password of user ``postgres``.

        Raises:
            EmbeddedError: the cluster has not been initialized yet (call `start`).
        """
        with self._lock:
            if self._password is None:
                self._password = self._data.read_private(PASSWORD_FILE)
            if self._password is None:
                raise EmbeddedError(
                    f"no password yet: {self.data_dir} holds no initialized cluster; call start()"
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
    def gateway_dsn(self) -> str:
        """``postgresql://pgqg_authenticator:<password>@127.0.0.1:<port>/postgres``: the
        gateway's login role, whose sessions run as ``pgqg_anon``.

        Raises:
            EmbeddedError: the cluster has not been started yet (call `start`).
        """
        password = self._data.read_private(GATEWAY_PASSWORD_FILE)
        if password is None:
            raise EmbeddedError(f"no gateway login role yet in {self.data_dir}; call start()")
        return f"postgresql://{LOGIN_ROLE}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def request_role(self) -> str:
        """The role requests through `gateway_dsn` run as."""
        return REQUEST_ROLE

    @property
    def socket_dir(self) -> Path | None:
        """The unix socket directory of the running server (``trust`` auth), else None."""
        server = self._server
        return server.socket_dir if server is not None and server.pid is not None else None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while the server we started runs, else None."""
        with self._lock:
            server = self._server
        return server.pid if server is not None else None

    @property
    def initialized_now(self) -> bool:
        """True when the last effective `start` ran initdb (a new cluster)."""
        return self._initialized_now

    @property
    def upgraded_now(self) -> bool:
        """True when the last effective `start` added the gateway's login role to a
        cluster made before there was one."""
        return self._upgraded_now

    @property
    def log_file(self) -> Path:
        """The server log."""
        return self._data.log_file

    def is_running(self) -> bool:
        """True while the postmaster this object started runs."""
        return self.pid is not None

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"<EmbeddedPostgres {self.data_dir} port={self._ports.current} {state}>"

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
            run_as = server_user()
            self._data.prepare(bin_dir, run_as)
            self._data.check_no_other_server()
            try:
                self._initialized_now = self._init_and_start(bin_dir, run_as, timeout)
            except EmbeddedError as exc:
                if not run_as.switches or "Permission denied" not in str(exc):
                    raise
                # Something took the search permission away from a parent directory
                # meanwhile (a new pytest session resets its temp root to 0700): once more.
                _log.warning("permission denied for %s; granting it again: %s", SYSTEM_USER, exc)
                self._data.prepare(bin_dir, run_as)
                self._initialized_now = self._init_and_start(bin_dir, run_as, timeout)
            try:
                self._after_start(run_as)
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
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(STOP_MODES)}: {mode!r}")
        with self._lock:
            server = self._forget_server()
            if server is not None and server.pid is not None:
                server.stop(mode, timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a simulated crash), and wait for them.

        ``postmaster.pid`` stays behind, stale; the next `start` recovers. Does nothing
        when the server is not running.

        Raises:
            EmbeddedError: server processes are still alive after SIGKILL.
        """
        with self._lock:
            server = self._forget_server()
            if server is not None and server.pid is not None:
                server.kill()

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

    def _init_and_start(self, bin_dir: Path, run_as: RunAs, timeout: float) -> bool:
        """initdb if needed, then start; True when initdb ran."""
        initialized = False
        if not self._data.is_cluster():
            self._password = initdb(self._data, bin_dir, run_as, fast=self._fast, timeout=timeout)
            initialized = True
        self._server = start_postmaster(
            self, self._data, bin_dir, run_as, self._ports, fast=self._fast, timeout=timeout
        )
        return initialized

    def _after_start(self, run_as: RunAs) -> None:
        """A new superuser password for a cluster we did not make (or a lost password
        file); the gateway's login role for a cluster made before there was one.

        Raises:
            EmbeddedError: either could not be set.
        """
        assert self._server is not None  # started just now
        admin = Admin(self._data, self._server.socket_dir, self.port, run_as)
        if self._data.read_private(PASSWORD_FILE) is None:
            self._password = admin.reset_password()
        created = admin.ensure_gateway_login()
        self._upgraded_now = created and not self._initialized_now
        if self._upgraded_now:
            _log.info("%s: added the login role %s; requests now run as %s, not as %s",
                      self.data_dir, LOGIN_ROLE, REQUEST_ROLE, SUPERUSER)  # fmt: skip

    def _forget_server(self) -> Postmaster | None:
        """No server of ours any more; return the one there was, if any."""
        server, self._server = self._server, None
        if server is not None:
            server.release()
        return server
