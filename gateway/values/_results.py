"""PostgreSQL results as the gateway answers them: columns, rows in a shape, command.

A `ResultConverter` belongs to one connection. It remembers the description
of each result shape it meets (column names and types, and how to build a row
in the job's shape), so a statement run again costs neither the decoding of
its column names nor the lookups of its type names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from psycopg.adapt import Transformer
from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGresult

from .._errors import BadRequest
from ._encoding import Codec

Row = Any  # a list (shape "arrays") or a dict (shape "objects")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    type_oid: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "type_oid": self.type_oid}


@dataclass(slots=True)
class StatementResult:
    """One statement's outcome: rows as the job's `shape` asked."""

    columns: list[Column]
    rows: list[Row]
    command: str
    row_count: int | None
    truncated: bool = False
    #: `columns` as JSON, when known (a connection's `ResultConverter` keeps it per shape)
    columns_json: orjson.Fragment | None = None


#: result shapes a connection remembers the columns of; past this it starts afresh
DESCRIPTIONS_REMEMBERED = 1024
#: wider results are described afresh each time, so the memory stays small
DESCRIBED_COLUMNS_MAX = 64

#: a result's columns, how to make one row of it in the job's shape, and the
#: columns as JSON (an answer embeds them as they are)
Description = tuple[list[Column], Callable[[Any], Any], orjson.Fragment]

_TAG_COUNT = re.compile(rb"(?: \d+)+$")
_TUPLES_OK = ExecStatus.TUPLES_OK  # a plain constant: an enum lookup per result costs
_EMPTY_QUERY = ExecStatus.EMPTY_QUERY


@functools.lru_cache(maxsize=64)
def command_name(tag: bytes | None) -> str:
    """The command of a command tag, without its row counts (``INSERT 0 1``: ``INSERT``)."""
    return _TAG_COUNT.sub(b"", tag or b"").decode()


def result_columns(res: PGresult, codec: Codec) -> list[Column]:
    """`res`'s columns: names, and types as `codec` names them."""
    return [
        Column((res.fname(i) or b"").decode(), codec.type_name(res.ftype(i)), res.ftype(i))
        for i in range(res.nfields)
    ]


def row_maker(shape: str, columns: list[Column]) -> Callable[[Any], Any]:
    """How to build a row of `columns` from its values: a list, or a dict by name."""
    if shape == "arrays":
        return list
    names = [c.name for c in columns]

    def make(values: Any) -> dict[str, Any]:
        return dict(zip(names, values, strict=True))

    return make


class ResultConverter:
    """One connection's results as `StatementResult`s, with the codec's loaders."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        self._tx = Transformer(codec.adapters)
        #: (shape, *column names, *column type oids) -> description, for known types
        self._descriptions: dict[tuple[Any, ...], Description] = {}

    def convert(self, res: PGresult, shape: str, max_rows: int) -> StatementResult | None:
        """`res` in `shape`, at most `max_rows` rows of it; None while one of its
        types is unknown to the codec.

        Raises:
            BadRequest: the statement was empty.
        """
        status = res.status
        if status == _EMPTY_QUERY:
            raise BadRequest("the statement is empty")
        described = self.describe(res, shape)
        if described is None:
            return None
        columns, make_row, columns_json = described
        rows: list[Any] = []
        truncated = False
        if status == _TUPLES_OK:
            count = res.ntuples
            take = min(count, max_rows)
            truncated = count > take
            self._tx.set_pgresult(res)
            rows = self._tx.load_rows(0, take, make_row)
        # positional: keywords cost a dataclass twice as long to build
        command = command_name(res.command_status)
        return StatementResult(columns, rows, command, res.command_tuples, truncated, columns_json)

    def describe(self, res: PGresult, shape: str) -> Description | None:
        """`res`'s columns and row maker; None while one of its types is unknown."""
        fields = range(res.nfields)
        # one flat tuple: the names, then the type oids
        key = (shape, *map(res.fname, fields), *map(res.ftype, fields))
        found = self._descriptions.get(key)
        if found is not None:
            return found
        if not all(self._codec.is_known(res.ftype(i)) for i in fields):
            return None
        columns = result_columns(res, self._codec)
        found = (columns, row_maker(shape, columns), orjson.Fragment(orjson.dumps(columns)))
        if len(columns) <= DESCRIBED_COLUMNS_MAX:
            if len(self._descriptions) >= DESCRIPTIONS_REMEMBERED:
                self._descriptions.clear()
            self._descriptions[key] = found
        return found
