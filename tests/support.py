"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import psycopg
import psycopg.conninfo
import pytest
from aiohttp.test_utils import TestClient
from aiohttp.web import Application, Request
from prometheus_client.parser import text_string_to_metric_families

from gateway.catalog import NamedQuery, parse_queries

GatewayClient = TestClient[Request, Application]

START_TIMEOUT_S = 20.0
REPO = Path(__file__).resolve().parent.parent


# --- the role the tests' gateways log in as ----------------------------------------------


@dataclass(frozen=True)
class GatewayLogin:
    """The tests' least-privileged login role on the test server (conftest makes it)."""

    host: str
    port: str
    user: str
    password: str


_gateway_login: GatewayLogin | None = None


def server_of(dsn: str) -> tuple[str, str]:
    """The host and port `dsn` names (as written; the port 5432 when it names none)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return str(info.get("host") or ""), str(info.get("port") or "5432")


def use_gateway_login(login: GatewayLogin) -> None:
    """Called once a session by conftest, when the login role exists."""
    global _gateway_login
    _gateway_login = login


def as_gateway(dsn: str) -> str:
    """`dsn` logged in as the tests' least-privileged role, as a user's gateway would,
    when it names the session's test server (any database on it); other DSNs as given."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    login = _gateway_login
    host, port = server_of(dsn)
    if login is None or (host, port) != (login.host, login.port):
        return dsn
    user = urllib.parse.quote(login.user, safe="")
    password = urllib.parse.quote(login.password, safe="")
    where = f"[{host}]" if ":" in host else urllib.parse.quote(host, safe="")
    # without a dbname libpq takes the user's name: the original user's, here
    dbname = urllib.parse.quote(str(info.get("dbname") or info.get("user") or ""), safe="")
    rest = {
        k: str(v)
        for k, v in info.items()
        if k not in ("host", "port", "user", "password", "dbname")
    }
    query = f"?{urllib.parse.urlencode(rest)}" if rest else ""
    return f"postgresql://{user}:{password}@{where}:{port}/{dbname}{query}"


async def wait_until_ready(client: GatewayClient, timeout: float = 20.0) -> None:
    """Poll ``/readyz`` until 200; fails the test after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            resp = await client.get("/readyz")
            if resp.status == 200:
                return
            await asyncio.sleep(0.05)


async def get_stats(client: GatewayClient) -> Any:
    """``/v1/stats``, decoded."""
    return await (await client.get("/v1/stats")).json()


async def until_stats(
    client: GatewayClient, check: Callable[[Any], object], what: str, timeout: float = 30.0
) -> Any:
    """``/v1/stats`` once `check` holds for it; fails the test after `timeout` seconds,
    saying `what` was awaited."""
    try:
        async with asyncio.timeout(timeout):
            while not check(stats := await get_stats(client)):
                await asyncio.sleep(0.01)
            return stats
    except TimeoutError:
        pytest.fail(f"not within {timeout} s: {what}")


async def settled_stats(client: GatewayClient, timeout: float = 30.0) -> Any:
    """``/v1/stats`` once no job runs and none is queued; fails after `timeout` seconds.

    A job is answered as soon as its own results are read, while its connection
    may still be reading the end of the round trip (the ROLLBACK that closes a
    batch): for that moment the job still counts as running.
    """
    return await until_stats(
        client, lambda s: not s["running"] and not s["queue"]["depth"], "settled", timeout
    )


async def query(client: GatewayClient, sql: str, *params: Any, **options: Any) -> tuple[int, Any]:
    """POST /v1/query; returns (status, decoded JSON body)."""
    resp = await client.post("/v1/query", json={"sql": sql, "params": list(params), **options})
    return resp.status, await resp.json()


async def transaction(
    client: GatewayClient, *statements: tuple[str, list[Any]], **options: Any
) -> tuple[int, Any]:
    """POST /v1/transaction; returns (status, decoded JSON body)."""
    body = {"statements": [{"sql": s, "params": p} for s, p in statements], **options}
    resp = await client.post("/v1/transaction", json=body)
    return resp.status, await resp.json()


def parse_one(text: str) -> NamedQuery:
    """The one named query of a file's *text* (read as ``q.sql``)."""
    (named,) = parse_queries(text, "q.sql")
    return named


def query_with(params: str, sql: str) -> NamedQuery:
    """A query ``q`` declaring *params* (the text after ``-- params:``) for *sql*."""
    return parse_one(f"-- name: q\n-- params: {params}\n{sql}\n")


def marker() -> str:
    """A unique string to find one test's query in pg_stat_activity."""
    return "pgqg-" + uuid.uuid4().hex[:12]


async def running(admin: psycopg.AsyncConnection[Any], mark: str) -> int:
    """How many backends are running a statement whose text holds `mark`."""
    cur = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
        " AND pid <> pg_backend_pid()",
        (f"%{mark}%",),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


#: how long a cancelled query may take to go, at the most: generous, for a loaded
#: machine (the queries cancelled in tests would otherwise run for minutes)
GONE_S = 30.0


async def gone_within(
    admin: psycopg.AsyncConnection[Any], mark: str, limit: float = GONE_S
) -> float:
    """Seconds until no backend runs `mark`'s statement; fails after `limit`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await running(admin, mark):
        assert loop.time() - started < limit, f"{mark} still running after {limit} s"
        await asyncio.sleep(0.02)
    return loop.time() - started


#: the tests' token secret (PGQG_JWT_SECRET): 32 bytes and more
JWT_SECRET = "pgqg-tests-only-secret-0123456789abcdef"


def sign(claims: dict[str, Any], *, lifetime_s: float = 300, **kwargs: Any) -> str:
    """A token of `claims` (``exp`` `lifetime_s` from now unless given), HS256 with
    `JWT_SECRET` unless `kwargs` (PyJWT's: key, algorithm, headers) say otherwise."""
    payload = {"exp": int(time.time() + lifetime_s), **claims}
    kwargs.setdefault("key", JWT_SECRET)
    kwargs.setdefault("algorithm", "HS256")
    return jwt.encode(payload, **kwargs)


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header that carries `token`."""
    return {"Authorization": f"Bearer {token}"}


def assert_error(body: Any, code: str, sqlstate: str | None = None) -> None:
    """The body has DESIGN §3's error shape with this code (and SQLSTATE)."""
    error = body["error"]
    assert set(error) == {"code", "message", "sqlstate", "detail", "hint", "position"}
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if sqlstate is not None:
        assert error["sqlstate"] == sqlstate, error


def as_made_before_login_roles(pg: Any) -> None:
    """Make the running `EmbeddedPostgres` look like a data directory made before the
    gateway had a login role of its own: no such roles, no password file for them."""
    from gateway.embedded._datadir import GATEWAY_PASSWORD_FILE
    from gateway.embedded._roles import LOGIN_ROLE, REQUEST_ROLE

    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {LOGIN_ROLE}, {REQUEST_ROLE}")
        conn.execute(f"DROP ROLE {LOGIN_ROLE}, {REQUEST_ROLE}")
    (pg.data_dir / GATEWAY_PASSWORD_FILE).unlink()


# --- a gateway in a process of its own (``pgqg serve``) ---------------------------------


async def waiting_for_lock(admin: psycopg.AsyncConnection[Any], key: int) -> None:
    """Until a backend waits for advisory lock `key` (bounded generously)."""
    sql = "select count(*) from pg_locks where locktype = 'advisory' and objid = %s and not granted"
    async with asyncio.timeout(30):
        while not (await (await admin.execute(sql, [key])).fetchone() or [0])[0]:
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def connection_held(
    client: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> AsyncIterator[asyncio.Future[tuple[int, Any]]]:
    """A request that holds one of the gateway's connections until the block ends,
    waiting on an advisory lock `admin` holds; yields the request, answered after.

    Held by a lock, not a timed sleep: a stall of a loaded machine cannot free
    the connection before the test is done with it.
    """
    key = 917_000 + os.getpid() % 1000
    await admin.execute("select pg_advisory_lock(%s)", [key])
    try:
        holder = asyncio.ensure_future(
            query(client, "select pg_advisory_xact_lock_shared($1::bigint)::text", key)
        )
        await waiting_for_lock(admin, key)
        yield holder
        assert not holder.done(), holder.result()  # it held the connection throughout
    finally:
        await admin.execute("select pg_advisory_unlock(%s)", [key])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Served:
    """A ``pgqg serve`` subprocess on a free port; `env` adds ``PGQG_*`` settings.

    It logs in as the tests' least-privileged role (`as_gateway`), unless `privileged`:
    then with `dsn` as given. Its output goes to a temporary file (a pipe nobody reads
    could fill and block it), shown by `output` once it exited.
    """

    def __init__(
        self,
        dsn: str,
        *args: str,
        env: dict[str, str] | None = None,
        privileged: bool = False,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        dsn = dsn if privileged else as_gateway(dsn)
        cmd = [sys.executable, "-m", "gateway", "serve", "--dsn", dsn, "--port", str(self.port)]
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, "PGQG_LOG_LEVEL": "warning", **(env or {})},
        )

    async def ready(self, http: aiohttp.ClientSession) -> None:
        """Poll ``/readyz`` until 200; fails after `START_TIMEOUT_S`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.output()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(self.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            assert loop.time() < deadline, "the gateway did not get ready"
            await asyncio.sleep(0.05)

    def ready_sync(self) -> None:
        """`ready`, for tests without an event loop."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.output()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp,
            ):
                if resp.status == 200:
                    return
            assert time.monotonic() < deadline, "the gateway did not get ready"
            time.sleep(0.05)

    async def exit_code(self, timeout: float) -> int:
        """Wait for the process to exit; fails after `timeout` seconds."""
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> None:
        """Kill the process if it still runs (harmless twice)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# --- /metrics, parsed by prometheus-client ------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: GatewayClient) -> Samples:
    """Every sample of ``/metrics``, parsed by prometheus-client, by (name, labels)."""
    resp = await client.get("/metrics")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is not there (a counter not yet moved)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def wait_for_metric(
    client: GatewayClient, name: str, at_least: float, timeout: float = 20.0, **labels: str
) -> Samples:
    """Scrape until the sample reaches `at_least`; fails after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            samples = await scrape(client)
            if value(samples, name, **labels) >= at_least:
                return samples
            await asyncio.sleep(0.05)
