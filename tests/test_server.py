"""Running the application (``gateway.web._server``): what its log says of bad clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from support import GatewayClient

from gateway.web._server import BadRequestsInOneLine


@pytest.fixture
def server_log() -> Iterator[None]:
    """aiohttp's server log as `serve` sets it up."""
    log = logging.getLogger("aiohttp.server")
    one_line = BadRequestsInOneLine()
    log.addFilter(one_line)
    try:
        yield
    finally:
        log.removeFilter(one_line)


async def raw_request(client: GatewayClient, request: bytes) -> bytes:
    """Send `request` as it is (no client library would) and read the whole answer."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(30):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.usefixtures("server_log")
async def test_a_nul_byte_in_a_header_is_one_info_line(
    client: GatewayClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    answer = await raw_request(client, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400 ")  # aiohttp's own answer, as before
    async with asyncio.timeout(30):
        while not caplog.records:
            await asyncio.sleep(0.02)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.exc_info is None and record.exc_text is None
    assert "\n" not in record.getMessage()
    assert "400 Invalid header value char" in record.getMessage()
    assert (await client.get("/healthz")).status == 200  # and it keeps serving


def test_other_server_errors_keep_their_traceback() -> None:
    record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "boom", (), None)
    try:
        raise RuntimeError("a real failure")
    except RuntimeError as exc:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    assert BadRequestsInOneLine().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_below_info_the_line_is_dropped() -> None:
    log = logging.getLogger("aiohttp.server")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 1, "bad", (), None)
        error = BadHttpMessage("Invalid header value char")
        record.exc_info = (type(error), error, None)
        assert not BadRequestsInOneLine().filter(record)
    finally:
        log.setLevel(level)
