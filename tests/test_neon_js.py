"""The unmodified Neon serverless driver and drizzle-orm against POST /sql, under node's
own test runner (gateway/web/_neon.py; tests/test_neon.py pins the wire format).

``tests/js`` holds the JavaScript tests with their ``package.json`` and
``package-lock.json``. This test installs them with ``npm ci`` when ``node_modules``
is missing or does not hold what the lock file says, starts three gateways on the
test database (raw SQL read-write, the default read-only, and one that verifies
tokens, for the driver's ``authToken``), makes the tables the JavaScript tests use,
and runs ``node --test``; node's report is the failure message. It needs node 20 or
newer and npm on the PATH, and the npm registry the first time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import JWT_SECRET, REPO, sign
from test_identity import READER, request_roles  # noqa: F401 - a fixture, used by name

JS_DIR = REPO / "tests" / "js"
TEST_FILES = ("neon.test.mjs", "drizzle.test.mjs")
NPM_TIMEOUT_S = 600.0
NODE_TIMEOUT_S = 300.0

pytestmark = pytest.mark.slow


def installed_as_locked(js_dir: Path = JS_DIR) -> bool:
    """Whether ``node_modules`` holds every package of the lock file at its version
    (npm keeps what it installed in ``node_modules/.package-lock.json``)."""
    installed = js_dir / "node_modules" / ".package-lock.json"
    if not installed.is_file():
        return False
    locked = json.loads((js_dir / "package-lock.json").read_text())["packages"]
    have = json.loads(installed.read_text())["packages"]
    return all(
        have.get(path, {}).get("version") == entry.get("version")
        for path, entry in locked.items()
        if path and not entry.get("optional")
    )


async def run(*args: str, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command in `JS_DIR`; its exit status and its output (stdout and stderr)."""
    program = shutil.which(args[0])
    assert program is not None, f"{args[0]} is not on the PATH: the Neon driver tests need node 20+"
    proc = await asyncio.create_subprocess_exec(
        program,
        *args[1:],
        cwd=JS_DIR,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture
async def tables(admin: psycopg.AsyncConnection[Any]) -> AsyncIterator[dict[str, str]]:
    """The JavaScript tests' tables, made by the superuser (a gateway's role may not
    create tables) and dropped after."""
    suffix = uuid.uuid4().hex[:10]
    made = {"PGQG_TABLE": f"neon_js_{suffix}", "PGQG_DRIZZLE_TABLE": f"neon_books_{suffix}"}
    await admin.execute(f"CREATE TABLE {made['PGQG_TABLE']} (id int PRIMARY KEY, v text)")
    await admin.execute(
        f"CREATE TABLE {made['PGQG_DRIZZLE_TABLE']} (id int PRIMARY KEY, name text NOT NULL,"
        " price numeric(10,2), tags text[], meta jsonb, created timestamptz, big int8)"
    )
    try:
        yield made
    finally:
        for name in made.values():
            await admin.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.mark.timeout(NPM_TIMEOUT_S + NODE_TIMEOUT_S + 60)
@pytest.mark.usefixtures("request_roles")
async def test_the_driver_and_drizzle_under_node(
    gateway_factory: Any, tables: dict[str, str]
) -> None:
    status, version = await run("node", "--version", timeout=30)
    assert status == 0 and int(version.strip().lstrip("v").split(".")[0]) >= 20, version
    if not installed_as_locked():
        status, out = await run("npm", "ci", "--no-audit", "--no-fund", timeout=NPM_TIMEOUT_S)
        assert status == 0, f"npm ci failed:\n{out}"
    read_write = await gateway_factory(raw_sql="read-write")
    read_only = await gateway_factory()
    with_tokens = await gateway_factory(jwt_secret=JWT_SECRET)
    env = {
        "PGQG_URL": str(read_write.make_url("")),
        "PGQG_READ_ONLY_URL": str(read_only.make_url("")),
        "PGQG_TOKENS_URL": str(with_tokens.make_url("")),
        "PGQG_READER_ROLE": READER,
        "PGQG_READER_TOKEN": sign({"role": READER, "sub": "ana"}, lifetime_s=NODE_TIMEOUT_S * 2),
        **tables,
    }
    status, out = await run("node", "--test", *TEST_FILES, timeout=NODE_TIMEOUT_S, env=env)
    assert status == 0, f"node --test failed:\n{out}"
    assert "# fail 0" in out, out
