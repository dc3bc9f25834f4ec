"""What DESIGN §4 says the gateway must answer for a value, worked out from PostgreSQL alone.

The oracle never looks at the gateway's code: it asks a direct connection (opened
with the gateway's session options) for a value's own text output and type, and
applies the rule — int2/int4/float4/float8 as JSON numbers with exactly
PostgreSQL's digits, bool as true/false, json/jsonb as the JSON value itself,
arrays as nested JSON arrays (their elements taken apart by PostgreSQL with
``unnest`` and ``array_dims``) unless a lower bound is not 1 (a JSON array
has none: then the array's text output), anything else as its text output.

JSON is compared with numbers kept as their text (`Num`) and objects as ordered
pairs (`Obj`), so ``0.10`` differs from ``0.1`` and key order counts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import ExecStatus

_NON_FINITE = {"NaN", "Infinity", "-Infinity"}
_NUMBERS = {"int2", "int4", "float4", "float8"}


@dataclass(frozen=True)
class Num:
    """A JSON number as written: never equal to a string or to other digits."""

    text: str


class Obj(tuple[tuple[str, Any], ...]):
    """A JSON object as its ordered (key, value) pairs."""

    def get(self, key: str) -> Any:
        return dict(self)[key]


def exact_json(text: str | bytes) -> Any:
    """Parse JSON keeping number text and key order."""
    return json.loads(text, parse_float=Num, parse_int=Num, object_pairs_hook=Obj)


def plain(value: Any) -> Any:
    """`exact_json` output as ordinary Python values (objects as dicts, numbers as text)."""
    if isinstance(value, Obj):
        return {k: plain(v) for k, v in value}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True)
class _Type:
    name: str
    base: int
    element: int


class Oracle:
    """Expected gateway JSON for SQL expressions, from a direct connection."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._pg = conn.pgconn
        self._types: dict[int, _Type] = {}

    def _exec(self, sql: str, params: list[bytes | None] | None = None) -> Any:
        res = self._pg.exec_params(sql.encode(), params)
        if res.status != ExecStatus.TUPLES_OK:
            raise AssertionError(f"{sql}: {res.error_message.decode()}")
        return res

    def text_output(self, expr: str) -> tuple[str | None, int]:
        """PostgreSQL's own text output of ``SELECT expr`` and its column type."""
        res = self._exec(f"SELECT {expr}")
        value = res.get_value(0, 0)
        return (value.decode() if value is not None else None), res.ftype(0)

    def expected(self, expr: str) -> Any:
        """What the gateway must answer for ``SELECT expr``, as `exact_json` parses it."""
        text, oid = self.text_output(expr)
        return self._expected(expr, text, oid)

    def _expected(self, expr: str, text: str | None, oid: int) -> Any:
        if text is None:
            return None
        info = self._type(oid)
        if info.base:
            return self._expected(expr, text, info.base)
        if info.element:
            return self._array(expr, text)
        if info.name in _NUMBERS:
            return text if text in _NON_FINITE else Num(text)
        if info.name == "bool":
            return {"t": True, "f": False}[text]
        if info.name in ("json", "jsonb"):
            return exact_json(text)
        return text

    def _array(self, expr: str, text: str) -> list[Any] | str:
        """The array `expr` taken apart by PostgreSQL: each element's own output, and the
        shape; its `text` output when one of its lower bounds is not 1."""
        dims = self._exec(f"SELECT pg_catalog.array_dims(({expr}))").get_value(0, 0)
        bounds = re.findall(r"\[(-?\d+):(-?\d+)\]", dims.decode()) if dims is not None else []
        if any(int(lo) != 1 for lo, _ in bounds):
            return text
        # unnest in the select list keeps a composite element whole
        elements_of = f"(SELECT pg_catalog.unnest(({expr})) AS u) AS s"
        res = self._exec(f"SELECT s.u FROM {elements_of}")
        elements = []
        for i in range(res.ntuples):
            raw = res.get_value(i, 0)
            element_text = raw.decode() if raw is not None else None
            element = f"(SELECT s.u FROM {elements_of} OFFSET {i} LIMIT 1)"
            elements.append(self._expected(element, element_text, res.ftype(0)))
        if not bounds:
            return []
        return _reshape(elements, [int(hi) - int(lo) + 1 for lo, hi in bounds])

    def _type(self, oid: int) -> _Type:
        if oid not in self._types:
            res = self._exec(
                "SELECT t.typname, t.typbasetype,"
                " coalesce((SELECT e.oid FROM pg_catalog.pg_type e WHERE e.typarray = t.oid), 0)"
                " FROM pg_catalog.pg_type t WHERE t.oid = $1",
                [str(oid).encode()],
            )
            name, base, element = (res.get_value(0, c).decode() for c in range(3))
            self._types[oid] = _Type(name, int(base), int(element))
        return self._types[oid]


def _reshape(items: list[Any], lengths: list[int]) -> list[Any]:
    if len(lengths) <= 1:
        return items
    step = len(items) // lengths[0]
    return [_reshape(items[i * step : (i + 1) * step], lengths[1:]) for i in range(lengths[0])]
