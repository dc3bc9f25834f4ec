"""What we do on a running cluster as its superuser, over the unix socket (``trust``):
keep the passwords we hand out, and give the gateway a login role of its own."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from ._datadir import GATEWAY_PASSWORD_FILE, PASSWORD_FILE, DataDir
from ._errors import EmbeddedError
from ._initdb import DATABASE, SUPERUSER, new_password
from ._install import RunAs
from ._roles import LOGIN_ROLE, create_gateway_roles, role_exists, set_password

__all__ = ["Admin"]

_log = logging.getLogger(__name__)


class Admin:
    """The superuser's access to the running cluster in `data`."""

    def __init__(self, data: DataDir, socket_dir: Path, port: int, run_as: RunAs) -> None:
        self._data = data
        self._socket_dir = socket_dir
        self._port = port
        self._run_as = run_as

    @contextlib.contextmanager
    def _connect(self, doing: str) -> Iterator[psycopg.Connection[Any]]:
        """An autocommit superuser connection; errors become EmbeddedError, saying
        what we were `doing`.

        Its commits wait for the WAL to be written even on a throwaway cluster
        (``synchronous_commit=off``): a role or password it makes is kept on disk
        beside the data directory's password file, and a server killed right after
        start (the fault tests do) must not come back without them.
        """
        try:
            with psycopg.connect(
                host=str(self._socket_dir), port=self._port, user=SUPERUSER, dbname=DATABASE,
                autocommit=True, connect_timeout=10, options="-c synchronous_commit=on",
            ) as conn:  # fmt: skip
                yield conn
        except psycopg.Error as exc:
            raise EmbeddedError(
                f"cluster in {self._data.path}: {doing} failed over the unix socket: {exc}"
            ) from exc

    def reset_password(self) -> str:
        """Give ``postgres`` a new password, keep it in ``pgqg.password`` and return it.

        Raises:
            EmbeddedError: the server refused it or could not be reached.
        """
        password = new_password()
        with self._connect(f"resetting the password of {SUPERUSER} (no {PASSWORD_FILE})") as conn:
            set_password(conn, SUPERUSER, password)
        self._data.write_private(PASSWORD_FILE, password + "\n", self._run_as)
        _log.warning("%s was missing: set a new password for %s", PASSWORD_FILE, SUPERUSER)
        return password

    def ensure_gateway_login(self) -> bool:
        """Make sure the gateway's login role exists and its password is kept in
        ``pgqg.gateway.password``; True when the roles were created now (a new cluster,
        or one made before there were such roles: upgraded in place).

        Raises:
            EmbeddedError: the server refused it or could not be reached.
        """
        with self._connect(f"setting up the login role {LOGIN_ROLE}") as conn:
            if role_exists(conn, LOGIN_ROLE):
                if self._data.read_private(GATEWAY_PASSWORD_FILE) is not None:
                    return False
                password = new_password()
                set_password(conn, LOGIN_ROLE, password)
                created = False
                _log.warning("%s was missing: set a new password for %s",
                             GATEWAY_PASSWORD_FILE, LOGIN_ROLE)  # fmt: skip
            else:
                password = new_password()
                create_gateway_roles(conn, password=password)
                created = True
        self._data.write_private(GATEWAY_PASSWORD_FILE, password + "\n", self._run_as)
        return created
