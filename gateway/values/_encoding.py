"""Values across the gateway without loss (DESIGN §4), both ways.

Results are read in PostgreSQL's *text* format and turned into JSON-ready
Python values by psycopg loaders registered once at start:

* ``int2``/``int4`` become ``int`` and ``bool`` becomes ``bool`` (C loaders);
* ``float4``/``float8`` and ``json``/``jsonb`` become `orjson.Fragment`, so the
  digits PostgreSQL printed are the digits the client reads;
* arrays become nested lists whose elements follow the same rules;
* everything else (``int8``, ``numeric``, dates, ``bytea``, ranges, enums, ...)
  stays PostgreSQL's own text output, as ``str``.

Parameters go the other way as text with type ``unknown``, so PostgreSQL
infers each one's type from the statement, exactly as it does for a literal.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import orjson
from mypy_extensions import mypyc_attr
from psycopg import adapters as default_adapters
from psycopg import postgres
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import AdaptersMap, Loader
from psycopg.pq import Format
from psycopg.types import TypeInfo
from psycopg.types.array import register_array

from .._errors import BadRequest

_NON_FINITE = {b"NaN": "NaN", b"Infinity": "Infinity", b"-Infinity": "-Infinity"}

# Loaders that produce JSON numbers or booleans straight from C.
_NATIVE_LOADERS = {"int2": "int2", "int4": "int4", "bool": "bool"}


class FloatLoader(Loader):
    """float4/float8 text as a JSON number, digit for digit; NaN and infinities as strings."""

    def load(self, data: Buffer) -> orjson.Fragment | str:
        raw = bytes(data)
        special = _NON_FINITE.get(raw)
        return special if special is not None else orjson.Fragment(raw)


class JsonbLoader(Loader):
    """jsonb text embedded unchanged: key order and number digits kept.

    jsonb's output never holds a raw line break (one inside a string is escaped).
    """

    def load(self, data: Buffer) -> orjson.Fragment:
        return orjson.Fragment(bytes(data))


#: "\n" and "\r" as byte values: `in` finds an int in bytes with memchr, several
#: times faster than a one-byte bytes; Final literals, so compiled they are constants
_LF: Final = 0x0A
_CR: Final = 0x0D


class JsonLoader(Loader):
    """json text embedded as it was stored, its raw line breaks written as spaces.

    A json value keeps the text it was given, and PostgreSQL's own functions
    put line breaks in theirs (``json_agg`` between rows, ``row_to_json(r,
    true)``): embedded as they are, an NDJSON row would span several lines.
    PostgreSQL refuses a raw CR or LF inside a json string, so one is always
    whitespace between tokens, and a space in its place is the same JSON value.
    """

    def load(self, data: Buffer) -> orjson.Fragment:
        raw = bytes(data)
        if _LF in raw or _CR in raw:
            raw = raw.replace(b"\n", b" ").replace(b"\r", b" ")
        return orjson.Fragment(raw)


#: "[" as a byte value (a Final literal: compiled, a constant)
_OPEN_BOUNDS: Final = 0x5B


# subclassed per array type at run time (`_array_loader`); compiled as a native class
# (a non-native one's methods refuse an instance of such a subclass as `self`)
@mypyc_attr(allow_interpreted_subclasses=True)
class ArrayLoader(Loader):
    """An array as nested lists, or as PostgreSQL's text when a lower bound is not 1.

    A JSON array has no lower bounds: ``'[2:3]={1,2}'::int[]`` as ``[1, 2]``
    would lose them, so by DESIGN §4's rule such an array goes out as its text,
    ``"[2:3]={1,2}"``. PostgreSQL writes the bounds of every dimension before
    the braces when (and only when) one of them does not start at 1. The lists
    are made by psycopg's array loader of the same type (`nested`), which
    loads each element with its own type's loader.
    """

    nested: ClassVar[type[Loader]]

    def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
        super().__init__(oid, context)
        self._nested = self.nested(oid, context).load

    def load(self, data: Buffer) -> Any:
        if data[0] == _OPEN_BOUNDS:
            return bytes(data).decode()
        return self._nested(data)


@functools.cache
def _array_loader(nested: type[Loader]) -> type[Loader]:
    """`ArrayLoader` over psycopg's array loader class `nested`; made once per class,
    as psycopg makes its own (a class is never freed)."""
    return type(nested.__name__, (ArrayLoader,), {"nested": nested})


@dataclass(frozen=True, slots=True)
class TypeName:
    """What a result column's type is called for clients."""

    name: str
    oid: int


#: pseudo-types a result column can have, with PostgreSQL's fixed oids; psycopg's
#: registry leaves them out, and learning one defers its job to the end of its batch
_PSEUDO_TYPES = {2278: "void", 705: "unknown", 2275: "cstring"}


class Codec:
    """The loaders and type names for results, shared by every connection.

    Types unknown at start (enums, domains' arrays, composites created later)
    are learnt with `learn` from ``pg_type`` rows the first time a result shows
    them; until then `is_known` is false for their oid.
    """

    def __init__(self) -> None:
        self.adapters = AdaptersMap(types=postgres.types)
        self._names: dict[int, str] = {}
        #: array types (and domains over them) -> their elements' delimiter
        self._delimiters: dict[int, str] = {}
        self._install_builtins()

    def _install_builtins(self) -> None:
        text = default_adapters.get_loader(0, Format.TEXT)
        assert text is not None
        self.adapters.register_loader(0, text)  # fallback for every other oid
        for info in postgres.types:
            self._names[info.oid] = info.name
            if info.array_oid:
                self._names[info.array_oid] = info.name + "[]"
            self._register_scalar(info)
        for info in postgres.types:
            if info.array_oid:
                self._register_array(info)
        self._names.update(_PSEUDO_TYPES)  # text, as the fallback loader reads them

    def _register_scalar(self, info: TypeInfo) -> None:
        if info.name in _NATIVE_LOADERS:
            native = default_adapters.get_loader(info.oid, Format.TEXT)
            assert native is not None
            self.adapters.register_loader(info.oid, native)
        elif info.name in ("float4", "float8"):
            self.adapters.register_loader(info.oid, FloatLoader)
        elif info.name == "json":
            self.adapters.register_loader(info.oid, JsonLoader)
        elif info.name == "jsonb":
            self.adapters.register_loader(info.oid, JsonbLoader)
        else:
            text = default_adapters.get_loader(0, Format.TEXT)
            assert text is not None
            self.adapters.register_loader(info.oid, text)

    def _register_array(self, element: TypeInfo) -> None:
        """Load `element`'s array type with an `ArrayLoader`."""
        register_array(element, self.adapters)  # psycopg's loader, in C when it can
        nested = self.adapters.get_loader(element.array_oid, Format.TEXT)
        assert nested is not None
        self.adapters.register_loader(element.array_oid, _array_loader(nested))
        self._delimiters[element.array_oid] = element.delimiter

    def is_known(self, oid: int) -> bool:
        return oid in self._names

    def array_delimiter(self, oid: int) -> str | None:
        """What separates the elements of array type `oid` in its literal (``;`` for
        box[]); None when `oid` is not an array type, or not learnt yet."""
        return self._delimiters.get(oid)

    def type_name(self, oid: int) -> str:
        """The type's name for column metadata; the oid as text when never learnt."""
        return self._names.get(oid) or str(oid)

    def learn_asked(self, rows: Iterable[Sequence[Any]], asked: Iterable[int]) -> None:
        """Learn `rows` of `TYPE_QUERY`, then every oid of `asked` it did not find (a
        type dropped meanwhile) as plain text, so it is never looked up again."""
        self.learn(rows)
        self.learn([(oid, str(oid), 0, ",", 0) for oid in asked if not self.is_known(oid)])

    def learn(self, rows: Iterable[Sequence[Any]]) -> None:
        """Learn types from rows of `TYPE_QUERY`: (oid, name, element oid, delimiter, base oid).

        An array (element oid set) gets an array loader whose elements follow
        their own type's rules, split on the element type's delimiter (``;``
        for box); a domain (base oid set) loads as its base type; anything else
        (enum, composite, range, a base type from an extension) stays text.
        Rows may come in any order: each waits until what it depends on is known.
        """
        pending = [row for row in map(_TypeRow.parse, rows) if not self.is_known(row.oid)]
        while pending:
            waiting = [row for row in pending if not self._learn_one(row)]
            if len(waiting) == len(pending):  # a dependency never came: keep them as text
                for row in waiting:
                    self._names[row.oid] = row.name
                return
            pending = waiting

    def _learn_one(self, row: _TypeRow) -> bool:
        """Register `row`'s loader; False while the type it depends on is unknown."""
        depends = row.element or row.base
        if depends and not self.is_known(depends):
            return False
        if row.element:
            self._names[row.oid] = self.type_name(row.element) + "[]"
            name = self.type_name(row.element)
            element = TypeInfo(name, row.element, row.oid, delimiter=row.delimiter)
            self._register_array(element)
            return True
        self._names[row.oid] = row.name
        base_loader = self.adapters.get_loader(row.base, Format.TEXT) if row.base else None
        if base_loader is not None:
            self.adapters.register_loader(row.oid, base_loader)
        if row.base in self._delimiters:  # a domain over an array type
            self._delimiters[row.oid] = self._delimiters[row.base]
        return True


@dataclass(frozen=True, slots=True)
class _TypeRow:
    """One row of `TYPE_QUERY`, typed."""

    oid: int
    name: str
    element: int
    delimiter: str
    base: int

    @classmethod
    def parse(cls, row: Sequence[Any]) -> _TypeRow:
        oid, name, element, delimiter, base = row
        return cls(int(oid), str(name), int(element), str(delimiter), int(base))


#: pg_type rows for `Codec.learn`: the types asked for and, recursively, the
#: element types of arrays and the base types of domains. A type is an array
#: when another type names it as its ``typarray`` (``typelem`` alone would also
#: match ``point`` and ``name``); an array's delimiter is its element's.
TYPE_QUERY = b"""\
WITH RECURSIVE wanted(oid) AS (
    SELECT pg_catalog.unnest($1::pg_catalog.oid[])
  UNION
    SELECT dep.oid
    FROM wanted w
    JOIN pg_catalog.pg_type t ON t.oid = w.oid
    CROSS JOIN LATERAL (
        SELECT e.oid FROM pg_catalog.pg_type e WHERE e.typarray = t.oid
        UNION ALL
        SELECT t.typbasetype WHERE t.typbasetype <> 0
    ) AS dep
)
SELECT t.oid, t.typname, coalesce(e.oid, 0), coalesce(e.typdelim, ','), t.typbasetype
FROM wanted w
JOIN pg_catalog.pg_type t ON t.oid = w.oid
LEFT JOIN pg_catalog.pg_type e ON e.typarray = t.oid"""


def _text_adapters() -> AdaptersMap:
    """Loaders that leave every value as PostgreSQL's text (str), NULL as None."""
    adapters = AdaptersMap(types=postgres.types)
    text = default_adapters.get_loader(0, Format.TEXT)
    assert text is not None
    adapters.register_loader(0, text)  # the fallback of every oid
    return adapters


#: every value as PostgreSQL's text output: CSV cells, and results of shape "text"
TEXT_ADAPTERS = _text_adapters()


# --- request JSON --------------------------------------------------------------


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of str
class JSONNumber(str):
    """A JSON number with a fraction or exponent, kept as the client wrote it."""

    __slots__ = ()


@mypyc_attr(native_class=False)  # nor of int
class NegativeZero(int):
    """The JSON number ``-0``: the integer 0, written back with its sign.

    It is 0 wherever an integer is wanted (an option, an ``int`` parameter),
    and reaches PostgreSQL as ``-0``: ``'-0'::float8`` is -0, ``'-0'::text``
    is ``-0``. Python's int has no negative zero; it is the one JSON integer
    whose `int` would print differently from what the client wrote.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "-0"

    def __str__(self) -> str:
        return "-0"


NEGATIVE_ZERO = NegativeZero(0)


def json_int(text: str) -> Any:
    """A JSON integer's value (``parse_int`` of `json.loads`); ``-0`` keeps its sign."""
    # Compiled, a result typed int (or `x if c else int(...)`, whose type is int)
    # is a plain int: mypyc would turn -0 back into 0.
    if text == "-0":
        return NEGATIVE_ZERO
    return int(text)


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not valid JSON; send non-finite numbers as strings")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadRequest(f"request body has the key {key!r} twice in one object")
            seen.add(key)
    return obj


def loads_exact(body: bytes) -> Any:
    """Parse request JSON without losing digits.

    Integers become `int` (exact at any size; ``-0`` is `NEGATIVE_ZERO`);
    other numbers stay text as `JSONNumber`, so ``0.10000000000000000555``
    reaches PostgreSQL unchanged.

    Raises:
        BadRequest: the body is not UTF-8 JSON, uses NaN/Infinity, has a key
            twice in one object (which one would win is a guess), holds a lone
            UTF-16 surrogate escape (no UTF-8 form: PostgreSQL cannot take it),
            or is nested too deeply to parse.
    """
    value = _loads_verbatim(body)
    return _loads_decoded(body) if value is _NOT_VERBATIM else value


def _loads_decoded(body: bytes) -> Any:
    """`loads_exact` by the standard library's decoder: any body, every check."""
    # a hook per integer triples the decoding of a list of them: only when one may be -0
    decoder = _SIGNED_ZERO_DECODER if b"-0" in body else _DECODER
    try:
        # json.loads' own decoding of bytes, with a decoder built once, not per call
        value = decoder.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    # Only a \uD800-\uDFFF escape can make a string without a UTF-8 form, so
    # the walk is skipped for every body without one.
    if _SURROGATE_ESCAPE.search(body):
        _check_encodable(value)
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: a JSON number with a fraction or an exponent has a digit right before its "." or "e"
_MAYBE_FRACTION = re.compile(rb"[0-9][.eE]")
_NOT_VERBATIM = object()


def _loads_verbatim(body: bytes) -> Any:
    """`body` parsed by orjson, when that is what `loads_exact` makes of it; else `_NOT_VERBATIM`.

    orjson is several times faster than the exact decoder, but keeps the last
    of a key given twice and reads fractions as binary floats. Its value is
    taken only when it holds no float and orjson writes it back byte for byte
    as `body`: then no key was dropped, and every string and integer is as
    sent. Compact JSON (what browsers and most clients send) passes; anything
    else (spaces, escapes, fractions, huge integers, errors) takes the exact path.
    """
    try:
        value = orjson.loads(body)
        if orjson.dumps(value) != body:
            return _NOT_VERBATIM
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return _NOT_VERBATIM
    if _MAYBE_FRACTION.search(body) and _holds_float(value):
        return _NOT_VERBATIM
    return value


def _holds_float(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_DECODER = json.JSONDecoder(
    parse_float=JSONNumber, parse_constant=_reject_constant, object_pairs_hook=_unique_keys
)
_SIGNED_ZERO_DECODER = json.JSONDecoder(
    parse_float=JSONNumber,
    parse_int=json_int,
    parse_constant=_reject_constant,
    object_pairs_hook=_unique_keys,
)


def _check_encodable(value: Any) -> None:
    """Raises BadRequest when a string (key or value) in `value` has no UTF-8 form."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                raise BadRequest(
                    "request body holds a lone UTF-16 surrogate (\\uD800-\\uDFFF escape)"
                ) from None


# --- parameters ----------------------------------------------------------------


def param_to_text(value: Any, delimiter: str = ",") -> bytes | None:
    """One JSON parameter as PostgreSQL text input; None is SQL NULL.

    Objects become JSON text (for json/jsonb), lists become array literals
    whose elements are separated by `delimiter`: the array's element type's
    (``pg_type.typdelim``: ``;`` for box, ``,`` for nearly every other type).

    Raises:
        BadRequest: a string holds a NUL byte, which PostgreSQL text cannot hold.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, str):
        if "\x00" in value:
            raise BadRequest("parameters cannot contain NUL (\\u0000) characters")
        return value.encode()
    if isinstance(value, (int, float)):  # a tuple: no union object built per call
        return repr(value).encode()
    if isinstance(value, dict):
        return orjson.dumps(_exact_json(value))
    if isinstance(value, list):
        return _array_literal(value, delimiter).encode()
    raise BadRequest(f"unsupported parameter type: {type(value).__name__}")


def params_to_text(values: Sequence[Any]) -> list[bytes | None]:
    """`param_to_text` over a parameter list, arrays delimited by ``,``."""
    return [param_to_text(v) for v in values]


def list_params(values: Sequence[Any]) -> dict[int, list[Any]] | None:
    """The list parameters whose array literal separates elements, by position.

    `params_to_text` writes them with ``,``; once the parameter's type is known,
    one whose element type has another delimiter is written again with it
    (`param_to_text`). None when there is none, as for nearly every request.
    """
    found = None
    for index, value in enumerate(values):
        if isinstance(value, list) and _delimits(value):
            if found is None:
                found = {}
            found[index] = value
    return found


def _delimits(items: list[Any]) -> bool:
    """Whether the array literal of `items` holds a delimiter (two elements somewhere)."""
    return len(items) > 1 or any(isinstance(item, list) and _delimits(item) for item in items)


def _exact_json(value: Any) -> Any:
    if isinstance(value, JSONNumber):
        return orjson.Fragment(value.encode())
    if isinstance(value, NegativeZero):
        return orjson.Fragment(b"-0")  # orjson writes an int subclass as its int
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return orjson.Fragment(str(value).encode())  # orjson stops at 64 bits
    if isinstance(value, dict):
        return {k: _exact_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exact_json(v) for v in value]
    if isinstance(value, str) and "\x00" in value:
        raise BadRequest("parameters cannot contain NUL (\\u0000) characters")
    return value


def _array_literal(items: list[Any], delimiter: str) -> str:
    return "{" + delimiter.join(_array_element(item, delimiter) for item in items) + "}"


def _array_element(item: Any, delimiter: str) -> str:
    if item is None:
        return "NULL"
    if isinstance(item, list):
        return _array_literal(item, delimiter)
    # quoted, so a delimiter inside an element is text (box's ',', any type's ';')
    text = param_to_text(item)
    assert text is not None
    escaped = text.decode().replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
