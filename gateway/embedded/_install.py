"""The PostgreSQL binaries shipped by `pgserver`, and the user they run as.

PostgreSQL refuses to run as root. When we are root (containers, CI), initdb and pg_ctl
run as the system user ``pgserver`` (created if missing, as `pgserver` itself does; root's
groups are dropped), and the install and every parent directory of the data get the
search bits that user needs.

This module does not import the `pgserver` package itself (its import creates a runtime
directory and emits a `RuntimeDirWarning` when ``XDG_RUNTIME_DIR`` is unset); it only
locates the binaries inside it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from ._errors import EmbeddedError

__all__ = [
    "SYSTEM_USER",
    "RunAs",
    "ensure_install_readable",
    "ensure_traversable",
    "postgres_bin_dir",
    "run_program",
    "server_user",
]

SYSTEM_USER = "pgserver"  # the system user the server runs as when we are root


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
class RunAs:
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


def server_user() -> RunAs:
    """Ourselves, or the ``pgserver`` system user (created if missing) when we are root.

    Raises:
        EmbeddedError: we are root and that user could not be created.
    """
    if os.name != "posix" or os.geteuid() != 0:
        return RunAs()
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
    return RunAs(entry.pw_uid, entry.pw_gid)


def ensure_traversable(path: Path) -> None:
    """Give "others" the search bit on every parent of `path` (pytest's tmp dirs are 0700)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


_install_checked: set[Path] = set()
_install_lock = threading.Lock()


def ensure_install_readable(bin_dir: Path) -> None:
    """Let other users read the PostgreSQL install (pip may have unpacked it 0700/0600).

    Raises:
        OSError: a mode could not be read or changed.
    """
    install = bin_dir.parent
    with _install_lock:
        if install in _install_checked:
            return
        ensure_traversable(install)
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


def _env() -> dict[str, str]:
    # libpq/pg_ctl variables of the caller (PGDATA, PGPORT, ...) must not leak in
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def run_program(
    argv: list[str], run_as: RunAs, *, cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a server program as the server's user in `cwd`; stdout and stderr together.

    Output goes through a temp file: pg_ctl's detached postmaster must not inherit a
    pipe we wait on.

    Raises:
        EmbeddedError: the program could not be run, or ran past `timeout` seconds.
    """
    with tempfile.TemporaryFile("w+") as out:
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                cwd=cwd,
                env=_env(),
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
