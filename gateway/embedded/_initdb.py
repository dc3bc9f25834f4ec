"""Creating a cluster: initdb with a random superuser password.

The cluster authenticates TCP connections with ``scram-sha-256`` (user ``postgres``, the
password kept in ``<data_dir>/pgqg.password``) and unix socket connections with ``trust``
(the socket directory admits only the server's user and root). The collation is bytewise
(``C``: fast, deterministic), ``upper()``/``lower()`` Unicode-aware (``C.UTF-8``) where
the system has that locale.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from pathlib import Path

from ._datadir import PASSWORD_FILE, DataDir
from ._errors import EmbeddedError
from ._install import RunAs, ensure_traversable, run_program

__all__ = ["DATABASE", "SUPERUSER", "initdb", "new_password"]

_log = logging.getLogger(__name__)

SUPERUSER = "postgres"
DATABASE = "postgres"


def new_password() -> str:
    return secrets.token_urlsafe(24)


def initdb(data: DataDir, bin_dir: Path, run_as: RunAs, *, fast: bool, timeout: float) -> str:
    """Create a cluster in the empty `data` directory; return the superuser's password
    (also written to ``pgqg.password``).

    `fast`: initdb does not fsync (a throwaway cluster).

    Raises:
        EmbeddedError: the directory is not empty, or initdb failed (what it left is
            removed).
    """
    if any(data.path.iterdir()):
        raise EmbeddedError(
            f"{data.path} is neither empty nor a PostgreSQL cluster (no PG_VERSION)"
        )
    password = new_password()
    with tempfile.TemporaryDirectory(prefix="pgqg-initdb-") as tmp:
        pwfile = Path(tmp) / "pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if run_as.switches:
            run_as.chown(Path(tmp))
            run_as.chown(pwfile)
            ensure_traversable(pwfile)
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
        if fast:
            base.append("--no-sync")
        _run_initdb(data, base, run_as, timeout)
    data.write_private(PASSWORD_FILE, password + "\n", run_as)
    _log.info("initialized a PostgreSQL cluster in %s", data.path)
    return password


def _run_initdb(data: DataDir, base: list[str], run_as: RunAs, timeout: float) -> None:
    """C.UTF-8 character classes, else plain C where the system has no such locale."""
    done = run_program(
        [*base, "--lc-collate=C", "--lc-ctype=C.UTF-8"], run_as, cwd=data.path, timeout=timeout
    )
    if done.returncode != 0 and "locale" in done.stdout.lower():
        _log.info("initdb: no C.UTF-8 locale here, using C: %s", done.stdout.strip())
        done = run_program([*base, "--locale=C"], run_as, cwd=data.path, timeout=timeout)
    if done.returncode != 0:
        data.empty()  # initdb cleans up after itself, unless it cannot
        raise EmbeddedError(f"initdb failed in {data.path}:\n{done.stdout.strip()}")
