"""Live events: how soon a NOTIFY reaches the gateway's SSE subscribers, beside a direct LISTEN.

Runs ``pgqg serve`` as a subprocess (every channel open to anonymous listeners) against an
embedded PostgreSQL of its own, or ``--dsn``. Each sample is one NOTIFY from a producer
connection, timed until it arrives at

* a direct psycopg connection LISTENing to the same channel: the baseline, what PostgreSQL
  and libpq cost on this machine at this moment, measured on the same notification;
* the gateway's first and its last SSE subscriber (aiohttp clients in this process).

Then a burst: ``--burst`` notifications in one transaction to every subscriber, timed
until the last subscriber has the last one.

Usage (from the repository root; traffic goes to 127.0.0.1 only)::

    python bench/listen.py                                   # 1 and 200 subscribers
    python bench/listen.py --samples 500 --subscribers 1 50 500 --burst 2000

Prints milliseconds (p50, p90, p99, max) and the ratio of each p50 to the baseline's;
exits 1 when the first subscriber's p99 is over the issue's 100 ms (the direct LISTEN's p99
is printed beside it: when the machine stalls, both show it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# bench/ is on the path as the script's own folder
from soak import free_port, wait_ready  # noqa: E402

from gateway.embedded._postgres import EmbeddedPostgres  # noqa: E402

TARGET_MS = 100.0
WAIT_S = 30.0


class Arrivals:
    """When each numbered notification reached each of `expected` receivers."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.times: dict[int, list[float]] = {}
        self._complete: dict[int, asyncio.Event] = {}

    def record(self, number: int, at: float) -> None:
        got = self.times.setdefault(number, [])
        got.append(at)
        if len(got) == self.expected:
            self._event(number).set()

    async def complete(self, number: int) -> None:
        await asyncio.wait_for(self._event(number).wait(), WAIT_S)

    def _event(self, number: int) -> asyncio.Event:
        return self._complete.setdefault(number, asyncio.Event())


async def read_stream(resp: aiohttp.ClientResponse, arrivals: Arrivals) -> None:
    """Record every notify event of an SSE response (its data is the notification's number)."""
    buffer = b""
    while chunk := await resp.content.readany():
        now = time.perf_counter()
        buffer += chunk
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            if block.startswith(b"event: notify"):
                arrivals.record(int(block.rpartition(b"data: ")[2]), now)


async def read_direct(conn: psycopg.AsyncConnection[Any], arrivals: Arrivals) -> None:
    async for notify in conn.notifies():
        arrivals.record(int(notify.payload), time.perf_counter())


@contextlib.asynccontextmanager
async def gateway(dsn: str) -> AsyncIterator[str]:
    """`pgqg serve` on a free port, every channel open to anonymous listeners; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PGQG_LISTEN_CHANNELS": json.dumps({"anon": ["*"]}),
        "PGQG_LISTEN_MAX_SUBSCRIBERS": "100000",
        "PGQG_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "gateway", "serve", "--dsn", dsn, "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        # started once, before anything is measured: blocking for a moment here is harmless
        proc = subprocess.Popen(  # noqa: ASYNC220
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            if not await wait_ready(url):
                raise RuntimeError("the gateway did not get ready")
            yield url
        finally:
            exited = proc.poll() is not None
            proc.kill()
            proc.wait()
            log.seek(0)
            if exited:
                print("--- the gateway exited; its log ---\n" + log.read()[-3000:])


def figures(samples_ms: list[float]) -> tuple[float, float, float, float]:
    ordered = sorted(samples_ms)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return cut[49], cut[89], cut[98], ordered[-1]


def row(label: str, samples_ms: list[float], baseline_p50: float | None) -> str:
    p50, p90, p99, worst = figures(samples_ms)
    ratio = f"{p50 / baseline_p50:6.1f}x" if baseline_p50 else "      -"
    return f"{label:<38} {p50:7.2f} {p90:7.2f} {p99:7.2f} {worst:7.2f}  {ratio}"


async def measure(args: argparse.Namespace, dsn: str) -> bool:
    verdicts: list[str] = []
    async with (
        gateway(dsn) as url,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as producer,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as direct,
    ):
        print(f"NOTIFY to arrival, {args.samples} samples each, ms"
              f"{'':<6}  p50     p90     p99     max   p50 / direct")  # fmt: skip
        for count in args.subscribers:
            channel = f"bench_{count}"
            await direct.execute(f"LISTEN {channel}")
            direct_arrivals, sse_arrivals = Arrivals(1), Arrivals(count)
            responses = await asyncio.gather(
                *(http.get(f"{url}/v1/listen/{channel}") for _ in range(count))
            )
            assert all(r.status == 200 for r in responses), [r.status for r in responses]
            tasks = [asyncio.ensure_future(read_stream(r, sse_arrivals)) for r in responses]
            tasks.append(asyncio.ensure_future(read_direct(direct, direct_arrivals)))
            await asyncio.sleep(0.5)  # every stream's first bytes read: the LISTEN is in place
            sent: dict[int, float] = {}
            for number in range(args.samples):
                sent[number] = time.perf_counter()
                await producer.execute(f"NOTIFY {channel}, '{number}'")
                await direct_arrivals.complete(number)
                await sse_arrivals.complete(number)
            base = [(direct_arrivals.times[n][0] - t) * 1000 for n, t in sent.items()]
            first = [(min(sse_arrivals.times[n]) - t) * 1000 for n, t in sent.items()]
            last = [(max(sse_arrivals.times[n]) - t) * 1000 for n, t in sent.items()]
            base_p50 = figures(base)[0]
            print(row("direct LISTEN (psycopg), the baseline", base, None))
            label = "1 subscriber" if count == 1 else f"{count} subscribers: the first"
            print(row(f"gateway, {label}", first, base_p50))
            if count > 1:
                print(row(f"gateway, {count} subscribers: the last", last, base_p50))
            p99, base_p99 = figures(first)[2], figures(base)[2]
            verdicts.append(
                f"{count} subscriber(s): the first's p99 {p99:.1f} ms"
                f" (the direct LISTEN's {base_p99:.1f} ms): "
                + ("met" if p99 <= TARGET_MS else "NOT met")
            )
            if args.burst:
                start = args.samples
                numbers = range(start, start + args.burst)
                started = time.perf_counter()
                await producer.execute(
                    "SELECT pg_notify(%s, n::text) FROM generate_series(%s::int, %s::int) n",
                    (channel, numbers[0], numbers[-1]),
                )
                await direct_arrivals.complete(numbers[-1])
                direct_s = direct_arrivals.times[numbers[-1]][0] - started
                await sse_arrivals.complete(numbers[-1])
                took = max(sse_arrivals.times[numbers[-1]]) - started
                events = count * args.burst
                print(
                    f"burst of {args.burst} in one transaction to {count}: the last arrived"
                    f" {took * 1000:.0f} ms after the statement was sent, {events / took:,.0f}"
                    f" events/s (direct LISTEN: {direct_s * 1000:.0f} ms)"
                )
            for resp in responses:
                resp.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await direct.execute(f"UNLISTEN {channel}")
            print()
    print(f"target: the first subscriber's p99 within {TARGET_MS:.0f} ms of NOTIFY")
    for verdict in verdicts:
        print("  " + verdict)
    return all(v.endswith(": met") for v in verdicts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="use this PostgreSQL instead of an embedded one")
    parser.add_argument("--samples", type=int, default=200, help="NOTIFYs per measurement (200)")
    parser.add_argument(
        "--subscribers", type=int, nargs="+", default=[1, 200], help="SSE subscribers (1 200)"
    )
    parser.add_argument("--burst", type=int, default=1000, help="burst size, 0: none (1000)")
    args = parser.parse_args(argv)
    if args.dsn:
        return 0 if asyncio.run(measure(args, args.dsn)) else 1
    with tempfile.TemporaryDirectory(prefix="pgqg-listen-") as tmp:
        os.chmod(tmp, 0o755)  # the embedded server's user must reach its data directory
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", fast=True)
        pg.start()
        try:
            ok = asyncio.run(measure(args, pg.dsn))
        finally:
            pg.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
