"""CORS (gateway/web/_cors.py, ``PGQG_CORS_ORIGINS``), issue 21.

Each rule over HTTP: preflights answered for every path, the headers they
allow, grants only to the origins listed (or ``*``), ``Vary: Origin`` always,
grants on error and streamed answers too, nothing at all when no origin is
configured; the setting's checks. Then in a real headless Chromium: a page
served from another origin calls the gateway, and succeeds only when its
origin is allowed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Page
from pydantic import ValidationError
from support import GatewayClient

from gateway import ConfigError, load_settings
from gateway._settings import Settings, _describe
from gateway.web._cors import ALLOWED_HEADERS, MAX_AGE_S

APP = "http://app.example.com"
OTHER = "http://evil.example.com"
NEON_HEADERS = (
    "Neon-Connection-String",
    "Neon-Raw-Text-Output",
    "Neon-Array-Mode",
    "Neon-Batch-Isolation-Level",
    "Neon-Batch-Read-Only",
    "Neon-Batch-Deferrable",
)


def preflight_headers(origin: str, method: str = "POST", headers: str = "content-type") -> Any:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


@pytest.fixture
async def cors_client(gateway_factory: Any) -> GatewayClient:
    """A gateway that grants `APP` and one more origin."""
    client: GatewayClient = await gateway_factory(cors_origins=f"{APP}, https://b.example.com:8443")
    return client


# --- preflights ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/query", "/v1/queries/x", "/v1/transaction", "/sql", "/nope"])
async def test_a_preflight_is_granted_on_every_path(cors_client: GatewayClient, path: str) -> None:
    resp = await cors_client.options(path, headers=preflight_headers(APP))
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert resp.headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST"
    assert resp.headers["Access-Control-Max-Age"] == str(MAX_AGE_S)
    assert resp.headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Credentials" not in resp.headers


async def test_a_preflight_allows_the_api_and_neon_headers(cors_client: GatewayClient) -> None:
    asked = ", ".join(("Content-Type", "Authorization", *NEON_HEADERS))
    resp = await cors_client.options("/sql", headers=preflight_headers(APP, headers=asked))
    allowed = {h.strip() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {h.lower() for h in asked.split(", ")} <= allowed
    assert resp.headers["Access-Control-Allow-Headers"] == ALLOWED_HEADERS


async def test_a_preflight_from_another_origin_gets_no_grant(cors_client: GatewayClient) -> None:
    resp = await cors_client.options("/v1/query", headers=preflight_headers(OTHER))
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"
    assert not any(h.startswith("Access-Control-Allow") for h in resp.headers)
    assert resp.headers["Vary"] == "Origin"


@pytest.mark.parametrize(
    "origin",
    [
        "http://app.example.com:8080",  # another port is another origin
        "https://app.example.com",  # and another scheme
        "http://APP.example.com.evil.com",
        "null",
    ],
)
async def test_only_the_exact_origin_is_granted(cors_client: GatewayClient, origin: str) -> None:
    resp = await cors_client.options("/v1/query", headers=preflight_headers(origin))
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_the_settings_spelling_of_an_origin_is_the_browsers(
    cors_client: GatewayClient,
) -> None:
    # configured as "https://b.example.com:8443": browsers send it just so
    resp = await cors_client.options(
        "/v1/query", headers=preflight_headers("https://b.example.com:8443")
    )
    assert resp.headers["Access-Control-Allow-Origin"] == "https://b.example.com:8443"


async def test_an_options_request_that_is_no_preflight_is_routed(
    cors_client: GatewayClient,
) -> None:
    resp = await cors_client.options("/v1/query", headers={"Origin": APP})
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert resp.headers["Access-Control-Allow-Origin"] == APP


# --- answers ---------------------------------------------------------------------------


async def test_answers_grant_the_allowed_origin(cors_client: GatewayClient) -> None:
    resp = await cors_client.post(
        "/v1/query", json={"sql": "SELECT 1 AS one"}, headers={"Origin": APP}
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert resp.headers["Access-Control-Expose-Headers"] == "Retry-After, WWW-Authenticate"
    assert resp.headers["Vary"] == "Origin"
    assert (await resp.json())["rows"] == [{"one": 1}]


async def test_error_and_streamed_answers_grant_it_too(cors_client: GatewayClient) -> None:
    error = await cors_client.post("/v1/query", json={"sql": "SELEC"}, headers={"Origin": APP})
    assert error.status == 400
    assert error.headers["Access-Control-Allow-Origin"] == APP
    missing = await cors_client.get("/nope", headers={"Origin": APP})
    assert missing.status == 404
    assert missing.headers["Access-Control-Allow-Origin"] == APP
    streamed = await cors_client.post(
        "/v1/query?format=ndjson",
        json={"sql": "SELECT generate_series(1, 3) AS i"},
        headers={"Origin": APP},
    )
    assert streamed.headers["Access-Control-Allow-Origin"] == APP
    assert streamed.headers["Vary"] == "Origin"
    assert await streamed.text() == '{"i":1}\n{"i":2}\n{"i":3}\n'


async def test_answers_to_other_origins_grant_nothing(cors_client: GatewayClient) -> None:
    for headers in ({"Origin": OTHER}, {}):
        resp = await cors_client.get("/healthz", headers=headers)
        assert resp.status == 200  # the browser, not the gateway, withholds it from the page
        assert "Access-Control-Allow-Origin" not in resp.headers
        assert "Access-Control-Expose-Headers" not in resp.headers
        assert resp.headers["Vary"] == "Origin"


async def test_a_wildcard_grants_every_origin(gateway_factory: Any) -> None:
    client = await gateway_factory(cors_origins="*")
    preflight = await client.options("/v1/query", headers=preflight_headers(OTHER))
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    resp = await client.get("/healthz", headers={"Origin": OTHER})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_no_origins_no_cors(client: GatewayClient) -> None:
    preflight = await client.options("/v1/query", headers=preflight_headers(APP))
    assert preflight.status == 405
    resp = await client.get("/healthz", headers={"Origin": APP})
    assert not any(h.startswith("Access-Control") for h in resp.headers)
    assert "Vary" not in resp.headers


# --- the setting -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "origins"),
    [
        ("", ()),
        ("*", ("*",)),
        (" https://App.Example.com/ ", ("https://app.example.com",)),
        (
            "https://a.example.com:443,http://a.example.com:80",
            ("https://a.example.com", "http://a.example.com"),
        ),
        ("http://localhost:3000,,http://localhost:3000", ("http://localhost:3000",)),
        ("http://[::1]:8080", ("http://[::1]:8080",)),
        (
            ["http://a.example.com", "http://b.example.com"],
            ("http://a.example.com", "http://b.example.com"),
        ),
    ],
)
def test_origins_are_read_as_browsers_send_them(given: Any, origins: tuple[str, ...]) -> None:
    assert load_settings(dsn="postgresql://x/y", cors_origins=given).cors_origins == origins


def test_origins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQG_CORS_ORIGINS", "http://a.example.com, http://b.example.com")
    settings = load_settings(dsn="postgresql://x/y")
    assert settings.cors_origins == ("http://a.example.com", "http://b.example.com")


@pytest.mark.parametrize(
    "given",
    [
        "null",
        "app.example.com",
        "http://app.example.com/path",
        "http://app.example.com?q=1",
        "http://user@app.example.com",
        "ftp://app.example.com",
        "http://app.example.com:99999",
        "*, http://app.example.com",
    ],
)
def test_what_is_not_an_origin_is_refused(given: str) -> None:
    with pytest.raises(ConfigError, match="PGQG_CORS_ORIGINS"):
        load_settings(dsn="postgresql://x/y", cors_origins=given)


def test_a_wildcard_is_refused_once_identity_is_configured() -> None:
    # identity does not exist yet: this is the check its settings turn on
    class WithIdentity(Settings):
        @property
        def identity_configured(self) -> bool:
            return True

    with pytest.raises(ValidationError) as refused:
        WithIdentity(dsn="postgresql://x/y", cors_origins="*")
    assert _describe(refused.value, None) == (
        "invalid settings: PGQG_CORS_ORIGINS=* is refused when identity is configured:"
        " list the origins"
    )
    listed = WithIdentity(dsn="postgresql://x/y", cors_origins=APP)
    assert listed.cors_origins == (APP,)


# --- in the browser: a page on another origin ---------------------------------------------

CALLER_PAGE = """<!doctype html><meta charset="utf-8"><title>caller</title>
<script src="/caller.js"></script>"""

#: the other origin's script: a JSON POST with a token to the gateway named in its
#: query string (so the browser sends a preflight first)
CALLER_SCRIPT = """
window.outcome = (async () => {
  const gateway = new URLSearchParams(location.search).get("gateway");
  try {
    const response = await fetch(gateway + "/v1/query", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer t"},
      body: JSON.stringify({sql: "SELECT 'from ' || $1 AS hello", params: [location.origin]}),
    });
    return {status: response.status, body: await response.json()};
  } catch (error) {
    return {refused: String(error)};
  }
})();
"""


@pytest.fixture
async def caller_origin() -> AsyncIterator[str]:
    """A second server (another port: another origin) serving the caller page; its origin."""
    app = web.Application()
    page = web.Response(text=CALLER_PAGE, content_type="text/html")
    script = web.Response(text=CALLER_SCRIPT, content_type="text/javascript")

    async def serve_page(_: web.Request) -> web.Response:
        return page

    async def serve_script(_: web.Request) -> web.Response:
        return script

    app.router.add_get("/", serve_page)
    app.router.add_get("/caller.js", serve_script)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def call_from(page: Page, origin: str, gateway: GatewayClient) -> Any:
    """What the caller page on `origin` got from `gateway`."""
    url = str(gateway.make_url("")).rstrip("/")
    await page.goto(f"{origin}/?{urlencode({'gateway': url})}")
    return await page.evaluate("() => window.outcome")


async def test_a_page_on_an_allowed_origin_calls_the_api(
    page: Page, page_errors: list[str], gateway_factory: Any, caller_origin: str
) -> None:
    gateway = await gateway_factory(cors_origins=f"{APP}, {caller_origin}")
    assert caller_origin != str(gateway.make_url("")).rstrip("/")
    outcome = await call_from(page, caller_origin, gateway)
    assert outcome == {
        "status": 200,
        "body": {
            "columns": [{"name": "hello", "type": "text", "type_oid": 25}],
            "rows": [{"hello": f"from {caller_origin}"}],
            "row_count": 1,
            "command": "SELECT",
            "truncated": False,
            "elapsed_ms": outcome["body"]["elapsed_ms"],
        },
    }
    assert page_errors == []


@pytest.mark.parametrize("allowed", ["", APP])
async def test_a_page_on_another_origin_is_refused_by_the_browser(
    page: Page, gateway_factory: Any, caller_origin: str, allowed: str
) -> None:
    gateway = await gateway_factory(cors_origins=allowed)
    outcome = await call_from(page, caller_origin, gateway)
    assert outcome == {"refused": "TypeError: Failed to fetch"}
