"""Load that keeps a gateway busy while faults strike, and what it must see afterwards.

Shared by tests/test_faults.py and bench/chaos.py. Writers insert ids into a
table without a unique key and retry an id only when told it is safe (503);
a 502 or a 504 may have been written and is never retried. Readers run
read-only transactions. Every answer is kept; `Summary` says what went wrong:

* an answer with a 5xx other than 502, 503 and 504, or none at all;
* an answer later than its deadline plus `SLACK_S` ("hung");
* a 502 that is not ``outcome_unknown`` or has ``Retry-After``; a 503 without one;
* an id written twice, an acknowledged write missing, a write answered 503
  (and given up) that is there all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson
import psycopg

#: a request is answered within its deadline plus this
SLACK_S = 1.0


@dataclass
class Answer:
    sent: float
    answered: float
    status: int
    code: str | None = None
    retry_after: str | None = None
    message: str = ""

    @property
    def took(self) -> float:
        return self.answered - self.sent


@dataclass
class Gateway:
    """A gateway's HTTP API as the load uses it; `table` is ``(id int, v text)``."""

    url: str
    http: aiohttp.ClientSession
    table: str
    deadline_s: float

    async def post(self, path: str, body: dict[str, object]) -> Answer:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            async with self.http.post(self.url + path, json=body) as resp:
                data = await resp.read()
                retry_after = resp.headers.get("Retry-After")
                answer = Answer(sent, loop.time(), resp.status, None, retry_after)
        except (aiohttp.ClientError, TimeoutError) as exc:  # no answer: a failure
            return Answer(sent, loop.time(), 599, type(exc).__name__, None, str(exc))
        if answer.status != 200:
            error = orjson.loads(data)["error"]
            answer.code, answer.message = error["code"], error["message"]
        return answer

    async def write(self, i: int) -> Answer:
        sql = f"insert into {self.table} values ($1, 'w')"
        return await self.post("/v1/query", {"sql": sql, "params": [i], "timeout_ms": self.ms})

    async def read(self, sql: str = "select 1 AS one") -> Answer:
        body = {"statements": [{"sql": sql}], "read_only": True, "timeout_ms": self.ms}
        return await self.post("/v1/transaction", body)

    @property
    def ms(self) -> int:
        return int(self.deadline_s * 1000)

    async def ready(self) -> bool:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.http.get(self.url + "/readyz") as resp:
                return resp.status == 200
        return False

    async def back_within(self, limit: float) -> float:
        """Seconds until ``/readyz`` and a read answer 200; AssertionError after `limit`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not (await self.ready() and (await self.read()).status == 200):
            assert loop.time() - started < limit, f"not back after {limit} s"
            await asyncio.sleep(0.02)
        return loop.time() - started


async def stored_ids(dsn: str, table: str) -> Counter[int]:
    """How often each id is in `table` (read directly from the database)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(f"select id from {table}")
        return Counter(row[0] for row in await cur.fetchall())


@dataclass
class Load:
    """Writers and readers that keep the gateway busy until stopped; every answer kept."""

    gateway: Gateway
    answers: list[Answer] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)
    #: writes answered 503 that were not tried again: they must not be there
    given_up: set[int] = field(default_factory=set)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, writers: int = 4, readers: int = 8) -> Load:
        self._tasks = [asyncio.ensure_future(self._write()) for _ in range(writers)]
        self._tasks += [asyncio.ensure_future(self._read()) for _ in range(readers)]
        return self

    @property
    def clients(self) -> int:
        """Requests the load keeps in flight: one per writer and reader."""
        return len(self._tasks)

    async def stop(self) -> None:
        self._stop.set()
        async with asyncio.timeout(self.gateway.deadline_s + SLACK_S + 5):
            await asyncio.gather(*self._tasks)

    async def answered_ok(self, count: int, after: float, limit: float = 10.0) -> None:
        """Wait until `count` requests sent after `after` were answered 200."""
        async with asyncio.timeout(limit):
            while sum(a.sent > after and a.status == 200 for a in self.answers) < count:
                await asyncio.sleep(0.02)

    async def _write(self) -> None:
        while not self._stop.is_set():
            i = next(self._ids)
            while True:
                answer = await self.gateway.write(i)
                self.answers.append(answer)
                if answer.status == 200:
                    self.acked.add(i)
                elif answer.status == 503 and not self._stop.is_set():
                    await asyncio.sleep(0.05)  # nothing happened: retry, as told
                    continue
                elif answer.status == 503:
                    self.given_up.add(i)
                else:  # 502, 504 or none: it may have been written; never retried
                    await asyncio.sleep(0.05)
                break

    async def _read(self) -> None:
        while not self._stop.is_set():
            answer = await self.gateway.read()
            self.answers.append(answer)
            if answer.status != 200:
                await asyncio.sleep(0.05)  # as a polite client would, during an outage

    async def summary(self, dsn: str) -> Summary:
        """What the answers and the table say (read from `dsn`, not through a fault)."""
        return Summary(self, await stored_ids(dsn, self.gateway.table))


@dataclass
class Summary:
    """The answers a `Load` got and what its table holds; see the module docstring."""

    load: Load
    stored: Counter[int]

    @property
    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.load.answers)

    @property
    def codes(self) -> Counter[str]:
        return Counter(a.code for a in self.load.answers if a.code)

    @property
    def hung(self) -> int:
        late = self.load.gateway.deadline_s + SLACK_S
        return sum(a.took >= late or a.status == 599 for a in self.load.answers)

    def latency(self, quantile: float) -> float:
        took = sorted(a.took for a in self.load.answers)
        return took[min(len(took) - 1, math.ceil(quantile * len(took)) - 1)] if took else 0.0

    def problems(self) -> list[str]:
        """Every way the run broke the rules; empty when it kept them all."""
        found = []
        if odd := set(self.statuses) - {200, 502, 503, 504}:
            found.append(f"answers with status {sorted(odd)}")
        if self.hung:
            found.append(f"{self.hung} requests hung (no answer within deadline + {SLACK_S} s)")
        for a in self.load.answers:
            if a.status == 502 and (a.code, a.retry_after) != ("outcome_unknown", None):
                found.append(f"a 502 that is not outcome_unknown: {a}")
            elif a.status == 503 and a.retry_after is None:
                found.append(f"a 503 without Retry-After: {a}")
        if twice := [i for i, n in self.stored.items() if n > 1]:
            found.append(f"ids written twice: {twice}")
        if missing := self.load.acked - set(self.stored):
            found.append(f"acknowledged writes missing: {sorted(missing)}")
        if ghosts := self.load.given_up & set(self.stored):
            found.append(f"writes answered 503 that took effect: {sorted(ghosts)}")
        return found

    def describe(self) -> str:
        return (
            f"answers {dict(sorted(self.statuses.items()))}, errors {dict(self.codes)},"
            f" p99 {self.latency(0.99) * 1000:.1f} ms, slowest {self.latency(1.0) * 1000:.1f} ms"
        )
