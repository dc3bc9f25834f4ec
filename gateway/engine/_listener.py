"""Live events: one LISTEN connection, outside the pool, fanned out to subscribers.

`Listener` owns a single psycopg connection. It LISTENs to a channel when the
channel's first subscriber arrives and UNLISTENs when its last one leaves, so
one connection serves every subscriber of every channel. Each `Subscription`
has a bounded buffer: a subscriber whose buffer is full when a notification
arrives is dropped (it gets a final `EventKind.DROPPED` event), so a fast
producer never makes the gateway hold more than ``listen_buffer`` events per
subscriber. The events themselves are shared: a notification fanned out to
200 subscribers is one object in 200 buffers.

psycopg's ``AsyncConnection.notifies()`` holds the connection's lock for as
long as it runs, so LISTEN and UNLISTEN cannot be sent beside it. The reader
runs it in a task of its own; when the set of channels changes, that task is
cancelled (only ever while it waits for the socket: fanning out is
synchronous, so no notification is half-handled), the statements are sent,
and a new reader starts. Notifications that arrive while the statements run
are kept by psycopg and are the first the next reader yields.

If the connection drops, it is opened again (about once a second while the
database is down, as the pool does) and every channel LISTENed to again; each
subscriber that was listening gets an `EventKind.MISSED` event, since
notifications sent meanwhile are gone.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .._errors import BadRequest, Overloaded, Unavailable
from .._settings import CHANNEL_NAME, Settings
from ._pool import connect_kwargs

log = logging.getLogger("gateway.listen")

APPLICATION_NAME = "pgqg-listen"
#: waits between attempts to reconnect: doubling from the first, capped at the last
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 1.0
#: most events a subscriber's stream takes at once (one write to its client)
TAKE_MAX = 64


class EventKind(enum.Enum):
    """What an event tells a subscriber."""

    #: a NOTIFY on one of its channels
    NOTIFY = "notify"
    #: the LISTEN connection was lost and is back: notifications may have been missed
    MISSED = "missed"
    #: the last event: the subscriber was too slow (``reason`` "slow") or the gateway stops
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class Event:
    """One event for a subscriber; NOTIFY events are shared by all of a channel's."""

    kind: EventKind
    channel: str = ""
    payload: str = ""
    #: the notification's number on its channel, from 1 when the channel is first listened to
    seq: int = 0
    #: why a DROPPED or MISSED event came
    reason: str = ""


@dataclass(slots=True)
class Counters:
    """What the listener did since it was made (read by ``/v1/stats``)."""

    #: notifications received on the LISTEN connection
    received: int = 0
    #: notification events a subscriber's stream took to send
    delivered: int = 0
    #: notification events a subscriber did not get: its buffer was full, or its stream
    #: ended with them still buffered
    dropped: int = 0
    #: subscribers dropped because their buffer overflowed
    slow_subscribers: int = 0
    #: times the LISTEN connection was opened again after it was lost
    reconnects: int = 0


def check_channel(name: str) -> str:
    """`name`, when it is a channel a subscriber may name (`CHANNEL_NAME`).

    Raises:
        BadRequest: it is not a PostgreSQL identifier of that form.
    """
    if not CHANNEL_NAME.fullmatch(name):
        shown = name if len(name) <= 64 else name[:64] + "…"
        raise BadRequest(
            f"channel {shown!r} is not a PostgreSQL identifier: ASCII letters, digits, _ and $,"
            " not starting with a digit, at most 63 characters"
        )
    return name


class Subscription:
    """One subscriber's channels and bounded buffer of events (`Listener.subscribe`).

    Its stream takes the events with `take` and must give it back with
    `Listener.unsubscribe` when it ends, however it ends.
    """

    __slots__ = ("_buffer", "_counters", "_limit", "_live", "_waiter", "channels", "ended")

    def __init__(self, channels: tuple[str, ...], limit: int, counters: Counters) -> None:
        loop = asyncio.get_running_loop()
        self.channels = channels
        #: resolved with the final event once the subscription ends (dropped or closed)
        self.ended: asyncio.Future[Event] = loop.create_future()
        self._buffer: deque[Event] = deque()
        self._limit = limit
        self._counters = counters
        self._live: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None

    @property
    def live(self) -> bool:
        """Every one of its channels is LISTENed to."""
        return self._live.done() and not self._live.cancelled()

    @property
    def buffered(self) -> int:
        """Events waiting to be taken."""
        return len(self._buffer)

    async def take(self, wait_s: float) -> list[Event]:
        """The events waiting, oldest first (at most `TAKE_MAX`); waits up to `wait_s`
        seconds for one. An empty list: none came in time, or the final one was taken."""
        if not self._buffer and not self.ended.done():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(wait_s):
                    await self._waiter
            except TimeoutError:
                return []
            finally:
                self._waiter = None
        taken = [self._buffer.popleft() for _ in range(min(len(self._buffer), TAKE_MAX))]
        self._counters.delivered += sum(1 for e in taken if e.kind is EventKind.NOTIFY)
        return taken

    def _offer(self, event: Event) -> bool:
        """Buffer `event`; False when the buffer is full (the subscriber must be dropped)."""
        if len(self._buffer) >= self._limit:
            return False
        if not self.ended.done():
            self._buffer.append(event)
            self._wake()
        return True

    def _finish(self, event: Event) -> None:
        """End with `event`, the last one, buffered beyond the bound (harmless twice)."""
        if self.ended.done():
            return
        self._buffer.append(event)
        self.ended.set_result(event)
        if not self._live.done():
            self._live.cancel()
        self._wake()

    def _discard(self) -> None:
        """Count what is still buffered as dropped, and forget it."""
        self._counters.dropped += sum(1 for e in self._buffer if e.kind is EventKind.NOTIFY)
        self._buffer.clear()
        if not self._live.done():
            self._live.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Channel:
    """A channel with subscribers: who they are and the last notification's number."""

    __slots__ = ("seq", "subscribers")

    def __init__(self) -> None:
        self.subscribers: set[Subscription] = set()
        self.seq = 0


class Listener:
    """The gateway's one LISTEN connection and its subscribers.

    Nothing is opened until the first `subscribe`; `close` ends every
    subscription and closes the connection (harmless twice).
    """

    def __init__(self, dsn: str, settings: Settings) -> None:
        self._dsn = dsn
        self._settings = settings
        self._connect_kwargs = connect_kwargs(settings, APPLICATION_NAME)
        self._subscribers: set[Subscription] = set()
        self._channels: dict[str, _Channel] = {}
        #: the channels LISTENed to on the connection now open (none when there is none)
        self._listening: set[str] = set()
        #: set when a channel gained its first subscriber or lost its last one
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._backend_pid: int | None = None
        self._closed = False
        self.counters = Counters()

    @property
    def subscribers(self) -> int:
        """Subscriptions open now."""
        return len(self._subscribers)

    @property
    def listening(self) -> frozenset[str]:
        """The channels LISTENed to on the connection now (none while it is down)."""
        return frozenset(self._listening)

    def stats(self) -> dict[str, Any]:
        """The connection, each channel's subscribers and the counters, for ``/v1/stats``."""
        c = self.counters
        return {
            "connected": self._connected,
            "backend_pid": self._backend_pid,
            "channels": {name: len(ch.subscribers) for name, ch in sorted(self._channels.items())},
            "listening": sorted(self._listening),
            "buffered": sum(sub.buffered for sub in self._subscribers),
            "received": c.received,
            "events_delivered": c.delivered,
            "events_dropped": c.dropped,
            "slow_subscribers_dropped": c.slow_subscribers,
            "reconnects": c.reconnects,
        }

    # --- subscribers' side ------------------------------------------------------------

    async def subscribe(self, channels: Iterable[str]) -> Subscription:
        """A subscription to `channels`, returned once each of them is LISTENed to,
        so every notification sent from then on reaches it.

        Raises:
            BadRequest: a channel name is not an identifier (`check_channel`).
            Overloaded: ``listen_max_subscribers`` subscriptions are open already.
            Unavailable: the listener is closed, or the LISTEN was not in place
                within ``connect_timeout_ms`` (the database is down).
        """
        names = tuple(check_channel(name) for name in channels)
        if self._closed:
            raise Unavailable("the gateway is shutting down")
        if len(self._subscribers) >= self._settings.listen_max_subscribers:
            raise Overloaded(
                f"{len(self._subscribers)} event streams are open, the most this gateway"
                " allows (PGQG_LISTEN_MAX_SUBSCRIBERS)"
            )
        sub = Subscription(names, self._settings.listen_buffer, self.counters)
        self._subscribers.add(sub)
        for name in names:
            channel = self._channels.get(name)
            if channel is None:
                channel = self._channels[name] = _Channel()
                self._changed.set()
            channel.subscribers.add(sub)
        if self._listening.issuperset(names):
            sub._live.set_result(None)
            return sub
        self._start()
        try:
            # asyncio.wait: neither cancels the future nor raises when it was cancelled
            await asyncio.wait([sub._live], timeout=self._settings.connect_timeout_ms / 1000)
        except BaseException:
            self.unsubscribe(sub)
            raise
        if not sub.live:
            self.unsubscribe(sub)
            if self._closed:
                raise Unavailable("the gateway is shutting down")
            raise Unavailable("cannot LISTEN: no connection to the database")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """`sub`'s stream has ended: forget it and what it still buffers (harmless twice).

        A channel whose last subscriber this was is UNLISTENed.
        """
        self._forget(sub)
        sub._discard()

    def end_streams(self) -> None:
        """The gateway is stopping: every subscriber gets its final event now, and
        new ones are refused (harmless twice)."""
        self._closed = True
        for sub in list(self._subscribers):
            self._forget(sub)
            sub._finish(Event(EventKind.DROPPED, reason="shutdown"))

    async def close(self) -> None:
        """End every subscription, stop listening and close the connection (harmless twice)."""
        self.end_streams()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def _forget(self, sub: Subscription) -> None:
        if sub not in self._subscribers:
            return
        self._subscribers.discard(sub)
        for name in sub.channels:
            channel = self._channels.get(name)
            if channel is None:
                continue
            channel.subscribers.discard(sub)
            if not channel.subscribers:
                del self._channels[name]
                self._changed.set()

    def _drop(self, sub: Subscription) -> None:
        """`sub`'s buffer is full: it loses the notification and ends."""
        self.counters.dropped += 1
        self.counters.slow_subscribers += 1
        self._forget(sub)
        sub._finish(Event(EventKind.DROPPED, reason="slow"))

    # --- the connection's side ----------------------------------------------------------

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="pgqg-listen")

    async def _run(self) -> None:
        """Keep a connection LISTENing to every channel with subscribers, until cancelled."""
        delay = 0.0
        lost = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._dsn, **self._connect_kwargs)
            except psycopg.Error as exc:
                delay = min(max(delay * 2, RECONNECT_FIRST_S), RECONNECT_MAX_S)
                log.warning("cannot open the LISTEN connection (again in %.1f s): %s", delay, exc)
                await asyncio.sleep(delay)
                continue
            delay = 0.0
            self._backend_pid = conn.info.backend_pid
            try:
                await self._serve(conn, reconnected=lost)
            except psycopg.Error as exc:
                log.warning("the LISTEN connection was lost: %s", exc)
            except Exception:  # a bug must not leave every subscriber without events
                log.exception("the LISTEN connection failed")
                await asyncio.sleep(RECONNECT_MAX_S)
            finally:
                self._connected, self._backend_pid = False, None
                self._listening.clear()
                await conn.close()
            lost = True

    async def _serve(self, conn: psycopg.AsyncConnection[Any], *, reconnected: bool) -> None:
        """LISTEN as subscribers come and go, fanning notifications out in between.

        Raises:
            psycopg.Error: the connection was lost (it never returns otherwise).
        """
        if reconnected:
            self.counters.reconnects += 1
        while True:
            self._changed.clear()
            await self._sync(conn)
            self._connected = True
            self._after_sync(reconnected=reconnected)
            reconnected = False
            await self._receive(conn)

    async def _sync(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """LISTEN to the channels that gained subscribers, UNLISTEN those that lost them."""
        wanted = set(self._channels)
        start = sorted(wanted - self._listening)
        stop = sorted(self._listening - wanted)
        if not start and not stop:
            return
        statements = [sql.SQL("LISTEN {}").format(sql.Identifier(name)) for name in start]
        statements += [sql.SQL("UNLISTEN {}").format(sql.Identifier(name)) for name in stop]
        await conn.execute(sql.SQL("; ").join(statements))
        self._listening.update(start)
        self._listening.difference_update(stop)

    def _after_sync(self, *, reconnected: bool) -> None:
        """Subscribers whose channels are all listened to now are live; after a
        reconnection those that were live already may have missed notifications."""
        missed = Event(EventKind.MISSED, reason="reconnected")
        for sub in list(self._subscribers):
            if sub.live:
                if reconnected and not sub._offer(missed):
                    self._drop(sub)
            elif self._listening.issuperset(sub.channels):
                sub._live.set_result(None)

    async def _receive(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Fan notifications out until the set of channels changes.

        Raises:
            psycopg.Error: the connection was lost.
        """
        reader = asyncio.create_task(self._read(conn))
        changed = asyncio.create_task(self._changed.wait())
        try:
            await asyncio.wait((reader, changed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            changed.cancel()
            await asyncio.wait((reader, changed))
        if not reader.cancelled():
            reader.result()  # the reader ends only when the connection fails: raise that

    async def _read(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for notify in conn.notifies():
            self._deliver(notify.channel, notify.payload)

    def _deliver(self, name: str, payload: str) -> None:
        """Give a notification to each of its channel's subscribers."""
        self.counters.received += 1
        channel = self._channels.get(name)
        if channel is None:
            return  # its last subscriber left; the UNLISTEN is on its way
        channel.seq += 1
        event = Event(EventKind.NOTIFY, name, payload, channel.seq)
        full = [sub for sub in channel.subscribers if not sub._offer(event)]
        for sub in full:
            self._drop(sub)
