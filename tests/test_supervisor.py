"""``pgqg serve --workers N``: N processes on one port under a supervisor (web/_supervisor.py).

Each test runs the real command as a subprocess on the test database and watches its
processes with psutil; nothing waits a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import psutil
import psycopg
import pytest
from support import REPO, Served, free_port, running, server_of

pytestmark = pytest.mark.slow

WAIT_S = 60.0  # start-ups of a few processes on a loaded two-core machine


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


async def every_worker_ready(served: Served, http: aiohttp.ClientSession) -> None:
    """Until the supervisor says every worker is ready: one answering ``/readyz``
    is not enough, and a worker killed before it was ready stops them all."""
    await served.ready(http)
    wait_for(lambda: "pgqg is serving on" in served.output(), "every worker ready")


def workers_of(served: Served) -> set[int]:
    """The supervisor's live children (a killed one is a zombie until it is reaped)."""
    found = set()
    for child in psutil.Process(served.proc.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
    return found


def pooled(pid: int, db_port: int) -> int:
    """How many connections process `pid` holds to the database's port."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections("tcp")
        if conn.raddr and conn.raddr.port == db_port and conn.status == psutil.CONN_ESTABLISHED
    )


@pytest.fixture
def start(database_dsn: str) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start_served(*args: str, **env: str) -> Served:
        served = Served(database_dsn, "--workers", "2", *args, env=env)
        started.append(served)
        return served

    yield start_served
    for served in started:
        workers = workers_of(served) if served.proc.poll() is None else set()
        served.stop()
        for pid in workers:  # the parent-death signal stops them; make sure
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).wait(30)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # a new connection per request, so the kernel may pick another worker each time
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def answering_pids(served: Served, http: aiohttp.ClientSession, want: set[int]) -> None:
    """Ask /v1/stats until every pid of `want` has answered (and only those)."""
    seen: set[int] = set()
    deadline = time.monotonic() + WAIT_S
    while seen != want:
        async with http.get(served.url + "/v1/stats") as resp:
            assert resp.status == 200
            pid = (await resp.json())["pid"]
        assert pid in want, (pid, want)
        seen.add(pid)
        assert time.monotonic() < deadline, f"only {seen} of {want} answered"


async def test_workers_share_the_port_and_each_answers(
    start: Callable[..., Served], http: aiohttp.ClientSession
) -> None:
    served = start()
    await every_worker_ready(served, http)
    workers = wait_for(lambda: len(workers_of(served)) == 2 and workers_of(served), "2 workers")
    await answering_pids(served, http, workers)
    async with http.post(served.url + "/v1/query", json={"sql": "select 1 as one"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["rows"] == [{"one": 1}]
    assert all(
        psutil.Process(pid).name() == psutil.Process(served.proc.pid).name() for pid in workers
    )


async def test_a_dead_worker_is_replaced_and_metrics_add_up(
    start: Callable[..., Served], http: aiohttp.ClientSession
) -> None:
    served = start()
    await every_worker_ready(served, http)
    first = wait_for(lambda: len(workers_of(served)) == 2 and workers_of(served), "2 workers")
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    now = wait_for(
        lambda: (w := workers_of(served)) and len(w) == 2 and victim not in w and w, "a new worker"
    )
    await answering_pids(served, http, now)
    assert "worker" in served.output() or served.proc.poll() is None

    async def ready_processes() -> float:
        async with http.get(served.url + "/metrics") as resp:
            text = await resp.text()
        return sum(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith("pgqg_ready ")
        )

    deadline = time.monotonic() + WAIT_S
    while await ready_processes() != 2.0:  # the dead one's gauges are gone
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_sigterm_drains_every_worker(
    start: Callable[..., Served], http: aiohttp.ClientSession, database_dsn: str
) -> None:
    slow_requests = 6
    # a pool as large as all of them in each worker, as the kernel may send them all to one
    served = start("--shutdown-grace-s", "30", "--pool-size", str(slow_requests))
    await every_worker_ready(served, http)
    workers = wait_for(lambda: len(workers_of(served)) == 2 and workers_of(served), "2 workers")
    # every pool full, so no slow query waits behind another on one connection (where
    # pg_stat_activity would show one of them only)
    db_port = int(server_of(database_dsn)[1])
    wait_for(lambda: all(pooled(pid, db_port) >= slow_requests for pid in workers), "full pools")
    tag = f"drain_{os.getpid()}_{time.monotonic_ns()}"
    sql = f"select 1 as done from pg_sleep(3) /* {tag} */"

    async def slow() -> int:
        async with http.post(served.url + "/v1/query", json={"sql": sql}) as resp:
            body = await resp.json()
            assert body["rows"] == [{"done": 1}] or resp.status != 200, body
            return resp.status

    requests = [asyncio.create_task(slow()) for _ in range(slow_requests)]
    async with await psycopg.AsyncConnection.connect(database_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + WAIT_S
        while await running(conn, tag) < slow_requests:  # every request runs in some worker
            answered = [r.result() for r in requests if r.done()]  # raises with the body
            assert not answered, f"a slow query answered before the stop: {answered}"
            assert time.monotonic() < deadline, "the slow queries did not start"
            await asyncio.sleep(0.02)
    served.proc.send_signal(signal.SIGTERM)
    assert await asyncio.gather(*requests) == [200] * slow_requests
    assert await served.exit_code(WAIT_S) == 0, served.output()
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in workers
    )


async def test_workers_that_keep_dying_stop_the_supervisor(
    start: Callable[..., Served], http: aiohttp.ClientSession
) -> None:
    served = start()
    await every_worker_ready(served, http)
    victim = 0
    for _ in range(6):  # MAX_RESTARTS + 1 deaths within a minute
        current = wait_for(
            lambda gone=victim: (w := workers_of(served)) and len(w) == 2 and gone not in w and w,
            "2 workers",
        )
        await answering_pids(served, http, current)  # each is ready before it is killed
        victim = min(current)
        os.kill(victim, signal.SIGKILL)
    assert await served.exit_code(WAIT_S) == 1
    output = served.output()
    assert "pgqg: stopped: worker" in output and "died within 60 s" in output, output


async def test_a_worker_failing_at_start_stops_the_supervisor(database_dsn: str) -> None:
    """A superuser login role with raw SQL on: each worker refuses to serve, in one line."""
    served = Served(database_dsn, "--workers", "2", privileged=True)
    try:
        assert await served.exit_code(WAIT_S) == 1
        output = served.output()
    finally:
        served.stop()
    assert "before it was ready" in output, output
    assert "pgqg: refusing to serve: the database role 'postgres'" in output, output
    assert "Traceback" not in output, output


def serve_workers(dsn: str, port: int) -> subprocess.CompletedProcess[str]:
    """``pgqg serve --workers 2`` on `port`, for a run that ends at start."""
    argv = ["serve", "--dsn", dsn, "--workers", "2", "--port", str(port)]
    return subprocess.run(
        [sys.executable, "-m", "gateway", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=WAIT_S,
    )


def test_workers_need_a_fixed_port(database_dsn: str) -> None:
    done = serve_workers(database_dsn, 0)
    assert done.returncode == 2
    assert "--workers needs a fixed --port" in done.stderr


def test_a_taken_port_is_one_line(database_dsn: str) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = serve_workers(database_dsn, port)
    assert done.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in done.stderr


async def test_every_process_signalled_at_once_still_drains(
    start: Callable[..., Served], http: aiohttp.ClientSession
) -> None:
    """systemd's default stop: SIGTERM to the supervisor and each worker at once; a
    worker gets it twice (directly and forwarded) and stops after one drain."""
    served = start()
    await every_worker_ready(served, http)
    workers = wait_for(lambda: len(workers_of(served)) == 2 and workers_of(served), "2 workers")
    for pid in [served.proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    assert await served.exit_code(WAIT_S) == 0, served.output()


async def test_workers_stopped_one_by_one_are_not_replaced(
    start: Callable[..., Served], http: aiohttp.ClientSession
) -> None:
    served = start()
    await every_worker_ready(served, http)
    workers = wait_for(lambda: len(workers_of(served)) == 2 and workers_of(served), "2 workers")
    first, second = sorted(workers)
    os.kill(first, signal.SIGTERM)  # it drains and exits 0: stopped on purpose
    wait_for(lambda: workers_of(served) == {second}, "the first worker to stop")
    await answering_pids(served, http, {second})
    os.kill(second, signal.SIGTERM)
    assert await served.exit_code(WAIT_S) == 0, served.output()
    assert f"pgqg: worker {first} was stopped; not replaced" in served.output()
