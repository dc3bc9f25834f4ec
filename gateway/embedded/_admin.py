"""What we do on a running cluster as its superuser, over the unix socket (``trust``)."""

from __future__ import annotations

import logging
from pathlib import Path

from ._datadir import PASSWORD_FILE, DataDir
from ._errors import EmbeddedError
from ._initdb import DATABASE, SUPERUSER, new_password
from ._install import RunAs

__all__ = ["reset_password"]

_log = logging.getLogger(__name__)


def reset_password(data: DataDir, socket_dir: Path, port: int, run_as: RunAs) -> str:
    """Give ``postgres`` a new password, keep it in ``pgqg.password`` and return it.

    Raises:
        EmbeddedError: the server refused it or could not be reached.
    """
    import psycopg
    from psycopg import sql

    password = new_password()
    try:
        with psycopg.connect(
            host=str(socket_dir), port=port, user=SUPERUSER, dbname=DATABASE,
            autocommit=True, connect_timeout=10,
        ) as conn:  # fmt: skip
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(password)
                )
            )
    except psycopg.Error as exc:
        raise EmbeddedError(
            f"cluster in {data.path} has no {PASSWORD_FILE} and its password "
            f"could not be reset over the unix socket: {exc}"
        ) from exc
    data.write_private(PASSWORD_FILE, password + "\n", run_as)
    _log.warning("%s was missing: set a new password for %s", PASSWORD_FILE, SUPERUSER)
    return password
