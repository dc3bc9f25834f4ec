"""Output formats (DESIGN §3): which one a request wants, and the streamed ones' bytes.

``application/json`` is the buffered answer built by the routes. The streamed
formats turn each chunk of rows (a libpq result) into bytes as it arrives:

* ``application/x-ndjson``: one JSON row per line, values by the same rules as
  the JSON answer (DESIGN §4), rows as objects or arrays (``shape``);
* ``text/csv``: a header line of column names, then one line per row, every
  cell PostgreSQL's own text output, quoted as RFC 4180 and PostgreSQL's
  ``COPY … CSV`` do (only when needed; an empty string is ``""``, NULL is
  nothing); lines end with ``\\n`` as ``COPY`` writes them.

A stream that fails after its first row cannot change its status any more: NDJSON
then writes a last line ``{"error": {…}}`` (DESIGN §3's error body), CSV writes
nothing more, and in both cases the response ends without HTTP's final chunk, so
clients see an incomplete response rather than a short, valid-looking one.
"""

from __future__ import annotations

import csv
import enum
import functools
import itertools
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from psycopg.abc import Transformer
from psycopg.adapt import Transformer as PgTransformer
from psycopg.pq.abc import PGresult

from .._errors import GatewayError, NotAcceptable
from ._encoding import TEXT_ADAPTERS
from ._results import Column


class OutputFormat(enum.Enum):
    JSON = "json"
    NDJSON = "ndjson"
    CSV = "csv"

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES[self]

    @property
    def streamed(self) -> bool:
        return self is not OutputFormat.JSON


_MEDIA_TYPES = {
    OutputFormat.JSON: "application/json",
    OutputFormat.NDJSON: "application/x-ndjson",
    OutputFormat.CSV: "text/csv",
}

#: media ranges of an Accept header we answer, and what with
_ACCEPTED = {
    "application/json": OutputFormat.JSON,
    "application/x-ndjson": OutputFormat.NDJSON,
    "application/ndjson": OutputFormat.NDJSON,
    "application/jsonl": OutputFormat.NDJSON,
    "application/x-jsonlines": OutputFormat.NDJSON,
    "text/csv": OutputFormat.CSV,
    "application/*": OutputFormat.JSON,
    "text/*": OutputFormat.CSV,
    "*/*": OutputFormat.JSON,
}


def negotiate(format_param: str | None, accept: str | None) -> OutputFormat:
    """The output format: ``?format=`` if given, else the best of ``Accept``, else JSON.

    Raises:
        NotAcceptable: ``format`` names no format, or ``Accept`` allows none we give.
    """
    if format_param is not None:
        try:
            return OutputFormat(format_param.lower())
        except ValueError:
            raise NotAcceptable(
                f"format {format_param!r} is not available; use json, ndjson or csv"
            ) from None
    if not accept:
        return OutputFormat.JSON
    return _accepted_format(accept)


@functools.lru_cache(maxsize=64)
def _accepted_format(accept: str) -> OutputFormat:
    """The best format an ``Accept`` header allows (clients send the same few headers).

    Raises:
        NotAcceptable: it allows none we give.
    """
    if not accept.strip():
        return OutputFormat.JSON
    best: tuple[float, OutputFormat] | None = None
    for media_range, quality in _parse_accept(accept):
        fmt = _ACCEPTED.get(media_range)
        if fmt is not None and quality > 0 and (best is None or quality > best[0]):
            best = (quality, fmt)
    if best is None:
        raise NotAcceptable(
            f"cannot answer with {accept!r}; available: "
            "application/json, application/x-ndjson, text/csv"
        )
    return best[1]


def _parse_accept(accept: str) -> list[tuple[str, float]]:
    """(media range, q) pairs in header order; a malformed q counts as 0."""
    ranges = []
    for item in accept.split(","):
        media_range, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media_range:
            ranges.append((media_range.lower(), quality))
    return ranges


class StreamEncoder(Protocol):
    """Turns a stream's column list and row chunks into the response's bytes."""

    format: OutputFormat

    def head(self, columns: list[Column]) -> bytes:
        """What comes before the first row."""

    def rows(self, res: PGresult, tx: Transformer, stop: int) -> bytes:
        """Rows ``0 … stop-1`` of `res`; `tx` holds the gateway's result loaders."""

    def error(self, error: GatewayError) -> bytes:
        """The last bytes of a stream that failed midway."""


_dumps_line = functools.partial(orjson.dumps, option=orjson.OPT_APPEND_NEWLINE)


class NdjsonEncoder:
    """One JSON value per line: an object per row, or an array with ``shape=arrays``."""

    format = OutputFormat.NDJSON

    def __init__(self, shape: str) -> None:
        self._shape = shape
        self._names: list[str] = []

    def head(self, columns: list[Column]) -> bytes:
        self._names = [c.name for c in columns]
        return b""

    def rows(self, res: PGresult, tx: Transformer, stop: int) -> bytes:
        tx.set_pgresult(res)
        rows: Iterable[Any] = tx.load_rows(0, stop, tuple)
        if self._shape != "arrays":
            # map/zip/dict keep the per-row work in C: no Python frame per row
            rows = map(dict, map(zip, itertools.repeat(self._names), rows))
        return b"".join(map(_dumps_line, rows))

    def error(self, error: GatewayError) -> bytes:
        return _dumps_line(error.to_dict())


_NEEDS_QUOTES = re.compile(rb'[",\r\n]')


def csv_cell(value: bytes | None, *, alone: bool = False) -> bytes:
    """One cell as ``COPY … (FORMAT csv)`` writes it: NULL empty, quoted only if needed.

    An empty string is quoted to tell it from NULL; `alone` (a one-column row)
    also quotes ``\\.``, which would read as COPY's end-of-data marker.
    """
    if value is None:
        return b""
    if not value or _NEEDS_QUOTES.search(value) or (alone and value == b"\\."):
        return b'"' + value.replace(b'"', b'""') + b'"'
    return value


class CsvEncoder:
    """A header line of column names, then each row's cells as PostgreSQL text.

    Rows go through Python's C `csv` writer, which quotes as ``COPY`` does
    (delimiter, quote, CR, LF) except in two cases it cannot tell: an empty
    string, which ``COPY`` quotes and ``csv`` does not (NULL is empty for both),
    and one-column rows (``csv`` quotes a lone empty cell, ``COPY`` a lone
    ``\\.``). Chunks with either are written cell by cell with `csv_cell`.
    """

    format = OutputFormat.CSV

    def __init__(self) -> None:
        self._tx = PgTransformer(TEXT_ADAPTERS)

    def head(self, columns: list[Column]) -> bytes:
        if not columns:
            return b""
        alone = len(columns) == 1
        return b",".join(csv_cell(c.name.encode(), alone=alone) for c in columns) + b"\n"

    def rows(self, res: PGresult, tx: Transformer, stop: int) -> bytes:
        if not stop:
            return b""
        self._tx.set_pgresult(res)
        rows = self._tx.load_rows(0, stop, tuple)
        if res.nfields == 1 or any(map(operator.contains, rows, itertools.repeat(""))):
            return self._cell_by_cell(res, stop)
        lines: list[str] = []
        # "\r\n" makes csv quote CR as well as LF; each line's ending becomes "\n" below
        csv.writer(_Appender(lines.append), lineterminator="\r\n").writerows(rows)
        lines.append("")
        return "\n".join(map(str.removesuffix, lines, itertools.repeat("\r\n"))).encode()

    @staticmethod
    def _cell_by_cell(res: PGresult, stop: int) -> bytes:
        nfields = res.nfields
        alone = nfields == 1
        value = res.get_value
        lines = [
            b",".join([csv_cell(value(row, col), alone=alone) for col in range(nfields)])
            for row in range(stop)
        ]
        lines.append(b"")
        return b"\n".join(lines)

    def error(self, error: GatewayError) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class _Appender:
    """A file for `csv.writer` whose every write (one per row) is appended to a list."""

    write: Callable[[str], Any]


def stream_encoder(fmt: OutputFormat, shape: str) -> StreamEncoder:
    """The encoder of a streamed format.

    Raises:
        ValueError: `fmt` is not streamed.
    """
    if fmt is OutputFormat.NDJSON:
        return NdjsonEncoder(shape)
    if fmt is OutputFormat.CSV:
        return CsvEncoder()
    raise ValueError(f"{fmt.value} is not a streamed format")
