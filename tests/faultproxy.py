"""A fault-injecting TCP proxy on asyncio, to put between a gateway and PostgreSQL.

`FaultProxy` listens on a free port of 127.0.0.1 and forwards every connection
to its upstream (the database). Its faults, each at once on every connection:

* `cut`: reset both sides (TCP RST), as a crashed host or a broken network does;
* `black_hole`: forward nothing, keep every socket open, as a silent partition
  does: bytes are held (TCP would retransmit them) and new connections wait;
* `heal`: forward again, held bytes first;
* `cut_after`: reset the connection right after the first chunk that completes
  a byte pattern has been passed on, in one direction: towards the server (the
  server gets that chunk and runs it, the client never hears back: the COMMIT
  of a job, say) or towards the client (it gets the stream up to the pattern,
  then a reset: a connection lost while results stream back).

And one condition: `round_trip_s`, a database that far away. What the server
sends reaches the client that much later, in order (the whole round trip on the
way back, as bench/latency_proxy.py adds it).

Loopback only; the proxy never sleeps, so a test that wants a fault to last
(``black_hole`` for 8 s) sleeps itself. Used by tests/test_faults.py and
bench/chaos.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal, cast

import psycopg.conninfo

Direction = Literal["to_server", "to_client"]

#: SO_LINGER on, 0 s: closing sends a reset (RST), not an orderly end (FIN)
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close `transport` with a TCP reset, as a crashed peer's kernel does."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    transport.abort()


@dataclass
class _Trigger:
    pattern: bytes
    direction: Direction
    fired: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class _Side(asyncio.Protocol):
    """One socket of a link: what it reads goes to the other side."""

    def __init__(self, link: _Link, direction: Direction) -> None:
        self.link = link
        self.direction = direction  # where the bytes it reads go
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self.link.proxy.flowing:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.link.forward(self.direction, data)

    def eof_received(self) -> bool:
        self.link.half_close(self.direction)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost(self.direction, exc)


class _Link:
    """One proxied connection: the client's socket and the server's."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, "to_server")
        self.server = _Side(self, "to_client")
        self._held: dict[Direction, list[bytes]] = {"to_server": [], "to_client": []}
        self._tail: dict[Direction, bytes] = {"to_server": b"", "to_client": b""}
        self._eof: set[Direction] = set()
        #: what the server sent, held until due (`FaultProxy.round_trip_s`): (due, data)
        self._late: collections.deque[tuple[float, bytes]] = collections.deque()
        self.closed = False

    def _target(self, direction: Direction) -> asyncio.Transport | None:
        side = self.server if direction == "to_server" else self.client
        return side.transport

    def forward(self, direction: Direction, data: bytes) -> None:
        if self.closed:
            return
        trigger = self.proxy.trigger
        if trigger is not None and trigger.direction == direction:
            seen = self._tail[direction] + data
            at = seen.find(trigger.pattern)
            if at >= 0:
                end = at + len(trigger.pattern) - len(self._tail[direction])
                self.proxy.trigger = None
                self._fire(direction, data if direction == "to_server" else data[:end], trigger)
                return
            keep = len(trigger.pattern) - 1  # a pattern may straddle two chunks
            self._tail[direction] = seen[-keep:] if keep > 0 else b""
        target = self._target(direction)
        if not self.proxy.flowing or target is None:
            self._held[direction].append(data)
        elif direction == "to_client" and (self.proxy.round_trip_s or self._late):
            self._send_late(data)
        else:
            target.write(data)

    def _send_late(self, data: bytes) -> None:
        """Pass `data` on to the client `round_trip_s` from now, after what is held."""
        loop = asyncio.get_running_loop()
        self._late.append((loop.time() + self.proxy.round_trip_s, data))
        if len(self._late) == 1:
            loop.call_at(self._late[0][0], self._release_late)

    def _release_late(self) -> None:
        loop = asyncio.get_running_loop()
        target = self.client.transport
        while self._late and self._late[0][0] <= loop.time():
            _, data = self._late.popleft()
            if target is not None and not target.is_closing():
                target.write(data)
        if self._late:
            loop.call_at(self._late[0][0], self._release_late)

    def _fire(self, direction: Direction, data: bytes, trigger: _Trigger) -> None:
        """Pass `data` on, then reset the client: towards the server the socket is
        closed after the data is flushed (the server runs what it got)."""
        target = self._target(direction)
        if target is not None:
            target.write(data)
        if direction == "to_server" and target is not None:
            target.close()  # flushes first
            _reset(self.client.transport)
        else:
            self.cut()
        self.closed = True
        if not trigger.fired.done():
            trigger.fired.set_result(None)

    def flush_held(self) -> None:
        for direction, chunks in self._held.items():
            target = self._target(direction)
            if target is None:
                continue
            while chunks:
                target.write(chunks.pop(0))
            if direction in self._eof and target.can_write_eof():
                target.write_eof()

    def half_close(self, direction: Direction) -> None:
        self._eof.add(direction)
        target = self._target(direction)
        if self.proxy.flowing and target is not None and target.can_write_eof():
            target.write_eof()

    def lost(self, direction: Direction, exc: Exception | None) -> None:
        """One side went away: so does the other (reset if it was reset)."""
        other = self._target(direction)
        if other is None or self.closed:
            self._done()
            return
        if exc is not None or not self.proxy.flowing:
            _reset(other)
        else:
            other.close()
        self._done()

    def cut(self) -> None:
        for side in (self.client, self.server):
            _reset(side.transport)
        self._done()

    def pause(self) -> None:
        for side in (self.client, self.server):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.pause_reading()

    def resume(self) -> None:
        self.flush_held()
        for side in (self.client, self.server):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.resume_reading()

    def _done(self) -> None:
        self.closed = True
        self.proxy.links.discard(self)


class FaultProxy:
    """A TCP proxy from 127.0.0.1:`port` to `upstream_port`; see the module docstring."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.links: set[_Link] = set()
        self.flowing = True
        self.trigger: _Trigger | None = None
        #: the round trip added to every connection: 0 for a database on this machine
        self.round_trip_s = 0.0
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._connecting: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultProxy:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and reset every connection (harmless twice)."""
        if self._server is not None:
            self._server.close()
            self.cut()
            for task in list(self._connecting):
                task.cancel()
            await asyncio.gather(*self._connecting, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def dsn(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by the proxy's."""
        return psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=self.port)

    # --- faults -----------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every connection now; return how many there were."""
        links = list(self.links)
        for link in links:
            link.cut()
        return len(links)

    def black_hole(self) -> None:
        """Forward nothing from now on, keeping every socket open, until `heal`."""
        self.flowing = False
        for link in list(self.links):
            link.pause()

    def heal(self) -> None:
        """Forward again: what was held first."""
        self.flowing = True
        for link in list(self.links):
            link.resume()

    def cut_after(self, pattern: bytes, direction: Direction = "to_server") -> asyncio.Future[None]:
        """Arm a cut: the first connection to pass `pattern` on in `direction` is
        reset right after it; the future resolves then."""
        self.trigger = _Trigger(pattern, direction)
        return self.trigger.fired

    def disarm(self) -> None:
        """Forget a `cut_after` that has not fired."""
        self.trigger = None

    # --- connections --------------------------------------------------------------------

    def _accept(self) -> _Side:
        link = _Link(self)
        self.links.add(link)
        self.accepted += 1
        task = asyncio.ensure_future(self._connect(link))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return link.client

    async def _connect(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: link.server, *self.upstream)
        except OSError:
            link.cut()  # the server is down: the client sees its connection reset
            return
        if link.closed:
            link.cut()
        elif self.flowing:
            link.flush_held()
