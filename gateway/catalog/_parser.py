"""Reading a file of named queries: ``sql/queries/*.sql`` into `NamedQuery` objects.

A file holds one or more queries in the format aiosql users know::

    -- name: book_by_id
    -- One book by its id, with its author.
    -- params: id int
    -- roles: reader, reviewer
    SELECT b.id, b.title FROM book b WHERE b.id = :id;

An optional ``-- roles:`` line names the only roles a request may run the query as
(the role its token names, or the anonymous role); without one, any role may.

Each ``:name`` becomes ``($n::type)``, n being the parameter's position in the
``-- params:`` line. The parentheses keep the cast attached to the parameter
where a bare ``$n::type`` would not parse as meant: ``:ids[1]`` would otherwise
read as a cast to ``int[][1]``, and ``FETCH FIRST $1::int ROWS`` is a syntax
error. Tokens are found with PostgreSQL's own scanner (``pglast.parser.scan``),
so string literals, quoted identifiers, comments, dollar-quoted bodies and
``::`` casts are never mistaken for parameters.

A file is read in steps, one function each: split it into queries
(`_query_spans`), then for each query read its name line (`_name`), its header
of doc, ``-- params:`` and ``-- roles:`` (`_header`), its statement (`_body`), find the
``:name`` uses (`_usages`), check them against the declaration
(`_check_usages`), rewrite them (`_rewrite`) and let PostgreSQL's parser check
the result (`_check_parses`). Every step raises `CatalogError` naming file and
line, so a bad query stops the gateway from starting rather than failing a
request later. This runs once, at start-up: unlike the rest of the catalog it
is not compiled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import NoReturn

from pglast.parser import ParseError, Token, parse_sql, scan

from ._catalog import CatalogError, NamedQuery, Param, _type_info

__all__ = ["parse_queries"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_LINE = re.compile(r"--\s*name\s*:\s*(?P<name>.*?)\s*")
_PARAMS_LINE = re.compile(r"--\s*params\s*:(?P<decl>.*)")
_ROLES_LINE = re.compile(r"--\s*roles\s*:(?P<decl>.*)")
#: the longest role name PostgreSQL keeps (NAMEDATALEN - 1)
_MAX_ROLE_BYTES = 63

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


def parse_queries(text: str, path: str = "<string>") -> list[NamedQuery]:
    """The named queries in *text*, the contents of the file *path*.

    Raises CatalogError (``path:line: problem``) for anything malformed: SQL
    before the first ``-- name:``, a bad name or suffix, a bad ``-- params:``
    line, an undeclared or unused parameter, ``$n`` placeholders, more than
    one statement, or SQL PostgreSQL's parser refuses.
    """
    source = _Source(text, path)
    tokens = source.scan(text, 1)
    return [
        _query(source, tokens[start], tokens[start + 1 : end])
        for start, end in _query_spans(source, tokens)
    ]


# --------------------------------------------------------------------------
# Positions in the file


@dataclass(frozen=True, slots=True)
class _Source:
    """The file's text and path: token text, line numbers and errors that name them."""

    text: str
    path: str

    @property
    def filename(self) -> str:
        return PurePath(self.path).name

    def of(self, token: Token) -> str:
        """The text of *token*."""
        return self.text[token.start : token.end + 1]

    def line(self, pos: int) -> int:
        """The 1-based line of character *pos*."""
        return self.text.count("\n", 0, pos) + 1

    def fail(self, pos: int, problem: str) -> NoReturn:
        """Raise CatalogError at the line of character *pos*."""
        raise CatalogError(f"{self.path}:{self.line(pos)}", problem)

    def scan(self, text: str, first_line: int) -> list[Token]:
        """The tokens of *text*, a piece of the file starting at *first_line*.

        Raises CatalogError when the scanner fails (an unterminated quote or comment).
        """
        try:
            return list(scan(text))
        except ParseError as exc:
            self.fail_parse(exc, text, first_line)

    def fail_parse(self, exc: ParseError, text: str, first_line: int) -> NoReturn:
        """Raise *exc*, from scanning or parsing *text* (which starts at
        *first_line*), as a CatalogError at the line it points to."""
        message, *rest = exc.args
        line = first_line
        if rest and isinstance(rest[0], int):
            line += text.count("\n", 0, _error_index(text, rest[0]))
        raise CatalogError(f"{self.path}:{line}", str(message))


# --------------------------------------------------------------------------
# The steps


def _query_spans(source: _Source, tokens: list[Token]) -> list[tuple[int, int]]:
    """Each query's tokens as (index of its ``-- name:`` comment, end).

    Raises CatalogError when anything but comments comes before the first query.
    """
    starts = [i for i, token in enumerate(tokens) if _is_name_line(source, token)]
    first = starts[0] if starts else len(tokens)
    stray = next((t for t in tokens[:first] if t.name not in _COMMENTS), None)
    if stray is not None:
        source.fail(stray.start, "SQL before the first '-- name:' line")
    if not starts:
        return []  # comments only: a file without queries
    return list(zip(starts, [*starts[1:], len(tokens)], strict=True))


def _is_name_line(source: _Source, token: Token) -> bool:
    """Whether *token* is a ``-- name:`` comment alone on its line."""
    if token.name != "SQL_COMMENT" or not _NAME_LINE.fullmatch(source.of(token)):
        return False
    line_start = source.text.rfind("\n", 0, token.start) + 1
    return not source.text[line_start : token.start].strip()


def _query(source: _Source, name_token: Token, tokens: list[Token]) -> NamedQuery:
    """The query named by *name_token*, from the *tokens* up to the next one.

    Raises CatalogError from any of the steps.
    """
    name, read_only = _name(source, name_token)
    header_end = next((i for i, t in enumerate(tokens) if t.name != "SQL_COMMENT"), len(tokens))
    doc, params, roles = _header(source, tokens[:header_end])
    body = _body(source, name, name_token, tokens[header_end:])
    usages = _usages(source, body)
    _check_usages(source, name, params, usages)
    sql = _rewrite(source, body, params, usages)
    _check_parses(source, sql, body[0].start)
    return NamedQuery(
        name=name,
        doc=doc,
        params=tuple(param for param, _ in params),
        sql=sql,
        read_only=read_only,
        source=f"{source.filename}:{source.line(name_token.start)}",
        roles=roles,
    )


def _name(source: _Source, token: Token) -> tuple[str, bool]:
    """The query's name and whether it is read-only, from its ``-- name:`` line.

    Raises CatalogError for an invalid name or an unsupported aiosql suffix.
    """
    match = _NAME_LINE.fullmatch(source.of(token))
    assert match is not None  # _is_name_line matched it
    name, read_only = match["name"], True
    if name.endswith(_UNSUPPORTED_SUFFIXES):
        source.fail(token.start, f"{name!r}: aiosql's '*!' and '#' suffixes are not supported")
    for suffix in _WRITE_SUFFIXES + _READ_SUFFIXES:
        if name.endswith(suffix):
            name, read_only = name.removesuffix(suffix), suffix not in _WRITE_SUFFIXES
            break
    if not _NAME.fullmatch(name):
        source.fail(token.start, f"invalid query name {match['name']!r}")
    return name, read_only


# A declared parameter and the "-- params:" comment that declared it (for errors).
_Declared = list[tuple[Param, Token]]


def _header(
    source: _Source, comments: list[Token]
) -> tuple[str, _Declared, tuple[str, ...] | None]:
    """The doc text, the declared parameters and the roles (None: any), from the
    comments after the name.

    Raises CatalogError for a second ``-- params:`` or ``-- roles:`` line, or a bad
    declaration.
    """
    doc: list[str] = []
    params: _Declared | None = None
    roles: tuple[str, ...] | None = None
    for comment in comments:
        text = source.of(comment)
        if (match := _ROLES_LINE.fullmatch(text)) is not None:
            if roles is not None:
                source.fail(comment.start, "a second '-- roles:' line")
            roles = _roles(source, match["decl"], comment.start)
        elif (match := _PARAMS_LINE.fullmatch(text)) is None:
            line = text.removeprefix("--")
            doc.append(line.removeprefix(" ").rstrip())
        elif params is not None:
            source.fail(comment.start, "a second '-- params:' line")
        else:
            offset = comment.start + match.start("decl")
            params = [(p, comment) for p in _params(source, match["decl"], offset)]
    return "\n".join(doc).strip("\n"), params or [], roles


def _roles(source: _Source, decl: str, offset: int) -> tuple[str, ...]:
    """The role names of a ``-- roles:`` line: as a token names them, exactly.

    Raises CatalogError for an empty, spaced or over-long name, or ``none``.
    """
    names = [name.strip() for name in decl.split(",")]
    for name in names:
        if not name or any(c.isspace() for c in name) or name == "none":
            source.fail(offset, f"'-- roles:' takes role names joined by commas, got {decl!r}")
        if len(name.encode()) > _MAX_ROLE_BYTES:
            source.fail(offset, f"role name {name!r} is longer than {_MAX_ROLE_BYTES} bytes")
    return tuple(dict.fromkeys(names))


def _params(source: _Source, decl: str, offset: int) -> list[Param]:
    """The parameters declared by *decl*, the text after ``-- params:`` at *offset*.

    Raises CatalogError for a malformed or repeated declaration.
    """
    tokens = source.scan(decl, source.line(offset))
    params: list[Param] = []
    for group in _split_top_level_commas(tokens):
        param = _param(source, decl, offset, group)
        if any(p.name == param.name for p in params):
            source.fail(offset, f"parameter {param.name!r} declared twice")
        params.append(param)
    return params


def _param(source: _Source, decl: str, offset: int, group: list[Token]) -> Param:
    """One ``name type`` of a declaration; raises CatalogError unless it is one."""
    if len(group) < 2:
        item = decl[group[0].start : group[-1].end + 1] if group else ""
        source.fail(offset, f"expected 'name type' in '-- params:', got {item!r}")
    if any(t.name in _COMMENTS for t in group):
        source.fail(offset, "a comment inside '-- params:'")
    name = decl[group[0].start : group[0].end + 1]
    type_text = decl[group[1].start : group[-1].end + 1]
    if not _NAME.fullmatch(name):
        source.fail(offset, f"invalid parameter name {name!r}")
    try:
        _type_info(type_text)
    except ValueError as exc:
        source.fail(offset, f"parameter {name!r}: {exc}")
    return Param(name, type_text)


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


def _body(source: _Source, name: str, name_token: Token, tokens: list[Token]) -> list[Token]:
    """The statement's tokens: trailing comments and one final ';' dropped.

    Raises CatalogError when there is no statement, more than one, or a ``$n``.
    """
    end = len(tokens)
    while end and tokens[end - 1].name in _COMMENTS:
        end -= 1
    if end and tokens[end - 1].name == _SEMICOLON:
        end -= 1
    body = tokens[:end]
    if not body:
        source.fail(name_token.start, f"query {name!r} has no SQL")
    for token in body:
        if token.name == _SEMICOLON:
            source.fail(token.start, f"query {name!r} has more than one statement")
        if token.name == "PARAM":
            source.fail(token.start, f"use :name parameters, not {source.of(token)}")
    return body


@dataclass(frozen=True, slots=True)
class _Usage:
    """A ``:name`` in the SQL: the colon and the name token after it."""

    colon: Token
    name_token: Token
    name: str


def _usages(source: _Source, body: list[Token]) -> list[_Usage]:
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
            last = source.text[before.end]
            if last.isalnum() or last == "_":
                continue
        word = source.of(after)
        if _NAME.fullmatch(word):
            usages.append(_Usage(colon, after, word))
    return usages


def _check_usages(source: _Source, name: str, params: _Declared, usages: list[_Usage]) -> None:
    """Raise CatalogError for a ``:name`` not declared, or a declared one not used."""
    declared = {param.name for param, _ in params}
    for usage in usages:
        if usage.name not in declared:
            source.fail(usage.colon.start, f":{usage.name} is not declared in '-- params:'")
    used = {usage.name for usage in usages}
    for param, line in params:
        if param.name not in used:
            source.fail(
                line.start, f"parameter {param.name!r} is declared but not used by {name!r}"
            )


def _rewrite(source: _Source, body: list[Token], params: _Declared, usages: list[_Usage]) -> str:
    """The statement's text with each ``:name`` replaced by ``($n::type)``."""
    number = {param.name: n for n, (param, _) in enumerate(params, start=1)}
    cast = {param.name: _type_info(param.type).cast for param, _ in params}
    pieces, pos = [], body[0].start
    for usage in usages:
        pieces.append(source.text[pos : usage.colon.start])
        pieces.append(f"(${number[usage.name]}::{cast[usage.name]})")
        pos = usage.name_token.end + 1
    pieces.append(source.text[pos : body[-1].end + 1])
    return "".join(pieces)


def _check_parses(source: _Source, sql: str, start: int) -> None:
    """Raise CatalogError, at the right line, when PostgreSQL's parser refuses *sql*."""
    # A replacement holds no newline, so lines of *sql* are lines of the file.
    try:
        parse_sql(sql)
    except ParseError as exc:
        source.fail_parse(exc, sql, source.line(start))


# --------------------------------------------------------------------------
# pglast's error positions


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
