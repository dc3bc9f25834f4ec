"""Neon's request shape at POST /sql beside /v1/query, for a point select, in one run.

    python bench/neon.py [--dsn DSN] [--rounds 5] [--duration 8] [--connections 32]
                         [--pool-size 8] [--scale 1]

One ``pgqg serve`` (read-only raw SQL, its defaults otherwise; logged in as the
embedded server's least-privileged role, as bench/run.py's) on an embedded
PostgreSQL loaded with pgbench's tables (or the database ``--dsn`` names), two kinds
of request to it in interleaved rounds, the order rotating:

* ``/v1/query``: ``{"sql": ..., "params": [aid]}``, as bench/run.py sends it;
* ``/sql``: what ``@neondatabase/serverless`` sends for ``sql`SELECT … WHERE aid =
  ${aid}```: ``{"query": ..., "params": ["aid"]}`` as text/plain with its
  ``Neon-Connection-String``, ``Neon-Raw-Text-Output`` and ``Neon-Array-Mode`` headers.

Both go through ``wrk`` with bench/wrk/point_select.lua. Prints the median req/s, p50
and p99, the gateway's CPU per request and jobs per round trip of each, the ratio /sql
over /v1, and how busy the rest of the machine was (``other CPU``: others' share of
all CPUs during the runs; the load average before and after). A run with an error
answer is flagged and left out of the medians. Every process started here is stopped
on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

# bench/ is on the path as the script's own folder
from run import (
    POINT_SELECT,
    REPO_DIR,
    CpuMeter,
    PgConn,
    Server,
    cpu_figures,
    free_port,
    load_pgbench_tables,
    pgqg_jobs,
    run_wrk,
)

from gateway._build import compiled_modules
from gateway.embedded._postgres import EmbeddedPostgres

#: the two requests measured, and the point-select script's arguments for each
KINDS = {"/v1/query": (), "/sql": (POINT_SELECT, "neon")}


def check_neon_answer(url: str, aid: int) -> None:
    """/sql answers the row of `aid` as the driver would read it.

    Raises:
        ValueError: it does not (a wrong answer must not be measured).
    """
    request = urllib.request.Request(
        f"{url}/sql",
        data=json.dumps({"query": POINT_SELECT, "params": [str(aid)]}).encode(),
        headers={"Neon-Raw-Text-Output": "true", "Neon-Array-Mode": "true"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        answer = json.loads(resp.read())
    if answer.get("rows", [[None]])[0][0] != str(aid):
        raise ValueError(f"/sql: unexpected answer to a point select: {answer!r:.200}")


def measure(
    server: Server, kind: str, args: argparse.Namespace, postmaster: int | None
) -> dict[str, Any]:
    meter = CpuMeter(server.pid, postmaster)
    jobs0 = pgqg_jobs(server.url)
    before = meter.sample()
    result = run_wrk(
        server.url,
        connections=args.connections,
        duration=args.duration,
        scale=args.scale,
        script_args=KINDS[kind],
    )
    result.update(cpu_figures(before, meter.sample(), result["requests"]))
    jobs1 = pgqg_jobs(server.url)
    trips = jobs1[1] - jobs0[1]
    result["jobs_per_round_trip"] = (jobs1[0] - jobs0[0]) / trips if trips else 0.0
    return result


def compare(dsn: str, serve_dsn: str, args: argparse.Namespace, postmaster: int | None) -> None:
    """Load the tables through `dsn`, serve `serve_dsn`'s role, measure and report."""
    if not args.skip_load:
        print(f"loading pgbench tables, scale {args.scale}", file=sys.stderr)
        load_pgbench_tables(PgConn(dsn), args.scale)
    scratch = Path(tempfile.mkdtemp(prefix="pgqg-bench-neon-"))
    port = free_port()
    server = Server(
        name="pgqg",
        argv=[
            sys.executable,
            *("-m", "gateway", "serve", "--dsn", serve_dsn, "--port", str(port)),
            *("--pool-size", str(args.pool_size)),
        ],
        port=port,
        log_path=scratch / "pgqg.log",
        # a --dsn may name a superuser, which pgqg serves raw SQL to only when allowed
        env={"PGQG_LOG_LEVEL": "warning", "PGQG_ALLOW_PRIVILEGED_ROLE": str(args.dsn is not None)},
    )
    server.start()
    try:
        check_neon_answer(server.url, 1)
        load_before = os.getloadavg()
        for kind in KINDS:  # warm-up, not counted
            measure(server, kind, argparse.Namespace(**{**vars(args), "duration": 2}), postmaster)
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        names = list(KINDS)
        for r in range(args.rounds):
            for kind in names[r % 2 :] + names[: r % 2]:
                result = measure(server, kind, args, postmaster)
                runs[kind].append(result)
                flag = "" if result["valid"] else "  INVALID (errors)"
                print(
                    f"round {r + 1} {kind:<10} {result['rps']:>9.1f} req/s"
                    f"  other CPU {result['other_cpu_pct']:>4.1f} %{flag}",
                    file=sys.stderr,
                )
        load_after = os.getloadavg()
    finally:
        server.stop()
    report(runs, args, load_before, load_after)


def report(
    runs: dict[str, list[dict[str, Any]]],
    args: argparse.Namespace,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    compiled = "compiled" if compiled_modules() else "plain Python"
    print(
        f"\npoint select, wrk -t2 -c{args.connections} -d{args.duration:g}s, pool"
        f" {args.pool_size}, {args.rounds} interleaved rounds, medians; pgqg {compiled},"
        f" {os.cpu_count()} CPUs\n"
    )
    print(
        "| request | req/s | p50 ms | p99 ms | gateway CPU µs/req | jobs/round trip | other CPU % |"
    )
    print("|---|---|---|---|---|---|---|")
    medians: dict[str, float] = {}
    for kind, results in runs.items():
        valid = [r for r in results if r["valid"]]
        if not valid:
            print(f"| `{kind}` | no valid run | | | | | |")
            continue
        medians[kind] = statistics.median(r["rps"] for r in valid)
        p50 = statistics.median(r["p50_ms"] for r in valid)
        p99 = statistics.median(r["p99_ms"] for r in valid)
        cpu = statistics.median(r["cpu_us_per_request"]["server"] for r in valid)
        trips = statistics.median(r["jobs_per_round_trip"] for r in valid)
        other = statistics.median(r["other_cpu_pct"] for r in valid)
        print(
            f"| `{kind}` | {medians[kind]:.0f} | {p50:.2f} | {p99:.2f} | {cpu:.1f}"
            f" | {trips:.2f} | {other:.1f} |"
        )
    if len(medians) == 2:
        print(f"\n/sql over /v1/query: {medians['/sql'] / medians['/v1/query']:.3f}x req/s")
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    print(f"load average (1, 5, 15 min) before: {before}, after: {after}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", help="a PostgreSQL with pgbench's tables (else an embedded one)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per run (8)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--pool-size", type=int, default=8, help="pgqg's pool size (8)")
    p.add_argument("--scale", type=int, default=1, help="pgbench scale to load and draw aids (1)")
    p.add_argument("--skip-load", action="store_true", help="the tables are loaded already")
    args = p.parse_args()
    os.chdir(REPO_DIR)
    if args.dsn:
        compare(args.dsn, args.dsn, args, None)
        return
    with (
        tempfile.TemporaryDirectory(prefix="pgqg-bench-neon-") as scratch,
        EmbeddedPostgres(Path(scratch) / "pgdata", fast=True) as pg,
    ):
        compare(pg.dsn, pg.gateway_dsn, args, pg.pid)


if __name__ == "__main__":
    main()
