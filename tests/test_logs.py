"""The log's two formats (gateway.web._logs): text, and one JSON object per line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import aiohttp
import pytest
from support import Served

from gateway.web._logs import TEXT_FORMAT, JsonFormatter


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gateway.test", logging.WARNING, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_a_record_is_one_line_of_json_with_its_fields() -> None:
    record = _record("two\nlines", fields={"request_id": "r-1", "rows": 3, "sqlstate": None})
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "gateway.test"
    assert entry["message"] == "two\nlines"
    assert (entry["request_id"], entry["rows"], entry["sqlstate"]) == ("r-1", 3, None)
    assert entry["time"].endswith("Z") and entry["time"][10] == "T"


def test_an_exception_stays_inside_its_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed", exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_text_stays_the_default() -> None:
    assert TEXT_FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"


@pytest.mark.slow
async def test_serve_logs_json_lines(database_dsn: str) -> None:
    served = Served(database_dsn, env={"PGQG_LOG_FORMAT": "json", "PGQG_LOG_LEVEL": "info"})
    try:
        async with aiohttp.ClientSession() as http:
            await served.ready(http)
            headers = {"X-Request-Id": "json-log-1"}
            async with http.post(
                served.url + "/v1/query", json={"sql": "select 1/0"}, headers=headers
            ) as resp:
                assert resp.status == 400
            async with asyncio.timeout(20):
                while "json-log-1" not in (output := served.output()):
                    await asyncio.sleep(0.05)
    finally:
        served.stop()
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (access,) = [e for e in entries if e.get("request_id") == "json-log-1"]
    assert access["logger"] == "gateway.access" and access["level"] == "warning"
    assert access["status"] == 400 and access["route"] == "/v1/query"
    assert access["sqlstate"] == "22012" and access["duration_ms"] > 0
    # the human lines of `pgqg serve` go to standard output; the log is all JSON
    assert all(line.startswith(("{", "pgqg", "  ")) for line in output.splitlines()), output
