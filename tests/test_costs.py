"""Which jobs the dispatcher treats as cheap: learnt per statement, by its shape."""

from __future__ import annotations

import asyncio

import pytest

from gateway.engine import _costs
from gateway.engine._costs import CHEAP_JOB_S, StatementCosts, cost_key
from gateway.engine._jobs import Job, Statement


def job(*sqls: str) -> Job:
    loop = asyncio.new_event_loop()
    try:
        return Job([Statement(s.encode()) for s in sqls], read_only=True, deadline=1e9,
                   max_rows=10, loop=loop)  # fmt: skip
    finally:
        loop.close()


def ran(costs: StatementCosts, j: Job, seconds: float) -> None:
    costs.is_cheap(j)
    j.cost_s = seconds
    costs.learn([j])


def test_a_statement_is_known_by_its_shape_not_its_values() -> None:
    assert cost_key(job("select * from t where id = 123")) == cost_key(
        job("select * from t where id = 456")
    )
    assert cost_key(job("select * from t where id = 1")) != cost_key(job("select * from u"))


def test_transactions_are_never_learnt() -> None:
    costs = StatementCosts()
    tx = job("select 1", "select 2")
    assert cost_key(tx) is None
    ran(costs, tx, 0.0001)
    assert not costs.is_cheap(job("select 1", "select 2"))


def test_unknown_is_not_cheap_until_a_quick_run_is_seen() -> None:
    costs = StatementCosts()
    assert not costs.is_cheap(job("select 1"))
    ran(costs, job("select 1"), 0.0002)
    assert costs.is_cheap(job("select 2"))  # the same shape


def test_a_statement_that_turns_slow_stops_being_cheap() -> None:
    costs = StatementCosts()
    ran(costs, job("select 1"), 0.0002)
    for _ in range(3):
        ran(costs, job("select 1"), 1.0)
    assert not costs.is_cheap(job("select 1"))
    ran(costs, job("select pg_sleep(1)"), 2 * CHEAP_JOB_S)
    assert not costs.is_cheap(job("select pg_sleep(1)"))


def test_memory_is_bounded_by_forgetting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_costs, "COSTS_REMEMBERED", 10)
    costs = StatementCosts()
    statements = [f"select 1 from t{'x' * i}" for i in range(25)]
    for sql in statements:
        ran(costs, job(sql), 0.0001)
    assert not costs.is_cheap(job(statements[0]))  # forgotten: unknown again
    assert costs.is_cheap(job(statements[-1]))
