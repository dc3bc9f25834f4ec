"""``/openapi.json`` describes what the gateway takes: each named query with its own
parameters and types, integers as JSON Schema has them, null for every optional field.

schemathesis calls the whole API from this document (test_fuzz.py); here, the
promises it makes are checked one by one against the gateway's answers.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import GatewayClient, assert_error

from gateway.catalog import Catalog, parse_queries
from gateway.web._openapi import openapi_document

BODIES = {  # each request schema, and a body that needs nothing else
    "QueryRequest": ("/v1/query", {"sql": "select 1 AS one"}),
    "TransactionRequest": ("/v1/transaction", {"statements": [{"sql": "select 1 AS one"}]}),
    "NamedQueryRequest": ("/v1/queries/book_by_id", {"params": {"id": 7}}),
}


@pytest.fixture
async def spec(demo_client: GatewayClient) -> Any:
    return await (await demo_client.get("/openapi.json")).json()


async def test_each_named_query_has_its_own_path_with_typed_parameters(spec: Any) -> None:
    book = spec["paths"]["/v1/queries/book_by_id"]
    (id_param,) = [p for p in book["get"]["parameters"] if p["name"] == "id"]
    assert id_param["in"] == "query" and id_param["required"] is True
    assert id_param["schema"]["type"] == "integer"
    body = book["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["params"]
    params = body["properties"]["params"]
    assert params["required"] == ["id"] and params["additionalProperties"] is False
    assert params["properties"]["id"]["type"] == ["integer", "string", "null"]
    assert params["properties"]["id"]["description"] == "PostgreSQL int"
    # a query that writes is called with POST only
    review = spec["paths"]["/v1/queries/add_review"]
    assert set(review) == {"post"}
    review_params = review["post"]["requestBody"]["content"]["application/json"]["schema"]
    properties = review_params["properties"]["params"]["properties"]
    assert {name: p["type"] for name, p in properties.items()} == {
        "book_id": ["integer", "string", "null"],
        "rating": ["integer", "string", "null"],
        "reviewer": ["string", "null"],
        "body": ["string", "null"],
    }
    operations = [op["operationId"] for path in spec["paths"].values() for op in path.values()
                  if "operationId" in op]  # fmt: skip
    assert len(operations) == len(set(operations))


async def test_a_named_query_called_as_its_schema_says(demo_client: GatewayClient) -> None:
    resp = await demo_client.get("/v1/queries/book_by_id", params={"id": "7"})
    assert resp.status == 200
    by_get = await resp.json()
    for value in (7, "7", 7.0, 7e0):
        resp = await demo_client.post("/v1/queries/book_by_id", json={"params": {"id": value}})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["rows"] == by_get["rows"]
    resp = await demo_client.post("/v1/queries/book_by_id", json={"params": {"id": 7.5}})
    assert resp.status == 400
    assert_error(await resp.json(), "bad_request")


@pytest.mark.parametrize("field", ["timeout_ms", "max_rows"])
async def test_integer_options_take_integral_numbers_as_json_schema_does(
    client: GatewayClient, spec: Any, field: str
) -> None:
    schema = spec["components"]["schemas"]["QueryRequest"]["properties"][field]
    assert schema["type"] == ["integer", "null"]
    for value in (1000, 1000.0, 1e3):
        resp = await client.post("/v1/query", json={"sql": "select 1 AS one", field: value})
        assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/query", json={"sql": "select 1 AS one", field: 1000.5})
    assert resp.status == 400
    assert_error(await resp.json(), "bad_request")


@pytest.mark.parametrize("schema_name", sorted(BODIES))
async def test_every_optional_field_takes_null_and_says_so(
    demo_client: GatewayClient, spec: Any, schema_name: str
) -> None:
    path, minimal = BODIES[schema_name]
    schema = spec["components"]["schemas"][schema_name]
    optional = [name for name in schema["properties"] if name not in schema.get("required", [])]
    assert optional
    for name in optional:
        field = schema["properties"][name]
        assert "null" in field["type"], (schema_name, name)
        if "enum" in field:
            assert None in field["enum"], (schema_name, name)
        if name in minimal:
            continue  # needed by this body (params of a query that has some)
        resp = await demo_client.post(path, json={**minimal, name: None})
        assert resp.status == 200, (name, await resp.text())
    # and inside a transaction's statements
    statement = spec["components"]["schemas"]["Statement"]["properties"]["params"]
    assert "null" in statement["type"]
    body = {"statements": [{"sql": "select 1 AS one", "params": None}]}
    assert (await demo_client.post("/v1/transaction", json=body)).status == 200


def test_a_query_without_parameters_takes_no_params_or_null() -> None:
    # the demo's queries all have parameters: one without is described alone
    catalog = Catalog(parse_queries("-- name: ping\n-- Answers.\nSELECT 1", "ping.sql"))
    ping = openapi_document(catalog)["paths"]["/v1/queries/ping"]
    body = ping["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == []
    assert body["properties"]["params"]["type"] == ["object", "null"]
    assert [p["name"] for p in ping["get"]["parameters"]][:1] == ["timeout_ms"]
    assert ping["get"]["summary"] == "Answers."
