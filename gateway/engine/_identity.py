"""What a job runs as: a PostgreSQL role, and the claims of the token that named it.

The engine sets both inside the job's own transaction, in the segment that opens
it, with one statement (`Identity.command`):

    SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true),
           set_config('request.jwt.claim.<name>', <value>, true)…

``set_config('role', r, true)`` is ``SET LOCAL ROLE r`` in function form: the same
check (PostgreSQL refuses a role the login role is not a member of with 42501), the
same effect, undone with the transaction, but the role travels as a parameter, so
it needs no quoting at all; and one statement sets the role and every claim.
``request.jwt.claim.<name>`` is set for each top-level claim whose value is a string
and whose name PostgreSQL takes as part of a setting's name; every claim is in
``request.jwt.claims``, as JSON. Nothing of it outlives the transaction: a pipelined
neighbour on the same connection starts with the login role's own role again.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from .._errors import ForbiddenRole, GatewayError

#: the longest role name PostgreSQL keeps (NAMEDATALEN - 1); a longer one is cut short
#: by the server, and could then name another role
MAX_ROLE_BYTES = 63
#: what PostgreSQL takes as one part of a custom setting's name (ASCII; it also takes
#: bytes above 127, which no claim name needs)
_SETTING_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
CLAIMS_SETTING = "request.jwt.claims"
CLAIM_PREFIX = "request.jwt.claim."
#: what PostgreSQL answers `Identity.command` for a role the login role may not take
#: (42501) or that does not exist (22023, "role ... does not exist")
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


@functools.lru_cache(maxsize=64)
def _command(claims: int) -> bytes:
    """The statement that sets the role, the claims, and `claims` single claims."""
    calls = [
        "pg_catalog.set_config('role', $1, true)",
        f"pg_catalog.set_config('{CLAIMS_SETTING}', $2, true)",
    ]
    calls += [f"pg_catalog.set_config(${n}, ${n + 1}, true)" for n in range(3, 3 + 2 * claims, 2)]
    return ("SELECT " + ", ".join(calls)).encode()


class Identity:
    """A role and the claims of its token, as one job's transaction sets them.

    Made once per token (the front end keeps it while the token is valid), so the
    statement and its parameters are built once too.

    Raises:
        ValueError: `role` cannot be a role (see `role_problem`), or a claim
            cannot be JSON PostgreSQL reads (NaN, Infinity).
    """

    __slots__ = ("claims", "command", "params", "role")

    def __init__(self, role: str, claims: Mapping[str, Any]) -> None:
        problem = role_problem(role)
        if problem is not None:
            raise ValueError(problem)
        self.role = role
        #: the claims as JSON text, as ``request.jwt.claims`` holds them
        self.claims = json.dumps(claims, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        singles = [
            (CLAIM_PREFIX + name, value)
            for name, value in claims.items()
            if isinstance(value, str) and "\x00" not in value and _SETTING_PART.fullmatch(name)
        ]
        self.command = _command(len(singles))
        #: the command's parameters: the role first (as the role checks compare it)
        self.params: list[bytes | None] = [role.encode(), self.claims.encode()]
        for name, value in singles:
            self.params += [name.encode(), value.encode()]

    def __repr__(self) -> str:
        # the claims stay out of logs and tracebacks
        return f"Identity(role={self.role!r})"


def identity_error(error: GatewayError) -> GatewayError:
    """The error to answer when `Identity.command` failed with `error`: a role
    PostgreSQL refused is `ForbiddenRole`; anything else (a cancel) stays as it is."""
    if error.sqlstate in _ROLE_REFUSED:
        return ForbiddenRole(error.message, sqlstate=error.sqlstate, hint=error.hint)
    return error
