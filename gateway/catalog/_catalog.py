"""The catalog of named queries: their declared types, binding, and lookup by name.

`NamedQuery.bind` checks a request's values against a query's declared types
and raises `BadRequest`; `Catalog` holds the queries a directory's files
declare (read by `gateway.catalog._parser`, which says what a file holds and
how ``:name`` parameters become ``($n::type)``). A malformed file is a
`CatalogError` at load time, naming file and line.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from pathlib import Path

from pglast import ast
from pglast.parser import ParseError, parse_sql
from pglast.stream import RawStream

from .._errors import BadRequest, UnknownQuery
from ..values._encoding import JSONNumber, NegativeZero, json_int

__all__ = ["Catalog", "CatalogError", "NamedQuery", "Param", "integral_number"]


class CatalogError(Exception):
    """A named-query file is malformed; the message starts with ``file:line``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


# --------------------------------------------------------------------------
# Parameter types


class _Kind(enum.Enum):
    """Which JSON values a declared PostgreSQL type takes."""

    INTEGER = "an integer or a string of digits"
    NUMBER = "a number or a numeric string"
    BOOLEAN = "true or false"
    JSON = "any JSON value"
    TEXT = "a string"


# Keyed by the parser's normalised name, so "int", "integer" and "int4" agree.
_KIND_BY_TYPE = {
    **dict.fromkeys(
        (
            "int2",
            "int4",
            "int8",
            "smallserial",
            "serial",
            "bigserial",
            "serial2",
            "serial4",
            "serial8",
        ),
        _Kind.INTEGER,
    ),
    **dict.fromkeys(("numeric", "float4", "float8"), _Kind.NUMBER),
    "bool": _Kind.BOOLEAN,
    "json": _Kind.JSON,
    "jsonb": _Kind.JSON,
}

# serial types exist only in CREATE TABLE; a cast needs the real integer type.
_CAST_FOR_SERIAL = {
    "smallserial": "int2",
    "serial2": "int2",
    "serial": "int4",
    "serial4": "int4",
    "bigserial": "int8",
    "serial8": "int8",
}


@dataclass(frozen=True, slots=True)
class _TypeInfo:
    kind: _Kind
    is_array: bool
    cast: str  # what goes after "::" in the rewritten SQL


@cache
def _type_info(declared: str) -> _TypeInfo:
    """Classify a declared type with PostgreSQL's grammar.

    Raises ValueError when *declared* is not exactly one type name.
    """
    probe = f"SELECT NULL::{declared}"
    try:
        (raw,) = parse_sql(probe)
    except (ParseError, ValueError) as exc:
        raise ValueError(f"{declared!r} is not a PostgreSQL type") from exc
    type_name = _lone_cast_type(raw.stmt)
    if type_name is None or type_name.setof:
        raise ValueError(f"{declared!r} is not a PostgreSQL type")
    base = type_name.names[-1].sval if type_name.names else ""
    is_array = bool(type_name.arrayBounds)
    cast = declared
    if base in _CAST_FOR_SERIAL:
        cast = _CAST_FOR_SERIAL[base] + ("[]" if is_array else "")
    return _TypeInfo(_KIND_BY_TYPE.get(base, _Kind.TEXT), is_array, cast)


def _lone_cast_type(stmt: ast.Node | None) -> ast.TypeName | None:
    """The type of ``SELECT NULL::type`` if *stmt* is that and nothing more.

    Comparing deparsed text catches anything the declaration smuggled in after
    the type (``int FROM x``, ``int AS y``, ``int, 1``, ``text COLLATE "C"``).
    """
    if not isinstance(stmt, ast.SelectStmt) or not stmt.targetList:
        return None
    target = stmt.targetList[0]
    if not isinstance(target, ast.ResTarget) or not isinstance(target.val, ast.TypeCast):
        return None
    type_name = target.val.typeName
    if type_name is None:
        return None
    expected = f"SELECT CAST(NULL AS {RawStream()(type_name)})"
    return type_name if RawStream()(stmt) == expected else None


# --------------------------------------------------------------------------
# Binding request values


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_NUMERIC_TEXT = re.compile(
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?inf(?:inity)?|nan",
    re.IGNORECASE,
)
_BOOLEAN_TEXT = {
    "true": True,
    "t": True,
    "1": True,
    "yes": True,
    "false": False,
    "f": False,
    "0": False,
    "no": False,
}


class _Misfit(Exception):
    """A value does not fit its parameter's type; the binder words the error."""


#: an integral number written with a fraction or exponent (``1000.0``, ``1e3``) is an
#: integer for JSON Schema; past this many digits it is no integer anyone means
_INTEGRAL_DIGITS = 100


def integral_number(value: object) -> int | None:
    """The integer a JSON number with a fraction or exponent spells (``1000.0``,
    ``1e3``), as JSON Schema's "integer" takes it; None when it is no integer
    (``1.5``), or one of more than 100 digits."""
    if not isinstance(value, JSONNumber):
        return None
    try:
        number = Decimal(value)
    except ArithmeticError:
        return None
    if not number.is_finite() or number.adjusted() >= _INTEGRAL_DIGITS:
        return None
    return int(number) if number == number.to_integral_value() else None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, JSONNumber | float | Decimal):  # JSONNumber first: it is a str
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _fits(kind: _Kind, value: object) -> bool:
    """Whether a JSON scalar (not null) fits *kind*."""
    if kind is _Kind.INTEGER:
        # a digit string too: int8 goes out as a string and must come back in as one
        if isinstance(value, JSONNumber):
            return integral_number(value) is not None  # 1000.0 is an integer too
        if isinstance(value, str):
            return _INTEGER_TEXT.fullmatch(value) is not None
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is _Kind.NUMBER:
        if isinstance(value, str):  # a JSONNumber, or a numeric string
            return _NUMERIC_TEXT.fullmatch(value) is not None
        return isinstance(value, int | float | Decimal) and not isinstance(value, bool)
    if kind is _Kind.BOOLEAN:
        return isinstance(value, bool)
    if kind is _Kind.JSON:
        return True
    return isinstance(value, str) and not isinstance(value, JSONNumber)


def _check_array(kind: _Kind, value: object) -> None:
    """Raise _Misfit unless *value* is a (nested) list of elements fitting *kind*."""
    if not isinstance(value, list):
        raise _Misfit("an array")
    for item in value:
        if isinstance(item, list) and kind is not _Kind.JSON:
            _check_array(kind, item)
        elif item is not None and not _fits(kind, item):
            raise _Misfit(f"an array whose elements are {kind.value}, not {_json_type(item)}")


def _json_text(value: object) -> str:
    """*value* as JSON text, numbers with the digits the client sent.

    json/jsonb parameters go out as this text: the caller cannot tell that a
    str or a list is meant as a JSON value rather than as text or an array.
    """
    if isinstance(value, JSONNumber | NegativeZero):  # json.dumps would write -0 as 0
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _Misfit("a finite number")
    if value is None or isinstance(value, bool | int | float | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_json_text(item) for item in value) + "]"
    if isinstance(value, dict):
        members = (f"{_json_text(str(key))}:{_json_text(item)}" for key, item in value.items())
        return "{" + ",".join(members) + "}"
    raise _Misfit("a JSON value")


def _from_json(info: _TypeInfo, value: object) -> object:
    """A value from a JSON body, unchanged once it is known to fit.

    json/jsonb values, and the elements of json[]/jsonb[], become JSON text.
    """
    if info.is_array:
        _check_array(info.kind, value)
    elif not _fits(info.kind, value):
        raise _Misfit(f"{info.kind.value}, not {_json_type(value)}")
    if info.kind is _Kind.INTEGER:
        return _integers(value)
    if info.kind is not _Kind.JSON:
        return value
    if info.is_array:
        assert isinstance(value, list)  # _check_array made sure
        return [None if item is None else _json_text(item) for item in value]
    return _json_text(value)


def _integers(value: object) -> object:
    """*value* (or its nested elements) with each ``1000.0`` as the integer 1000:
    PostgreSQL's integer input refuses the fraction."""
    if isinstance(value, list):
        return [_integers(item) for item in value]
    integral = integral_number(value)
    return value if integral is None else integral


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_json_text(text: str) -> object:
    try:
        return json.loads(
            text, parse_float=JSONNumber, parse_int=json_int, parse_constant=_reject_constant
        )
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise _Misfit("valid JSON text") from exc


def _from_text(info: _TypeInfo, text: str) -> object:
    """A query-string value, converted to the JSON value it spells."""
    if info.is_array:
        return _from_json(info, _parse_json_text(text))
    if info.kind is _Kind.INTEGER and _INTEGER_TEXT.fullmatch(text):
        try:
            return int(text)
        except ValueError as exc:  # beyond Python's int-from-str digit limit
            raise _Misfit("an integer of sensible length") from exc
    if info.kind is _Kind.NUMBER and _NUMERIC_TEXT.fullmatch(text):
        return text  # kept as text: a float would round it
    if info.kind is _Kind.BOOLEAN and text.lower() in _BOOLEAN_TEXT:
        return _BOOLEAN_TEXT[text.lower()]
    if info.kind is _Kind.JSON:
        _parse_json_text(text)
        return text  # already JSON text, digits and all
    if info.kind is _Kind.TEXT:
        return text
    expected = "one of true/false/t/f/1/0/yes/no" if info.kind is _Kind.BOOLEAN else info.kind.value
    raise _Misfit(expected)


# --------------------------------------------------------------------------
# The public value types


@dataclass(frozen=True, slots=True)
class Param:
    """A declared parameter; *type* is the PostgreSQL type as written (``"int[]"``)."""

    name: str
    type: str

    def json_schema(self, *, in_query_string: bool = False) -> dict[str, object]:
        """The JSON Schema of the values `NamedQuery.bind` takes for this parameter:
        from a JSON body (null, SQL NULL, included), or `in_query_string` as text."""
        info = _type_info(self.type)
        if in_query_string:
            schema = _text_schema(info)
        elif info.is_array:
            element = _nullable(_SCHEMA_BY_KIND[info.kind])
            items = element if info.kind is _Kind.JSON else {"anyOf": [element, _ARRAY]}
            schema = _nullable({**_ARRAY, "items": items})
        else:
            schema = _nullable(_SCHEMA_BY_KIND[info.kind])
        return {**schema, "description": f"PostgreSQL {self.type}"}


_ARRAY: dict[str, object] = {"type": "array"}
_INTEGER_PATTERN = "^[+-]?[0-9]+$"
#: `_NUMERIC_TEXT` and `_BOOLEAN_TEXT` for JSON Schema, whose patterns take no flags
_NUMERIC_PATTERN = (
    r"^(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    "|[+-]?[Ii][Nn][Ff](?:[Ii][Nn][Ii][Tt][Yy])?|[Nn][Aa][Nn])$"
)
_BOOLEAN_PATTERN = (
    "^(?:[Tt](?:[Rr][Uu][Ee])?|[Ff](?:[Aa][Ll][Ss][Ee])?|[Yy][Ee][Ss]|[Nn][Oo]|[01])$"
)
_SCHEMA_BY_KIND: dict[_Kind, dict[str, object]] = {
    # JSON Schema's integers include 1000.0, which `integral_number` takes too
    _Kind.INTEGER: {"type": ["integer", "string"], "pattern": _INTEGER_PATTERN},
    _Kind.NUMBER: {"type": ["number", "string"], "pattern": _NUMERIC_PATTERN},
    _Kind.BOOLEAN: {"type": "boolean"},
    _Kind.JSON: {},
    _Kind.TEXT: {"type": "string"},
}


def _nullable(schema: dict[str, object]) -> dict[str, object]:
    """*schema*, or null (any type is NULL in SQL)."""
    kind = schema.get("type")
    if kind is None:
        return schema  # any JSON value already
    kinds = kind if isinstance(kind, list) else [kind]
    return {**schema, "type": [*kinds, "null"]}


def _text_schema(info: _TypeInfo) -> dict[str, object]:
    """What a query-string value of this type must spell (`_from_text`)."""
    if info.is_array or info.kind is _Kind.JSON:
        return {"type": "string", "contentMediaType": "application/json"}
    if info.kind is _Kind.INTEGER:
        return {"type": "integer"}
    if info.kind is _Kind.NUMBER:
        return {"type": "string", "pattern": _NUMERIC_PATTERN}
    if info.kind is _Kind.BOOLEAN:
        return {"type": "string", "pattern": _BOOLEAN_PATTERN}
    return {"type": "string"}


@dataclass(frozen=True, slots=True)
class NamedQuery:
    """One query of the catalog, its SQL already rewritten to ``$n`` placeholders."""

    name: str
    doc: str
    params: tuple[Param, ...]
    sql: str
    read_only: bool
    source: str  # "file.sql:12", the line of its "-- name:" comment
    #: the only roles that may run it ("-- roles:"); None: any role
    roles: tuple[str, ...] | None = None

    def bind(
        self, values: Mapping[str, object], *, from_query_string: bool = False
    ) -> list[object]:
        """The parameter values in ``$n`` order, checked against the declared types.

        *values* come from a JSON body (as `gateway.values.loads_exact` parses
        it: non-integer numbers are `JSONNumber` text), or with
        *from_query_string* from a URL's query string: every value a str,
        checked by the same rules and converted (``"42"`` for an int gives 42,
        ``"yes"`` for a bool gives True, a JSON array text for an array type
        gives a list; numeric text stays text). A json/jsonb value is returned
        as its JSON text, so that it reaches PostgreSQL as JSON even when it is
        a string or an array. None (JSON null) is SQL NULL for any type. Range
        checks are left to PostgreSQL.

        Raises BadRequest, naming the parameter, when a declared parameter is
        missing, an undeclared one is given, or a value does not fit its type.
        """
        declared = [param.name for param in self.params]
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise BadRequest(
                f"query {self.name!r} has no parameter {_quoted(unknown)}; "
                f"its parameters are {_quoted(declared) or 'none'}"
            )
        missing = [name for name in declared if name not in values]
        if missing:
            raise BadRequest(f"query {self.name!r} needs parameter {_quoted(missing)}")
        return [
            self._bind_one(param, values[param.name], from_query_string) for param in self.params
        ]

    def _bind_one(self, param: Param, value: object, from_query_string: bool) -> object:
        if value is None:
            return None
        info = _type_info(param.type)
        try:
            if not from_query_string:
                return _from_json(info, value)
            if not isinstance(value, str):
                raise _Misfit("a single value")
            return _from_text(info, value)
        except RecursionError:
            raise BadRequest(f"parameter {param.name!r} is nested too deeply") from None
        except _Misfit as misfit:
            shown = _shown(value) if from_query_string else _json_type(value)
            raise BadRequest(
                f"parameter {param.name!r} of query {self.name!r} is {param.type}: "
                f"expected {misfit}, got {shown}"
            ) from None

    def describe(self) -> dict[str, object]:
        """The JSON description served by ``GET /v1/queries``."""
        return {
            "name": self.name,
            "doc": self.doc,
            "params": [{"name": param.name, "type": param.type} for param in self.params],
            "read_only": self.read_only,
            "roles": None if self.roles is None else list(self.roles),
            "sql": self.sql,
        }


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Catalog:
    """The named queries, in the order they were loaded; looked up by name."""

    __slots__ = ("_queries",)

    def __init__(self, queries: Iterable[NamedQuery] = ()) -> None:
        """Raises CatalogError when two queries share a name."""
        self._queries: dict[str, NamedQuery] = {}
        for query in queries:
            first = self._queries.setdefault(query.name, query)
            if first is not query:
                raise CatalogError(
                    query.source, f"duplicate query name {query.name!r} (first at {first.source})"
                )

    @classmethod
    def load(cls, directory: Path) -> Catalog:
        """Every query of ``directory/*.sql``, files in name order.

        A missing directory gives an empty catalog. Raises CatalogError for a
        malformed file, an unreadable one, or a name defined twice.
        """
        if not directory.exists():
            return cls()
        if not directory.is_dir():
            raise CatalogError(str(directory), "not a directory")
        # The parser builds this module's types, so it is imported here, not at the
        # top; it runs at start-up only and is not compiled.
        from ._parser import parse_queries

        queries: list[NamedQuery] = []
        for path in sorted(p for p in directory.glob("*.sql") if p.is_file()):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CatalogError(str(path), f"cannot read: {exc}") from exc
            queries.extend(parse_queries(text, str(path)))
        return cls(queries)

    def get(self, name: str) -> NamedQuery:
        """The query called *name*; raises UnknownQuery when there is none."""
        try:
            return self._queries[name]
        except KeyError:
            raise UnknownQuery(f"no named query {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._queries

    def __iter__(self) -> Iterator[NamedQuery]:
        return iter(self._queries.values())

    def __len__(self) -> int:
        return len(self._queries)
