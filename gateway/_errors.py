"""The gateway's one exception tree, and how PostgreSQL errors map onto it.

Every error a client can see is a `GatewayError`: it carries the HTTP status, a
stable machine-readable `code` and, for database errors, PostgreSQL's diagnostic
fields. `gateway.web._middleware` is the only place that turns one into a response.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar


class DiagnosticError(Exception):
    """An error with PostgreSQL's diagnostic fields, where it came from PostgreSQL.

    `position` is the 1-based character of the statement the error points at.
    `diagnostics` holds the other fields PostgreSQL sent (severity, context,
    schema_name, table_name, ...), named as psycopg's ``Diagnostic`` names them;
    the v1 error body leaves them out, the Neon one (``POST /sql``) has them.
    """

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        detail: str | None = None,
        hint: str | None = None,
        position: int | None = None,
        diagnostics: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.detail = detail
        self.hint = hint
        self.position = position
        self.diagnostics = diagnostics or {}


class GatewayError(DiagnosticError):
    """Base of every error the gateway answers with.

    Subclasses fix `status` and `code`; `retry_after` (seconds) adds a
    ``Retry-After`` header to the response.
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    retry_after: ClassVar[int | None] = None

    def headers(self) -> dict[str, str]:
        """The response's headers besides the body's: ``Retry-After`` when set."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(self.retry_after)}

    def to_dict(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` body of DESIGN §3."""
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "sqlstate": self.sqlstate,
                "detail": self.detail,
                "hint": self.hint,
                "position": self.position,
            }
        }


class BadRequest(GatewayError):
    """The request is malformed: bad JSON, wrong types, missing parameters."""

    status = 400
    code = "bad_request"


class RawSqlDisabled(GatewayError):
    """Raw SQL was sent while ``raw_sql`` is ``off``."""

    status = 403
    code = "raw_sql_disabled"


class Unauthorized(GatewayError):
    """The request carries no bearer token, and this gateway has no anonymous role.

    `challenge` is the ``WWW-Authenticate`` header of the answer (RFC 6750: no
    error code when the request had no credentials at all).
    """

    status = 401
    code = "unauthorized"

    @property
    def challenge(self) -> str:
        return "Bearer"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": self.challenge}


class InvalidToken(Unauthorized):
    """The bearer token is malformed, expired, not yet valid, for another audience,
    or its signature does not verify. The message is one of the gateway's own
    fixed sentences: it never quotes the token."""

    code = "invalid_token"

    @property
    def challenge(self) -> str:
        description = self.message.replace("\\", "").replace('"', "'")
        return f'Bearer error="invalid_token", error_description="{description}"'


class Forbidden(GatewayError):
    """The request asks for something the configuration does not allow."""

    status = 403
    code = "forbidden"


class ForbiddenRole(GatewayError):
    """The request's role may not do this: the gateway's login role cannot SET it,
    the named query is declared for other roles, or raw SQL is limited to others."""

    status = 403
    code = "forbidden_role"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class UnknownQuery(GatewayError):
    """No named query by that name is in the catalog."""

    status = 404
    code = "unknown_query"


class MethodNotAllowed(GatewayError):
    """The resource exists but not with this method; *allow* lists the methods it
    takes, sent as the ``Allow`` header HTTP requires on a 405."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: Iterable[str] = (), **fields: Any) -> None:
        super().__init__(message, **fields)
        self.allow = ", ".join(allow)

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.allow:
            headers["Allow"] = self.allow
        return headers


class NotAcceptable(GatewayError):
    """The ``Accept`` header or ``format`` asks for an output we do not produce."""

    status = 406
    code = "not_acceptable"


class TooLarge(GatewayError):
    """The request body exceeds ``max_body_bytes``."""

    status = 413
    code = "too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "unsupported_media_type"


class ResultTooLarge(GatewayError):
    """A result has more rows than ``max_rows``, where the answer cannot say it was cut
    (``POST /sql``: Neon's protocol has no ``truncated``)."""

    status = 507
    code = "result_too_large"


class Overloaded(GatewayError):
    """The dispatcher queue is full, or a job waited in it too long."""

    status = 503
    code = "overloaded"
    retry_after = 1


class Unavailable(GatewayError):
    """No working database connection: the database is down or restarting."""

    status = 503
    code = "unavailable"
    retry_after = 2


class OutcomeUnknown(GatewayError):
    """The connection was lost after a write's COMMIT (or autocommit statement) was
    sent and before PostgreSQL acknowledged it: it may or may not have taken effect.

    No ``Retry-After``: unlike `Unavailable`, retrying blindly may apply it twice.
    """

    status = 502
    code = "outcome_unknown"


class Timeout(GatewayError):
    """The request's deadline passed (queue wait plus execution)."""

    status = 504
    code = "timeout"


class QueryError(GatewayError):
    """PostgreSQL refused or failed the statement.

    The status depends on the SQLSTATE; build it with `query_error`.
    """

    code = "query_error"

    def __init__(self, message: str, *, status: int, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.status = status  # type: ignore[misc]  # per instance, from the SQLSTATE

    @property
    def retry_after(self) -> int | None:  # type: ignore[override]
        return Unavailable.retry_after if self.status == 503 else None


# Specific codes first, then classes: in the spirit of PostgREST's table.
_STATUS_BY_SQLSTATE = {
    "57014": 504,  # query_canceled: statement timeout or cancel
    "08P01": 400,  # protocol_violation: a raw statement given the wrong number of params
    "23503": 409,  # foreign_key_violation
    "23505": 409,  # unique_violation
    "42501": 403,  # insufficient_privilege
    "25006": 403,  # read_only_sql_transaction
    "57P01": 503,  # admin_shutdown: the server is going down
    "57P02": 503,  # crash_shutdown
    "57P03": 503,  # cannot_connect_now
}
_STATUS_BY_CLASS = {
    "08": 503,  # connection exception
    "53": 503,  # insufficient resources
    "22": 400,  # data exception
    "23": 400,  # integrity constraint violation
    "42": 400,  # syntax error or access rule violation
    "0A": 400,  # feature not supported
    "21": 400,  # cardinality violation
    "24": 400,  # invalid cursor state
    "25": 400,  # invalid transaction state
    "26": 400,  # invalid SQL statement name
    "27": 400,  # triggered data change violation
    "28": 403,  # invalid authorization specification
    "2D": 400,  # invalid transaction termination
    "0B": 400,  # invalid transaction initiation
    "0L": 403,  # invalid grantor
    "0P": 403,  # invalid role specification
    "2B": 400,  # dependent privilege descriptors still exist
    "2F": 400,  # SQL routine exception
    "34": 400,  # invalid cursor name
    "38": 400,  # external routine exception
    "39": 400,  # external routine invocation exception
    "3B": 400,  # savepoint exception
    "3D": 400,  # invalid catalog name
    "3F": 400,  # invalid schema name
    "40": 409,  # transaction rollback: serialization failure, deadlock
    "44": 400,  # with check option violation
    "P0": 400,  # PL/pgSQL raise_exception and friends
    "54": 400,  # program limit exceeded (statement too complex)
    "55": 409,  # object not in prerequisite state (lock not available)
    "XX": 500,
    "58": 500,
}


def status_for_sqlstate(sqlstate: str | None) -> int:
    """The HTTP status for a PostgreSQL SQLSTATE (DESIGN §3); 500 when unknown."""
    if not sqlstate:
        return 500
    status = _STATUS_BY_SQLSTATE.get(sqlstate)
    if status is None:
        status = _STATUS_BY_CLASS.get(sqlstate[:2], 500)
    return status


def query_error(
    message: str,
    *,
    sqlstate: str | None,
    detail: str | None = None,
    hint: str | None = None,
    position: int | None = None,
    diagnostics: dict[str, str] | None = None,
) -> QueryError:
    """Build the `QueryError` for a PostgreSQL error, its status from the SQLSTATE.

    The message is PostgreSQL's, in the client's words where it speaks the
    protocol's (`client_message`).
    """
    return QueryError(
        client_message(message, sqlstate),
        status=status_for_sqlstate(sqlstate),
        sqlstate=sqlstate,
        detail=detail,
        hint=hint,
        position=position,
        diagnostics=diagnostics,
    )


# PostgreSQL's words (postgres.c) when a Bind carries the wrong number of values
_BIND_COUNT = re.compile(
    r'bind message supplies (?P<given>\d+) parameters?, but prepared statement ".*" requires'
    r" (?P<needed>\d+)"
)


def client_message(message: str, sqlstate: str | None) -> str:
    """PostgreSQL's error *message* as the client should read it.

    The wire protocol's wording of a wrong parameter count (SQLSTATE 08P01,
    "bind message supplies 1 parameters, but prepared statement "" requires
    2") becomes `parameter_count_message`'s; every other message is kept.
    """
    if sqlstate == "08P01" and (match := _BIND_COUNT.fullmatch(message)):
        return parameter_count_message(int(match["needed"]), int(match["given"]))
    return message


def parameter_count_message(needed: int, given: int) -> str:
    """``the statement has 2 parameters ($1, $2); 1 given``: said the same on every path."""
    if not needed:
        return f"the statement has no parameters; {given} given"
    numbers = [f"${n}" for n in range(1, needed + 1)]
    if needed > 4:
        numbers = [*numbers[:2], "…", numbers[-1]]
    plural = "s" if needed != 1 else ""
    return f"the statement has {needed} parameter{plural} ({', '.join(numbers)}); {given} given"
