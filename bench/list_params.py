"""What a list parameter costs: its statement is described first, for the array delimiter.

    python bench/list_params.py [--dsn DSN] [--rounds 5] [--duration 5]

Starts an embedded PostgreSQL in a temporary directory unless ``--dsn`` names one, and
one pgqg (``python -m gateway serve``) on a free port; then runs interleaved rounds of
``wrk -t1 -c16`` (the order rotates from round to round), one request body each:

* ``list``: ``select $1::int[]`` with ``[[1, 2, 3]]``, described before it runs;
* ``literal``: the same array as a string, ``["{1,2,3}"]``: not described;
* ``scalar``: ``select $1::int`` with ``[1]``: no list.

Prints each one's median requests/s over the rounds and the ratios to ``literal``. A run
with a non-2xx answer or a socket error stops the benchmark. Every process it starts is
stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(REPO_DIR))  # `gateway` from this checkout, whatever the cwd

from gateway.embedded._postgres import EmbeddedPostgres  # noqa: E402

BODIES = {
    "list": {"sql": "select $1::int[] AS a", "params": [[1, 2, 3]]},
    "literal": {"sql": "select $1::int[] AS a", "params": ["{1,2,3}"]},
    "scalar": {"sql": "select $1::int AS a", "params": [1]},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    with (
        tempfile.TemporaryDirectory(prefix="pgqg-bench-") as tmp,
        EmbeddedPostgres(Path(tmp) / "data", fast=True) as pg,
    ):
        yield pg.dsn


@contextlib.contextmanager
def gateway(dsn: str) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gateway", "serve", "--dsn", dsn, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO_DIR, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url + "/readyz", timeout=1) as resp,
            ):
                if resp.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("pgqg did not get ready")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wrk(url: str, body: dict[str, object], duration: int) -> float:
    """Requests/s of one wrk run; stops the benchmark on an error."""
    script = str(BENCH_DIR / "wrk" / "body.lua")
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{duration}s", "-s", script, url, "--", json.dumps(body)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"an invalid run:\n{out}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert found, out
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in BODIES}
    names = list(BODIES)
    with database(args.dsn) as dsn, gateway(dsn) as url:
        for name in names:  # warm up: the statements, the types, the dispatcher's costs
            wrk(url, BODIES[name], 1)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[name].append(wrk(url, BODIES[name], args.duration))
                print(f"round {r + 1} {name}: {rates[name][-1]:.0f} req/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print("\n| body | req/s (median) | / literal |\n|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.0f} | {median / medians['literal']:.3f}x |")


if __name__ == "__main__":
    main()
