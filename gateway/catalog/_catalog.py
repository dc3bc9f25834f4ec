"""The catalog of named queries: ``sql/queries/*.sql`` parsed, checked and bound.

A file holds one or more queries in the format aiosql users know::

    -- name: book_by_id
    -- One book by its id, with its author.
    -- params: id int
    SELECT b.id, b.title FROM book b WHERE b.id = :id;

Each ``:name`` becomes ``($n::type)``, n being the parameter's position in the
``-- params:`` line. The parentheses keep the cast attached to the parameter
where a bare ``$n::type`` would not parse as meant: ``:ids[1]`` would otherwise
read as a cast to ``int[][1]``, and ``FETCH FIRST $1::int ROWS`` is a syntax
error. Tokens are found with PostgreSQL's own scanner (``pglast.parser.scan``),
so string literals, quoted identifiers, comments, dollar-quoted bodies and
``::`` casts are never mistaken for parameters.

Everything wrong in a file is a `CatalogError` at load time, naming file and
line, so a bad query stops the gateway from starting rather than failing a
request later. `NamedQuery.bind` checks a request's values against the
declared types and raises `BadRequest`.
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
from pathlib import Path, PurePath
from typing import NoReturn

from pglast import ast
from pglast.parser import ParseError, Token, parse_sql, scan
from pglast.stream import RawStream

from .._errors import BadRequest, UnknownQuery
from ..values._encoding import JSONNumber, NegativeZero, json_int

__all__ = ["Catalog", "CatalogError", "NamedQuery", "Param", "parse_queries"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_LINE = re.compile(r"--\s*name\s*:\s*(?P<name>.*?)\s*")
_PARAMS_LINE = re.compile(r"--\s*params\s*:(?P<decl>.*)")

# aiosql's operation suffixes. Only "!" and "<!" mean the query writes; "^" and
# "$" (one row, one value) only shape aiosql's Python result, so they are
# accepted and dropped. "*!" (executemany) and "#" (script) have no meaning
# for one statement with one set of parameters.
_WRITE_SUFFIXES = ("<!", "!")
_READ_SUFFIXES = ("^", "$")
_UNSUPPORTED_SUFFIXES = ("*!", "#")

_COMMENTS = frozenset({"SQL_COMMENT", "C_COMMENT"})
_COLON, _SEMICOLON, _COMMA = "ASCII_58", "ASCII_59", "ASCII_44"
_OPENERS, _CLOSERS = frozenset({"ASCII_40", "ASCII_91"}), frozenset({"ASCII_41", "ASCII_93"})


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
        if isinstance(value, str) and not isinstance(value, JSONNumber):
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
    if info.kind is not _Kind.JSON:
        return value
    if info.is_array:
        assert isinstance(value, list)  # _check_array made sure
        return [None if item is None else _json_text(item) for item in value]
    return _json_text(value)


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


@dataclass(frozen=True, slots=True)
class NamedQuery:
    """One query of the catalog, its SQL already rewritten to ``$n`` placeholders."""

    name: str
    doc: str
    params: tuple[Param, ...]
    sql: str
    read_only: bool
    source: str  # "file.sql:12", the line of its "-- name:" comment

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


# --------------------------------------------------------------------------
# Parsing a file


def parse_queries(text: str, path: str = "<string>") -> list[NamedQuery]:
    """The named queries in *text*, the contents of the file *path*.

    Raises CatalogError (``path:line: problem``) for anything malformed: SQL
    before the first ``-- name:``, a bad name or suffix, a bad ``-- params:``
    line, an undeclared or unused parameter, ``$n`` placeholders, more than
    one statement, or SQL PostgreSQL's parser refuses.
    """
    return _FileParser(text, path).queries()


@dataclass(frozen=True, slots=True)
class _Usage:
    """A ``:name`` in the SQL: the colon and the name token after it."""

    colon: Token
    name_token: Token
    name: str


class _FileParser:
    """One file's tokens, and the positions needed to word errors."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.filename = PurePath(path).name
        self.tokens = self._scan(text)

    def queries(self) -> list[NamedQuery]:
        starts = [i for i, token in enumerate(self.tokens) if self._is_name_line(token)]
        first = starts[0] if starts else len(self.tokens)
        stray = next((t for t in self.tokens[:first] if t.name not in _COMMENTS), None)
        if stray is not None:
            self._fail(stray.start, "SQL before the first '-- name:' line")
        ends = [*starts[1:], len(self.tokens)]
        return [
            self._query(self.tokens[s], self.tokens[s + 1 : e])
            for s, e in zip(starts, ends, strict=True)
        ]

    # -- helpers on positions

    def _scan(self, text: str) -> list[Token]:
        try:
            return list(scan(text))
        except ParseError as exc:
            self._fail_parse(exc, text, 1)

    def _text(self, token: Token) -> str:
        return self.text[token.start : token.end + 1]

    def _line(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def _fail(self, pos: int, problem: str) -> NoReturn:
        raise CatalogError(f"{self.path}:{self._line(pos)}", problem)

    def _fail_parse(self, exc: ParseError, text: str, first_line: int) -> NoReturn:
        """Raise *exc* from scanning or parsing *text*, which starts at *first_line*."""
        message, *rest = exc.args
        line = first_line
        if rest and isinstance(rest[0], int):
            line += text.count("\n", 0, _error_index(text, rest[0]))
        raise CatalogError(f"{self.path}:{line}", str(message))

    def _is_name_line(self, token: Token) -> bool:
        if token.name != "SQL_COMMENT" or not _NAME_LINE.fullmatch(self._text(token)):
            return False
        line_start = self.text.rfind("\n", 0, token.start) + 1
        return not self.text[line_start : token.start].strip()

    # -- one query

    def _query(self, name_token: Token, tokens: list[Token]) -> NamedQuery:
        name, read_only = self._name(name_token)
        header_end = next((i for i, t in enumerate(tokens) if t.name != "SQL_COMMENT"), len(tokens))
        doc, params = self._header(tokens[:header_end])
        body = self._body(name, name_token, tokens[header_end:])
        usages = self._usages(body)
        self._check_usages(name, params, usages)
        sql = self._rewrite(body, params, usages)
        self._check_parses(sql, body[0].start)
        return NamedQuery(
            name=name,
            doc=doc,
            params=tuple(param for param, _ in params),
            sql=sql,
            read_only=read_only,
            source=f"{self.filename}:{self._line(name_token.start)}",
        )

    def _name(self, token: Token) -> tuple[str, bool]:
        match = _NAME_LINE.fullmatch(self._text(token))
        assert match is not None  # _is_name_line matched it
        name, read_only = match["name"], True
        if name.endswith(_UNSUPPORTED_SUFFIXES):
            self._fail(token.start, f"{name!r}: aiosql's '*!' and '#' suffixes are not supported")
        for suffix in _WRITE_SUFFIXES + _READ_SUFFIXES:
            if name.endswith(suffix):
                name, read_only = name.removesuffix(suffix), suffix not in _WRITE_SUFFIXES
                break
        if not _NAME.fullmatch(name):
            self._fail(token.start, f"invalid query name {match['name']!r}")
        return name, read_only

    def _header(self, comments: list[Token]) -> tuple[str, list[tuple[Param, Token]]]:
        """The doc text and the declared parameters, each with its params line."""
        doc: list[str] = []
        params: list[tuple[Param, Token]] | None = None
        for comment in comments:
            text = self._text(comment)
            match = _PARAMS_LINE.fullmatch(text)
            if match is None:
                line = text.removeprefix("--")
                doc.append(line.removeprefix(" ").rstrip())
            elif params is not None:
                self._fail(comment.start, "a second '-- params:' line")
            else:
                offset = comment.start + match.start("decl")
                params = [(p, comment) for p in self._params(match["decl"], offset)]
        return "\n".join(doc).strip("\n"), params or []

    def _params(self, decl: str, offset: int) -> list[Param]:
        try:
            tokens = list(scan(decl))
        except ParseError as exc:
            self._fail_parse(exc, decl, self._line(offset))
        params: list[Param] = []
        for group in _split_top_level_commas(tokens):
            param = self._param(decl, offset, group)
            if any(p.name == param.name for p in params):
                self._fail(offset, f"parameter {param.name!r} declared twice")
            params.append(param)
        return params

    def _param(self, decl: str, offset: int, group: list[Token]) -> Param:
        if len(group) < 2:
            item = decl[group[0].start : group[-1].end + 1] if group else ""
            self._fail(offset, f"expected 'name type' in '-- params:', got {item!r}")
        if any(t.name in _COMMENTS for t in group):
            self._fail(offset, "a comment inside '-- params:'")
        name = decl[group[0].start : group[0].end + 1]
        type_text = decl[group[1].start : group[-1].end + 1]
        if not _NAME.fullmatch(name):
            self._fail(offset, f"invalid parameter name {name!r}")
        try:
            _type_info(type_text)
        except ValueError as exc:
            self._fail(offset, f"parameter {name!r}: {exc}")
        return Param(name, type_text)

    def _body(self, name: str, name_token: Token, tokens: list[Token]) -> list[Token]:
        """The statement's tokens: trailing comments and one final ';' dropped."""
        end = len(tokens)
        while end and tokens[end - 1].name in _COMMENTS:
            end -= 1
        if end and tokens[end - 1].name == _SEMICOLON:
            end -= 1
        body = tokens[:end]
        if not body:
            self._fail(name_token.start, f"query {name!r} has no SQL")
        for token in body:
            if token.name == _SEMICOLON:
                self._fail(token.start, f"query {name!r} has more than one statement")
            if token.name == "PARAM":
                self._fail(token.start, f"use :name parameters, not {self._text(token)}")
        return body

    def _usages(self, body: list[Token]) -> list[_Usage]:
        """Every ``:name``: a ':' token with a bare word right after it.

        PostgreSQL's scanner gives ``:name`` as ':' then an IDENT or a keyword
        (``:limit``), and ``::`` as one TYPECAST token. A ':' right after a word
        is an array slice (``a[lo:hi]``) as in aiosql, not a parameter.
        """
        usages = []
        for i, colon in enumerate(body[:-1]):
            after = body[i + 1]
            if colon.name != _COLON or after.start != colon.end + 1:
                continue
            before = body[i - 1] if i else None
            if before is not None and before.end + 1 == colon.start:
                last = self.text[before.end]
                if last.isalnum() or last == "_":
                    continue
            word = self._text(after)
            if _NAME.fullmatch(word):
                usages.append(_Usage(colon, after, word))
        return usages

    def _check_usages(
        self, name: str, params: list[tuple[Param, Token]], usages: list[_Usage]
    ) -> None:
        declared = {param.name for param, _ in params}
        for usage in usages:
            if usage.name not in declared:
                self._fail(usage.colon.start, f":{usage.name} is not declared in '-- params:'")
        used = {usage.name for usage in usages}
        for param, line in params:
            if param.name not in used:
                self._fail(
                    line.start, f"parameter {param.name!r} is declared but not used by {name!r}"
                )

    def _rewrite(
        self, body: list[Token], params: list[tuple[Param, Token]], usages: list[_Usage]
    ) -> str:
        number = {param.name: n for n, (param, _) in enumerate(params, start=1)}
        cast = {param.name: _type_info(param.type).cast for param, _ in params}
        pieces, pos = [], body[0].start
        for usage in usages:
            pieces.append(self.text[pos : usage.colon.start])
            pieces.append(f"(${number[usage.name]}::{cast[usage.name]})")
            pos = usage.name_token.end + 1
        pieces.append(self.text[pos : body[-1].end + 1])
        return "".join(pieces)

    def _check_parses(self, sql: str, start: int) -> None:
        # A replacement holds no newline, so lines of *sql* are lines of the file.
        try:
            parse_sql(sql)
        except ParseError as exc:
            self._fail_parse(exc, sql, self._line(start))


def _pglast_recounts_positions() -> bool:
    """Whether pglast's error positions need correcting.

    PostgreSQL reports an error position in characters; pglast 8 converts it
    again as if it were a byte offset, which is only right for ASCII text.
    Probe once rather than trust a version number.
    """
    try:
        scan("'\u00e9' 'x")  # an unterminated string at character 4
    except ParseError as exc:
        return bool(exc.args[1:] and exc.args[1] != 4)
    return False


_RECOUNTED = _pglast_recounts_positions()


def _error_index(text: str, reported: int) -> int:
    """The character index in *text* of an error position pglast reported."""
    if _RECOUNTED:
        # *reported* is the character that holds byte number <true index>, so
        # the true index is that character's first byte: exact, or a few
        # characters short when the character there is not ASCII.
        return min(len(text[:reported].encode("utf-8")), len(text))
    return reported


def _split_top_level_commas(tokens: list[Token]) -> list[list[Token]]:
    """Tokens split at commas outside parentheses: ``numeric(10,2)`` stays whole."""
    groups: list[list[Token]] = [[]]
    depth = 0
    for token in tokens:
        if token.name in _OPENERS:
            depth += 1
        elif token.name in _CLOSERS:
            depth -= 1
        elif token.name == _COMMA and depth == 0:
            groups.append([])
            continue
        groups[-1].append(token)
    if groups == [[]]:
        return []  # "-- params:" with nothing after it declares none
    return groups
