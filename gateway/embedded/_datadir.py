"""A cluster's data directory: the files we keep in it, the server log, the lock.

Besides PostgreSQL's own files the directory holds ``pgqg.password`` (the superuser's
password, mode 0600), ``pgqg.gateway.password`` (the gateway's login role's, 0600),
``pgqg.port`` (the port of the last start, tried first by a later process) and the
server log ``postgresql.log``.

The lock is PostgreSQL's ``postmaster.pid``. A stale one (a killed server) is removed
before starting once no process of the cluster is alive: in containers whose init reaps
orphans late, PostgreSQL would read the dead postmaster's zombie as alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import time
from pathlib import Path

from ._errors import EmbeddedError
from ._install import SYSTEM_USER, RunAs, ensure_install_readable, ensure_traversable
from ._processes import server_processes

__all__ = ["GATEWAY_PASSWORD_FILE", "LOG_FILE", "PASSWORD_FILE", "PORT_FILE", "DataDir"]

_log = logging.getLogger(__name__)

PASSWORD_FILE = "pgqg.password"
GATEWAY_PASSWORD_FILE = "pgqg.gateway.password"
PORT_FILE = "pgqg.port"
LOG_FILE = "postgresql.log"
_LOG_TAIL_LINES = 30


class DataDir:
    """The data directory at `path` (absolute), and what we keep in it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    def is_cluster(self) -> bool:
        """True when initdb has run here."""
        return (self.path / "PG_VERSION").exists()

    def prepare(self, bin_dir: Path, run_as: RunAs) -> None:
        """Create the directory (0700) and let `run_as` reach it and the install.

        Raises:
            EmbeddedError: it is a file, it holds another user's cluster, or it is not
                usable (an OSError).
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise EmbeddedError(f"data directory {path} exists and is not a directory")
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if run_as.switches:
                ensure_install_readable(bin_dir)
                ensure_traversable(path)
                if path.stat().st_uid != run_as.uid:
                    if self.is_cluster():
                        raise EmbeddedError(
                            f"{path} holds a cluster owned by uid {path.stat().st_uid}, "
                            f"not by {SYSTEM_USER!r} that the server runs as"
                        )
                    run_as.chown(path)
        except OSError as exc:
            raise EmbeddedError(f"data directory {path} is not usable: {exc}") from exc

    def check_no_other_server(self) -> None:
        """Refuse a data directory that another server uses; clear a dead one's locks.

        A postmaster killed here may stay a zombie for a while (until init reaps it),
        and PostgreSQL reads a zombie pid in ``postmaster.pid`` as a live server. So when
        no process of the cluster is alive any more, the stale lock files are removed
        here rather than left to pg_ctl. (PostgreSQL still refuses to start if the old
        shared memory block is attached somewhere.)

        Raises:
            EmbeddedError: a server process of this cluster is alive.
        """
        live = server_processes(self.path)
        pid = self._postmaster_pid()
        if live and pid not in live:
            # children of a postmaster that died: they notice and exit on their own
            deadline = time.monotonic() + 5
            while live and time.monotonic() < deadline:
                time.sleep(0.02)
                live = server_processes(self.path)
        if live:
            who = pid if pid in live else live[0]
            raise EmbeddedError(
                f"a PostgreSQL server (pid {who}) already runs on {self.path}, "
                "started by another process or object; stop it first (pg_ctl -D "
                f"{shlex.quote(str(self.path))} stop -m fast, or kill {who})"
            )
        self._remove_stale_lock()

    def _postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid``, or None when there is no (readable) pid file."""
        try:
            first = (self.path / "postmaster.pid").read_text().split("\n", 1)[0].strip()
            return int(first)
        except (OSError, ValueError):
            return None

    def _remove_stale_lock(self) -> None:
        pid_file = self.path / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            return
        _log.info("removing the stale postmaster.pid of %s (no server process left)", self.path)
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the socket lock file carries the same pid: ".s.PGSQL.<port>.lock"
            lock = Path(lines[4].split(",")[0].strip()) / f".s.PGSQL.{int(lines[3])}.lock"
            if lock.read_text().split("\n", 1)[0].strip() == lines[0].strip():
                lock.unlink()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()

    def write_private(self, name: str, text: str, run_as: RunAs) -> None:
        """Write a mode 0600 file into the data directory, owned like the cluster.

        Raises:
            OSError: it could not be written.
        """
        path = self.path / name
        tmp = path.with_name(f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        run_as.chown(tmp)
        os.replace(tmp, path)

    def read_private(self, name: str) -> str | None:
        """The stripped text of one of our files; None when it is missing or empty."""
        try:
            text = (self.path / name).read_text().strip()
        except OSError:
            return None
        return text or None

    def remembered_port(self) -> int | None:
        """The port of the last start (``pgqg.port``), if it is a valid one."""
        with contextlib.suppress(ValueError):
            port = int(self.read_private(PORT_FILE) or "")
            if 0 < port < 65536:
                return port
        return None

    def empty(self) -> None:
        """Remove what a failed initdb left in the (formerly empty) data directory."""
        with contextlib.suppress(OSError):
            for child in self.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def log_size(self) -> int:
        """Where the next start's lines begin in the server log."""
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, since: int) -> bytes | None:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(since)
                return fh.read()
        except OSError:
            return None

    def log_tail(self, since: int = 0) -> str:
        """The last lines of the server log written after offset `since`."""
        text = self._log_since(since)
        if text is None:
            return "(no server log)"
        lines = text.decode("utf-8", "replace").strip().splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(server log is empty)"

    def fatal_logged(self, since: int) -> bool:
        """Whether the server logged a FATAL or PANIC after offset `since`."""
        text = self._log_since(since)
        return text is not None and (b"FATAL:" in text or b"PANIC:" in text)
