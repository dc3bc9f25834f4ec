"""``pgqg serve`` with no database configured, as a newcomer runs it: a subprocess with
a fresh HOME and no database settings, an embedded PostgreSQL, the demo, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from support import as_made_before_login_roles

from gateway._settings import DEFAULT_SQL_DIR
from gateway.cli._demo import load_demo
from gateway.embedded._postgres import EmbeddedPostgres, server_processes

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 90.0  # initdb and the seed on a busy two-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def clean_env(home: Path, data_dir: Path, port: int) -> dict[str, str]:
    """The environment of a fresh machine: no database and no pgqg settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGQG_") and k != "DATABASE_URL"}
    env.update(HOME=str(home), PGQG_DATA_DIR=str(data_dir), PGQG_PORT=str(port))
    env.pop("XDG_DATA_HOME", None)
    return env


class Served:
    """A ``python -m gateway serve`` subprocess and its output file."""

    def __init__(self, env: dict[str, str], out: Path) -> None:
        self.out = out
        self.url = f"http://127.0.0.1:{env['PGQG_PORT']}"
        with out.open("wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.out.read_text()

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def wait_ready(self) -> float:
        """Poll /readyz (bounded); returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < READY_TIMEOUT_S:
            assert self.proc.poll() is None, f"pgqg serve exited:\n{self.output}"
            try:
                if self.get("/readyz")[0] == 200:
                    return time.monotonic() - started
            except (OSError, ValueError):
                pass  # not listening yet
            time.sleep(0.1)
        pytest.fail(f"not ready within {READY_TIMEOUT_S} s:\n{self.output}")

    def terminate(self) -> int:
        """SIGTERM; the exit status (the process is killed if it hangs)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"pgqg serve did not stop after SIGTERM:\n{self.output}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def data_dir(embedded_dir: Path) -> Iterator[Path]:
    """Outside pytest's basetemp (see conftest: the server may run as another user);
    any server left on it by a failed test is stopped."""
    path = embedded_dir / "pgdata"
    yield path
    for pid in server_processes(path):
        with contextlib.suppress(psutil.Error):  # a failed test left it running
            psutil.Process(pid).send_signal(signal.SIGQUIT)


def assert_nothing_left(served: Served, data_dir: Path) -> None:
    deadline = time.monotonic() + 10  # children of a stopped postmaster exit on their own
    while server_processes(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_processes(data_dir) == [], served.output
    assert not (data_dir / "postmaster.pid").exists()


@pytest.mark.slow
def test_serve_embedded_demo_then_sigterm_then_again(home: Path, data_dir: Path) -> None:
    port = free_port()
    env = clean_env(home, data_dir, port)

    first = Served(env, home / "first.log")
    try:
        cold = first.wait_ready()
        status, body = first.get("/v1/queries/book_by_id?id=1")
        assert status == 200, body
        assert body["rows"][0]["id"] == 1 and body["rows"][0]["title"]
        status, body = first.post("/v1/query", {"sql": "select count(*) AS n from review"})
        assert (status, body["rows"]) == (200, [{"n": "3600"}])
        # requests run as the least-privileged role, not as the superuser
        sql = "select current_user, (select rolsuper from pg_roles where rolname = current_user)"
        status, body = first.post("/v1/query", {"sql": sql, "shape": "arrays"})
        assert (status, body["rows"]) == (200, [["pgqg_anon", False]])
        status, body = first.post("/v1/query", {"sql": "select pg_read_file('/etc/hostname')"})
        assert (status, body["error"]["sqlstate"]) == (403, "42501"), body
        assert first.terminate() == 0, first.output
    finally:
        first.kill()
    assert_nothing_left(first, data_dir)
    out = first.output
    assert f"data in {data_dir}" in out
    assert "PostgreSQL created and started" in out
    assert "loaded the demo bookshop" in out
    assert f"pgqg is serving on http://127.0.0.1:{port}" in out
    assert "psql 'postgresql://postgres:" in out
    assert "requests run as the role pgqg_anon, not a superuser" in out
    assert "upgraded" not in out

    # a second start on the same data: the data is reused, the seed is not applied again
    second = Served(env, home / "second.log")
    try:
        warm = second.wait_ready()
        status, body = second.post("/v1/query", {"sql": "select count(*) AS n from review"})
        assert (status, body["rows"]) == (200, [{"n": "3600"}])
        superuser = second.output.split("psql '", 1)[1].split("'", 1)[0]
        with psycopg.connect(superuser) as conn:  # pgqg.demo is not the requests' business
            assert conn.execute("select count(*) from pgqg.demo").fetchone() == (1,)
        assert second.terminate() == 0, second.output
    finally:
        second.kill()
    assert_nothing_left(second, data_dir)
    assert "PostgreSQL started in" in second.output
    assert "the demo bookshop is already loaded" in second.output
    print(f"pgqg serve ready: cold {cold:.1f} s, warm {warm:.1f} s")


@pytest.mark.slow
def test_sigterm_while_starting_leaves_nothing_running(home: Path, data_dir: Path) -> None:
    served = Served(clean_env(home, data_dir, free_port()), home / "serve.log")
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "embedded PostgreSQL, data in" not in served.output:
            assert time.monotonic() < deadline and served.proc.poll() is None, served.output
            time.sleep(0.01)
        time.sleep(0.3)  # somewhere inside initdb or the server's start
        status = served.terminate()
    finally:
        served.kill()
    assert status == 0, served.output
    assert_nothing_left(served, data_dir)


@pytest.mark.slow
def test_serve_upgrades_an_older_data_directory_in_place(home: Path, data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as pg:  # what an older pgqg serve left: the demo
        load_demo(pg.dsn, DEFAULT_SQL_DIR)
        as_made_before_login_roles(pg)
    served = Served(clean_env(home, data_dir, free_port()), home / "serve.log")
    try:
        served.wait_ready()
        sql = "select current_user AS who, count(*) AS n from review"
        status, body = served.post("/v1/query", {"sql": sql})
        assert (status, body["rows"]) == (200, [{"who": "pgqg_anon", "n": "3600"}])
        assert served.terminate() == 0, served.output
    finally:
        served.kill()
    assert_nothing_left(served, data_dir)
    out = served.output
    assert "PostgreSQL started in" in out
    assert "upgraded the data directory in place: requests now run as the role pgqg_anon" in out
    assert "the demo bookshop is already loaded" in out


def test_a_second_serve_on_a_data_dir_in_use_says_to_use_another(
    home: Path, data_dir: Path, embedded_factory: Any
) -> None:
    running = embedded_factory(data_dir)  # the first gateway's server, as far as we know
    second = Served(clean_env(home, data_dir, free_port()), home / "second.log")
    try:
        status = second.proc.wait(timeout=READY_TIMEOUT_S)
    finally:
        second.kill()
    assert status == 1, second.output
    assert second.output.splitlines()[-1] == (
        f"pgqg: another PostgreSQL server already runs on {data_dir} (another pgqg serve?):"
        " give this gateway its own data directory with --data-dir (PGQG_DATA_DIR), or stop"
        " the other gateway first"
    )
    assert "kill" not in second.output and "pg_ctl" not in second.output
    assert running.is_running()  # left alone, and serving
    with psycopg.connect(running.dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
