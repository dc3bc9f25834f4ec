"""What each statement pgqg adds to a point select costs PostgreSQL, in one run.

Issue 26's session hygiene rides the job's own round trip: after a raw
statement the gateway sends its role check, and the last check of a job also
releases the session's advisory locks (`gateway.engine._planner`). bench/run.py
measures the whole of it (``--against pgqg-noguard``); this splits it up. One
backend, logged in as the embedded cluster's ``pgqg_authenticator``, runs
pipelined batches of 32 point-select jobs shaped as pgqg sends them
(``BEGIN READ ONLY``, the select, the variant's extra statement, ``ROLLBACK``),
variant after variant, interleaved round after round. The figure is the
backend's own CPU time per job (``/proc/<pid>/schedstat``), which other
processes on the machine barely move, unlike req/s.

    python bench/segment_cost.py            # about a minute

Variants: ``none`` (the select alone), ``unlock`` (only the advisory-lock
release), ``check`` (`ROLE_GUARD`), ``guard`` (`LAST_GUARD`: check and release,
what a read-write job's last statement gets), ``read`` (`LAST_READ`: what a
read-only job's last statement gets), ``select1`` (the floor of any extra
statement).
"""

from __future__ import annotations

import argparse
import random
import select
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `gateway`

import psycopg
from psycopg import pq

from gateway.embedded import EmbeddedPostgres
from gateway.engine._planner import LAST_GUARD, LAST_READ, ROLE_GUARD

POINT_SELECT = b"SELECT aid, abalance FROM segment_cost WHERE aid = $1"
ACCOUNTS = 100_000
VARIANTS: dict[str, bytes | None] = {
    "none": None,
    "unlock": b"SELECT pg_catalog.pg_advisory_unlock_all()",
    "check": ROLE_GUARD,
    "guard": LAST_GUARD,
    "read": LAST_READ,
    "select1": b"SELECT 1",
}


def backend_cpu_ns(pid: int) -> int:
    """CPU time the process has run, in ns (schedstat's first field)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def send_job(pg: pq.abc.PGconn, extra: bytes | None, roles: list[bytes], first: bool) -> None:
    if not first:
        pg.send_query_params(b"ROLLBACK", None)
    pg.send_query_params(b"BEGIN READ ONLY", None)
    pg.send_query_params(POINT_SELECT, [str(random.randint(1, ACCOUNTS)).encode()])
    if extra is not None:
        pg.send_query_params(extra, roles if b"$2" in extra else None)
    pg.pipeline_sync()


def read_syncs(pg: pq.abc.PGconn, syncs: int) -> None:
    """Read results until `syncs` pipeline syncs came back.

    Raises:
        RuntimeError: a statement failed.
    """
    while syncs:
        pg.flush()
        pg.consume_input()
        while syncs and not pg.is_busy():
            res = pg.get_result()
            if res is None:
                continue
            if res.status == pq.ExecStatus.PIPELINE_SYNC:
                syncs -= 1
            elif res.status == pq.ExecStatus.FATAL_ERROR:
                raise RuntimeError(res.error_message.decode())
        if syncs:
            select.select([pg.socket], [], [], 1)


def cost_per_job(conn: psycopg.Connection[Any], extra: bytes | None, roles: list[bytes]) -> float:
    """Backend CPU µs per job over 10 pipelined batches of 32 jobs."""
    pg, batches, batch = conn.pgconn, 10, 32
    before = backend_cpu_ns(pg.backend_pid)
    for _ in range(batches):
        for j in range(batch):
            send_job(pg, extra, roles, first=j == 0)
        pg.send_query_params(b"ROLLBACK", None)
        pg.pipeline_sync()
        read_syncs(pg, batch + 1)
    return (backend_cpu_ns(pg.backend_pid) - before) / (batches * batch) / 1000


def measure(dsn: str, names: list[str], rounds: int) -> dict[str, list[float]]:
    """Each variant's µs per job, one figure per round, variants rotated each round."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT current_user, session_user").fetchone()
        assert row is not None
        roles = [str(role).encode() for role in row]
        conn.pgconn.nonblocking = 1
        conn.pgconn.enter_pipeline_mode()
        per: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                per[name].append(cost_per_job(conn, VARIANTS[name], roles))
        conn.pgconn.exit_pipeline_mode()
    return per


def load(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE segment_cost (aid int PRIMARY KEY, abalance int)")
        conn.execute(
            "INSERT INTO segment_cost SELECT g, 0 FROM generate_series(1, %s) g", [ACCOUNTS]
        )
        conn.execute(f"GRANT SELECT ON segment_cost TO {pg.request_role}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds (40)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)} (all)"
    )
    args = parser.parse_args()
    names = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="pgqg-segment-cost-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "data", fast=True)
        pg.start()
        try:
            load(pg)
            per = measure(pg.gateway_dsn, names, args.rounds)
        finally:
            pg.stop()
    base = statistics.median(per[names[0]])
    print(f"PostgreSQL backend CPU per point-select job, {args.rounds} interleaved rounds")
    print("| variant | µs/job (median) | IQR | vs " + names[0] + " |\n|---|---:|---:|---:|")
    for name, values in per.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {q1:.1f}-{q3:.1f} | {median - base:+.1f} |")


if __name__ == "__main__":
    main()
