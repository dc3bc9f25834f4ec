"""Splitting a file of SQL into statements, as ``psql -f`` would (``pgqg run``).

Tokens come from PostgreSQL's own scanner (``pglast.parser.scan``), so string
literals (``'a;b'``, ``E'a\\';b'``), quoted identifiers, dollar-quoted bodies
(``$$ … ; … $$``, ``$fn$ … $fn$``) and comments (``--``, nested ``/* */``) are
single tokens and a ``;`` inside them never ends a statement. On top of the
tokens, the splitting rules are psql's (``psqlscan.l``):

* a ``;`` inside parentheses does not end a statement (``CREATE RULE … DO
  (INSERT …; INSERT …)``);
* in ``CREATE [OR REPLACE] FUNCTION|PROCEDURE``, ``BEGIN`` and ``CASE`` open a
  block that ``END`` closes, and a ``;`` inside one does not end the statement
  (SQL-standard bodies: ``BEGIN ATOMIC … ; … END``).

pglast's own ``split(with_parser=False)`` has the first rule but not the
second, and its parser variant refuses a whole file for one syntax error (the
server should report that error, for that statement, after the ones before it
ran).
"""

from __future__ import annotations

from dataclasses import dataclass

from pglast.parser import ParseError, Token, scan

from ._parser import _error_index

__all__ = ["SqlFileError", "SqlStatement", "split_statements"]

_SEMICOLON = "ASCII_59"
_OPEN_PAREN, _CLOSE_PAREN = "ASCII_40", "ASCII_41"
_BACKSLASH = "ASCII_92"
_COMMENTS = frozenset({"SQL_COMMENT", "C_COMMENT"})
_ROUTINES = frozenset({"FUNCTION", "PROCEDURE"})
_BLOCK_OPENERS = frozenset({"BEGIN_P", "CASE"})
_CLIENT_STREAMS = frozenset({"STDIN", "STDOUT"})


class SqlFileError(ValueError):
    """The file cannot be run: the scanner failed (an unterminated quote or
    comment), or it holds a psql meta-command or a COPY through the client.
    `line` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class SqlStatement:
    """One statement of a file: its text (comments before it and the final
    ``;`` left out), its 1-based number, and where it starts in the file."""

    number: int
    text: str
    line: int
    offset: int

    def line_of(self, position: int | None) -> int:
        """The file line of a character `position` (1-based, PostgreSQL's error
        position) in this statement; the statement's first line when unknown."""
        if not position or position < 1:
            return self.line
        return self.line + self.text.count("\n", 0, position - 1)

    @property
    def summary(self) -> str:
        """The first line of the statement, shortened: for progress and errors."""
        first = self.text.split("\n", 1)[0].strip()
        return first if len(first) <= 60 else first[:57] + "..."


def split_statements(text: str) -> list[SqlStatement]:
    """The statements of `text`, in order; statements holding only comments and
    empty statements (``;;``) are left out.

    Raises:
        SqlFileError: the scanner stopped on an unterminated quoted string,
            dollar-quoted string, quoted identifier or comment; or a statement
            starts with a backslash (a psql meta-command such as ``\\connect``,
            which only psql understands); or a COPY reads STDIN or writes STDOUT.
    """
    try:
        tokens = scan(text)
    except ParseError as exc:
        reported = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else 0
        index = _error_index(text, reported)
        raise SqlFileError(_line_at(text, index), str(exc.args[0])) from None
    statements: list[SqlStatement] = []
    current: list[Token] = []
    parens = 0
    blocks = 0
    routine: bool | None = None  # known once a BEGIN, CASE or END needs it
    for token in tokens:
        name = token.name
        if name in _COMMENTS and not current:
            continue  # a comment before a statement is not part of it
        if name == _SEMICOLON and parens == 0 and blocks == 0:
            _close(text, current, statements)
            current, routine = [], None
            continue
        if not current and name == _BACKSLASH:
            word = text[token.start : _word_end(text, token.start + 1)]
            raise SqlFileError(
                _line_at(text, token.start),
                f"{word} is a psql meta-command; only SQL statements can be run here",
            )
        current.append(token)
        if name == _OPEN_PAREN:
            parens += 1
        elif name == _CLOSE_PAREN:
            parens = max(parens - 1, 0)
        elif name in _BLOCK_OPENERS or (name == "END_P" and blocks):
            if routine is None:
                routine = _defines_routine(current)
            if routine:
                blocks += 1 if name in _BLOCK_OPENERS else -1
    _close(text, current, statements)
    return statements


def _close(text: str, tokens: list[Token], into: list[SqlStatement]) -> None:
    """Append the statement made of `tokens` (trailing comments dropped), if any."""
    end = len(tokens)
    while end and tokens[end - 1].name in _COMMENTS:
        end -= 1
    if not end:
        return
    start = tokens[0].start
    if tokens[0].name == "COPY" and any(t.name in _CLIENT_STREAMS for t in tokens[:end]):
        # the data would travel through the client (psql's job), and psycopg's
        # connection stays in COPY state after refusing it, failing what follows
        raise SqlFileError(
            _line_at(text, start),
            "COPY ... FROM STDIN / TO STDOUT moves data through psql and is not "
            "supported here; use COPY with a server-side file, or INSERT statements",
        )
    body = text[start : tokens[end - 1].end + 1]
    into.append(SqlStatement(len(into) + 1, body, _line_at(text, start), start))


def _defines_routine(tokens: list[Token]) -> bool:
    """psql's test: the statement starts CREATE [OR REPLACE] FUNCTION|PROCEDURE."""
    words = [t.name for t in tokens[:8] if t.name not in _COMMENTS][:4]
    if len(words) < 2 or words[0] != "CREATE":
        return False
    if words[1] in _ROUTINES:
        return True
    return words[1:3] == ["OR", "REPLACE"] and len(words) > 3 and words[3] in _ROUTINES


def _line_at(text: str, index: int) -> int:
    return text.count("\n", 0, max(index, 0)) + 1


def _word_end(text: str, index: int) -> int:
    while index < len(text) and not text[index].isspace():
        index += 1
    return index
