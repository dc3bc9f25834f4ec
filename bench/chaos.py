"""Chaos soak: a gateway under load while the connection to PostgreSQL keeps breaking.

Runs ``pgqg serve`` as a subprocess against an embedded PostgreSQL of its own,
through the fault-injecting proxy of the tests (tests/faultproxy.py), under
the load of tests/faultload.py (writers that retry only when told it is safe,
readers). Every few seconds one fault strikes, in a seeded random order, and
ends before the next:

* ``cut``: every connection reset;
* ``black_hole``: nothing forwarded for `BLACK_HOLE_S`, sockets kept open;
* ``terminate``: ``pg_terminate_backend`` on every pooled backend;
* ``kill``: the postmaster SIGKILLed, started again `DOWN_S` later;
* ``commit``: the connection reset right after the next COMMIT reached the server;
* ``results``: a connection reset as a result comes back.

After each the service must answer again within `BACK_S` of the database. At
the end it prints the requests answered, errors by code, latency, "hung"
(answers later than their deadline plus 1 s, or none), what the table holds
against what was acknowledged, and how long SIGTERM took; it exits 0 when
nothing hung, nothing was written twice, every 503 was safe, the service
always came back in time and SIGTERM ended the gateway within its grace
plus 2 s.

Usage (from the repository root; all traffic stays on 127.0.0.1)::

    python bench/chaos.py                  # 60 s, a fault every ~5 s
    python bench/chaos.py --duration 20 --every 3 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from faultload import Gateway, Load  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from support import Served  # noqa: E402

from gateway.embedded._postgres import EmbeddedPostgres  # noqa: E402

DEADLINE_S = 3.0
GRACE_S = 1.0
BACK_S = 3.0
BLACK_HOLE_S = 3.0
DOWN_S = 2.0
POOL_SIZE = 4


class Chaos:
    """The faults, struck one at a time at a gateway behind `proxy`."""

    def __init__(self, pg: EmbeddedPostgres, proxy: FaultProxy, gateway: Gateway) -> None:
        self.pg = pg
        self.proxy = proxy
        self.gateway = gateway
        self.struck: Counter[str] = Counter()
        #: seconds from the database being whole again to the gateway answering
        self.back: list[float] = []
        self.faults: dict[str, Callable[[], Awaitable[None]]] = {
            "cut": self.cut,
            "black_hole": self.black_hole,
            "terminate": self.terminate,
            "kill": self.kill,
            "commit": self.commit,
            "results": self.results,
        }

    async def strike(self, name: str) -> None:
        await self.faults[name]()
        self.struck[name] += 1
        self.back.append(await self.gateway.back_within(BACK_S + 7))

    async def cut(self) -> None:
        self.proxy.cut()

    async def black_hole(self) -> None:
        self.proxy.black_hole()
        await asyncio.sleep(BLACK_HOLE_S)
        self.proxy.heal()

    async def terminate(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.pg.dsn, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'pgqg'"
            )

    async def kill(self) -> None:
        if self.pg.pid is not None:
            os.kill(self.pg.pid, signal.SIGKILL)
        await asyncio.sleep(DOWN_S)
        await asyncio.to_thread(self.pg.start)

    async def commit(self) -> None:
        fired = self.proxy.cut_after(b"COMMIT\x00", "to_server")
        with contextlib.suppress(TimeoutError):  # the writers send one soon
            await asyncio.wait_for(asyncio.shield(fired), 2.0)
        self.proxy.disarm()

    async def results(self) -> None:
        marker = "pgqg-" + uuid.uuid4().hex[:8]
        self.proxy.cut_after(marker.encode(), "to_client")
        await self.gateway.read(f"select '{marker}' AS m, pg_sleep(0.05)")
        self.proxy.disarm()


def rounds(names: list[str], rng: random.Random) -> Iterator[str]:
    """`names` in a new random order each round, for ever."""
    while True:
        rng.shuffle(names)
        yield from names


async def chaos(args: argparse.Namespace, pg: EmbeddedPostgres) -> bool:
    table = "chaos_" + uuid.uuid4().hex[:8]
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as conn:
        await conn.execute(f"create table {table} (id int, v text)")  # no key: duplicates show
    proxy = await FaultProxy(pg.port).start()
    env = {
        "PGQG_RAW_SQL": "read-write",
        "PGQG_POOL_SIZE": str(POOL_SIZE),
        "PGQG_SHUTDOWN_GRACE_S": str(GRACE_S),
        "PGQG_CONNECT_TIMEOUT_MS": "1000",
        "PGQG_LOG_LEVEL": "error",
    }
    served = Served(proxy.dsn(pg.gateway_dsn), env=env)
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S + 15)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await served.ready(http)
            gateway = Gateway(served.url, http, table, DEADLINE_S)
            return await drive(args, pg, proxy, served, gateway)
    finally:
        served.stop()
        await proxy.close()


async def drive(
    args: argparse.Namespace,
    pg: EmbeddedPostgres,
    proxy: FaultProxy,
    served: Served,
    gateway: Gateway,
) -> bool:
    rng = random.Random(args.seed)
    faults = Chaos(pg, proxy, gateway)
    load = Load(gateway).start(writers=args.writers, readers=args.readers)
    loop = asyncio.get_running_loop()
    started = loop.time()
    end = started + args.duration
    broken: list[str] = []
    for name in rounds(list(faults.faults), rng):
        pause = rng.uniform(0.6 * args.every, 1.4 * args.every)
        if loop.time() + pause >= end:
            break
        await asyncio.sleep(pause)
        try:
            await faults.strike(name)
        except AssertionError as exc:
            broken.append(f"{name}: {exc}")
            break
    await asyncio.sleep(max(end - loop.time(), 0))
    await load.stop()
    elapsed = loop.time() - started
    summary = await load.summary(pg.dsn)
    served.proc.send_signal(signal.SIGTERM)
    sigterm = time.monotonic()
    code = await asyncio.wait_for(asyncio.to_thread(served.proc.wait), GRACE_S + 15)
    exit_s = time.monotonic() - sigterm
    problems = summary.problems() + broken
    if code != 0 or exit_s >= GRACE_S + 2:
        problems.append(f"SIGTERM: exit code {code} after {exit_s:.2f} s")
    n = len(summary.load.answers)
    print(f"chaos: {elapsed:.0f} s, {sum(faults.struck.values())} faults:"
          f" {', '.join(f'{k} {v}' for k, v in sorted(faults.struck.items()))}")  # fmt: skip
    print(f"requests answered: {n} ({n / elapsed:.0f}/s)")
    print(f"by status: {dict(sorted(summary.statuses.items()))}")
    print(f"errors by code: {dict(sorted(summary.codes.items()))}")
    p50, p99, slowest = (summary.latency(q) * 1000 for q in (0.5, 0.99, 1.0))
    print(f"latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {slowest:.1f} ms")
    print(f"hung: {summary.hung}")
    print(f"writes: {len(load.acked)} acknowledged, {len(summary.stored)} ids stored,"
          f" {sum(n > 1 for n in summary.stored.values())} written twice")  # fmt: skip
    print(f"back after a fault: max {max(faults.back, default=0):.2f} s (bound {BACK_S} s)")
    print(f"SIGTERM: exit code {code} after {exit_s:.2f} s (bound {GRACE_S + 2:.0f} s)")
    if max(faults.back, default=0) >= BACK_S:
        problems.append(f"the service came back {max(faults.back):.2f} s after the database")
    for problem in problems[:10]:
        print("  " + problem)
    print("CHAOS PASSED" if not problems else "CHAOS FAILED")
    return not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--every", type=float, default=5.0, help="mean seconds between faults")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pgqg-chaos-") as tmp:
        # EmbeddedPostgres wants its data directory reachable by the server's user
        os.chmod(tmp, 0o755)
        # durable commits: with fast=True PostgreSQL loses acknowledged ones on SIGKILL
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", fast=False)
        pg.start()
        try:
            ok = asyncio.run(chaos(args, pg))
        finally:
            pg.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
