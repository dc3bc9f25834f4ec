"""The embedded PostgreSQL: a ``pgserver`` cluster in a data directory, started and stopped.

Imports nothing of the gateway: the CLI and the tests drive it.
"""

from ._postgres import EmbeddedError, EmbeddedPostgres, postgres_bin_dir, server_processes

__all__ = ["EmbeddedError", "EmbeddedPostgres", "postgres_bin_dir", "server_processes"]
