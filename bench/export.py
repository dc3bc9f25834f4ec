"""Export benchmark: a large result streamed through the gateway, against COPY.

Runs, in one go and against the same PostgreSQL:

* ``COPY (query) TO STDOUT`` over a direct psycopg connection, text and CSV
  formats (the floor: PostgreSQL's own bulk output, no HTTP, no JSON);
* the gateway (``python -m gateway serve`` in a child process, so its memory is
  its own) answering ``POST /v1/query`` with ``?format=ndjson`` and ``?format=csv``.

Each export is read to the end and its lines counted (1,000,000 rows, plus the
CSV header). The gateway's RSS is sampled every 5 ms with psutil; the peak
during each export is reported next to its RSS when idle.

    python bench/export.py                  # embedded PostgreSQL in a temp dir
    python bench/export.py --dsn postgresql://… --rows 1000000 --repeat 3

The best of ``--repeat`` runs is reported (the machine is shared; the best run
is the one least disturbed). ``--json FILE`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.embedded._postgres import EmbeddedPostgres  # noqa: E402

QUERY = "select g, md5(g::text) from generate_series(1, {rows}) g"
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def database(dsn: str | None) -> Iterator[tuple[str, str]]:
    """The given DSN, or a throwaway embedded cluster's: (for COPY, for the gateway,
    which logs in as the embedded server's least-privileged role as pgqg serve does)."""
    if dsn:
        yield dsn, dsn
        return
    with tempfile.TemporaryDirectory(prefix="pgqg-bench-") as tmp:
        os.chmod(tmp, 0o755)  # the server may run as another user when we are root
        with EmbeddedPostgres(Path(tmp) / "pg", fast=True) as pg:
            yield pg.dsn, pg.gateway_dsn


@contextmanager
def gateway(dsn: str, port: int) -> Iterator[psutil.Process]:
    """``python -m gateway serve`` in a child process, ready to answer."""
    # a --dsn may name a superuser, which pgqg serves raw SQL to only when allowed to
    env = {
        **os.environ,
        "PGQG_LOG_LEVEL": "warning",
        "PGQG_ALLOW_PRIVILEGED_ROLE": "true",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--dsn", dsn, "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_ready(port, proc)
        yield psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    async def poll() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("the gateway exited during start-up")
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    asyncio.run(asyncio.wait_for(poll(), timeout))


class RssSampler:
    """Samples a process's RSS in a thread while in use; `peak` is the highest seen."""

    def __init__(self, process: psutil.Process, interval: float = 0.005) -> None:
        self._process = process
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def copy_export(dsn: str, sql: str, fmt: str) -> int:
    """Lines of ``COPY (sql) TO STDOUT`` over a direct connection."""
    options = "" if fmt == "text" else " WITH (FORMAT csv, HEADER)"
    lines = 0
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY ({sql}) TO STDOUT{options}") as copy,
    ):
        for block in copy:
            lines += bytes(block).count(b"\n")
    return lines


def gateway_export(port: int, sql: str, fmt: str) -> int:
    """Lines of the gateway's streamed answer in `fmt`, read to the end."""

    async def run() -> int:
        lines = 0
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"http://127.0.0.1:{port}/v1/query?format={fmt}"
            async with session.post(url, json={"sql": sql}) as resp:
                resp.raise_for_status()
                async for chunk in resp.content.iter_chunked(MB):
                    lines += chunk.count(b"\n")
        return lines

    return asyncio.run(run())


def best_of(repeat: int, run: Callable[[], int]) -> tuple[float, int]:
    """The shortest of `repeat` runs (seconds) and its line count."""
    best: tuple[float, int] | None = None
    for _ in range(repeat):
        started = time.perf_counter()
        lines = run()
        elapsed = time.perf_counter() - started
        if best is None or elapsed < best[0]:
            best = (elapsed, lines)
    assert best is not None
    return best


def bench(dsn: str, serve_dsn: str, rows: int, repeat: int) -> dict[str, Any]:
    sql = QUERY.format(rows=rows)
    figures: dict[str, Any] = {"rows": rows, "query": sql, "repeat": repeat}
    for fmt in ("text", "csv"):
        elapsed, lines = best_of(repeat, lambda fmt=fmt: copy_export(dsn, sql, fmt))
        figures[f"copy_{fmt}"] = {"seconds": elapsed, "rows_per_s": rows / elapsed, "lines": lines}
    port = free_port()
    with gateway(serve_dsn, port) as process:
        gateway_export(port, "select 1", "ndjson")  # warm up: connections, imports
        figures["gateway_idle_rss_mb"] = process.memory_info().rss / MB
        for fmt in ("ndjson", "csv"):
            with RssSampler(process) as rss:
                elapsed, lines = best_of(repeat, lambda fmt=fmt: gateway_export(port, sql, fmt))
            figures[fmt] = {
                "seconds": elapsed,
                "rows_per_s": rows / elapsed,
                "lines": lines,
                "peak_rss_mb": rss.peak / MB,
            }
    return figures


def report(figures: dict[str, Any]) -> str:
    copy_rate = figures["copy_text"]["rows_per_s"]
    out = [
        f"{figures['rows']:,} rows: {figures['query']}  (best of {figures['repeat']})",
        f"{'export':<28}{'seconds':>9}{'rows/s':>13}{'vs COPY':>9}{'peak RSS':>11}",
    ]
    names = {
        "copy_text": "COPY TO STDOUT (direct)",
        "copy_csv": "COPY … CSV (direct)",
        "ndjson": "gateway NDJSON",
        "csv": "gateway CSV",
    }
    for key, name in names.items():
        row = figures[key]
        rss = f"{row['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in row else ""
        out.append(
            f"{name:<28}{row['seconds']:>9.2f}{row['rows_per_s']:>13,.0f}"
            f"{row['rows_per_s'] / copy_rate:>9.2f}{rss:>11}"
        )
    out.append(f"gateway RSS when idle: {figures['gateway_idle_rss_mb']:.0f} MB")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded one)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with database(args.dsn) as (dsn, serve_dsn):
        figures = bench(dsn, serve_dsn, args.rows, args.repeat)
    for key, extra in (("ndjson", 0), ("csv", 1), ("copy_text", 0), ("copy_csv", 1)):
        if figures[key]["lines"] != args.rows + extra:
            raise SystemExit(f"{key}: {figures[key]['lines']} lines, not {args.rows + extra}")
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
