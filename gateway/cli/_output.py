"""Printing an `Outcome` as ``pgqg query --format table|json|ndjson|csv`` asks.

* ``table``: a rich table for people, cells in PostgreSQL's text output, numbers
  right-aligned, NULL dimmed, a ``(N rows)`` footer as psql has; a statement
  without rows prints its command tag (``INSERT 3``).
* ``json``: the gateway's own result object (DESIGN §3), same values and layout.
* ``ndjson``: one JSON row per line, nothing else.
* ``csv``: a header line, then PostgreSQL's text output per cell, quoted as RFC 4180
  says (CRLF line ends); NULL is an empty field and an empty string is ``""``, as
  PostgreSQL's own ``COPY … CSV`` tells them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, BinaryIO, Literal

import orjson
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._client import RawNumber
from ._targets import Outcome

__all__ = ["FORMATS", "SHAPES", "csv_cell", "result_body", "write_outcome"]

Format = Literal["table", "json", "ndjson", "csv"]
Shape = Literal["objects", "arrays"]
FORMATS: tuple[Format, ...] = ("table", "json", "ndjson", "csv")
SHAPES: tuple[Shape, ...] = ("objects", "arrays")

_UNBOUNDED = 1 << 20
_NUMERIC_TYPES = frozenset({"int2", "int4", "int8", "numeric", "float4", "float8", "money", "oid"})
#: commands whose tag carries a row count worth printing
_COUNTED = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "FETCH", "MOVE"})


def write_outcome(
    outcome: Outcome,
    fmt: Format,
    *,
    shape: Shape = "objects",
    binary_out: BinaryIO,
    console: Console,
) -> None:
    """Print `outcome`: machine formats as UTF-8 bytes to `binary_out`, the table
    through `console`."""
    if fmt == "table":
        write_table(outcome, console)
    elif fmt == "json":
        binary_out.write(_dumps(result_body(outcome, shape)) + b"\n")
    elif fmt == "ndjson":
        for row in _shaped_rows(outcome, shape):
            binary_out.write(_dumps(row) + b"\n")
    elif fmt == "csv":
        if outcome.has_rows:
            binary_out.write(_csv_line([c.name for c in outcome.columns]))
            for texts in outcome.texts:
                binary_out.write(_csv_line(texts))
    else:  # pragma: no cover - click validates the choice
        raise ValueError(f"unknown format {fmt!r}")
    binary_out.flush()


def result_body(outcome: Outcome, shape: Shape = "objects") -> dict[str, Any]:
    """The gateway's result object for `outcome` (DESIGN §3)."""
    return {
        "columns": [c.to_dict() for c in outcome.columns],
        "rows": _shaped_rows(outcome, shape),
        "row_count": outcome.row_count if outcome.row_count is not None else len(outcome.rows),
        "command": outcome.command,
        "truncated": outcome.truncated,
        "elapsed_ms": outcome.elapsed_ms,
    }


def command_line(outcome: Outcome) -> str:
    """``INSERT 3``, ``CREATE TABLE``: what a statement without rows did."""
    if outcome.command in _COUNTED and outcome.row_count is not None:
        return f"{outcome.command} {outcome.row_count}"
    return outcome.command


def write_table(outcome: Outcome, console: Console) -> None:
    """A readable table on `console`; the command tag when there are no columns."""
    if not outcome.has_rows:
        console.print(Text(command_line(outcome)))
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for column in outcome.columns:
        table.add_column(
            Text(column.name, style="bold"),
            justify="right" if column.type in _NUMERIC_TYPES else "left",
            overflow="fold",  # wrap long values rather than cut them
        )
    for texts in outcome.texts:
        table.add_row(*(Text("NULL", style="dim") if t is None else Text(t) for t in texts))
    if not console.is_terminal:
        # nobody resizes a pipe: give the table its natural width, not 80 columns
        unbounded = console.options.update(width=_UNBOUNDED)
        console.width = max(console.measure(table, options=unbounded).maximum, 80)
    console.print(table)
    count = len(outcome.texts)
    footer = f"({count} row{'' if count == 1 else 's'})"
    if outcome.truncated:
        footer += " truncated by the gateway's max_rows"
    console.print(Text(footer))


def csv_cell(text: str | None, *, alone: bool = False) -> str:
    """One CSV field: NULL empty, quotes only where RFC 4180 needs them (and for '');
    `alone` (a one-column row) also quotes ``\\.``, as ``COPY`` and the gateway do."""
    if text is None:
        return ""
    if text == "" or any(c in text for c in ',"\r\n') or (alone and text == "\\."):
        return '"' + text.replace('"', '""') + '"'
    return text


def _csv_line(cells: Sequence[str | None]) -> bytes:
    alone = len(cells) == 1
    return (",".join(csv_cell(c, alone=alone) for c in cells) + "\r\n").encode()


def _shaped_rows(outcome: Outcome, shape: Shape) -> list[Any]:
    if shape == "arrays":
        return outcome.rows
    names = [c.name for c in outcome.columns]
    # as the gateway does: a later column of the same name wins (use shape=arrays)
    return [dict(zip(names, row, strict=True)) for row in outcome.rows]


def _raw_number(value: Any) -> Any:
    if isinstance(value, RawNumber):
        return orjson.Fragment(value.encode())
    raise TypeError(f"cannot encode {type(value).__name__}")


def _dumps(value: Any) -> bytes:
    # RawNumber is a str subclass: passing subclasses through hands it to the default
    # hook, which writes its digits unchanged
    return orjson.dumps(value, default=_raw_number, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
