"""What a job runs as: a PostgreSQL role, and the claims of the token that named it.

The engine sets both inside the job's own transaction, in the segment that opens
it, with utility statements (`Identity.commands`), the role first:

    SET LOCAL ROLE "<role>"; SET LOCAL request.jwt.claims = E'<claims>';
    SET LOCAL request.jwt.claim."<name>" = E'<value>'…

``SET LOCAL`` ends with the transaction: a pipelined neighbour on the same
connection starts with the login role's own role again. PostgreSQL refuses a role
the login role is not a member of with 42501, one that does not exist with 22023,
and skips the rest of the segment. Utility statements are neither planned nor
typed: the four of a typical token cost PostgreSQL about two thirds of one
``SELECT set_config(…), …`` with the same values as parameters (bench/segment_cost.py's
method), which is why the values are quoted here rather than sent as parameters:
an identifier in double quotes, a value as an ``E''`` literal with its backslashes
and quotes doubled, which reads the same whatever ``standard_conforming_strings``
is, on a connection whose client encoding is UTF8 (the pool's). NUL, which neither
can hold, is refused in a role and skipped in a claim.
``request.jwt.claim.<name>`` is set for each top-level claim whose value is a string
and whose name PostgreSQL takes as part of a setting's name; every claim is in
``request.jwt.claims``, as JSON. Each `Identity` is made once per token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from psycopg.pq.abc import PGconn

from .._errors import ForbiddenRole, GatewayError

#: the longest role name PostgreSQL keeps (NAMEDATALEN - 1); a longer one is cut short
#: by the server, and could then name another role
MAX_ROLE_BYTES = 63
#: what PostgreSQL takes as one part of a custom setting's name (ASCII; it also takes
#: bytes above 127, which no claim name needs)
_SETTING_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
CLAIMS_SETTING = "request.jwt.claims"
CLAIM_PREFIX = "request.jwt.claim."
#: what PostgreSQL answers SET LOCAL ROLE (`Identity.commands`) for a role the login
#: role may not take (42501) or that does not exist (22023, "role ... does not exist")
_ROLE_REFUSED = frozenset({"42501", "22023"})


def role_problem(role: str) -> str | None:
    """Why `role` cannot be a request's role, or None when it can be tried.

    ``none`` is refused: ``SET ROLE none`` means the login role itself.
    """
    if not role:
        return "an empty role name"
    if role == "none":
        return "'none' is not a role (SET ROLE none would mean the login role)"
    if "\x00" in role:
        return "a role name with a NUL character"
    try:
        size = len(role.encode())
    except UnicodeEncodeError:
        return "a role name that is not valid Unicode"
    if size > MAX_ROLE_BYTES:
        return f"a role name longer than {MAX_ROLE_BYTES} bytes"
    return None


def quote_identifier(name: str) -> str:
    """`name` as a quoted SQL identifier (it holds no NUL: `role_problem`)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """`value` as an ``E''`` string literal: the same text whatever
    ``standard_conforming_strings`` is (it holds no NUL)."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _set_local(setting: str, value: str) -> bytes:
    return f"SET LOCAL {setting} = {quote_literal(value)}".encode()


class Identity:
    """A role and the claims of its token, as one job's transaction sets them.

    Made once per token (the front end keeps it while the token is valid), so the
    statements are built once too.

    Raises:
        ValueError: `role` cannot be a role (see `role_problem`), or a claim
            cannot be JSON PostgreSQL reads (NaN, Infinity).
    """

    __slots__ = ("claims", "commands", "role", "role_bytes")

    def __init__(self, role: str, claims: Mapping[str, Any]) -> None:
        problem = role_problem(role)
        if problem is not None:
            raise ValueError(problem)
        self.role = role
        #: the claims as JSON text, as ``request.jwt.claims`` holds them
        self.claims = json.dumps(claims, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        singles = [
            (name, value)
            for name, value in claims.items()
            if isinstance(value, str) and "\x00" not in value and _SETTING_PART.fullmatch(name)
        ]
        #: the role first: its refusal is the one `identity_error` maps
        self.commands = (
            f"SET LOCAL ROLE {quote_identifier(role)}".encode(),
            _set_local(CLAIMS_SETTING, self.claims),
            *(_set_local(CLAIM_PREFIX + quote_identifier(n), v) for n, v in singles),
        )
        #: the current_user its role checks expect
        self.role_bytes = role.encode()

    def send(self, pg: PGconn) -> int:
        """Queue `commands` on `pg`; return how many results they have."""
        for command in self.commands:
            pg.send_query_params(command, None)
        return len(self.commands)

    def __repr__(self) -> str:
        # the claims stay out of logs and tracebacks
        return f"Identity(role={self.role!r})"


def identity_error(error: GatewayError) -> GatewayError:
    """The error to answer when `Identity.commands`' first (the role) failed with `error`: a role
    PostgreSQL refused is `ForbiddenRole`; anything else (a cancel) stays as it is."""
    if error.sqlstate in _ROLE_REFUSED:
        return ForbiddenRole(error.message, sqlstate=error.sqlstate, hint=error.hint)
    return error
