"""pgqg past one process and past a local database (issue 23), in one run each.

    python bench/scale.py latency [--rtt-ms 0.5,2,10] [--connections 32,64,128]
                                  [--pool-size 4] [--rounds 3] [--quick]
    python bench/scale.py workers [--connections 32] [--pool-size 8] [--rounds 3] [--quick]

``latency``: PostgreSQL a network hop away. For each added round trip, a
`bench/latency_proxy.py` is put between the targets and the database, and pgqg,
aiohttp + psycopg_pool and aiohttp + asyncpg (`bench/baselines.py`), each with
``--pool-size`` connections through the proxy, get the same point-select load in
interleaved rounds (``wrk -c``), at each number of HTTP clients of ``--connections``.
pgqg pipelines the jobs waiting for a connection into one round trip; a pool that runs
one query per connection at a time cannot do more than ``pool_size / rtt`` queries a
second. The proxy's real added round trip is measured with psycopg beside a direct
connection and printed too.

Why several client counts: a closed loop of N clients can never do more than N requests
per answer time (Little's law), so a fixed N measures whichever target it holds back
least. The baselines reach their ``pool_size / rtt`` ceiling with few clients; pgqg's
ceiling is far higher and needs more requests in flight to reach. Each table compares
the targets at one client count; the goal line also compares each target at its best
count, its capacity.

``workers``: ``pgqg serve --workers 2`` beside ``--workers 1`` on this machine, same
run: one process with ``--pool-size`` connections, two with half as many each (the
same connections in all), and two with ``--pool-size`` each.

Both reuse bench/run.py's database set-up (an embedded PostgreSQL with pgbench's tables
unless ``--dsn``), wrk script and CPU accounting: ``others %`` is the share of the
machine's CPUs that neither the target, PostgreSQL nor wrk used during the run (other
people's tests on a shared machine). Ratios are pgqg's median req/s over each target's.
Results go to ``bench/results/scale-latency.json`` / ``scale-workers.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from run import (
    BENCH_DIR,
    PGQG,
    RESULTS_DIR,
    Bench,
    BenchError,
    CpuMeter,
    Server,
    _cpu_of,
    cpu_figures,
    machine,
    pgqg_jobs,
    run_wrk,
    summarize,
)

#: issue 23's goal: pgqg over psycopg_pool at 2 ms added round trip, pool size 4
GOAL = {"rtt_ms": 2.0, "against": "psycopg_pool", "ratio": 4.0}
LATENCY_TARGETS = (PGQG, "psycopg_pool", "asyncpg")


@dataclass
class ProcessTreeMeter(CpuMeter):
    """`CpuMeter` counting the server's children too (the workers of a supervisor), and
    the latency proxy's CPU apart (``proxy``) when there is one."""

    proxy_pid: int | None = None

    def sample(self) -> dict[str, float]:
        out = super().sample()
        if self.server_pid is not None:
            out["server"] = _cpu_of(self.server_pid, with_children=True)
        if self.proxy_pid is not None:
            out["proxy"] = _cpu_of(self.proxy_pid, with_children=False)
        return out


def proxy_figures(
    before: dict[str, float], after: dict[str, float], result: dict[str, Any]
) -> None:
    """Add the proxy's CPU µs per request and its share of one core to `result`, and
    take it out of ``other_cpu_pct`` (`cpu_figures` counts it as someone else's)."""
    if "proxy" not in after:
        return
    used, wall = after["proxy"] - before["proxy"], after["wall"] - before["wall"]
    if result["requests"]:
        result["cpu_us_per_request"]["proxy"] = round(used / result["requests"] * 1e6, 1)
    result["proxy_core_pct"] = round(100 * used / wall, 1) if wall > 0 else 0.0
    capacity_pct = 100 * used / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
    result["other_cpu_pct"] = round(max(0.0, result["other_cpu_pct"] - capacity_pct), 1)


class LatencyProxy:
    """`bench/latency_proxy.py` in front of the database's port; stopped by `close`."""

    def __init__(self, dsn: str, rtt_ms: float) -> None:
        info = conninfo_to_dict(dsn)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(BENCH_DIR / "latency_proxy.py"),
                "--target-port",
                str(info.get("port") or 5432),
                "--rtt-ms",
                str(rtt_ms),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            self.close()
            raise BenchError("the latency proxy did not start")
        self.port = int(line[1])
        self.dsn = self.route(dsn)

    def route(self, dsn: str) -> str:
        """`dsn` (a URI, as asyncpg takes only those) through the proxy."""
        uri = urllib.parse.urlsplit(dsn)
        netloc = uri.netloc.rsplit("@", 1)[0] + "@" if "@" in uri.netloc else ""
        return uri._replace(netloc=f"{netloc}127.0.0.1:{self.port}").geturl()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def round_trip_ms(dsn: str, n: int = 200) -> float:
    """The median time of ``select 1`` on one connection to `dsn`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.execute("select 1").fetchone()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


class ScaleBench(Bench):
    #: the latency proxy of the measurements under way, if any
    proxy_pid: int | None = None

    def measure_server(self, server: Server, connections: int, duration: float) -> dict[str, Any]:
        # one process's jobs per round trip (with --workers, the one /v1/stats reached)
        jobs0 = pgqg_jobs(server.url) if server.name == PGQG else None
        meter = ProcessTreeMeter(server.pid, self.postmaster_pid, self.proxy_pid)
        before = meter.sample()
        result = run_wrk(
            server.url, connections=connections, duration=duration, scale=self.args.scale
        )
        after = meter.sample()
        result.update(cpu_figures(before, after, result["requests"]))
        proxy_figures(before, after, result)
        if jobs0 is not None:
            jobs1 = pgqg_jobs(server.url)
            result["jobs"], result["round_trips"] = jobs1[0] - jobs0[0], jobs1[1] - jobs0[1]
            trips = result["round_trips"]
            result["jobs_per_round_trip"] = round(result["jobs"] / trips, 2) if trips else 0.0
        return result

    def rounds(self, servers: dict[str, Server], clients: int) -> dict[str, Any]:
        """Warm-up, then interleaved rounds of `clients` HTTP clients over `servers`;
        medians and pgqg's ratios."""
        a = self.args
        self.log(f" {clients} HTTP clients")
        for server in servers.values():
            self.measure_server(server, clients, a.warmup)
        names = list(servers)
        rounds: list[dict[str, Any]] = []
        for r in range(a.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            this_round = {}
            for name in order:
                res = this_round[name] = self.measure_server(servers[name], clients, a.duration)
                cpu = res["cpu_us_per_request"]
                self.log(
                    f"  round {r + 1}/{a.rounds} {name:<22} {res['rps']:>9.0f} req/s"
                    f"  p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms"
                    f"  CPU µs/req {cpu.get('server', 0):.0f}"
                    + (f" (proxy {cpu['proxy']:.0f})" if "proxy" in cpu else "")
                    + (f"  {res['jobs_per_round_trip']} jobs/trip" if "jobs" in res else "")
                    + f"  (others {res['other_cpu_pct']:.0f} % CPU)"
                    + ("" if res["valid"] else "  INVALID (errors)")
                )
            rounds.append(this_round)
        summary = {name: summarize([rnd[name] for rnd in rounds]) for name in names}
        first = summary[names[0]]["rps"]
        ratios = {
            n: first / s["rps"] if s["rps"] else None for n, s in summary.items() if n != names[0]
        }
        return {"clients": clients, "rounds": rounds, "summary": summary, "ratios": ratios}

    def server(self, name: str, kind: str, dsn: str, pool_size: int, **env: str) -> Server:
        """A target (pgqg or a baseline `kind`) logging in with `dsn` (the gateway's
        least-privileged login role), started; stopped by `stop`."""
        own, self.serve_dsn = self.serve_dsn, dsn
        try:
            server = self.make_server(kind, pool_size)
        finally:
            self.serve_dsn = own
        server.name = name
        server.env.update(env)
        server.log_path = RESULTS_DIR / "logs" / f"scale-{name}.log"
        return self.start(server)

    def latency(self) -> list[dict[str, Any]]:
        a = self.args
        direct_ms = round_trip_ms(self.dsn)
        self.log(f"select 1 straight to PostgreSQL: {direct_ms:.3f} ms")
        proxy = LatencyProxy(self.dsn, 0.0)
        try:  # what the proxy itself costs a round trip, with nothing added
            proxy_ms = round_trip_ms(proxy.dsn)
        finally:
            proxy.close()
        self.log(f"select 1 through the proxy adding nothing: {proxy_ms:.3f} ms")
        out = []
        for rtt in a.rtt_ms:
            proxy = LatencyProxy(self.dsn, rtt)
            try:
                via_ms = round_trip_ms(proxy.dsn)
                self.log(
                    f"added round trip {rtt:g} ms: select 1 takes {via_ms:.3f} ms through the proxy"
                )
                servers = {
                    kind: self.server(kind, kind, proxy.route(self.serve_dsn), a.pool_size)
                    for kind in LATENCY_TARGETS
                }
                self.proxy_pid = proxy.proc.pid
                by_clients = [self.rounds(servers, clients) for clients in a.connections]
            finally:
                self.proxy_pid = None
                for name in list(self.servers):
                    self.stop(name)
                proxy.close()
            out.append(
                {
                    "rtt_ms": rtt,
                    "added_ms_measured": round(via_ms - direct_ms, 3),
                    "proxy_overhead_ms": round(proxy_ms - direct_ms, 3),
                    "by_clients": by_clients,
                }
            )
        return out

    def workers(self) -> list[dict[str, Any]]:
        a = self.args
        half = max(1, a.pool_size // 2)
        servers = {
            f"workers 1, pool {a.pool_size}": self.server("w1", PGQG, self.serve_dsn, a.pool_size),
            f"workers 2, pool {half} each": self.server(
                "w2-half", PGQG, self.serve_dsn, half, PGQG_WORKERS="2"
            ),
            f"workers 2, pool {a.pool_size} each": self.server(
                "w2", PGQG, self.serve_dsn, a.pool_size, PGQG_WORKERS="2"
            ),
        }
        try:
            return [self.rounds(servers, clients) for clients in a.connections]
        finally:
            for name in list(self.servers):
                self.stop(name)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(result: dict[str, Any], labels: dict[str, str] | None = None) -> list[str]:
    lines = [
        "| target | req/s (median) | p50 ms | p99 ms | first over it"
        " | CPU µs/req: target, proxy | others' CPU % (max) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["summary"].items():
        ratio = result["ratios"].get(name)
        label = (labels or {}).get(name, name)
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        cpu = s.get("cpu_us_per_request", {})
        proxy = f"{cpu['proxy']:.0f}" if "proxy" in cpu else "-"
        lines.append(
            f"| {label} | {s['rps']:.0f} | {_ms(s['p50_ms'])} | {_ms(s['p99_ms'])}"
            f" | {shown} | {cpu.get('server', 0):.0f}, {proxy}"
            f" | {s.get('other_cpu_pct_max', 0):.0f} |"
        )
    return lines


LABELS = {"pgqg": "pgqg", "psycopg_pool": "aiohttp + psycopg_pool", "asyncpg": "aiohttp + asyncpg"}


def report_latency(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [f"pool size {args.pool_size} each, HTTP clients (wrk): {args.connections}", ""]
    for result in results:
        measured, overhead = result["added_ms_measured"], result["proxy_overhead_ms"]
        for by in result["by_clients"]:
            out.append(
                f"### +{result['rtt_ms']:g} ms round trip (measured +{measured:.2f} ms,"
                f" of which the proxy's own {overhead:.2f} ms), {by['clients']} clients"
            )
            out += ["", *table(by, LABELS), ""]
            per_trip = by["summary"][PGQG].get("jobs_per_round_trip")
            out += [f"pgqg ran {per_trip} jobs per round trip", ""]
        if result["rtt_ms"] == GOAL["rtt_ms"] and args.pool_size == 4:
            out += [*goal_lines(result["by_clients"]), ""]
    return "\n".join(out)


def goal_lines(by_clients: list[dict[str, Any]]) -> list[str]:
    """Issue 23's goal at each client count, then with each target at its best count."""
    against = GOAL["against"]
    head = f"goal: pgqg at least {GOAL['ratio']:g}x psycopg_pool at 2 ms, pool 4"
    lines = []
    for by in by_clients:
        ratio = by["ratios"].get(against)
        met = ratio is not None and ratio >= GOAL["ratio"]
        lines.append(
            f"{head}, {by['clients']} clients each: {'met' if met else 'NOT met'}"
            f" ({ratio and round(ratio, 2)}x)"
        )

    def best(name: str) -> tuple[float, int]:
        return max((by["summary"][name]["rps"], by["clients"]) for by in by_clients)

    (ours, ours_at), (theirs, theirs_at) = best(PGQG), best(against)
    ratio = ours / theirs if theirs else 0.0
    lines.append(
        f"{head}, each at its best client count: {'met' if ratio >= GOAL['ratio'] else 'NOT met'}"
        f" ({ratio:.2f}x: pgqg {ours:.0f} req/s at {ours_at},"
        f" psycopg_pool {theirs:.0f} req/s at {theirs_at})"
    )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pgqg past one process and a local database.")
    p.add_argument("what", choices=("latency", "workers"))
    p.add_argument("--dsn", help="use this PostgreSQL (its pgbench_* tables are recreated)")
    p.add_argument("--skip-load", action="store_true", help="with --dsn: tables already loaded")
    p.add_argument(
        "--rtt-ms", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 2.0, 10.0]
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (10)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument(
        "--connections",
        type=lambda s: [int(x) for x in s.split(",")],
        help="HTTP clients, comma-separated (latency 32,64,128; workers 32)",
    )
    p.add_argument("--pool-size", type=int, help="connections per target (latency 4, workers 8)")
    p.add_argument("--scale", type=int, default=10, help="pgbench scale (10)")
    p.add_argument("--quick", action="store_true", help="harness check: 1 round of 3 s")
    args = p.parse_args(argv)
    args.against = []  # bench/run.py's: no pgqg-jwt target here
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3.0, 1.0
    if args.pool_size is None:
        args.pool_size = 4 if args.what == "latency" else 8
    if args.connections is None:
        args.connections = [32, 64, 128] if args.what == "latency" else [32]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = ScaleBench(args)
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "dsn"}}
    results["machine"] = machine()
    try:
        results["database"] = bench.setup_database()
        if args.what == "latency":
            results["latency"] = bench.latency()
            text = report_latency(results["latency"], args)
        else:
            results["workers"] = bench.workers()
            text = "\n\n".join(
                f"{r['clients']} HTTP clients (wrk), {machine()['cpus']} CPUs\n\n"
                + "\n".join(table(r))
                for r in results["workers"]
            )
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        bench.close()
    out = RESULTS_DIR / f"scale-{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(text)
    print(f"\n(details in {out})")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
