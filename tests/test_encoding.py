"""Values cross the gateway without loss (DESIGN §4): the common types."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.pq import Format
from support import GatewayClient, query

from gateway import BadRequest, Codec, loads_exact, param_to_text
from gateway.values._encoding import JSONNumber, NegativeZero, _loads_decoded, list_params


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1::int2", 1),
        ("(-2147483648)::int4", -2147483648),
        ("9223372036854775807::int8", "9223372036854775807"),
        ("0.10::numeric", "0.10"),
        (
            "123456789012345678901234567890.000000001::numeric",
            "123456789012345678901234567890.000000001",
        ),
        ("'NaN'::numeric", "NaN"),
        ("1.5::float8", 1.5),
        ("0.1::float4", 0.1),
        ("'NaN'::float8", "NaN"),
        ("'-Infinity'::float8", "-Infinity"),
        ("'text'::text", "text"),
        ("true", True),
        ('\'{"b": 1, "a": [1, 2]}\'::json', {"b": 1, "a": [1, 2]}),
        ("'\\x00ff'::bytea", "\\x00ff"),
        ("'2024-02-29'::date", "2024-02-29"),
        ("'2024-02-29 12:34:56.789+02'::timestamptz", "2024-02-29 10:34:56.789+00"),
        ("'2024-02-29 12:34:56'::timestamp", "2024-02-29 12:34:56"),
        ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("array[1, null, 3]", [1, None, 3]),
        ("array[array['a', null], array['NULL', 'b,c']]", [["a", None], ["NULL", "b,c"]]),
        ("array[1.5, 'NaN']::float8[]", [1.5, "NaN"]),
        ("array[10000000000]::int8[]", ["10000000000"]),
        ("null::int", None),
    ],
)
async def test_common_values(client: GatewayClient, expr: str, expected: Any) -> None:
    status, body = await query(client, f"select {expr} AS v")
    assert status == 200, body
    assert body["rows"] == [{"v": expected}]


async def test_json_keeps_digits_and_key_order(client: GatewayClient) -> None:
    resp = await client.post(
        "/v1/query",
        json={
            "sql": 'select \'{"b": 0.10000000000000000555, "a": 1}\'::json AS j, '
            "'[0.10000000000000000555]'::jsonb AS jb"
        },
    )
    text = await resp.text()
    assert '"j":{"b": 0.10000000000000000555, "a": 1}' in text
    assert '"jb":[0.10000000000000000555]' in text


async def test_parameters_go_in_losslessly(client: GatewayClient) -> None:
    resp = await client.post(
        "/v1/query",
        data=b'{"sql": "select $1::numeric AS n, $2::int8 AS i, $3::jsonb AS j",'
        b' "params": [0.10000000000000000555, 9007199254740993, {"x": 1.10}]}',
        headers={"Content-Type": "application/json"},
    )
    text = await resp.text()
    assert '"n":"0.10000000000000000555"' in text
    assert '"i":"9007199254740993"' in text
    assert '"j":{"x": 1.10}' in text


def test_loads_exact_keeps_number_text() -> None:
    value = loads_exact(b'{"a": 0.10000000000000000555, "b": 12345678901234567890123}')
    assert isinstance(value["a"], JSONNumber) and value["a"] == "0.10000000000000000555"
    assert value["b"] == 12345678901234567890123
    with pytest.raises(BadRequest):
        loads_exact(b"[NaN]")
    with pytest.raises(BadRequest):
        loads_exact(b"[" * 100000 + b"]" * 100000)


def _pairs_json(value: Any) -> str:
    """Compact JSON of `value`, where a list of pairs is an object (keys may repeat)."""
    if isinstance(value, tuple):
        return "{" + ",".join(f"{json.dumps(k)}:{_pairs_json(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_pairs_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _tagged(value: Any) -> Any:
    """`value` with every leaf's type, so 1 and 1.0 or a str and a JSONNumber differ."""
    if isinstance(value, dict):
        return ("dict", [(k, _tagged(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_tagged(v) for v in value])
    return (type(value).__name__, value)


def _outcome(parse: Any, body: bytes) -> Any:
    try:
        return _tagged(parse(body))
    except BadRequest as exc:
        return ("refused", str(exc))


_KEYS = st.sampled_from(["sql", "params", "a", "é", 'a"b'])
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_JSON_VALUES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.lists(st.tuples(_KEYS, inner), max_size=4).map(tuple)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=_JSON_VALUES)
def test_compact_json_parses_as_the_exact_decoder_does(value: Any) -> None:
    # compact bodies take orjson when it gives the same value: repeated keys,
    # fractions, huge integers and escapes must come out as the exact path has them
    body = _pairs_json(value).encode()
    assert _outcome(loads_exact, body) == _outcome(_loads_decoded, body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"a":2}',
        b'{"a":[{"b":1,"b":1}]}',
        b'{"a":0.10000000000000000555}',
        b'{"a":1e400}',
        b'{"a":12345678901234567890123}',
        b'{"a":"\\u00e9\\ud83d\\ude00"}',
        b'{"a":"\\ud800"}',
        b'{"a":-0}',
        b'{"a":"x\\u0000"}',
    ],
)
def test_compact_json_edge_cases_parse_as_the_exact_decoder_does(body: bytes) -> None:
    assert _outcome(loads_exact, body) == _outcome(_loads_decoded, body)


def test_param_to_text() -> None:
    assert param_to_text(None) is None
    assert param_to_text(True) == b"true"
    assert param_to_text(10**30) == b"1" + b"0" * 30
    assert param_to_text([1, None, "NULL", 'q"b\\', [2]]) == b'{"1",NULL,"NULL","q\\"b\\\\",{"2"}}'
    with pytest.raises(BadRequest):
        param_to_text("nul\x00")


def test_negative_zero_keeps_its_sign() -> None:
    body = loads_exact(b'{"a": -0, "b": [-0, 0, -0.0], "c": {"d": -0}}')
    assert isinstance(body["a"], NegativeZero) and body["a"] == 0
    assert type(body["b"][1]) is int and isinstance(body["b"][2], JSONNumber)
    assert param_to_text(body["a"]) == b"-0"
    assert param_to_text(body["b"]) == b'{"-0","0","-0.0"}'
    assert param_to_text(body["c"]) == b'{"d":-0}'
    # compact bodies too (orjson reads -0 as 0: they take the exact decoder)
    assert isinstance(loads_exact(b'{"params":[-0]}')["params"][0], NegativeZero)


def test_array_literals_take_the_delimiter() -> None:
    boxes = ["(1,1),(0,0)", None, "(3,3),(2,2)"]
    assert param_to_text(boxes, ";") == b'{"(1,1),(0,0)";NULL;"(3,3),(2,2)"}'
    assert param_to_text([boxes[:1], boxes[2:]], ";") == b'{{"(1,1),(0,0)"};{"(3,3),(2,2)"}}'
    # only lists with a delimiter in their literal need their type's
    assert list_params([1, [], [1], [[1]], "x"]) is None
    assert list_params([[1, 2], 3, [[1], [2]], [[1, 2]]]) == {
        0: [1, 2],
        2: [[1], [2]],
        3: [[1, 2]],
    }


def test_json_line_breaks_become_spaces() -> None:
    codec = Codec()

    def embedded(oid: int, text: bytes) -> bytes:
        loader = codec.adapters.get_loader(oid, Format.TEXT)
        assert loader is not None
        return orjson.dumps([loader(oid).load(text)])

    assert embedded(114, b'\r\n{"a":\n[1,\r2]}\n') == b'[  {"a": [1, 2]} ]'
    assert embedded(114, b'{"a\\nb": "\\r"}') == b'[{"a\\nb": "\\r"}]'  # escapes stay
    assert embedded(3802, b'{"a": "\\n"}') == b'[{"a": "\\n"}]'


def test_a_type_asked_for_but_not_found_is_learnt_as_text() -> None:
    # a type dropped between its result and the lookup: text, not looked up again
    codec = Codec()
    codec.learn_asked([], [987654])
    assert codec.is_known(987654)
    assert codec.type_name(987654) == "987654"
