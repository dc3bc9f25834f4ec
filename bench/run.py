"""pgqg beside the alternatives: one command, one run, interleaved rounds.

    python bench/run.py [--dsn DSN] [--rounds 3] [--duration 10] [--quick] [--profile]
                        [--no-sweeps] [--against static,asyncpg,...]

1. Starts an embedded PostgreSQL (TCP on 127.0.0.1, scram-sha-256 password, as
   deployments have it) in a temporary directory, unless ``--dsn`` names one, and loads
   pgbench's tables (``pgbench -i -s 10``, over TCP with the password).
2. Starts every target as its own process on its own 127.0.0.1 port, with the same pool
   size: pgqg (``python -m gateway serve``), pgqg again with ``PGQG_METRICS=false``
   (``pgqg-nometrics``: what ``/metrics`` costs) and the baselines of
   ``bench/baselines.py``. Each must answer a point select correctly before it is measured.
   ``pgqg-jwt`` is pgqg with ``PGQG_JWT_SECRET``, every request carrying an HS256 token
   that names a role (``pgqg_bench_reader``, made here, allowed to read pgbench's
   tables): the token's cost, verification and the role and claims set in each job's
   transaction.
3. Warms each target up, then runs ``--rounds`` interleaved rounds: in each round every
   target in turn (the order rotates from round to round) gets
   ``wrk -t2 -c32 -d{duration}s`` with ``bench/wrk/point_select.lua`` (a random aid per
   request); pgbench ``-S`` (the database's ceiling) takes its turn in the same rounds.
   Figures are medians over the rounds; ratios are pgqg's median over each target's.
4. Sweeps, pgqg only: client concurrency 1, 8, 32, 128, 512 at the same pool size, and
   pool size 1, 2, 4, 8, 16 at 32 clients (pgqg restarted each time); jobs per round
   trip from ``/v1/stats``, before and after each run.
5. Prints Markdown tables and writes everything to ``bench/results/latest.json``:
   per run also the CPU time per request of the server and of PostgreSQL, and the share
   of the machine's CPUs that other processes took meanwhile (a noise figure).
   ``--profile`` adds a py-spy profile of pgqg under the same load, in a separate run.

A run with a non-2xx answer or a socket error is flagged invalid, never averaged in.
Every process started here is stopped on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(REPO_DIR))  # `gateway` from this checkout, whatever the cwd

from gateway._build import compiled_modules, stale_build  # noqa: E402
from gateway.embedded._postgres import EmbeddedPostgres, postgres_bin_dir  # noqa: E402

LUA_SCRIPT = BENCH_DIR / "wrk" / "point_select.lua"
RESULTS_DIR = BENCH_DIR / "results"
POINT_SELECT = "SELECT aid, abalance FROM pgbench_accounts WHERE aid = $1"

PGQG = "pgqg"
#: pgqg itself with PGQG_METRICS=false: what /metrics costs it, in the same run
PGQG_NO_METRICS = "pgqg-nometrics"
#: pgqg itself with PGQG_JWT_SECRET, each request with a token: what a token costs
PGQG_JWT = "pgqg-jwt"
#: pgqg without the role checks after raw statements (bench/unguarded.py): what they cost
PGQG_NO_GUARD = "pgqg-noguard"
PGBENCH = "pgbench -S"
#: the role of pgqg-jwt's token, and the secret it is signed with (a run's own)
BENCH_ROLE = "pgqg_bench_reader"
JWT_SECRET = os.urandom(24).hex()
#: the HTTP targets, in the order of the first round; bench/baselines.py's kinds
BASELINES = ("connect", "psycopg_pool", "asyncpg", "asyncpg_noreset", "static")
LABELS = {
    PGQG: "pgqg",
    PGQG_NO_METRICS: "pgqg, metrics off (PGQG_METRICS=false)",
    PGQG_JWT: "pgqg, Bearer HS256 token (role and claims per job)",
    PGQG_NO_GUARD: "pgqg, no role checks (bench/unguarded.py)",
    "connect": "connect per request (psycopg)",
    "psycopg_pool": "aiohttp + psycopg_pool",
    "asyncpg": "aiohttp + asyncpg pool",
    "asyncpg_noreset": "aiohttp + asyncpg pool, no reset on release",
    "static": "aiohttp, static JSON (no database)",
    PGBENCH: "pgbench -S (no HTTP, C client)",
}
#: issue 6's targets: pgqg's req/s over each baseline's, at 32 clients
TARGETS = {"psycopg_pool": 1.8, "asyncpg": 1.4, "connect": 50.0, "static": 0.5}
#: issue 22's: metrics cost a point select less than 5 %
TARGETS[PGQG_NO_METRICS] = 0.95
#: issue 19's: a token costs less than this share of pgqg's req/s (pgqg-jwt's own line)
TOKEN_COST_GOAL = 0.15
CONCURRENCY_SWEEP = (1, 8, 32, 128, 512)
POOL_SWEEP = (1, 2, 4, 8, 16)


class BenchError(Exception):
    """The harness cannot go on (a server did not come up, a tool is missing)."""


# --- processes ----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the harness dies without cleaning up (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    url: str, body: dict[str, Any] | None = None, timeout: float = 5.0, token: str | None = None
) -> Any:
    """GET (or POST `body` as JSON) and decode the JSON answer; HTTP errors raise."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Server:
    """One HTTP target, run as a subprocess on 127.0.0.1:`port`."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    #: a bearer token every request carries (pgqg-jwt)
    token: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait until it answers a point select correctly."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO_DIR,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited at start; see {self.log_path}")
            try:
                check_answer(self.name, self.url, aid=1, token=self.token)
                return
            except (OSError, ValueError, urllib.error.URLError) as exc:
                last = exc
                time.sleep(0.1)
        raise BenchError(f"{self.name} did not answer within {timeout:.0f} s: {last}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def check_answer(name: str, url: str, aid: int, token: str | None = None) -> None:
    """A point select through `url` must answer the row of `aid`.

    Raises:
        ValueError: the answer has no such row (a server answering 200 with
            the wrong thing must not be measured).
    """
    answer = http(f"{url}/v1/query", {"sql": POINT_SELECT, "params": [aid]}, token=token)
    rows = answer.get("rows") if isinstance(answer, dict) else None
    if not rows or rows[0].get("aid") != aid or "abalance" not in rows[0]:
        raise ValueError(f"{name}: unexpected answer to a point select: {answer!r:.200}")


# --- measuring ------------------------------------------------------------------------------


@dataclass
class CpuMeter:
    """CPU seconds of the server process, of PostgreSQL (postmaster and backends), of the
    load generator (wrk or pgbench) and of the whole machine, to tell what else ran."""

    server_pid: int | None
    postmaster_pid: int | None

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {"wall": time.monotonic()}
        if self.server_pid is not None:
            out["server"] = _cpu_of(self.server_pid, with_children=False)
        if self.postmaster_pid is not None:
            out["postgres"] = _cpu_of(self.postmaster_pid, with_children=True)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, pgbench (reaped)
        out["load_generator"] = usage.ru_utime + usage.ru_stime
        t = psutil.cpu_times()
        out["machine"] = sum(t) - t.idle - getattr(t, "iowait", 0.0)  # steal counts as busy
        return out


def _cpu_of(pid: int, *, with_children: bool) -> float:
    """User + system CPU seconds of `pid`; with its live and reaped children."""
    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total: float = t.user + t.system
        if with_children:
            total += t.children_user + t.children_system  # backends that already exited
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
        return total
    except psutil.Error:
        return 0.0


def cpu_figures(before: dict[str, float], after: dict[str, float], requests: int) -> Any:
    """CPU µs per request of each party, and the share of the machine used by others.

    ``other_cpu_pct`` is the machine's busy time that neither the server, PostgreSQL
    nor the load generator used (idle targets, py-spy, other users, steal), as a
    percentage of all CPUs over the run: above a few percent, the figure is noisy.
    """
    delta = {k: after[k] - before[k] for k in after if k in before}
    ours = sum(v for k, v in delta.items() if k in ("server", "postgres", "load_generator"))
    capacity = delta["wall"] * (os.cpu_count() or 1)
    per_request = {
        k: round(v / requests * 1e6, 1)
        for k, v in delta.items()
        if k in ("server", "postgres", "load_generator") and requests > 0
    }
    other = max(0.0, delta["machine"] - ours)
    return {
        "cpu_us_per_request": per_request,
        "other_cpu_pct": round(100 * other / capacity, 1) if capacity > 0 else 0.0,
    }


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    scale: int,
    threads: int = 2,
    token: str | None = None,
    script_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One wrk run with the point-select script; counts, rate and latency percentiles;
    with `token`, every request carries it; `script_args`, if given, replace what
    follows the scale (the SQL, and "neon" for POST /sql: bench/neon.py)."""
    threads = max(1, min(threads, connections))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(scale),
        *(script_args or (POINT_SELECT, *([token] if token else []))),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    match = re.search(r"^RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    return {
        "rps": round(raw["requests"] / seconds, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "requests": raw["requests"],
        "non2xx": raw["non2xx"],
        "socket_errors": raw["socket_errors"],
        "valid": raw["non2xx"] == 0 and raw["socket_errors"] == 0 and raw["requests"] > 0,
        "wrk": raw,
    }


@dataclass
class PgConn:
    """How pgbench and psql reach the database: libpq environment variables."""

    dsn: str

    def env(self) -> dict[str, str]:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(self.dsn)
        names = {
            "host": "PGHOST",
            "port": "PGPORT",
            "user": "PGUSER",
            "password": "PGPASSWORD",
            "dbname": "PGDATABASE",
            "sslmode": "PGSSLMODE",
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({names[k]: str(v) for k, v in info.items() if k in names and v is not None})
        return env


def pgbench_path() -> str:
    found = postgres_bin_dir() / "pgbench"
    return str(found) if found.is_file() else (shutil.which("pgbench") or "pgbench")


def load_pgbench_tables(pg: PgConn, scale: int) -> float:
    """``pgbench -i -s scale`` over TCP with the password; returns the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        [pgbench_path(), "-i", "-s", str(scale), "-q"],
        env=pg.env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise BenchError(f"pgbench -i failed: {done.stderr.strip()}")
    return time.monotonic() - started


def run_pgbench(pg: PgConn, *, clients: int, duration: float, log_dir: Path) -> dict[str, Any]:
    """``pgbench -S -c N -j 2 -T d`` over TCP; percentiles from its per-transaction log."""
    for old in log_dir.glob("pgbench_log*"):
        old.unlink()
    argv = [
        pgbench_path(),
        "-S",
        "-n",
        f"-c{clients}",
        f"-j{min(2, clients)}",
        f"-T{max(1, round(duration))}",
        "-l",
        f"--log-prefix={log_dir / 'pgbench_log'}",
    ]
    done = subprocess.run(
        argv, env=pg.env(), capture_output=True, text=True, timeout=duration + 120
    )
    if done.returncode != 0:
        raise BenchError(f"pgbench -S failed: {done.stderr.strip()}")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    latencies: list[int] = []
    for path in log_dir.glob("pgbench_log*"):
        with open(path) as fh:
            latencies.extend(int(line.split()[2]) for line in fh if line.strip())
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] / 1000

    errors = int(failed.group(1)) if failed else 0
    return {
        "rps": round(float(tps.group(1)), 1) if tps else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "requests": len(latencies),
        "non2xx": errors,
        "socket_errors": 0,
        "valid": tps is not None and errors == 0,
    }


def pgqg_jobs(url: str) -> tuple[int, int]:
    """pgqg's total (jobs, batches) so far; a batch is one round trip."""
    stats = http(f"{url}/v1/stats")
    conns = stats["connections"]
    return sum(c["jobs"] for c in conns), sum(c["batches"] for c in conns)


# --- the run ------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    dsn: str = ""
    #: what pgqg and the baselines log in as: the embedded server's least-privileged
    #: login role (as pgqg serve's), or --dsn's
    serve_dsn: str = ""
    postmaster_pid: int | None = None
    servers: dict[str, Server] = field(default_factory=dict)
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgqg-bench-")))

    @property
    def pg(self) -> PgConn:
        return PgConn(self.dsn)

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # targets

    def make_server(self, name: str, pool_size: int) -> Server:
        """pgqg or a baseline on a free port, with `pool_size` connections."""
        port = free_port()
        common = ["--dsn", self.serve_dsn, "--port", str(port), "--pool-size", str(pool_size)]
        env, token = {}, None
        if name.startswith(PGQG):
            argv = [sys.executable, "-m", "gateway", "serve", *common]
            if name == PGQG_NO_GUARD:
                argv[1:3] = [str(BENCH_DIR / "unguarded.py")]
            env["PGQG_LOG_LEVEL"] = "warning"
            # a --dsn may name a superuser, which pgqg serves raw SQL to only when allowed
            env["PGQG_ALLOW_PRIVILEGED_ROLE"] = str(bool(self.args.dsn))
            if name == PGQG_NO_METRICS:
                env["PGQG_METRICS"] = "false"
        else:
            argv = [sys.executable, str(BENCH_DIR / "baselines.py"), "--kind", name, *common]
        if name == PGQG_JWT:
            env["PGQG_JWT_SECRET"] = JWT_SECRET
            token = bench_token()
        return Server(
            name=name,
            argv=argv,
            port=port,
            log_path=RESULTS_DIR / "logs" / f"{name}.log",
            # pgqg's own defaults otherwise (read-only raw SQL, max_batch 32, ...)
            env=env,
            token=token,
        )

    def start(self, server: Server) -> Server:
        self.servers[server.name] = server
        server.start()
        return server

    def stop(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is not None:
            server.stop()

    # one measurement

    def measure(
        self, name: str, *, connections: int, duration: float, server: Server | None = None
    ) -> dict[str, Any]:
        if name == PGBENCH:
            meter = CpuMeter(None, self.postmaster_pid)
            before = meter.sample()
            result = run_pgbench(
                self.pg, clients=connections, duration=duration, log_dir=self.scratch
            )
            result.update(cpu_figures(before, meter.sample(), result["requests"]))
            return result
        server = server or self.servers[name]
        is_pgqg = name.startswith(PGQG)
        jobs0 = pgqg_jobs(server.url) if is_pgqg else (0, 0)
        meter = CpuMeter(server.pid, self.postmaster_pid)
        before = meter.sample()
        result = run_wrk(
            server.url,
            connections=connections,
            duration=duration,
            scale=self.args.scale,
            token=server.token,
        )
        result.update(cpu_figures(before, meter.sample(), result["requests"]))
        if is_pgqg:
            jobs1 = pgqg_jobs(server.url)
            jobs, batches = jobs1[0] - jobs0[0], jobs1[1] - jobs0[1]
            result["jobs"], result["round_trips"] = jobs, batches
            result["jobs_per_round_trip"] = round(jobs / batches, 2) if batches else 0.0
        return result

    # the phases

    def setup_database(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.args.dsn:
            self.dsn = self.serve_dsn = self.args.dsn
            info["database"] = "given by --dsn"
        else:
            data_dir = self.scratch / "pgdata"
            embedded = EmbeddedPostgres(data_dir, fast=True)
            self._embedded = embedded
            self.log(f"starting an embedded PostgreSQL in {data_dir}")
            embedded.start()
            self.dsn, self.serve_dsn = embedded.dsn, embedded.gateway_dsn
            self.postmaster_pid = embedded.pid
            info["database"] = "embedded PostgreSQL 16 (pgserver), fsync off, TCP + scram"
        if not self.args.skip_load:
            self.log(f"loading pgbench tables, scale {self.args.scale}")
            info["load_s"] = round(load_pgbench_tables(self.pg, self.args.scale), 1)
        info["server_version"] = self._server_version()
        if PGQG_JWT in self.args.against:
            self._bench_role()
        return info

    def _bench_role(self) -> None:
        """`BENCH_ROLE`: reads pgbench's tables; pgqg's login role may take it."""
        import psycopg
        from psycopg import sql
        from psycopg.conninfo import conninfo_to_dict

        login = sql.Identifier(str(conninfo_to_dict(self.serve_dsn)["user"]))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [BENCH_ROLE])
            role = sql.Identifier(BENCH_ROLE)
            if found.fetchone() is None:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(role))
            conn.execute(sql.SQL("GRANT SELECT ON pgbench_accounts TO {}").format(role))
            conn.execute(sql.SQL("GRANT {} TO {}").format(role, login))

    def _server_version(self) -> str:
        import psycopg

        want = self.args.scale * 100_000
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            # every aid the wrk script draws must exist: a missing row still answers 200
            got = conn.execute(
                "SELECT count(*), min(aid), max(aid) FROM pgbench_accounts"
            ).fetchone()
        if got is None or tuple(got) != (want, 1, want):
            raise BenchError(
                f"pgbench_accounts holds (count, min, max) {got}, not scale "
                f"{self.args.scale}; load it with pgbench -i -s {self.args.scale}"
            )
        return str(row[0]) if row else "?"

    def comparison(self) -> dict[str, Any]:
        a = self.args
        names = [PGQG, *a.against]
        servers = [name for name in names if name != PGBENCH]
        for name in servers:
            self.log(f"starting {name}")
            self.start(self.make_server(name, a.pool_size))
        self.log(f"warming up ({a.warmup:g} s each)")
        for name in names:
            self.measure(name, connections=a.connections, duration=a.warmup)
        rounds: list[dict[str, Any]] = []
        for r in range(a.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            this_round: dict[str, Any] = {}
            for name in order:
                res = self.measure(name, connections=a.connections, duration=a.duration)
                this_round[name] = res
                flag = "" if res["valid"] else "  INVALID (errors)"
                self.log(
                    f"round {r + 1}/{a.rounds} {name:<15} {res['rps']:>9.0f} req/s  "
                    f"p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms  "
                    f"(others used {res['other_cpu_pct']:.0f} % CPU){flag}"
                )
            rounds.append(this_round)
        for name in servers:
            self.stop(name)
        summary = {name: summarize([rnd[name] for rnd in rounds]) for name in names}
        pgqg_rps = summary[PGQG]["rps"]
        # unrounded: a target is judged on these (0.4996 does not meet 0.5)
        ratios = {
            name: pgqg_rps / s["rps"] if s["rps"] else None
            for name, s in summary.items()
            if name != PGQG
        }
        return {"rounds": rounds, "summary": summary, "ratios": ratios}

    def concurrency_sweep(self) -> list[dict[str, Any]]:
        a = self.args
        server = self.start(self.make_server(PGQG, a.pool_size))
        self.measure(PGQG, connections=32, duration=a.warmup)
        rows = [
            self.sweep_point(server, c, a.pool_size, f"clients {c:>4}") for c in CONCURRENCY_SWEEP
        ]
        self.stop(PGQG)
        return rows

    def pool_sweep(self) -> list[dict[str, Any]]:
        a = self.args
        rows = []
        for p in POOL_SWEEP:
            server = self.start(self.make_server(PGQG, p))
            self.measure(PGQG, connections=a.connections, duration=a.warmup)
            rows.append(self.sweep_point(server, a.connections, p, f"pool {p:>2}"))
            self.stop(PGQG)
        return rows

    def sweep_point(
        self, server: Server, connections: int, pool_size: int, label: str
    ) -> dict[str, Any]:
        """One measurement of a sweep, annotated and logged."""
        res = self.measure(
            PGQG, connections=connections, duration=self.args.sweep_duration, server=server
        )
        res["connections"], res["pool_size"] = connections, pool_size
        self.log(
            f"sweep {label}: {res['rps']:>9.0f} req/s, "
            f"{res['jobs_per_round_trip']} jobs/round trip"
            + ("" if res["valid"] else "  INVALID (errors)")
        )
        return res

    def profile(self) -> dict[str, Any]:
        """py-spy samples pgqg under the comparison's load (a separate run)."""
        a = self.args
        if shutil.which("py-spy") is None:
            self.log("py-spy is not installed (pip install py-spy): no profile")
            return {}
        server = self.start(self.make_server(PGQG, a.pool_size))
        self.measure(PGQG, connections=a.connections, duration=a.warmup)
        out = RESULTS_DIR / "pgqg-profile.txt"
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(server.pid),
                "--format",
                "raw",
                "--output",
                str(out),
                "--duration",
                str(round(a.duration)),
                "--rate",
                "200",
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            res = self.measure(PGQG, connections=a.connections, duration=a.duration)
        finally:
            spy.wait(timeout=a.duration + 60)
        self.stop(PGQG)
        return {"run_under_py_spy": res, **top_frames(out), "collapsed_stacks": str(out)}

    def close(self) -> None:
        for name in list(self.servers):
            with contextlib.suppress(Exception):
                self.stop(name)
        embedded = getattr(self, "_embedded", None)
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the valid rounds; how many rounds were invalid."""
    valid = [r for r in results if r["valid"]]
    out: dict[str, Any] = {"rounds": len(results), "invalid_rounds": len(results) - len(valid)}
    if not valid:
        return {**out, "rps": 0.0, "p50_ms": None, "p99_ms": None}
    for key in ("rps", "p50_ms", "p99_ms"):
        out[key] = round(statistics.median(r[key] for r in valid), 3)
    out["rps_min"] = min(r["rps"] for r in valid)
    out["rps_max"] = max(r["rps"] for r in valid)
    cpu = [r.get("cpu_us_per_request") or {} for r in valid]
    out["cpu_us_per_request"] = {
        k: round(statistics.median(c[k] for c in cpu if k in c), 1) for k in cpu[0]
    }
    out["other_cpu_pct_max"] = max(r.get("other_cpu_pct", 0.0) for r in valid)
    if "jobs_per_round_trip" in valid[0]:
        jobs = sum(r["jobs"] for r in valid)
        trips = sum(r["round_trips"] for r in valid)
        out["jobs_per_round_trip"] = round(jobs / trips, 2) if trips else 0.0
    return out


def top_frames(collapsed: Path, n: int = 15) -> dict[str, Any]:
    """The hottest frames of a py-spy collapsed-stack file (``--format raw``).

    Stacks are cut below the event loop (``run_app``): a sample whose innermost frame
    is ``run_app`` itself was in uvloop's C code (polling, callbacks, transports).
    "self" is by line (where the samples landed), "inclusive" by function.
    """
    self_count: dict[str, int] = {}
    incl_count: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError), open(collapsed) as fh:
        for line in fh:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            roots = [i for i, f in enumerate(frames) if f.startswith("run_app ")]
            if roots:
                frames = frames[roots[-1] :]
            total += count
            leaf = _short_frame(frames[-1], line=True)
            if leaf.startswith("run_app "):
                leaf = "event loop (uvloop, C)"
            self_count[leaf] = self_count.get(leaf, 0) + count
            for f in {_short_frame(f, line=False) for f in frames[1:]}:
                incl_count[f] = incl_count.get(f, 0) + count

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return [(frame, round(100 * c / total, 1)) for frame, c in ranked]

    return {"samples": total, "top_self": top(self_count), "top_inclusive": top(incl_count)}


def _short_frame(frame: str, *, line: bool) -> str:
    """``func (path/to/module.py:123)`` as ``func (module.py:123)`` or ``func (module.py)``."""
    m = re.match(r"(.*?) \((.*?)(?::(\d+))?\)$", frame)
    if not m:
        return frame
    where = Path(m.group(2)).name + (f":{m.group(3)}" if line and m.group(3) else "")
    return f"{m.group(1)} ({where})"


# --- reporting ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "?",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def bench_token() -> str:
    """pgqg-jwt's token: `BENCH_ROLE`, a sub, valid for a day (one token, as one
    signed-in user's browser sends: the gateway verifies it once, then knows it)."""
    import jwt

    now = int(time.time())
    claims = {"role": BENCH_ROLE, "sub": "bench", "iat": now, "exp": now + 86400}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def guard_cost(guarded: dict[str, Any], unguarded: dict[str, Any]) -> str:
    """What the role checks after raw statements cost a point select: pgqg against
    ``pgqg-noguard``, req/s and CPU per request (less sensitive to others' load)."""
    parts = [f"req/s {guarded['rps'] / unguarded['rps'] - 1:+.1%}"]
    with_cpu, without = guarded["cpu_us_per_request"], unguarded["cpu_us_per_request"]
    for key in ("server", "postgres"):
        if with_cpu.get(key) and without.get(key):
            parts.append(
                f"{key} CPU per request {without[key]:.0f} -> {with_cpu[key]:.0f} µs "
                f"({with_cpu[key] / without[key] - 1:+.1%})"
            )
    return "The role checks after raw statements (issue 26), pgqg over pgqg-noguard: " + (
        "; ".join(parts) + "."
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    comp = results["comparison"]
    summary, ratios = comp["summary"], comp["ratios"]
    lines = [
        f"Point select by primary key, {cfg['connections']} clients (wrk -t2), pool size "
        f"{cfg['pool_size']} for every pooled target, {cfg['rounds']} interleaved rounds of "
        f"{cfg['duration']:g} s, medians; {results['machine']['cpus']} CPUs "
        f"({results['machine']['cpu_model']}), PostgreSQL {results['database']['server_version']}; "
        f"pgqg {'compiled by mypyc' if results['pgqg_compiled'] else 'plain Python'}.",
        "",
        "| target | req/s (median) | min-max | p50 ms | p99 ms | CPU µs/req: server, postgres "
        "| others' CPU % (max) | pgqg ÷ target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        cpu = s.get("cpu_us_per_request") or {}
        cpu_text = ", ".join(f"{cpu[k]:.0f}" if k in cpu else "-" for k in ("server", "postgres"))
        ratio = "-" if name == PGQG else f"{ratios[name]:.2f}x" if ratios[name] else "-"
        invalid = f" ({s['invalid_rounds']} invalid)" if s["invalid_rounds"] else ""
        spread = f"{s['rps_min']:.0f}-{s['rps_max']:.0f}" if "rps_min" in s else "-"
        lines.append(
            f"| {LABELS[name]}{invalid} | {s['rps']:.0f} | {spread} | {_ms(s['p50_ms'])} "
            f"| {_ms(s['p99_ms'])} | {cpu_text} | {s.get('other_cpu_pct_max', 0):.0f} | {ratio} |"
        )
    jpr = summary[PGQG].get("jobs_per_round_trip")
    noise = max(s.get("other_cpu_pct_max", 0.0) for s in summary.values())
    lines += [
        "",
        f"pgqg: {jpr} jobs per round trip at {cfg['connections']} clients. CPU µs/req counts "
        "the server process and all PostgreSQL processes (wrk's own is in the JSON). "
        "Others' CPU: the share of the machine's CPUs used by processes outside the "
        f"measurement (idle targets, other users, steal); at most {noise:.0f} % in this run.",
        "",
    ]
    lines += ["| pgqg ÷ | target | measured | met |", "|---|---:|---:|---|"]
    for name, want in TARGETS.items():
        if name not in ratios:
            lines.append(f"| {LABELS[name]} | >= {want:g}x | - | not measured |")
            continue
        got = ratios[name]
        met = "yes" if got is not None and got >= want else "no"
        shown = f"{got:.4f}x" if got is not None else "-"
        lines.append(f"| {LABELS[name]} | >= {want:g}x | {shown} | {met} |")
    if ratios.get(PGQG_JWT):
        cost = 1 - 1 / ratios[PGQG_JWT]
        met = "yes" if cost < TOKEN_COST_GOAL else "no"
        lines += [
            "",
            f"A bearer token (HS256, verified once and then known; role and claims set in "
            f"each job's transaction) costs {100 * cost:.1f} % of pgqg's req/s "
            f"(goal: under {100 * TOKEN_COST_GOAL:.0f} %; met: {met}).",
        ]
    if ratios.get(PGQG_NO_GUARD):
        lines += ["", guard_cost(summary[PGQG], summary[PGQG_NO_GUARD])]
    for title, key in (("clients", "concurrency_sweep"), ("pool size", "pool_sweep")):
        rows = results.get(key) or []
        if not rows:
            continue
        fixed = "pool size" if key == "concurrency_sweep" else "clients"
        fixed_key = "pool_size" if key == "concurrency_sweep" else "connections"
        lines += [
            "",
            f"| pgqg, {title} ({fixed} {rows[0][fixed_key]}) "
            "| req/s | p50 ms | p99 ms | jobs per round trip | errors |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            x = r["connections"] if key == "concurrency_sweep" else r["pool_size"]
            errors = r["non2xx"] + r["socket_errors"]
            lines.append(
                f"| {x} | {r['rps']:.0f} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} "
                f"| {r['jobs_per_round_trip']} | {errors or 0} |"
            )
    prof = results.get("profile") or {}
    if prof.get("top_self"):
        lines += [
            "",
            f"py-spy, pgqg at {cfg['connections']} clients ({prof['samples']} samples):",
            "",
            "| self % | function | | inclusive % | function |",
            "|---:|---|---|---:|---|",
        ]
        for (sf, sp), (inf, ip) in zip(prof["top_self"], prof["top_inclusive"], strict=False):
            lines.append(f"| {sp} | `{sf}` | | {ip} | `{inf}` |")
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="pgqg beside the alternatives (see bench/run.py's docstring)."
    )
    p.add_argument("--dsn", help="use this PostgreSQL (its pgbench_* tables are recreated)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per target (3)")
    p.add_argument("--sweep-duration", type=float, help="seconds per sweep point (--duration)")
    p.add_argument("--connections", type=int, default=32, help="clients for the comparison (32)")
    p.add_argument("--pool-size", type=int, default=8, help="connections per pooled target (8)")
    p.add_argument("--scale", type=int, default=10, help="pgbench scale (10: 1M accounts)")
    p.add_argument("--skip-load", action="store_true", help="with --dsn: tables already loaded")
    p.add_argument("--no-sweeps", action="store_true", help="only the comparison")
    p.add_argument(
        "--against",
        type=_targets,
        default=[*BASELINES, PGQG_NO_METRICS, PGQG_JWT, PGQG_NO_GUARD, PGBENCH],
        metavar="NAME,...",
        help="what pgqg is compared with (all): "
        + ", ".join([*BASELINES, PGQG_NO_METRICS, PGQG_JWT, PGQG_NO_GUARD, "pgbench"]),
    )
    p.add_argument("--profile", action="store_true", help="also py-spy pgqg under load")
    p.add_argument(
        "--quick",
        action="store_true",
        help="harness check: 1 round of 3 s, 1 s warm-ups, 2 s sweep points",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="results file (bench/results/latest.json; quick.json with --quick)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3.0, 1.0
        args.sweep_duration = args.sweep_duration or 2.0
    args.out = args.out or RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    args.sweep_duration = args.sweep_duration or args.duration
    if args.skip_load and not args.dsn:
        p.error("--skip-load needs --dsn (the embedded database starts empty)")
    return args


def _targets(text: str) -> list[str]:
    """``--against``'s comma-separated names, in the baselines' order."""
    known = (*BASELINES, PGQG_NO_METRICS, PGQG_JWT, PGQG_NO_GUARD, PGBENCH)
    wanted = {PGBENCH if n.strip() == "pgbench" else n.strip() for n in text.split(",")}
    if unknown := wanted.difference(known):  # an empty name is unknown too
        names = ", ".join(map(repr, sorted(unknown)))
        raise argparse.ArgumentTypeError(f"unknown target(s): {names}")
    return [n for n in known if n in wanted]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    if stale := stale_build():
        print(stale, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    bench = Bench(args)
    results: dict[str, Any] = {
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "dsn"
        },
        "machine": machine(),
        "pgqg_env": {k: v for k, v in os.environ.items() if k.startswith("PGQG_")},
        "pgqg_compiled": compiled_modules(),  # by mypyc at install; [] when plain Python
        "sql": POINT_SELECT,
    }
    try:
        results["database"] = bench.setup_database()
        results["comparison"] = bench.comparison()
        if not args.no_sweeps:
            results["concurrency_sweep"] = bench.concurrency_sweep()
            results["pool_sweep"] = bench.pool_sweep()
        if args.profile:
            results["profile"] = bench.profile()
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        bench.close()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\n(full run took {results['elapsed_s']:.0f} s; details in {args.out})")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
