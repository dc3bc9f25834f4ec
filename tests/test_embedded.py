"""`gateway.embedded._postgres.EmbeddedPostgres` against real clusters, and the test database."""

from __future__ import annotations

import gc
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from conftest import EmbeddedFactory
from support import as_made_before_login_roles

from gateway.embedded import EmbeddedError, EmbeddedPostgres, server_processes
from gateway.embedded._datadir import GATEWAY_PASSWORD_FILE, LOG_FILE, PASSWORD_FILE, PORT_FILE
from gateway.embedded._roles import LOGIN_ROLE, REQUEST_ROLE


def postgres_cmdline_pids(data_dir: Path) -> list[int]:
    """Live (non-zombie) ``postgres`` processes with `data_dir` on their command line."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        info = proc.info
        if info["name"] != "postgres" or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if str(data_dir) in " ".join(info["cmdline"] or ()):
            found.append(proc.pid)
    return found


def family(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def all_gone(procs: list[psutil.Process]) -> bool:
    """Exited (a zombie, not yet reaped by init, has exited too)."""
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def assert_no_server(pg: EmbeddedPostgres) -> None:
    assert not pg.is_running()
    assert pg.pid is None
    assert postgres_cmdline_pids(pg.data_dir) == []
    assert server_processes(pg.data_dir) == []


def query_one(dsn: str, sql: str) -> tuple[object, ...]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return tuple(row)


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.fixture(scope="module")
def shared(embedded_root: Path) -> Iterator[EmbeddedPostgres]:
    """One running cluster for the tests that only look at it."""
    with EmbeddedPostgres(embedded_root / "shared", fast=True) as pg:
        yield pg


# ------------------------------------------------------------------ a running cluster


def test_fresh_cluster_takes_its_password_over_tcp(shared: EmbeddedPostgres) -> None:
    assert shared.initialized_now
    assert shared.dsn == f"postgresql://postgres:{shared.password}@127.0.0.1:{shared.port}/postgres"
    user, addr, port, ssl, scram = query_one(
        shared.dsn,
        "SELECT current_user, host(inet_server_addr()), inet_server_port(), "
        "  (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), "
        "  (SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'postgres')",
    )
    assert (user, addr, port, scram) == ("postgres", "127.0.0.1", shared.port, True)
    assert ssl is False


def test_wrong_or_missing_password_is_refused(shared: EmbeddedPostgres, tmp_path: Path) -> None:
    no_passfile = tmp_path / "no-pgpass"
    for password in ("wrong", ""):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(
                host="127.0.0.1",
                port=shared.port,
                user="postgres",
                dbname="postgres",
                password=password,
                passfile=str(no_passfile),
                connect_timeout=10,
            ).close()
        message = str(info.value)
        assert "password authentication failed" in message or "no password" in message


def test_pg_hba_is_scram_on_tcp_and_trust_on_the_socket(shared: EmbeddedPostgres) -> None:
    assert shared.socket_dir == shared.data_dir  # the tmp path is short enough
    with psycopg.connect(
        host=str(shared.socket_dir), port=shared.port, user="postgres", dbname="postgres"
    ) as conn:  # no password: trust
        rules = conn.execute(
            "SELECT type, auth_method FROM pg_hba_file_rules WHERE error IS NULL"
        ).fetchall()
    assert rules
    assert {method for kind, method in rules if kind == "local"} == {"trust"}
    assert {method for kind, method in rules if kind == "host"} == {"scram-sha-256"}


def test_server_settings(shared: EmbeddedPostgres) -> None:
    row = query_one(
        shared.dsn,
        "SELECT current_setting('max_connections'), current_setting('listen_addresses'), "
        "  current_setting('fsync'), current_setting('synchronous_commit'), "
        "  current_setting('full_page_writes'), current_setting('server_encoding'), "
        "  upper('é'), 'b' < 'B'",
    )
    assert row == ("200", "127.0.0.1", "off", "off", "off", "UTF8", "É", False)


def test_private_files(shared: EmbeddedPostgres) -> None:
    password_file = shared.data_dir / PASSWORD_FILE
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password_file.read_text().strip() == shared.password
    assert (shared.data_dir / PORT_FILE).read_text().strip() == str(shared.port)
    assert (
        "database system is ready to accept connections" in (shared.data_dir / LOG_FILE).read_text()
    )


def test_start_is_idempotent(shared: EmbeddedPostgres) -> None:
    pid = shared.pid
    assert pid is not None
    shared.start()
    assert shared.pid == pid
    assert shared.initialized_now  # a no-op start does not change it


def test_a_second_object_is_refused_while_the_first_runs(
    shared: EmbeddedPostgres,
) -> None:
    other = EmbeddedPostgres(shared.data_dir)
    with pytest.raises(EmbeddedError, match=rf"\(pid {shared.pid}\) already runs"):
        other.start()
    assert not other.is_running()
    other.stop()  # harmless, and must not touch the first one's server
    assert shared.is_running()
    assert query_one(shared.dsn, "SELECT 1") == (1,)


def test_database_dsn_fixture_connects(database_dsn: str) -> None:
    version, one = query_one(database_dsn, "SELECT current_setting('server_version_num')::int, 1")
    assert isinstance(version, int)
    assert version >= 120000
    assert one == 1


# ------------------------------------------------------------------ lifecycles


def test_stop_restart_reuses_data_and_port(
    embedded_factory: EmbeddedFactory, embedded_dir: Path
) -> None:
    pg = embedded_factory(embedded_dir / "does" / "not" / "exist" / "yet")
    assert pg.initialized_now
    port, dsn = pg.port, pg.dsn
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (42)")
    assert pg.pid is not None
    procs = family(pg.pid)
    assert len(procs) > 3  # postmaster, checkpointer, walwriter, ...
    assert postgres_cmdline_pids(pg.data_dir) == [pg.pid]
    # found by working directory: the postmaster and its children (the backend of the
    # connection just closed may be exiting, so it may be missing)
    seen = set(server_processes(pg.data_dir))
    assert pg.pid in seen
    assert len(seen) > 3
    assert seen <= {p.pid for p in procs}

    pg.stop()
    assert all_gone(procs)
    assert_no_server(pg)
    assert not (pg.data_dir / "postmaster.pid").exists()
    pg.stop()  # harmless when already stopped
    pg.kill()  # so is kill

    pg.start()
    assert not pg.initialized_now
    assert (pg.port, pg.dsn) == (port, dsn)
    assert query_one(dsn, "SELECT x FROM t") == (42,)


def test_kill_then_start_recovers(embedded_factory: EmbeddedFactory, embedded_dir: Path) -> None:
    data_dir = embedded_dir / "empty"
    data_dir.mkdir()  # an existing, empty directory is fine for initdb
    pg = embedded_factory(data_dir)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")  # the cluster is fast=True
        conn.execute("CREATE TABLE t AS SELECT 7 AS x")
    assert pg.pid is not None
    procs = family(pg.pid)

    pg.kill()
    assert all_gone(procs)
    assert_no_server(pg)
    assert (data_dir / "postmaster.pid").exists()  # stale

    pg.start()
    assert not pg.initialized_now
    assert pg.pid not in {p.pid for p in procs}
    assert query_one(pg.dsn, "SELECT x FROM t") == (7,)
    assert "automatic recovery in progress" in (data_dir / LOG_FILE).read_text()


def test_a_crashed_postmaster_is_recovered_by_a_later_object(
    embedded_factory: EmbeddedFactory,
) -> None:
    """Only the postmaster dies, as in a real crash: its children exit on their own."""
    first = embedded_factory()
    pid = first.pid
    assert pid is not None
    procs = family(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while first.is_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not first.is_running()
    later = embedded_factory(first.data_dir)  # orphans, zombie and stale pid file: handled
    assert all_gone(procs)
    assert later.dsn == first.dsn
    assert query_one(later.dsn, "SELECT 1") == (1,)


def test_a_later_object_reuses_data_port_and_password(
    embedded_factory: EmbeddedFactory,
) -> None:
    first = embedded_factory()
    first.stop()
    later = embedded_factory(first.data_dir)
    assert not later.initialized_now
    assert later.dsn == first.dsn
    assert query_one(later.dsn, "SELECT 1") == (1,)


def test_a_taken_remembered_port_falls_back_to_a_free_one(
    embedded_factory: EmbeddedFactory,
) -> None:
    first = embedded_factory()
    first.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first.port))
        squatter.listen()
        later = embedded_factory(first.data_dir)
        assert later.port != first.port
        assert query_one(later.dsn, "SELECT inet_server_port()") == (later.port,)
    assert (later.data_dir / PORT_FILE).read_text().strip() == str(later.port)


def test_a_taken_explicit_port_fails_with_the_log_tail(
    embedded_factory: EmbeddedFactory,
) -> None:
    with listening_socket() as squatter:
        port = squatter.getsockname()[1]
        pg = embedded_factory(port=port, start=False)
        with pytest.raises(EmbeddedError) as info:
            pg.start()
    message = str(info.value)
    assert "did not start" in message
    assert "Address already in use" in message  # from the server log
    assert_no_server(pg)


def test_a_lost_password_file_gets_a_new_password(embedded_factory: EmbeddedFactory) -> None:
    first = embedded_factory()
    old = first.password
    first.stop()
    (first.data_dir / PASSWORD_FILE).unlink()
    later = embedded_factory(first.data_dir)
    assert later.password != old
    assert query_one(later.dsn, "SELECT 1") == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(first.dsn).close()


def test_long_data_dir_gets_a_short_socket_dir(embedded_dir: Path) -> None:
    data_dir = embedded_dir / ("d" * 60) / ("e" * 60)
    with EmbeddedPostgres(data_dir, fast=True) as pg:
        socket_dir = pg.socket_dir
        assert socket_dir is not None
        assert socket_dir != data_dir
        assert len(str(socket_dir / f".s.PGSQL.{pg.port}")) <= 107
        with psycopg.connect(
            host=str(socket_dir), port=pg.port, user="postgres", dbname="postgres"
        ) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pid = pg.pid
        assert pid is not None
        procs = family(pid)
    assert all_gone(procs)  # __exit__ stopped it
    assert_no_server(pg)
    assert not socket_dir.exists()


def test_a_dropped_object_shuts_its_server_down(embedded_dir: Path) -> None:
    pg = EmbeddedPostgres(embedded_dir / "pg", fast=True)
    pg.start()
    data_dir, pid = pg.data_dir, pg.pid
    assert pid is not None
    procs = family(pid)
    del pg
    gc.collect()
    deadline = time.monotonic() + 10
    while not all_gone(procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all_gone(procs)
    assert server_processes(data_dir) == []


# ------------------------------------------------------------------ no cluster needed


def test_a_non_empty_directory_is_not_initialized(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    pg = EmbeddedPostgres(tmp_path)
    with pytest.raises(EmbeddedError, match="neither empty nor a PostgreSQL cluster"):
        pg.start()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert not pg.is_running()


def test_a_file_is_not_a_data_directory(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(EmbeddedError, match="not a directory"):
        EmbeddedPostgres(path).start()


def test_no_dsn_before_initdb(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "new", port=54329)
    assert pg.port == 54329
    assert pg.pid is None
    assert not pg.initialized_now
    with pytest.raises(EmbeddedError, match="call start"):
        _ = pg.dsn


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        EmbeddedPostgres(tmp_path, port=70000)
    with pytest.raises(ValueError, match="stop mode"):
        EmbeddedPostgres(tmp_path).stop(mode="gently")


# ------------------------------------------------------------------ the gateway's login role


def test_a_new_cluster_has_a_least_privileged_login_role(shared: EmbeddedPostgres) -> None:
    assert not shared.upgraded_now
    mode = stat.S_IMODE((shared.data_dir / GATEWAY_PASSWORD_FILE).stat().st_mode)
    assert mode == 0o600
    with psycopg.connect(shared.dsn) as conn:
        roles = conn.execute(
            "SELECT rolname, rolsuper, rolinherit, rolcanlogin, rolcreaterole, rolcreatedb, "
            "  rolreplication, rolbypassrls, "
            "  array(SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid "
            "        WHERE m.member = r.oid), "
            "  (SELECT count(*) FROM pg_class WHERE relowner = r.oid) "
            "FROM pg_roles r WHERE rolname IN (%s, %s) ORDER BY rolname",
            [LOGIN_ROLE, REQUEST_ROLE],
        ).fetchall()
    assert roles == [
        (REQUEST_ROLE, False, True, False, False, False, False, False, [], 0),
        (LOGIN_ROLE, False, False, True, False, False, False, False, [REQUEST_ROLE], 0),
    ]
    user, session, probes = query_one(
        shared.gateway_dsn,
        "SELECT current_user, session_user, "
        "  has_function_privilege('pg_read_file(text)', 'EXECUTE')",
    )
    assert (user, session, probes) == (REQUEST_ROLE, LOGIN_ROLE, False)


def test_the_request_role_reads_and_writes_the_superusers_tables(
    embedded_factory: EmbeddedFactory,
) -> None:
    pg = embedded_factory()
    with psycopg.connect(pg.dsn, autocommit=True) as conn:  # made after the role: the demo
        conn.execute("CREATE TABLE t (id int GENERATED BY DEFAULT AS IDENTITY, v text)")
        conn.execute("CREATE TABLE s (id serial, v text)")
    with psycopg.connect(pg.gateway_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t (v) VALUES ('a'); INSERT INTO s (v) VALUES ('b')")
        conn.execute("UPDATE t SET v = 'c'; DELETE FROM s")
        assert conn.execute("SELECT v FROM t").fetchall() == [("c",)]
        for ddl in ("CREATE TABLE mine (x int)", "DROP TABLE t", "TRUNCATE t"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(ddl)


def test_an_older_cluster_is_upgraded_in_place(embedded_factory: EmbeddedFactory) -> None:
    first = embedded_factory()
    with psycopg.connect(first.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE book (id int, title text)")
        conn.execute("INSERT INTO book VALUES (7, 'kept')")
    as_made_before_login_roles(first)
    first.stop()

    later = embedded_factory(first.data_dir)
    assert (later.initialized_now, later.upgraded_now) == (False, True)
    assert later.dsn == first.dsn  # the superuser's password is kept
    assert query_one(later.gateway_dsn, "SELECT current_user, title FROM book") == (
        REQUEST_ROLE,
        "kept",
    )
    later.stop()
    again = embedded_factory(first.data_dir)
    assert (again.initialized_now, again.upgraded_now) == (False, False)
    assert again.gateway_dsn == later.gateway_dsn


def test_a_lost_gateway_password_file_gets_a_new_password(
    embedded_factory: EmbeddedFactory,
) -> None:
    first = embedded_factory()
    old = first.gateway_dsn
    first.stop()
    (first.data_dir / GATEWAY_PASSWORD_FILE).unlink()
    later = embedded_factory(first.data_dir)
    assert not later.upgraded_now
    assert later.gateway_dsn != old
    assert query_one(later.gateway_dsn, "SELECT current_user") == (REQUEST_ROLE,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(old).close()
