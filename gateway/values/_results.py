"""PostgreSQL results as the gateway answers them: columns, rows in a shape, command.

A `ResultConverter` belongs to one connection. It remembers the description
of each result shape it meets (column names and types, and how to build a row
in the job's shape), so a statement run again costs neither the decoding of
its column names nor the lookups of its type names.

Besides the v1 shapes (``objects``, ``arrays``) there are two for front doors
that speak another wire protocol (Neon's, at ``POST /sql``): both give rows as
lists and describe every field as PostgreSQL's RowDescription does
(`StatementResult.fields`); `TEXT_SHAPE` keeps each value as PostgreSQL's text
output, `DESCRIBED_SHAPE` loads it as ``arrays`` does.
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
from ._encoding import TEXT_ADAPTERS, Codec

Row = Any  # a list (shape "arrays") or a dict (shape "objects")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    type_oid: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "type_oid": self.type_oid}


@dataclass(frozen=True, slots=True)
class Field:
    """A result field as PostgreSQL describes it (RowDescription; libpq's ``PQf*``)."""

    name: str
    type_oid: int
    #: the table the field is a column of, and its attribute number there; 0 and 0 if none
    table_oid: int
    column: int
    #: the type's size in bytes (``pg_type.typlen``), negative for a variable-length type
    size: int
    #: the type modifier (``atttypmod``: a varchar's length, a numeric's precision); -1 if none
    modifier: int
    #: 0 text, 1 binary
    format: int


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
    #: every field as PostgreSQL describes it, in `TEXT_SHAPE` and `DESCRIBED_SHAPE` only,
    #: and as JSON (see `fields_json`)
    fields: list[Field] | None = None
    fields_json: orjson.Fragment | None = None


#: rows as lists of each value's PostgreSQL text output (str; None for NULL), fields described
TEXT_SHAPE = "text"
#: rows as lists of the values shape "arrays" has, fields described
DESCRIBED_SHAPE = "described"


#: result shapes a connection remembers the columns of; past this it starts afresh
DESCRIPTIONS_REMEMBERED = 1024
#: wider results are described afresh each time, so the memory stays small
DESCRIBED_COLUMNS_MAX = 64

#: a result's columns, how to make one row of it in the job's shape, and the
#: columns as JSON (an answer embeds them as they are)
Description = tuple[list[Column], Callable[[Any], Any], orjson.Fragment]
#: a result's columns, its fields as PostgreSQL described them, and the fields as JSON
FieldsDescription = tuple[list[Column], list[Field], orjson.Fragment]

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


def result_fields(res: PGresult) -> list[Field]:
    """`res`'s fields as PostgreSQL described them."""
    return [
        Field(
            (res.fname(i) or b"").decode(),
            res.ftype(i),
            res.ftable(i),
            res.ftablecol(i),
            res.fsize(i),
            res.fmod(i),
            res.fformat(i),
        )
        for i in range(res.nfields)
    ]


def fields_json(fields: list[Field]) -> orjson.Fragment:
    """`fields` as JSON, each as node-postgres names a field (its ``FieldDef``), which
    JavaScript clients read and Neon's answer holds."""
    return orjson.Fragment(
        orjson.dumps(
            [
                {
                    "name": f.name,
                    "dataTypeID": f.type_oid,
                    "tableID": f.table_oid,
                    "columnID": f.column,
                    "dataTypeSize": f.size,
                    "dataTypeModifier": f.modifier,
                    "format": "binary" if f.format else "text",
                }
                for f in fields
            ]
        )
    )


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
        self._text_tx = Transformer(TEXT_ADAPTERS)
        #: (shape, *column names, *column type oids) -> description, for known types
        self._descriptions: dict[tuple[Any, ...], Description] = {}
        #: the described shapes' descriptions, by the fields' (see `describe_fields`)
        self._fields: dict[tuple[Any, ...], FieldsDescription] = {}

    def convert(self, res: PGresult, shape: str, max_rows: int) -> StatementResult | None:
        """`res` in `shape`, at most `max_rows` rows of it; None while one of its
        types is unknown to the codec.

        Raises:
            BadRequest: the statement was empty.
        """
        status = res.status
        if status == _EMPTY_QUERY:
            raise BadRequest("the statement is empty")
        if shape in (TEXT_SHAPE, DESCRIBED_SHAPE):
            return self._convert_described(res, shape, max_rows)
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

    def _convert_described(
        self, res: PGresult, shape: str, max_rows: int
    ) -> StatementResult | None:
        """`convert` in `TEXT_SHAPE` (never None: no type needs to be known) or
        `DESCRIBED_SHAPE`."""
        text = shape == TEXT_SHAPE
        described = self.describe_fields(res, known_types=not text)
        if described is None:
            return None
        columns, fields, fields_as_json = described
        tx = self._text_tx if text else self._tx
        rows: list[Any] = []
        truncated = False
        if res.status == _TUPLES_OK:
            take = min(res.ntuples, max_rows)
            truncated = res.ntuples > take
            tx.set_pgresult(res)
            rows = tx.load_rows(0, take, list)
        command = command_name(res.command_status)
        return StatementResult(
            columns, rows, command, res.command_tuples, truncated, None, fields, fields_as_json
        )

    def describe_fields(self, res: PGresult, *, known_types: bool) -> FieldsDescription | None:
        """`res`'s columns and fields; None when `known_types` asks for every type to
        be known to the codec and one is not yet."""
        n = range(res.nfields)
        # the names, type oids, tables, column numbers and type modifiers: all that
        # tells two descriptions apart (a size follows from the type; the format is text)
        key = (
            *map(res.fname, n),
            *map(res.ftype, n),
            *map(res.ftable, n),
            *map(res.ftablecol, n),
            *map(res.fmod, n),
        )
        found = self._fields.get(key)
        if found is not None:
            return found
        known = all(self._codec.is_known(res.ftype(i)) for i in n)
        if known_types and not known:
            return None
        fields = result_fields(res)
        found = (result_columns(res, self._codec), fields, fields_json(fields))
        if known and len(fields) <= DESCRIBED_COLUMNS_MAX:
            if len(self._fields) >= DESCRIPTIONS_REMEMBERED:
                self._fields.clear()
            self._fields[key] = found
        return found

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
