"""Soak: a gateway under mixed, partly hostile load; its memory must stay flat.

Runs ``pgqg serve`` as a subprocess against an embedded PostgreSQL of its own,
drives it from bounded concurrency with a mix of good queries, writes, query
errors, deadlines that pass (504 and a cancel on the server), clients that hang
up, bursts beyond the queue (503) and malformed requests, samples the
gateway's RSS every second, and checks at the end:

* every request got an answer (those the client dropped on purpose aside),
  none took longer than its deadline allows;
* the gateway's RSS after warm-up is flat;
* nothing leaked: queue empty, nothing running, every pooled connection idle
  in ``pg_stat_activity`` and answering;
* SIGTERM ends it with exit code 0.

Usage (from the repository root; load goes to 127.0.0.1 only)::

    python bench/soak.py                   # 60 s
    python bench/soak.py --duration 10 --concurrency 16

Exits 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.embedded._postgres import EmbeddedPostgres  # noqa: E402

#: the first seconds are warm-up (imports, caches, the pool filling): not judged
WARMUP_S = 10.0
#: flat means: the last third's mean RSS is within this of the first third's
FLAT_MB = 8.0
FLAT_FRACTION = 0.10


@dataclass
class Tally:
    """What the load saw."""

    sent: Counter[str] = field(default_factory=Counter)
    answered: Counter[tuple[str, int]] = field(default_factory=Counter)
    dropped_on_purpose: int = 0
    unanswered: list[str] = field(default_factory=list)  # errors where an answer was due
    unexpected: list[str] = field(default_factory=list)  # an answer its request cannot earn
    too_slow: list[str] = field(default_factory=list)
    worst_s: float = 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the load ----------------------------------------------------------------------------

#: the statuses each kind may get (503: overloaded, under this load)
EXPECTED = {
    "ok": {200, 503},
    "write": {200, 503},
    "error": {400, 503},
    "timeout": {503, 504},
    "hangup": {503},
    "burst": {200, 503},
    "hostile": {400},
}
BURST = 40
BURST_EVERY_S = 2.0
#: kind -> (weight, HTTP body, longest acceptable answer in seconds)
KINDS: dict[str, tuple[int, Any, float]] = {
    "ok": (40, {"sql": "select g, md5(g::text) from generate_series(1, 50) g"}, 3.0),
    "write": (10, None, 3.0),  # an insert, body made per request
    "error": (10, {"sql": "select 1/0"}, 3.0),
    "timeout": (8, {"sql": "select pg_sleep(2)", "timeout_ms": 150}, 1.5),
    "hangup": (6, {"sql": "select pg_sleep(1)"}, 1.5),  # dropped before it answers
    "burst": (0, {"sql": "select pg_sleep(0.05)"}, 3.0),  # BURST at once, every BURST_EVERY_S
    "hostile": (8, b'{"sql": "select 1", "sql": ', 1.0),
    "named": (6, None, 3.0),  # GET /readyz, /v1/stats, /v1/queries: the cheap endpoints
}


class Load:
    def __init__(
        self,
        url: str,
        concurrency: int,
        seconds: float,
        rng: random.Random,
        bound_factor: float = 1.0,
    ) -> None:
        self.url = url
        self.concurrency = concurrency
        self.seconds = seconds
        self.rng = rng
        self.bound_factor = bound_factor  # each kind's longest acceptable answer, times this
        self.tally = Tally()
        self._next_id = 0
        kinds = [k for k in KINDS if KINDS[k][0]]
        self._choices = (kinds, [KINDS[k][0] for k in kinds])

    async def run(self) -> Tally:
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=self.concurrency * 2)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            end = time.monotonic() + self.seconds
            clients = [self._client(http, end) for _ in range(self.concurrency)]
            await asyncio.gather(self._bursts(http, end), *clients)
        return self.tally

    async def _client(self, http: aiohttp.ClientSession, end: float) -> None:
        while time.monotonic() < end:
            await self._one(http, self.rng.choices(*self._choices)[0])

    async def _bursts(self, http: aiohttp.ClientSession, end: float) -> None:
        """Now and then far more at once than pool and queue hold: most get 503 at once."""
        while time.monotonic() + BURST_EVERY_S < end:
            await asyncio.sleep(BURST_EVERY_S)
            await asyncio.gather(*(self._one(http, "burst") for _ in range(BURST)))

    async def _one(self, http: aiohttp.ClientSession, kind: str) -> None:
        self.tally.sent[kind] += 1
        started = time.monotonic()
        try:
            status = await self._send(http, kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no answer where one was due
            self.tally.unanswered.append(f"{kind}: {type(exc).__name__}: {exc}")
            return
        took = time.monotonic() - started
        if status is None:
            self.tally.dropped_on_purpose += 1
            return
        self.tally.answered[(kind, status)] += 1
        self.tally.worst_s = max(self.tally.worst_s, took)
        if took > KINDS[kind][2] * self.bound_factor:
            self.tally.too_slow.append(f"{kind}: {status} after {took:.2f} s")

    async def _send(self, http: aiohttp.ClientSession, kind: str) -> int | None:
        body = KINDS[kind][1]
        if kind == "write":
            self._next_id += 1
            body = {"sql": "insert into soak (id, v) values ($1, $2)",
                    "params": [self._next_id, "x" * 100]}  # fmt: skip
        if kind == "named":
            path = self.rng.choice(["/readyz", "/v1/stats", "/v1/queries", "/healthz"])
            async with http.get(self.url + path) as resp:
                await resp.read()
                return resp.status
        if kind == "hangup":
            request = asyncio.ensure_future(self._post(http, body, kind))
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))
            if request.done():
                return request.result()
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            return None
        return await self._post(http, body, kind)

    async def _post(self, http: aiohttp.ClientSession, body: Any, kind: str) -> int:
        kwargs: dict[str, Any] = {"json": body} if not isinstance(body, bytes) else {
            "data": body, "headers": {"Content-Type": "application/json"}}  # fmt: skip
        async with http.post(self.url + "/v1/query", **kwargs) as resp:
            text = await resp.text()
            if resp.status not in EXPECTED[kind]:
                self.tally.unexpected.append(f"{kind}: {resp.status} {text[:300]}")
            if resp.status == 503:
                # as a polite client would (Retry-After says 1 s; a soak wants load)
                await asyncio.sleep(self.rng.uniform(0.05, 0.2))
            return resp.status


# --- measuring ------------------------------------------------------------------------------


async def sample_rss(proc: psutil.Process, samples: list[tuple[float, float]], t0: float) -> None:
    """Append (seconds since t0, RSS in MB) every second until cancelled."""
    while True:
        with contextlib.suppress(psutil.Error):
            samples.append((time.monotonic() - t0, proc.memory_info().rss / 2**20))
        await asyncio.sleep(1.0)


def judge_rss(samples: list[tuple[float, float]]) -> tuple[bool, str]:
    judged = [mb for t, mb in samples if t >= WARMUP_S]
    if len(judged) < 6:
        judged = [mb for _, mb in samples[len(samples) // 3 :]]
    third = max(len(judged) // 3, 1)
    first, last = statistics.mean(judged[:third]), statistics.mean(judged[-third:])
    growth = last - first
    flat = growth <= max(FLAT_MB, FLAT_FRACTION * first)
    start = samples[0][1] if samples else 0.0
    peak = max((mb for _, mb in samples), default=0.0)
    return flat, (
        f"RSS: {start:.1f} MB at start, {first:.1f} MB after warm-up, {last:.1f} MB at the end"
        f" (growth {growth:+.1f} MB, peak {peak:.1f} MB) -> {'flat' if flat else 'GROWING'}"
    )


async def leaks(url: str, dsn: str, pool_size: int) -> list[str]:
    """What did not return to rest once the load stopped."""
    problems: list[str] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(100):  # abandoned queries are still being cancelled: up to 5 s
            async with http.get(url + "/v1/stats") as resp:
                stats = await resp.json()
            if (
                not stats["running"]
                and sum(c["connected"] for c in stats["connections"]) == pool_size
            ):
                break
            await asyncio.sleep(0.05)
        if stats["running"] or stats["queue"]["depth"]:
            problems.append(f"running {stats['running']}, queued {stats['queue']['depth']}")
        pids = [c["backend_pid"] for c in stats["connections"] if c["connected"]]
        if len(pids) != pool_size:
            problems.append(f"{len(pids)} of {pool_size} connections up")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "select pid, state from pg_stat_activity where pid = any(%s)", (pids,)
            )
            states = dict(await cur.fetchall())
        busy = {pid: state for pid, state in states.items() if state != "idle"}
        if busy or len(states) != len(pids):
            problems.append(f"pooled backends not idle: {busy or states}")
        answers = await asyncio.gather(*(
            http.post(url + "/v1/query", json={"sql": "select pg_backend_pid() p, pg_sleep(0.2)"})
            for _ in range(pool_size)
        ))  # fmt: skip
        if [r.status for r in answers] != [200] * pool_size:
            problems.append(f"connections not all usable: {[r.status for r in answers]}")
        for r in answers:
            r.release()
    return problems


# --- the run ----------------------------------------------------------------------------


async def soak(args: argparse.Namespace, pg: EmbeddedPostgres) -> bool:
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as conn:
        await conn.execute("create table soak (id int primary key, v text)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PGQG_RAW_SQL": "read-write",
        "PGQG_QUEUE_SIZE": str(args.queue_size),
        "PGQG_STATEMENT_TIMEOUT_MS": "5000",
        "PGQG_LOG_LEVEL": "error",
    }
    cmd = [sys.executable, "-m", "gateway", "serve", "--dsn", pg.gateway_dsn, "--port", str(port),
           "--pool-size", str(args.pool_size), "--shutdown-grace-s", "5"]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        # started once, before any load: blocking for a moment here is harmless
        gateway = subprocess.Popen(  # noqa: ASYNC220
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            return await drive(args, url, pg.dsn, gateway)
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
            log.seek(0)
            if text := log.read().strip():
                print("--- gateway log ---\n" + text[-3000:])


async def wait_ready(url: str) -> bool:
    """Poll the gateway's ``/readyz`` until 200 (True); False after about 20 s."""
    async with aiohttp.ClientSession() as http:
        for _ in range(400):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return True
            await asyncio.sleep(0.05)
    return False


async def drive(
    args: argparse.Namespace, url: str, dsn: str, gateway: subprocess.Popen[bytes]
) -> bool:
    if not await wait_ready(url):
        print("the gateway did not get ready")
        return False
    proc = psutil.Process(gateway.pid)
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    sampler = asyncio.ensure_future(sample_rss(proc, samples, t0))
    load = Load(url, args.concurrency, args.duration, random.Random(args.seed), args.bound_factor)
    try:
        tally = await load.run()
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    elapsed = time.monotonic() - t0
    problems = await leaks(url, dsn, args.pool_size)
    gateway.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(asyncio.to_thread(gateway.wait), 15)
    except TimeoutError:
        code = None
    return report(tally, samples, elapsed, problems, code)


def report(
    tally: Tally,
    samples: list[tuple[float, float]],
    elapsed: float,
    problems: list[str],
    exit_code: int | None,
) -> bool:
    sent = sum(tally.sent.values())
    answered = sum(tally.answered.values())
    by_status = Counter[int]()
    for (_, status), n in tally.answered.items():
        by_status[status] += n
    flat, rss = judge_rss(samples)
    print(f"{sent} requests in {elapsed:.0f} s ({sent / elapsed:.0f}/s):"
          f" {answered} answered, {tally.dropped_on_purpose} dropped by their client on purpose,"
          f" {len(tally.unanswered)} without an answer")  # fmt: skip
    print("statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())))
    for kind, n in sorted(tally.sent.items()):
        got = ", ".join(f"{s}: {c}" for (k, s), c in sorted(tally.answered.items()) if k == kind)
        print(f"  {kind:8} {n:6}  ({got})")
    print(f"slowest answer {tally.worst_s:.2f} s; over its bound: {len(tally.too_slow)}")
    print(rss)
    print(f"leaks: {'; '.join(problems) or 'none'}")
    print(f"gateway exit code after SIGTERM: {exit_code}")
    print(f"answers a request of its kind cannot earn: {len(tally.unexpected)}")
    for line in (tally.unanswered + tally.too_slow + tally.unexpected)[:10]:
        print("  " + line)
    ok = flat and not problems and not tally.unanswered and not tally.too_slow and exit_code == 0
    ok = ok and not tally.unexpected
    ok = ok and 500 not in by_status and answered + tally.dropped_on_purpose == sent
    print("SOAK PASSED" if ok else "SOAK FAILED")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--bound-factor",
        type=float,
        default=1.0,
        help="scale each kind's longest acceptable answer (a loaded machine: the suite's 10)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pgqg-soak-") as tmp:
        # EmbeddedPostgres wants its data directory reachable by the server's user
        os.chmod(tmp, 0o755)
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", fast=True)
        pg.start()
        try:
            ok = asyncio.run(soak(args, pg))
        finally:
            pg.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
