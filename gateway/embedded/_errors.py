"""The one exception of the embedded server."""

from __future__ import annotations

__all__ = ["EmbeddedError"]


class EmbeddedError(Exception):
    """The embedded cluster could not be set up, started or stopped.

    When the server itself failed, the message ends with the tail of its log.
    """
