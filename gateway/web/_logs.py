"""The gateway's log: readable text by default, one JSON object per line for log shippers.

``PGQG_LOG_FORMAT=json`` turns every record (the access log's included) into
one line of JSON on standard error::

    {"time": "2025-01-31T12:00:00.123Z", "level": "info", "logger": "gateway.access",
     "message": "...", "request_id": "...", "route": "/v1/query", "status": 200,
     "duration_ms": 1.234, "rows": 1, "sqlstate": null, ...}

The fields after ``message`` are the record's ``fields`` (``extra={"fields": {...}}``);
an exception's traceback goes in ``exception``, inside the same line.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field of another type is written as its text, never lost
        return orjson.dumps(entry, default=str).decode()


def _utc(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: ``2025-01-31T12:00:00.123Z``."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def configure_logging(level: str, fmt: Literal["text", "json"]) -> None:
    """Send every record at `level` or above to standard error, as text or JSON."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
