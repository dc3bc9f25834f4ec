"""A job whose rows go to the client chunk by chunk instead of in one result.

The connection worker runs a `StreamJob` alone on its connection. Its future
resolves as soon as the first chunk of rows is ready (with the columns and no
rows), so an error before that still becomes an ordinary error response. The
chunks then pass through a small bounded buffer: when the client reads slowly,
the worker waits, stops reading from PostgreSQL, and the server waits in turn,
so memory does not grow with the result.

Either side may stop: the worker `finish`es (end of rows, or an error midway),
or the client goes away and the handler `abandon`s, which sets `stopped` so the
worker cancels the query and gives its connection back at once.
"""

from __future__ import annotations

import asyncio
import collections

from ._errors import GatewayError, Timeout
from ._jobs import Column, Job, JobState, Statement, StatementResult
from ._streaming import StreamEncoder

#: encoded chunks a stream may hold between the connection worker and the client
BUFFERED_CHUNKS = 4


class StreamJob(Job):
    """One statement whose rows are streamed; see the module docstring.

    `row_limit` cuts the stream (None: no limit); `stall_s` is how long either
    side may keep the other waiting once the stream has begun.
    """

    __slots__ = (
        "_chunks",
        "_ended",
        "_error",
        "_readable",
        "_writable",
        "encoder",
        "row_limit",
        "stall_s",
        "stopped",
    )

    def __init__(
        self,
        statement: Statement,
        *,
        encoder: StreamEncoder,
        read_only: bool,
        deadline: float,
        row_limit: int | None,
        stall_s: float,
    ) -> None:
        super().__init__([statement], read_only=read_only, deadline=deadline, max_rows=0)
        self.encoder = encoder
        self.row_limit = row_limit
        self.stall_s = stall_s
        #: set when nobody will read the rest: the worker stops and cancels the query
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._ended = False
        self._error: GatewayError | None = None

    # --- the connection worker's side ---------------------------------------------------

    def begin(self, columns: list[Column]) -> bool:
        """Hand the columns to the client: the response can start. False if it is gone."""
        if self.state is not JobState.RUNNING or self.future.done():
            return False
        self.future.set_result([StatementResult(columns, [], "", None)])
        return True

    async def put(self, chunk: bytes) -> bool:
        """Queue a chunk for the client, waiting while the buffer is full.

        False when the client is gone, or did not read for `stall_s` (the
        stream then ends with a `Timeout` for it): stop producing.
        """
        try:
            async with asyncio.timeout(self.stall_s):
                while len(self._chunks) >= BUFFERED_CHUNKS and not self.stopped.done():
                    self._writable.clear()
                    await self._writable.wait()
        except TimeoutError:
            ms = round(self.stall_s * 1000)
            self.finish(Timeout(f"the client read nothing for {ms} ms; the stream was cut"))
            self._stop()
            return False
        if self.stopped.done():
            return False
        self._chunks.append(chunk)
        self._readable.set()
        return True

    def finish(self, error: GatewayError | None = None) -> None:
        """No more chunks: the client reads what is buffered, then the end (or `error`)."""
        if self._ended:
            return
        self._ended, self._error = True, error
        self.state = JobState.DONE
        self._readable.set()

    def fail(self, error: GatewayError) -> None:
        """Before the stream began: an error response. After: the stream ends with `error`."""
        if self.future.done():
            self.finish(error)
        else:
            super().fail(error)
            self._stop()

    def abandon(self, error: GatewayError | None = None) -> None:
        """The client stopped waiting (deadline before the first row) or went away."""
        if not self.future.done():
            super().abandon(error)
        self.finish(error)
        self._stop()

    def _stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)
        self._writable.set()

    # --- the client's side -------------------------------------------------------------

    async def next_chunk(self) -> bytes | None:
        """The next chunk of the response; None at its end.

        Raises:
            GatewayError: the stream failed after it began.
        """
        while not self._chunks and not self._ended:
            self._readable.clear()
            await self._readable.wait()
        if self._chunks:
            chunk = self._chunks.popleft()
            self._writable.set()
            return chunk
        if self._error is not None:
            raise self._error
        return None
