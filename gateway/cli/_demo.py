"""Loading the demo bookshop (``sql/schema.sql`` then ``sql/seed.sql``) into a database.

Schema, seed and a marker row go in one transaction: either the demo is there and
marked, or nothing changed. The marker (table ``pgqg.demo``) is what makes
``pgqg serve`` on an existing data directory skip the seed instead of applying it a
second time; it survives restarts because it lives in the database itself, and it
cannot claim a load that was rolled back. A transaction-scoped advisory lock makes two
loaders of the same database take turns, so the second one sees the first one's marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from .._errors import DiagnosticError

__all__ = ["DEMO_FILES", "DemoError", "DemoState", "demo_state", "load_demo"]

#: applied in this order, from the settings' ``sql_dir``
DEMO_FILES = ("schema.sql", "seed.sql")
_LOCK_KEY = 0x70677167_64656D6F  # "pgqg" "demo": one advisory lock for every loader

_MARKER_DDL = """
CREATE SCHEMA IF NOT EXISTS pgqg;
COMMENT ON SCHEMA pgqg IS 'pgqg bookkeeping; pgqg.demo marks a database holding the demo';
CREATE TABLE IF NOT EXISTS pgqg.demo (
    loaded_at timestamptz NOT NULL DEFAULT now(),
    files     text[]      NOT NULL
)"""


class DemoError(DiagnosticError):
    """The demo could not be loaded: a file is missing, or PostgreSQL refused it.

    `sqlstate`, `detail` and `hint` are PostgreSQL's when the database refused it.
    """


@dataclass(frozen=True, slots=True)
class DemoState:
    """Whether the demo is in the database, and when it was loaded."""

    loaded: bool
    loaded_at: datetime | None = None


def demo_state(conn: psycopg.Connection[Any]) -> DemoState:
    """Read the marker on an open connection (no transaction is left open by it).

    Raises:
        psycopg.Error: the query failed.
    """
    row = conn.execute("SELECT to_regclass('pgqg.demo') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return DemoState(False)
    found = conn.execute("SELECT max(loaded_at) FROM pgqg.demo").fetchone()
    loaded_at = found[0] if found else None
    return DemoState(loaded_at is not None, loaded_at)


def load_demo(dsn: str, sql_dir: Path) -> bool:
    """Apply the demo's schema and seed to the database at `dsn`, once.

    Returns True when it was loaded now, False when the marker shows it was loaded
    before (then nothing is changed).

    Raises:
        DemoError: a file is missing or unreadable, the connection failed, or
            PostgreSQL refused a statement (for instance because tables of the same
            names exist already); nothing was changed in the database.
    """
    scripts = []
    for name in DEMO_FILES:
        path = sql_dir / name
        try:
            scripts.append(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DemoError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        with (
            psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn,
            conn.transaction(),
        ):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
            if demo_state(conn).loaded:
                return False
            for script in scripts:
                # no parameters: psycopg sends each file whole, over the simple
                # query protocol, which runs its statements in order
                conn.execute(script.encode())
            conn.execute(_MARKER_DDL.encode())
            conn.execute("INSERT INTO pgqg.demo (files) VALUES (%s)", [list(DEMO_FILES)])
    except psycopg.Error as exc:
        diag = exc.diag
        raise DemoError(
            diag.message_primary or str(exc).strip(),
            sqlstate=diag.sqlstate,
            detail=diag.message_detail,
            hint=diag.message_hint,
        ) from exc
    return True
