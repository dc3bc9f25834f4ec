"""The LISTEN connection and its fan-out (gateway/engine/_listener.py), without HTTP.

Each test makes its own `Listener` on the session database and its own channel
names, so no two tests hear each other. Waits are bounded polls, never sleeps.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from gateway import Unavailable
from gateway._errors import BadRequest, Overloaded
from gateway._settings import load_settings
from gateway.engine._listener import Event, EventKind, Listener, Subscription

#: long enough for a loaded 2-core machine, short enough to fail a hang quickly
WAIT_S = 10.0

MakeListener = Callable[..., Listener]


def channel() -> str:
    return "ch_" + uuid.uuid4().hex[:12]


@pytest.fixture
async def make_listener(database_dsn: str) -> AsyncIterator[MakeListener]:
    """Listeners on the test database with settings overrides; all closed after."""
    made: list[Listener] = []

    def make(dsn: str | None = None, **overrides: Any) -> Listener:
        listener = Listener(dsn or database_dsn, load_settings(dsn=database_dsn, **overrides))
        made.append(listener)
        return listener

    yield make
    for listener in made:
        await listener.close()


async def until(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll `check` until it is true; fails after `WAIT_S`."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                result = check()
                if result if isinstance(result, bool) else await result:
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"not within {WAIT_S} s: {what}")


async def notify(admin: psycopg.AsyncConnection[Any], name: str, *payloads: str) -> None:
    """NOTIFY `name` with each payload, in one transaction (delivered together, in order)."""
    async with admin.transaction():
        for payload in payloads:
            await admin.execute("SELECT pg_notify(%s, %s)", (name, payload))


async def events(sub: Subscription, count: int) -> list[Event]:
    """The next `count` events of `sub`; fails when they do not come within `WAIT_S`."""
    got: list[Event] = []
    async with asyncio.timeout(WAIT_S):
        while len(got) < count:
            got += await sub.take(WAIT_S)
    return got


async def listen_backends(admin: psycopg.AsyncConnection[Any], pid: int | None) -> int:
    cur = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgqg-listen' AND pid = %s",
        (pid,),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_notifications_reach_every_subscriber_in_order(
    make_listener: MakeListener, admin: psycopg.AsyncConnection[Any]
) -> None:
    listener = make_listener()
    a, b = channel(), channel()
    first = await listener.subscribe([a])
    both = await listener.subscribe([a, b])
    await notify(admin, a, "1", "2")
    await notify(admin, b, "x")
    first_got = await events(first, 2)
    assert [(e.channel, e.payload, e.seq) for e in first_got] == [(a, "1", 1), (a, "2", 2)]
    got = await events(both, 3)
    assert [(e.kind, e.channel, e.payload, e.seq) for e in got] == [
        (EventKind.NOTIFY, a, "1", 1),
        (EventKind.NOTIFY, a, "2", 2),
        (EventKind.NOTIFY, b, "x", 1),
    ]
    assert got[0] is first_got[0]  # one event object for every subscriber
    stats = listener.stats()
    assert stats["channels"] == {a: 2, b: 1}
    assert (stats["events_delivered"], stats["events_dropped"]) == (5, 0)


async def test_one_connection_listens_first_subscriber_in_last_one_out(
    make_listener: MakeListener, admin: psycopg.AsyncConnection[Any]
) -> None:
    listener = make_listener()
    names = [channel() for _ in range(5)]
    subs = [await listener.subscribe([name]) for name in names for _ in range(3)]
    assert listener.listening == frozenset(names)
    pid = listener.stats()["backend_pid"]
    assert await listen_backends(admin, pid) == 1
    cur = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgqg-listen'"
        " AND backend_start >= (SELECT backend_start FROM pg_stat_activity WHERE pid = %s)",
        (pid,),
    )
    assert (await cur.fetchone()) == (1,)  # no other listen connection came with it
    for sub in subs[:2]:
        listener.unsubscribe(sub)
    listener.unsubscribe(subs[0])  # harmless twice
    assert names[0] in listener.listening  # one subscriber is left
    listener.unsubscribe(subs[2])
    await until(lambda: names[0] not in listener.listening, "UNLISTEN after the last one left")
    for sub in subs[3:]:
        listener.unsubscribe(sub)
    await until(lambda: not listener.listening, "UNLISTEN of every channel")
    stats = listener.stats()
    assert stats["channels"] == {} and listener.subscribers == 0
    assert stats["connected"] and stats["backend_pid"] == pid  # the connection stays open


async def test_a_notification_after_unlisten_is_not_received(
    make_listener: MakeListener, admin: psycopg.AsyncConnection[Any]
) -> None:
    listener = make_listener()
    gone, kept = channel(), channel()
    sub_gone = await listener.subscribe([gone])
    sub_kept = await listener.subscribe([kept])
    listener.unsubscribe(sub_gone)
    await until(lambda: gone not in listener.listening, "UNLISTEN")
    received = listener.counters.received
    await notify(admin, gone, "nobody")
    await notify(admin, kept, "someone")
    assert [e.payload for e in await events(sub_kept, 1)] == ["someone"]
    assert listener.counters.received == received + 1  # PostgreSQL sent only the listened one


async def test_a_slow_subscriber_is_dropped_with_a_final_event(
    make_listener: MakeListener, admin: psycopg.AsyncConnection[Any]
) -> None:
    listener = make_listener(listen_buffer=5)
    name = channel()
    slow = await listener.subscribe([name])
    fast = await listener.subscribe([name])
    fast_got: list[Event] = []
    for i in range(10):  # one at a time: the fast one takes each before the next comes
        await notify(admin, name, str(i))
        fast_got += await events(fast, 1)
    assert [e.payload for e in fast_got] == [str(i) for i in range(10)]
    got = await events(slow, 6)
    assert [e.payload for e in got[:5]] == ["0", "1", "2", "3", "4"]  # what fit in its buffer
    assert (got[5].kind, got[5].reason) == (EventKind.DROPPED, "slow")
    assert await slow.take(0.01) == []  # nothing after the final event
    assert slow.ended.done()
    stats = listener.stats()
    assert stats["channels"] == {name: 1}
    assert stats["slow_subscribers_dropped"] == 1
    assert stats["events_dropped"] == 1  # the one that found the buffer full
    assert stats["events_delivered"] == 15
    listener.unsubscribe(slow)
    assert listener.stats()["events_dropped"] == 1


async def test_buffered_events_of_a_stream_that_ends_count_as_dropped(
    make_listener: MakeListener, admin: psycopg.AsyncConnection[Any]
) -> None:
    listener = make_listener()
    name = channel()
    sub = await listener.subscribe([name])
    other = await listener.subscribe([name])
    await notify(admin, name, "a", "b", "c")
    assert len(await events(other, 3)) == 3
    await until(lambda: sub.buffered == 3, "three events buffered")
    listener.unsubscribe(sub)
    stats = listener.stats()
    assert (stats["events_delivered"], stats["events_dropped"]) == (3, 3)


async def test_a_lost_connection_is_reopened_and_subscribers_told(
    make_listener: MakeListener, admin: psycopg.AsyncConnection[Any]
) -> None:
    listener = make_listener()
    a, b = channel(), channel()
    sub = await listener.subscribe([a, b])
    pid = listener.stats()["backend_pid"]
    await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    got = await events(sub, 1)
    assert (got[0].kind, got[0].reason) == (EventKind.MISSED, "reconnected")
    stats = listener.stats()
    assert stats["reconnects"] == 1 and stats["connected"]
    assert stats["backend_pid"] not in (None, pid)
    assert listener.listening == {a, b}  # LISTENed again
    await notify(admin, b, "after")
    assert [(e.channel, e.payload) for e in await events(sub, 1)] == [(b, "after")]
    # a subscriber that comes now is not told of a loss it did not live through
    late = await listener.subscribe([a])
    await notify(admin, a, "later")
    assert [e.kind for e in await events(late, 1)] == [EventKind.NOTIFY]


async def test_subscribe_fails_fast_without_a_database(make_listener: MakeListener) -> None:
    listener = make_listener("postgresql://nobody@127.0.0.1:9/none", connect_timeout_ms=300)
    with pytest.raises(Unavailable, match="no connection"):
        await listener.subscribe([channel()])
    assert listener.subscribers == 0 and listener.stats()["channels"] == {}


async def test_a_cancelled_subscribe_leaves_nothing(make_listener: MakeListener) -> None:
    listener = make_listener("postgresql://nobody@127.0.0.1:9/none", connect_timeout_ms=60_000)
    task = asyncio.create_task(listener.subscribe([channel()]))
    await until(lambda: listener.subscribers == 1, "the subscriber waits")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert listener.subscribers == 0 and listener.stats()["channels"] == {}


async def test_close_ends_streams_and_is_harmless_twice(
    make_listener: MakeListener, admin: psycopg.AsyncConnection[Any]
) -> None:
    listener = make_listener()
    sub = await listener.subscribe([channel()])
    pid = listener.stats()["backend_pid"]
    await listener.close()
    await listener.close()
    got = await events(sub, 1)
    assert (got[0].kind, got[0].reason) == (EventKind.DROPPED, "shutdown")
    with pytest.raises(Unavailable, match="shutting down"):
        await listener.subscribe([channel()])

    async def backend_gone() -> bool:
        return await listen_backends(admin, pid) == 0

    await until(backend_gone, "the LISTEN connection closed")


async def test_a_listener_never_used_opens_nothing(make_listener: MakeListener) -> None:
    listener = make_listener("postgresql://nobody@127.0.0.1:9/none")
    assert listener.stats()["connected"] is False
    await listener.close()


async def test_bad_names_and_too_many_subscribers(make_listener: MakeListener) -> None:
    listener = make_listener(listen_max_subscribers=2)
    for bad in ["", "1abc", "a b", 'a"b', "x" * 64, "é", "a;b", "a\nb"]:
        with pytest.raises(BadRequest):
            await listener.subscribe([bad])
    name = channel()
    await listener.subscribe([name])
    await listener.subscribe([name])
    with pytest.raises(Overloaded, match="PGQG_LISTEN_MAX_SUBSCRIBERS"):
        await listener.subscribe([name])
    assert listener.subscribers == 2
    assert listener.listening == {name}


async def test_subscribers_churning_while_notifications_flow(
    make_listener: MakeListener, admin: psycopg.AsyncConnection[Any], database_dsn: str
) -> None:
    """Subscribers come and go on a few channels (LISTEN and UNLISTEN all the while)
    while a producer notifies them: each sees its channels' numbers only rising,
    and once all have left nothing is listened to."""
    listener = make_listener()
    names = [channel() for _ in range(4)]
    stop = asyncio.Event()

    async def produce() -> None:
        async with await psycopg.AsyncConnection.connect(database_dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                await conn.execute("SELECT pg_notify(%s, %s)", (names[i % 4], str(i)))
                i += 1

    async def churn(k: int) -> int:
        seen = 0
        for round_ in range(15):
            sub = await listener.subscribe([names[(k + round_) % 4], names[(k + round_ + 1) % 4]])
            last: dict[str, int] = {}
            try:
                for event in await sub.take(0.02):
                    assert event.kind is EventKind.NOTIFY
                    assert event.seq > last.get(event.channel, 0)
                    last[event.channel] = event.seq
                    seen += 1
            finally:
                listener.unsubscribe(sub)
        return seen

    producer = asyncio.create_task(produce())
    try:
        seen = await asyncio.wait_for(asyncio.gather(*(churn(k) for k in range(20))), 60)
    finally:
        stop.set()
        await producer
    assert sum(seen) > 0
    assert listener.subscribers == 0 and listener.stats()["channels"] == {}
    await until(lambda: not listener.listening, "every channel UNLISTENed")
    assert listener.stats()["reconnects"] == 0
