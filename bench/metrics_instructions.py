"""What metrics cost a point select, in instructions: a figure the machine's load cannot move.

    python bench/metrics_instructions.py [--requests 2000] [--pairs 2]

Timed comparisons (``bench/run.py --against pgqg-nometrics``) need a quiet machine to
resolve a few percent. This runs ``pgqg serve`` under valgrind's callgrind, metrics on
and off in turn (``--pairs`` times each), with instrumentation switched on only while
one keep-alive client sends ``--requests`` sequential point selects (after a warm-up),
and prints the instructions per request of each run and the cost of metrics as a share
of the runs without. One client at a time: each job is its own round trip, so the share
is a little smaller than at 32 clients, where pipelining makes the rest of a request
cheaper. Needs valgrind (``apt-get install valgrind``); takes about a minute a run.

Not quite free of the load: timers count per wall-clock second, which valgrind stretches
(a request takes milliseconds), chiefly the dispatcher's deadline sweep every 5 ms while
a job is pending; their share moves with the machine's load by a few thousand
instructions a request, so compare medians of a few pairs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(REPO_DIR))

from run import free_port  # noqa: E402

from gateway.embedded._postgres import EmbeddedPostgres  # noqa: E402

SQL = "SELECT aid, abalance FROM accounts WHERE aid = $1"
ROWS = 10_000
WARMUP = 200


def prepare(dsn: str) -> None:
    """A table of `ROWS` accounts that the gateway's role may read."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (aid int PRIMARY KEY, abalance int)")
        conn.execute(f"INSERT INTO accounts SELECT g, g FROM generate_series(1, {ROWS}) g")
        conn.execute("GRANT SELECT ON accounts TO PUBLIC")


def point_select(conn: http.client.HTTPConnection, aid: int) -> None:
    """One point select; raises AssertionError on anything but 200."""
    body = json.dumps({"sql": SQL, "params": [aid]})
    conn.request("POST", "/v1/query", body, {"Content-Type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 200, answer.status


def connect(port: int, proc: subprocess.Popen[bytes]) -> http.client.HTTPConnection:
    """A connection to the gateway once it answers (valgrind makes it start slowly).

    Raises:
        RuntimeError: the gateway exited, or did not answer within ten minutes.
    """
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("pgqg serve exited at start")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            point_select(conn, 1)
            return conn
        except OSError:
            time.sleep(1)
    raise RuntimeError("pgqg serve did not answer within 600 s")


def instructions_per_request(dsn: str, metrics: bool, requests: int, out: Path) -> float:
    """Instructions the gateway process ran per point select, under callgrind."""
    port = free_port()
    env = {**os.environ, "PGQG_LOG_LEVEL": "warning", "PGQG_METRICS": str(metrics).lower()}
    argv = [
        *("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"),
        *(sys.executable, "-m", "gateway", "serve", "--dsn", dsn, "--port", str(port)),
        *("--pool-size", "1"),  # one client needs one; the deadline sweep visits each
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        conn = connect(port, proc)
        for i in range(WARMUP):
            point_select(conn, i + 1)
        control = ["callgrind_control", "-i"]
        subprocess.run([*control, "on", str(proc.pid)], check=True, capture_output=True)
        for i in range(requests):
            point_select(conn, i % ROWS + 1)
        subprocess.run([*control, "off", str(proc.pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # one file per dump; the instructions counted are in the dump made above
    return max(_total(path) for path in out.parent.glob(out.name + "*")) / requests


def _total(path: Path) -> int:
    """The largest instruction total a callgrind output file reports (0: none)."""
    with open(path, errors="replace") as fh:
        totals = [int(line.split()[1]) for line in fh if line.startswith(("summary:", "totals:"))]
    return max(totals, default=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="counted per run (2000)")
    p.add_argument("--pairs", type=int, default=2, help="runs with metrics and without (2)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgqg-instructions-") as scratch:
        pg = EmbeddedPostgres(Path(scratch) / "pgdata", fast=True)
        pg.start()
        try:
            prepare(pg.dsn)
            runs: dict[bool, list[float]] = {True: [], False: []}
            for n in range(args.pairs):
                for metrics in (True, False):
                    out = Path(scratch) / f"callgrind.{n}.{metrics}.out"
                    per = instructions_per_request(pg.gateway_dsn, metrics, args.requests, out)
                    runs[metrics].append(per)
                    print(f"metrics {'on ' if metrics else 'off'}: {per:,.0f} instructions/request")
        finally:
            pg.stop()
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    print(f"metrics cost {on - off:,.0f} instructions a request: {100 * (on / off - 1):.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
