"""Shared fixtures.

The test database (DESIGN §7): tests run against a real PostgreSQL, never a mock.
`database_dsn` (session-scoped) finds one, in this order:

1. ``PGQG_TEST_DSN`` if set, used as is;
2. else a throwaway ``postgres:16-alpine`` container through `testcontainers`, but only
   if a Docker engine answers a ping within ~2 s (no engine: falls through at once,
   silently; `testcontainers` is only imported on this branch);
3. else a throwaway embedded cluster (`gateway.embedded._postgres.EmbeddedPostgres`, ``fast=True``)
   in a temporary directory, started for the session and stopped at its end.

So the suite passes on a machine with nothing but Python, and no database test is
skipped for want of a database. `database_dsn` is a superuser, for setting up and
checking; the gateways under test log in as a least-privileged role
(``pgqg_test_authenticator``, sessions as ``pgqg_test_anon``), as users' do: see
`gateway_login` and `support.as_gateway`. `embedded_factory` makes extra embedded clusters that
a test owns (restart and crash tests); they are all stopped at the test's teardown.

Embedded clusters live under `embedded_root`, a session directory outside pytest's
basetemp: as root the server runs as another user, which must be able to traverse
the parent directories, and every new pytest session on the machine resets
``/tmp/pytest-of-<user>`` to mode 0700.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import psycopg
import psycopg.conninfo
import pytest
from aiohttp.test_utils import TestClient, TestServer
from faultproxy import FaultProxy
from support import (
    GatewayClient,
    GatewayLogin,
    as_gateway,
    server_of,
    use_gateway_login,
    wait_until_ready,
)

from gateway import Codec, create_app, load_settings
from gateway._build import stale_build
from gateway._settings import DEFAULT_SQL_DIR as SQL_DIR
from gateway.embedded._postgres import EmbeddedPostgres
from gateway.embedded._roles import create_gateway_roles, role_exists, set_password
from gateway.engine._pipeline import Session
from gateway.engine._pool import session_options

#: fixtures of a headless Chromium (tests/browser.py), for the tests that ask for one
pytest_plugins = ("browser",)

DSN_ENV = "PGQG_TEST_DSN"
CONTAINER_IMAGE = "postgres:16-alpine"
DOCKER_PING_TIMEOUT = 2.0


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test old code: an edited module compiled before the edit runs as it was."""
    if stale := stale_build():
        pytest.exit(stale, returncode=2)


def docker_answers(timeout: float = DOCKER_PING_TIMEOUT) -> bool:
    """True when a Docker engine answers a ping within `timeout`. Never raises or warns."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False  # no engine configured and none at the default socket
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the docker client may leak a socket on failure
        try:
            import docker

            client = docker.from_env(timeout=max(1, round(timeout)))
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()  # collect a leaked socket here, where its ResourceWarning is ignored


@contextlib.contextmanager
def container_database() -> Iterator[str]:
    """A throwaway PostgreSQL container; yields its DSN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers before the "community" package split
            from testcontainers.postgres import PostgresContainer
        container = PostgresContainer(CONTAINER_IMAGE, driver=None)
        container.start()
    try:
        yield str(container.get_connection_url())
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            container.stop()


@contextlib.contextmanager
def embedded_database(data_dir: Path) -> Iterator[str]:
    """A throwaway embedded cluster in `data_dir`; yields its DSN."""
    with EmbeddedPostgres(data_dir, fast=True) as pg:
        yield pg.dsn


@contextlib.contextmanager
def find_database(embedded_root: Path) -> Iterator[str]:
    """The test database, in the order of the module docstring; yields its DSN."""
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        yield dsn
    elif docker_answers():
        with container_database() as dsn:
            yield dsn
    else:
        with embedded_database(embedded_root / "session") as dsn:
            yield dsn


@pytest.fixture(scope="session")
def embedded_root() -> Iterator[Path]:
    """A directory for this session's embedded clusters, removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="pgqg-pytest-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


TEST_LOGIN = "pgqg_test_authenticator"
TEST_REQUEST_ROLE = "pgqg_test_anon"


def gateway_login(dsn: str) -> GatewayLogin:
    """Make (or refresh) the tests' login role on the server of `dsn` (a superuser's).

    Authenticator style, as docs/security.md has it; its request role may read and
    write every table of every database (``pg_read_all_data``, ``pg_write_all_data``,
    PostgreSQL 14 and later), as the tests make tables everywhere, and nothing more.
    """
    password = uuid.uuid4().hex
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.info.server_version < 140000:
            raise RuntimeError("the tests' gateway login role needs PostgreSQL 14 or later")
        if role_exists(conn, TEST_LOGIN):
            set_password(conn, TEST_LOGIN, password)
        else:
            create_gateway_roles(
                conn, password=password, login=TEST_LOGIN, request_role=TEST_REQUEST_ROLE
            )
        conn.execute(f"GRANT pg_read_all_data, pg_write_all_data TO {TEST_REQUEST_ROLE}")
    return GatewayLogin(*server_of(dsn), TEST_LOGIN, password)


@pytest.fixture(scope="session")
def database_dsn(embedded_root: Path) -> Iterator[str]:
    """A libpq URI of a real PostgreSQL for the whole session (superuser on it).

    The tests' gateway login role is made on it first (`gateway_login`).
    """
    with find_database(embedded_root) as dsn:
        use_gateway_login(gateway_login(dsn))
        yield dsn


@pytest.fixture(scope="session")
def gateway_dsn(database_dsn: str) -> str:
    """`database_dsn` as the gateways under test log in: least-privileged."""
    return as_gateway(database_dsn)


@pytest.fixture
def embedded_dir(embedded_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh, empty directory of the test's own to hold embedded clusters."""
    return Path(tempfile.mkdtemp(prefix=f"{request.node.name[:30]}-", dir=embedded_root))


class EmbeddedFactory(Protocol):
    """Makes an `EmbeddedPostgres` (started unless ``start=False``) that the test owns."""

    def __call__(
        self,
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        fast: bool = True,
        start: bool = True,
    ) -> EmbeddedPostgres: ...


@pytest.fixture
def embedded_factory(embedded_dir: Path) -> Iterator[EmbeddedFactory]:
    """Extra embedded clusters, by default in fresh dirs under `embedded_dir`; all
    stopped at teardown. Pass `data_dir` to reuse a directory (a "later process" on the
    same data), ``start=False`` to get one not yet started."""
    made: list[EmbeddedPostgres] = []

    def make(
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        fast: bool = True,
        start: bool = True,
    ) -> EmbeddedPostgres:
        pg = EmbeddedPostgres(data_dir or embedded_dir / f"pg{len(made)}", port=port, fast=fast)
        made.append(pg)
        if start:
            pg.start()
        return pg

    yield make
    failures: list[BaseException] = []
    for pg in reversed(made):
        try:
            pg.stop()
        except Exception as exc:  # stop them all, then report
            failures.append(exc)
    if failures:
        raise failures[0]


ProxyFactory = Callable[[int], Awaitable[FaultProxy]]


@pytest.fixture
async def fault_proxy() -> AsyncIterator[ProxyFactory]:
    """Fault-injecting TCP proxies (tests/faultproxy.py) to a local port; all closed after."""
    made: list[FaultProxy] = []

    async def make(upstream_port: int) -> FaultProxy:
        proxy = await FaultProxy(upstream_port).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in reversed(made):
        await proxy.close()


# --------------------------------------------------------------------------------------
# Application and client fixtures follow below.


# --- the gateway under test ------------------------------------------------------------


@pytest.fixture
async def admin(database_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A direct autocommit connection, to set up and check what the gateway did."""
    conn = await psycopg.AsyncConnection.connect(database_dsn, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def table(admin: psycopg.AsyncConnection[Any]) -> AsyncIterator[str]:
    """A fresh table ``(id int primary key, v text)`` with a unique name, dropped after."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    try:
        yield name
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {name}")


ClientFactory = Callable[..., Awaitable[GatewayClient]]


@pytest.fixture
async def gateway_factory(database_dsn: str) -> AsyncIterator[ClientFactory]:
    """Start gateways on the test database with settings overrides; all closed after.

    Each logs in as the tests' least-privileged role (`support.as_gateway`), unless
    ``privileged=True``: then with `dsn` as given. Each waits until ``/readyz`` answers
    200 unless ``wait_ready=False``.
    """
    clients: list[GatewayClient] = []

    async def start(
        *,
        wait_ready: bool = True,
        dsn: str | None = None,
        privileged: bool = False,
        **overrides: Any,
    ) -> GatewayClient:
        overrides.setdefault("pool_size", 4)
        dsn = dsn or database_dsn
        settings = load_settings(dsn=dsn if privileged else as_gateway(dsn), **overrides)
        client = TestClient(TestServer(create_app(settings)))
        clients.append(client)  # closed after, also when its start fails
        await client.start_server()
        if wait_ready:
            await wait_until_ready(client)
        return client

    try:
        yield start
    finally:
        for client in reversed(clients):
            await client.close()


@pytest.fixture
async def client(gateway_factory: ClientFactory) -> GatewayClient:
    """A gateway in the default read-only raw SQL mode, 4 connections."""
    return await gateway_factory()


@pytest.fixture
async def rw_client(gateway_factory: ClientFactory) -> GatewayClient:
    """A gateway with ``raw_sql = read-write``."""
    return await gateway_factory(raw_sql="read-write")


@pytest.fixture(scope="session")
def demo_dsn(database_dsn: str) -> str:
    """A database holding the demo schema and seed (sql/), created once a session."""
    name = "pgqg_demo"
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = psycopg.conninfo.make_conninfo(database_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for file in ("schema.sql", "seed.sql"):
            conn.execute((SQL_DIR / file).read_text())
    return dsn


@pytest.fixture
async def demo_client(gateway_factory: ClientFactory, demo_dsn: str) -> GatewayClient:
    """A gateway on the demo database, default settings otherwise."""
    return await gateway_factory(dsn=demo_dsn)


@pytest.fixture
async def session(gateway_dsn: str) -> AsyncIterator[Session]:
    """A pipelined `Session` on a direct connection with the gateway's session options,
    logged in as the gateways under test are."""
    settings = load_settings(dsn=gateway_dsn)
    conn = await psycopg.AsyncConnection.connect(
        gateway_dsn, autocommit=True, options=session_options(settings)
    )
    sess = Session(conn, Codec(), statement_timeout_ms=settings.statement_timeout_ms)
    try:
        yield sess
    finally:
        sess.close()
        await conn.close()
