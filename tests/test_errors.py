"""The error tree and the SQLSTATE → HTTP status table (DESIGN §3)."""

from __future__ import annotations

import pytest

from gateway import (
    BadRequest,
    GatewayError,
    OutcomeUnknown,
    Overloaded,
    QueryError,
    Timeout,
    Unavailable,
    status_for_sqlstate,
)
from gateway._errors import query_error


@pytest.mark.parametrize(
    ("sqlstate", "status"),
    [
        ("08006", 503),
        ("08001", 503),
        ("57014", 504),
        ("23503", 409),
        ("23505", 409),
        ("23502", 400),
        ("42501", 403),
        ("25006", 403),
        ("53300", 503),
        ("22012", 400),
        ("42P01", 400),
        ("40001", 409),
        ("XX000", 500),
        ("58030", 500),
        ("57P01", 503),
        (None, 500),
    ],
)
def test_status_for_sqlstate(sqlstate: str | None, status: int) -> None:
    assert status_for_sqlstate(sqlstate) == status


def test_every_error_is_a_gateway_error_with_the_design_shape() -> None:
    for cls, status, code in [
        (BadRequest, 400, "bad_request"),
        (Overloaded, 503, "overloaded"),
        (Unavailable, 503, "unavailable"),
        (OutcomeUnknown, 502, "outcome_unknown"),
        (Timeout, 504, "timeout"),
    ]:
        err = cls("msg")
        assert isinstance(err, GatewayError)
        assert (err.status, err.code) == (status, code)
        assert err.to_dict() == {
            "error": {
                "code": code,
                "message": "msg",
                "sqlstate": None,
                "detail": None,
                "hint": None,
                "position": None,
            }
        }
    assert Overloaded.retry_after and Unavailable.retry_after
    assert OutcomeUnknown.retry_after is None  # retrying blindly may write twice


def test_query_error_carries_postgres_fields() -> None:
    err = query_error("boom", sqlstate="08006", detail="d", hint="h", position=3)
    assert isinstance(err, QueryError)
    assert err.status == 503
    assert err.retry_after == 2
    assert err.to_dict()["error"] == {
        "code": "query_error",
        "message": "boom",
        "sqlstate": "08006",
        "detail": "d",
        "hint": "h",
        "position": 3,
    }
    assert query_error("x", sqlstate="22012").retry_after is None


@pytest.mark.parametrize(
    ("needed", "given", "message"),
    [
        (2, 1, "the statement has 2 parameters ($1, $2); 1 given"),
        (1, 2, "the statement has 1 parameter ($1); 2 given"),
        (0, 1, "the statement has no parameters; 1 given"),
        (7, 0, "the statement has 7 parameters ($1, $2, …, $7); 0 given"),
    ],
)
def test_a_wrong_parameter_count_is_said_in_the_clients_words(
    needed: int, given: int, message: str
) -> None:
    protocol = (
        f'bind message supplies {given} parameters, but prepared statement "" requires {needed}'
    )
    error = query_error(protocol, sqlstate="08P01")
    assert (error.message, error.status, error.sqlstate) == (message, 400, "08P01")


def test_other_protocol_errors_keep_postgres_words() -> None:
    assert query_error("invalid message format", sqlstate="08P01").message == (
        "invalid message format"
    )
    # the same words under another SQLSTATE are not the Bind's count
    bind = 'bind message supplies 1 parameters, but prepared statement "" requires 2'
    assert query_error(bind, sqlstate="XX000").message == bind
