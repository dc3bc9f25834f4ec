"""The embedded PostgreSQL: a ``pgserver`` cluster in a data directory, started and stopped.

`EmbeddedPostgres` (``_postgres``) owns one cluster; its parts are the binaries and the
user they run as (``_install``), the data directory and its lock (``_datadir``), creating
the cluster (``_initdb``), its configuration (``_config``), the server process
(``_postmaster``, ``_processes``) and what is done on it as the superuser (``_admin``).

Imports nothing of the gateway: the CLI and the tests drive it.
"""

from ._errors import EmbeddedError
from ._install import postgres_bin_dir
from ._postgres import EmbeddedPostgres
from ._processes import server_processes

__all__ = ["EmbeddedError", "EmbeddedPostgres", "postgres_bin_dir", "server_processes"]
