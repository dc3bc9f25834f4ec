"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient
from aiohttp.web import Application, Request

GatewayClient = TestClient[Request, Application]


async def wait_until_ready(client: GatewayClient, timeout: float = 20.0) -> None:
    """Poll ``/readyz`` until 200; fails the test after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            resp = await client.get("/readyz")
            if resp.status == 200:
                return
            await asyncio.sleep(0.05)


async def query(client: GatewayClient, sql: str, *params: Any, **options: Any) -> tuple[int, Any]:
    """POST /v1/query; returns (status, decoded JSON body)."""
    resp = await client.post("/v1/query", json={"sql": sql, "params": list(params), **options})
    return resp.status, await resp.json()


async def transaction(
    client: GatewayClient, *statements: tuple[str, list[Any]], **options: Any
) -> tuple[int, Any]:
    """POST /v1/transaction; returns (status, decoded JSON body)."""
    body = {"statements": [{"sql": s, "params": p} for s, p in statements], **options}
    resp = await client.post("/v1/transaction", json=body)
    return resp.status, await resp.json()


def assert_error(body: Any, code: str, sqlstate: str | None = None) -> None:
    """The body has DESIGN §3's error shape with this code (and SQLSTATE)."""
    error = body["error"]
    assert set(error) == {"code", "message", "sqlstate", "detail", "hint", "position"}
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if sqlstate is not None:
        assert error["sqlstate"] == sqlstate, error
