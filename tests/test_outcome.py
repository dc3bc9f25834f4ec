"""What a client is told when its job's connection is lost (gateway/engine/_outcome.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway import Job, OutcomeUnknown, Statement, Unavailable
from gateway.engine._outcome import ends_connection, lost_error


def job(*, read_only: bool) -> Job:
    deadline = asyncio.get_running_loop().time() + 10
    return Job([Statement(b"select 1")], read_only=read_only, deadline=deadline, max_rows=1)


@pytest.mark.parametrize(
    ("read_only", "sent", "error"),
    [
        (True, False, Unavailable),
        (True, True, Unavailable),  # READ ONLY: it cannot have written anything
        (False, False, Unavailable),  # nothing of it left the gateway
        (False, True, OutcomeUnknown),  # its COMMIT may have run
    ],
)
async def test_only_a_write_that_was_sent_has_an_unknown_outcome(
    read_only: bool, sent: bool, error: type[Exception]
) -> None:
    answer = lost_error(job(read_only=read_only), sent=sent)
    assert type(answer) is error
    if error is OutcomeUnknown:
        assert (answer.status, answer.retry_after) == (502, None)
        assert "may or may not" in answer.message
    else:
        assert (answer.status, answer.retry_after) == (503, 2)
        assert "safe to retry" in answer.message


def test_errors_that_end_the_connection() -> None:
    assert ends_connection("57P01") and ends_connection("57P02") and ends_connection("08006")
    assert not ends_connection("57014") and not ends_connection("40001")
    assert not ends_connection(None)
