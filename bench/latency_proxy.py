"""A TCP proxy on the loopback interface that adds a fixed round-trip time.

    python bench/latency_proxy.py --target-port 5432 --rtt-ms 2 [--port 0]

PostgreSQL is often a network hop away (another zone, a managed service). This
puts one between a client and a server on this machine: what the client sends
goes on at once, and every chunk the server sends is written to the client
``rtt`` later, in order, so a request and its answer take ``rtt`` more (the
whole round trip is added on the way back: one wait per round trip instead of
two, for the same effect on a request-answer protocol); bandwidth is not limited. It listens on
127.0.0.1 only and connects to 127.0.0.1 only. Prints ``ready PORT`` once it
listens; stops on SIGTERM or SIGINT.

The sockets are asyncio's, but the waiting is not: asyncio's timers wake with
epoll's resolution of a millisecond, which would turn 0.25 ms into about 1 ms. A
timer thread sleeps until each chunk is due (the kernel's timers are good to tens
of microseconds) and hands the write to the event loop, which wakes at once.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import signal
import threading
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"
CHUNK = 65536


class Releaser:
    """A thread that calls each callback on the event loop when it is due."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="releaser", daemon=True)
        self._thread.start()

    def at(self, when: float, callback: Callable[[], None]) -> None:
        """Call `callback` on the loop at `when` (time.monotonic()); same `when` keeps order."""
        with self._cond:
            heapq.heappush(self._due, (when, next(self._seq), callback))
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._due:
                    self._cond.wait()
                    continue
                wait = self._due[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _, _, callback = heapq.heappop(self._due)
                self._loop.call_soon_threadsafe(callback)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay_s: float,
    releaser: Releaser,
) -> None:
    """Copy `reader` to `writer`, each chunk `delay_s` after it arrived; EOF likewise.
    With no delay, at once."""
    if delay_s <= 0:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
        except ConnectionError:
            pass
        writer.close()
        return
    done = asyncio.get_running_loop().create_future()

    def write(data: bytes) -> None:
        if not writer.is_closing():
            writer.write(data)

    def finish() -> None:
        if not writer.is_closing():
            writer.close()
        if not done.done():
            done.set_result(None)

    try:
        while data := await reader.read(CHUNK):
            releaser.at(time.monotonic() + delay_s, lambda data=data: write(data))
    except ConnectionError:
        pass
    releaser.at(time.monotonic() + delay_s, finish)
    await done


async def serve(port: int, target_port: int, rtt_ms: float) -> None:
    loop = asyncio.get_running_loop()
    releaser = Releaser(loop)
    delay_s = rtt_ms / 1000.0
    tasks: set[asyncio.Task[None]] = set()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(LOOPBACK, target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            pipe(client_r, server_w, 0.0, releaser),
            pipe(server_r, client_w, delay_s, releaser),
        )

    def start(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(handle(client_r, client_w))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(start, LOOPBACK, port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        releaser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="listen port (0: any free one)")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--rtt-ms", type=float, required=True, help="round trip to add")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.target_port, args.rtt_ms))


if __name__ == "__main__":
    main()
