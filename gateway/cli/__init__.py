"""The ``pgqg`` command: serve, query, run, db init; its gateway client and terminal output.

The top layer: it may import every other package; none imports it.
"""

from ._commands import main

__all__ = ["main"]
