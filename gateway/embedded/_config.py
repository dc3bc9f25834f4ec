"""How the embedded server is configured: its port, its unix socket, its settings.

The cluster listens on TCP ``127.0.0.1:<port>`` and on a unix socket in a directory only
the server's user (and root) can enter: the data directory, or a short private directory
when the data directory's path is too long for a socket address. Settings are passed on
the postmaster's command line, so nothing in ``postgresql.conf`` is edited.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import socket
import stat
import tempfile
from pathlib import Path

from ._datadir import DataDir
from ._errors import EmbeddedError
from ._install import RunAs, ensure_traversable

__all__ = [
    "MAX_CONNECTIONS",
    "PortChoice",
    "choose_socket_dir",
    "free_port",
    "port_is_free",
    "server_options",
]

_log = logging.getLogger(__name__)

MAX_CONNECTIONS = 200
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes, NUL included


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the postmaster does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on now (it may be taken before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class PortChoice:
    """The TCP port of one cluster object: the given one, else chosen when first needed
    and kept while it stays free."""

    def __init__(self, explicit: int | None) -> None:
        if explicit is not None and not 0 < explicit < 65536:
            raise ValueError(f"port out of range: {explicit}")
        self.explicit = explicit
        self.current = explicit

    def get(self, data: DataDir) -> int:
        """The port; chosen now when there is none yet."""
        if self.current is None:
            self.current = self.choose(data)
        return self.current

    def choose(self, data: DataDir) -> int:
        """(Again) for a start: the given port; else ours, the one remembered in `data`
        or a free one."""
        self.current = port = self._choose(data)
        return port

    def _choose(self, data: DataDir) -> int:
        if self.explicit is not None:
            return self.explicit
        if self.current is not None:
            if port_is_free(self.current):
                return self.current
            _log.warning("port %d of %s is taken now; using another one", self.current, data.path)
        else:
            remembered = data.remembered_port()
            if remembered is not None and port_is_free(remembered):
                return remembered
        return free_port()


def choose_socket_dir(data_dir: Path, port: int, run_as: RunAs) -> Path:
    """The data directory, or a short private directory when its path is too long.

    Raises:
        EmbeddedError: the short directory exists and is not ours, or is not usable.
    """
    name = f".s.PGSQL.{port}"
    if len(os.fsencode(data_dir / name)) <= _SOCKET_PATH_MAX:
        return data_dir
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
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
            ensure_traversable(short)
    except OSError as exc:
        raise EmbeddedError(f"socket directory {short} is not usable: {exc}") from exc
    return short


def _guc_list_item(value: str) -> str:
    """Quote one element of a GUC list (unix_socket_directories) if it needs it."""
    if value and not any(c in value for c in ' \t,"'):
        return value
    return '"' + value.replace('"', '""') + '"'


def server_options(port: int, socket_dir: Path, *, fast: bool) -> str:
    """pg_ctl's ``-o``: the postmaster's settings, quoted for /bin/sh.

    `fast`: a throwaway cluster for tests, with ``fsync``, ``synchronous_commit`` and
    ``full_page_writes`` off.
    """
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": _guc_list_item(str(socket_dir)),
        "unix_socket_permissions": "0700",
        "max_connections": str(MAX_CONNECTIONS),
    }
    if fast:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    # pg_ctl hands -o to /bin/sh: quote every word
    return " ".join(f"-c {shlex.quote(f'{key}={value}')}" for key, value in settings.items())
