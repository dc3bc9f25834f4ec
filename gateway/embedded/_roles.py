"""The roles the gateway's requests run as, authenticator style (as PostgREST's).

* ``pgqg_authenticator``: the pool's login role. Not a superuser, NOINHERIT (it holds no
  privilege of its own), owns nothing; its sessions start as the request role
  (``ALTER ROLE … SET role``), and ``RESET ROLE`` returns to it.
* ``pgqg_anon``: what a request may do: ``USAGE`` on schema ``public``, ``SELECT``,
  ``INSERT``, ``UPDATE``, ``DELETE`` on its tables and ``USAGE``, ``SELECT`` on its
  sequences, the ones there now and, through default privileges, those the superuser
  creates there later (the demo bookshop). Nothing else beyond what PostgreSQL grants
  ``PUBLIC``.

The superuser only administers: it creates the cluster, these roles and the demo.
"""

from __future__ import annotations

from typing import Any

from psycopg import Connection, sql

__all__ = [
    "LOGIN_ROLE",
    "REQUEST_ROLE",
    "ROLES_SQL",
    "create_gateway_roles",
    "role_exists",
    "roles_sql",
    "set_password",
]

LOGIN_ROLE = "pgqg_authenticator"
REQUEST_ROLE = "pgqg_anon"


def role_exists(conn: Connection[Any], name: str) -> bool:
    """Whether role `name` exists in the cluster.

    Raises:
        psycopg.Error: the query failed.
    """
    return (
        conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", [name]).fetchone()
        is not None
    )


#: the roles, with their names, password and schema to fill in: `create_gateway_roles`
#: runs it; docker/postgres-initdb and docs/security.md show it for pgqg_authenticator
#: (tests/test_compose.py checks that they say the same)
ROLES_SQL = """\
CREATE ROLE {web} NOLOGIN;
CREATE ROLE {login} LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE
    NOREPLICATION NOBYPASSRLS PASSWORD {password};
GRANT {web} TO {login};
ALTER ROLE {login} SET role = {web_name};
GRANT USAGE ON SCHEMA {schema} TO {web};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {web};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {web};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema}
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {web};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema}
    GRANT USAGE, SELECT ON SEQUENCES TO {web};
"""


def roles_sql(
    *,
    password: str,
    login: str = LOGIN_ROLE,
    request_role: str = REQUEST_ROLE,
    schema: str = "public",
) -> sql.Composed:
    """`ROLES_SQL` for these names, `password` and `schema`."""
    return sql.SQL(ROLES_SQL).format(
        login=sql.Identifier(login),
        web=sql.Identifier(request_role),
        web_name=sql.Literal(request_role),
        password=sql.Literal(password),
        schema=sql.Identifier(schema),
    )


def create_gateway_roles(
    conn: Connection[Any],
    *,
    password: str,
    login: str = LOGIN_ROLE,
    request_role: str = REQUEST_ROLE,
    schema: str = "public",
) -> None:
    """Run `roles_sql` in one transaction on `conn`, whose user (a superuser, or the
    owner of the schema's tables) is the one whose future tables the request role gets.

    Raises:
        psycopg.Error: PostgreSQL refused a statement (a role exists already, ...);
            nothing was changed.
    """
    statements = roles_sql(password=password, login=login, request_role=request_role, schema=schema)
    with conn.transaction():
        # no parameters: sent whole over the simple query protocol, run in order
        conn.execute(statements)


def set_password(conn: Connection[Any], role: str, password: str) -> None:
    """Give `role` a new password (stored as a SCRAM verifier by the server).

    Raises:
        psycopg.Error: PostgreSQL refused it.
    """
    conn.execute(
        sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
    )
