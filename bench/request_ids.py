"""What carrying a request id into pg_stat_activity costs PostgreSQL, per job.

    python bench/request_ids.py [--dsn DSN] [--jobs 16000] [--rounds 7]

A point select pipelined as pgqg sends it (``ROLLBACK; BEGIN READ ONLY; statement;
Sync`` per job, 32 jobs a round trip), three ways in interleaved rounds: as it is, with
a ``/* request_id=… */`` comment in front of the statement (what pgqg does), and with
``set_config('application_name', …, true)`` in the job's transaction. Prints the median
CPU time per job of the PostgreSQL backend (from /proc, in 10 ms ticks: 16,000 jobs
make a tick 0.6 µs a job) and of this client. Starts an embedded PostgreSQL unless ``--dsn``.
"""

from __future__ import annotations

import argparse
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import psycopg
from psycopg import pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.embedded._postgres import EmbeddedPostgres

BATCH = 32
POINT = b"SELECT aid, abalance FROM bench_request_ids WHERE aid = $1"
SET_NAME = b"SELECT pg_catalog.set_config('application_name', $1, true)"
WAYS = ("plain", "comment", "application_name")


def send_job(pg: pq.abc.PGconn, way: str, i: int) -> None:
    request_id = f"3f9a1c2e-{i:x}"
    pg.send_query_params(b"ROLLBACK", None)
    pg.send_query_params(b"BEGIN READ ONLY", None)
    sql = POINT
    if way == "comment":
        sql = f"/* request_id={request_id} */ ".encode() + POINT
    elif way == "application_name":
        pg.send_query_params(SET_NAME, [f"pgqg {request_id}".encode()])
    pg.send_query_params(sql, [str(i % 1000 + 1).encode()])
    pg.pipeline_sync()


def read_batch(pg: pq.abc.PGconn) -> None:
    """Read results up to the batch's last Sync; raise on an error."""
    syncs = 0
    while syncs < BATCH:
        if pg.is_busy():
            select.select([pg.socket], [], [], 1.0)
            pg.consume_input()
            continue
        res = pg.get_result()
        if res is None:
            continue
        if res.status == pq.ExecStatus.PIPELINE_SYNC:
            syncs += 1
        elif res.status == pq.ExecStatus.FATAL_ERROR:
            raise RuntimeError(res.error_message)


def measure(pg: pq.abc.PGconn, backend: psutil.Process, way: str, jobs: int) -> tuple[float, float]:
    """(backend, client) CPU µs per job over `jobs` jobs sent `way`."""
    server0, client0 = sum(backend.cpu_times()[:2]), time.process_time()
    for start in range(0, jobs, BATCH):
        for i in range(start, start + BATCH):
            send_job(pg, way, i)
        pg.flush()
        read_batch(pg)
    server = (sum(backend.cpu_times()[:2]) - server0) / jobs * 1e6
    return server, (time.process_time() - client0) / jobs * 1e6


def run(dsn: str, jobs: int, rounds: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_request_ids (aid int PRIMARY KEY, abalance int)"
        )
        conn.execute(
            "INSERT INTO bench_request_ids SELECT g, 0 FROM generate_series(1, 1000) g"
            " ON CONFLICT DO NOTHING"
        )
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        backend = psutil.Process(row[0])
        pg = conn.pgconn
        pg.enter_pipeline_mode()
        figures: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        for r in range(rounds):
            for way in WAYS[r % 3 :] + WAYS[: r % 3]:
                figures[way].append(measure(pg, backend, way, jobs))
        pg.exit_pipeline_mode()
    print(f"{jobs} jobs x {rounds} interleaved rounds, medians, CPU µs per job:")
    for way, values in figures.items():
        server = statistics.median(s for s, _ in values)
        client = statistics.median(c for _, c in values)
        print(f"  {way:<17} PostgreSQL backend {server:6.1f}   client {client:5.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", help="use this PostgreSQL (a table bench_request_ids is made)")
    p.add_argument("--jobs", type=int, default=16000, help="jobs per measurement (16000)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (7)")
    args = p.parse_args()
    if args.dsn:
        run(args.dsn, args.jobs, args.rounds)
        return
    with (
        tempfile.TemporaryDirectory(prefix="pgqg-bench-") as scratch,
        EmbeddedPostgres(Path(scratch) / "pgdata", fast=True) as pg,
    ):
        run(pg.dsn, args.jobs, args.rounds)


if __name__ == "__main__":
    main()
