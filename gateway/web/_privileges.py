"""What the login role may do, read when the gateway starts with raw SQL on.

A read-only raw SQL endpoint is only as safe as the role it runs under: READ ONLY stops
writes to tables, not a superuser reading the server's files (``pg_read_file``), running
programs (``COPY … TO PROGRAM``), signalling other sessions or reloading the server's
configuration. So with raw SQL on, a login role that is a superuser, or may act as one,
or is a member of a predefined role that reaches outside the database, or may replicate
or bypass row-level security, is refused at start-up unless ``allow_privileged_role`` is
set. Membership counts whatever its INHERIT or SET options: a member can become that role
with ``SET ROLE``, from a raw statement too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from .._settings import Settings

__all__ = [
    "SERVER_ROLES",
    "PrivilegedRoleError",
    "check_login_role",
    "connection_check",
    "role_problems",
]

_log = logging.getLogger(__name__)

#: predefined roles whose members reach beyond the database's own tables
SERVER_ROLES = (
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_signal_backend",
)

#: every role the login role is a member of (itself included; a superuser is a member
#: of every role), with what it may do. CREATEROLE counts before PostgreSQL 16, where
#: it let a role grant itself the predefined roles above.
_ROLES_QUERY = b"""
SELECT r.rolname, r.rolname = session_user, r.rolsuper, r.rolreplication, r.rolbypassrls,
       r.rolcreaterole AND pg_catalog.current_setting('server_version_num')::int < 160000
FROM pg_catalog.pg_roles r
WHERE pg_catalog.pg_has_role(session_user, r.oid, 'MEMBER')
ORDER BY r.rolname = session_user DESC, r.rolname
"""

#: how long the start-up check waits for the database before leaving it for later
CHECK_CONNECT_TIMEOUT_S = 5


class PrivilegedRoleError(Exception):
    """The login role may do more than raw SQL should, and the opt-in is not set."""


def role_problems(rows: list[tuple[Any, ...]]) -> list[str]:
    """What is wrong with a login role, from the rows of `_ROLES_QUERY`; [] when nothing.

    A superuser login role is one problem (it is a member of every role).
    """
    problems = []
    for name, own, superuser, replication, bypassrls, createrole in rows:
        whose = "it" if own else f"its role {name}"
        if superuser:
            if own:
                return ["is a superuser"]
            problems.append(f"may SET ROLE to the superuser {name}")
        if name in SERVER_ROLES:
            problems.append(f"is a member of {name}")
        if replication:
            problems.append(f"{whose} has REPLICATION")
        if bypassrls:
            problems.append(f"{whose} has BYPASSRLS")
        if createrole:
            problems.append(f"{whose} has CREATEROLE (before PostgreSQL 16: a way to the above)")
    return problems


def _message(login: str, problems: list[str], settings: Settings) -> str:
    return (
        f"the database role {login!r} that pgqg logs in as {'; '.join(problems)}, and raw SQL "
        f"is on (raw_sql = {settings.raw_sql}): a request could read or write the server's "
        "files, run programs on it or signal other sessions, which READ ONLY does not stop. "
        "Log in as a least-privileged role instead (docs/security.md gives the SQL to "
        "create one, authenticator style), or accept this with allow_privileged_role "
        "(PGQG_ALLOW_PRIVILEGED_ROLE=true, --allow-privileged-role). Named queries alone "
        "(PGQG_RAW_SQL=off) run under any role."
    )


async def _read_problems(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """`role_problems` of `conn`'s login role.

    Raises:
        psycopg.Error: the query failed.
    """
    rows = await (await conn.execute(_ROLES_QUERY, prepare=False)).fetchall()
    return role_problems(rows)


async def check_login_role(dsn: str, settings: Settings) -> None:
    """Read what the login role of `dsn` may do, when raw SQL is on.

    With ``allow_privileged_role`` a privileged role is logged as one warning. A
    database that cannot be reached now is logged and left to `connection_check`:
    the gateway starts without its database (`/readyz` says when it is there).

    Raises:
        PrivilegedRoleError: the role is privileged, and the opt-in is not set.
    """
    if settings.raw_sql == "off":
        return
    try:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=CHECK_CONNECT_TIMEOUT_S, application_name="pgqg"
        ) as conn:
            login = conn.info.user
            problems = await _read_problems(conn)
    except psycopg.Error as exc:
        _log.warning("could not read the login role's privileges at start-up: %s", exc)
        return
    if not problems:
        return
    if not settings.allow_privileged_role:
        raise PrivilegedRoleError(_message(login, problems, settings))
    _log.warning(
        "raw SQL runs as the database role %r, which %s (allow_privileged_role is set): "
        "READ ONLY does not keep a request from the server's files, programs or sessions",
        login,
        "; ".join(problems),
    )


def connection_check(
    settings: Settings,
) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None:
    """The pool's check of each new connection, so that a login role made privileged
    after start-up (or first reached after it) serves no raw SQL; None when there is
    nothing to check (raw SQL off, or ``allow_privileged_role``)."""
    if settings.raw_sql == "off" or settings.allow_privileged_role:
        return None

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        problems = await _read_problems(conn)
        if problems:
            refusal = PrivilegedRoleError(_message(conn.info.user, problems, settings))
            await conn.close()  # the pool drops it: closed, it warns of nothing
            raise refusal

    return check
