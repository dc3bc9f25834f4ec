"""The query console (gateway/web/_console.py and its page), issue 21.

How the page is served (caching, Content-Security-Policy, the setting that turns
it off) is checked over HTTP; what it does is checked in a real headless
Chromium (tests/browser.py): a query and its table, errors with their SQLSTATE
and position, a value that looks like HTML shown as text, a 100k-row stream with
its counter, Stop cancelling the query on the server, named-query forms, links,
the CSV download and the token field.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from typing import Any

import psycopg
from playwright.async_api import Page, expect
from support import REPO, GatewayClient, Served, get_stats, gone_within, marker, running

from gateway.web._console import CONTENT_SECURITY_POLICY, FILES

CONSOLE_FILES = ("index.html", "console.js", "console.css")


def console_url(client: GatewayClient, fragment: str = "") -> str:
    return str(client.make_url("/")) + fragment


async def open_console(page: Page, client: GatewayClient, fragment: str = "") -> None:
    """Load the console and wait until it has the catalogue."""
    await page.goto(console_url(client, fragment))
    await expect(page.locator("#catalog-status")).not_to_have_text("Loading…")


async def run_sql(page: Page, sql: str) -> None:
    """Type `sql` into the editor and run it with Ctrl-Enter."""
    await page.fill("#sql", sql)
    await page.press("#sql", "Control+Enter")


async def rows_counted(page: Page) -> int:
    return int(await page.locator("#row-count").get_attribute("data-rows") or "-1")


async def table_cells(page: Page) -> list[list[str]]:
    rows = page.locator("#result table tbody tr")
    return [await row.locator("td").all_text_contents() for row in await rows.all()]


# --- serving ------------------------------------------------------------------------


async def asset_urls(client: GatewayClient) -> list[str]:
    html = await (await client.get("/")).text()
    return re.findall(r'(?:src|href)="(console/[^"]+)"', html)


async def test_page_is_served_with_its_policy(client: GatewayClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "require-trusted-types-for 'script'" in CONTENT_SECURITY_POLICY
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-cache"
    etag = resp.headers["ETag"]
    again = await client.get("/", headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b""
    head = await client.head("/")
    assert head.status == 200


async def test_script_and_styles_are_cached_by_content_hash(client: GatewayClient) -> None:
    urls = sorted(await asset_urls(client), key=lambda url: url.rpartition(".")[2])
    assert len(urls) == 2
    for url, name, content_type in zip(
        urls, ("console.css", "console.js"), ("text/css", "text/javascript"), strict=True
    ):
        assert re.fullmatch(r"console/console\.[0-9a-f]{12}\." + name.rpartition(".")[2], url)
        resp = await client.get("/" + url)
        assert resp.status == 200
        assert resp.content_type == content_type
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert await resp.read() == FILES.joinpath(name).read_bytes()
    missing = await client.get("/console/console.000000000000.js")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"


async def test_console_setting_turns_it_off(gateway_factory: Any) -> None:
    client = await gateway_factory(console=False)
    resp = await client.get("/")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    assert (await client.get("/healthz")).status == 200


def test_console_files_are_package_data() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "web/console/*" in pyproject["tool"]["setuptools"]["package-data"]["gateway"]
    for name in CONSOLE_FILES:
        assert FILES.joinpath(name).is_file(), name


def test_page_has_no_inline_code_and_never_writes_html() -> None:
    html = FILES.joinpath("index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(" src=" in tag for tag in scripts), scripts
    assert not re.search(r"\son[a-z]+\s*=", html), "an inline event handler"
    assert " style=" not in html and "<style" not in html
    script = FILES.joinpath("console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "new Function" not in script
    assert not re.search(r"https?://", html + script), "nothing from outside"


# --- in the browser -------------------------------------------------------------------

VALUES_SQL = """SELECT 1 AS n, 'x'::text AS s, 9007199254740993::int8 AS big,
       1.5e-7::float8 AS f, '{"a": 1.10}'::json AS j, NULL::text AS nothing,
       1.10::numeric AS num, true AS yes"""


async def test_a_query_fills_the_table(
    page: Page, page_errors: list[str], client: GatewayClient
) -> None:
    await open_console(page, client)
    await run_sql(page, VALUES_SQL)
    await expect(page.locator("#status")).to_contain_text("SELECT")
    headers = page.locator("#result th")
    assert await headers.locator(".name").all_text_contents() == [
        "n", "s", "big", "f", "j", "nothing", "num", "yes"
    ]  # fmt: skip
    assert await headers.locator(".type").all_text_contents() == [
        "int4", "text", "int8", "float8", "json", "text", "numeric", "bool"
    ]  # fmt: skip
    # as the API sent them: digits and spelling kept, NULL told apart from text
    assert await table_cells(page) == [
        ["1", "x", "9007199254740993", "1.5e-07", '{"a": 1.10}', "NULL", "1.10", "true"]
    ]
    assert await page.locator("#result td.null").count() == 1
    assert await rows_counted(page) == 1
    assert "#sql=" in page.url  # the address is a link to this run
    assert page_errors == []


async def test_an_answer_cut_at_max_rows_says_so(page: Page, gateway_factory: Any) -> None:
    client = await gateway_factory(max_rows=5)
    await open_console(page, client)
    await run_sql(page, "SELECT generate_series(1, 8) AS n")
    await expect(page.locator("#status")).to_contain_text("cut at the gateway's max_rows")
    assert await page.locator("#result tbody tr").count() == 5


async def test_parameters_are_sent_as_typed_or_null(page: Page, client: GatewayClient) -> None:
    await open_console(page, client)
    await page.fill("#sql", "SELECT $1::int + 1 AS next, $2::text IS NULL AS missing")
    await page.fill('input[data-param="1"]', "41")
    await page.check('input[data-null="2"]')
    await page.click("#run")
    await expect(page.locator("#result td").first).to_have_text("42")
    assert await table_cells(page) == [["42", "true"]]


async def test_a_sql_error_is_shown_with_its_sqlstate(page: Page, client: GatewayClient) -> None:
    await open_console(page, client)
    await run_sql(page, "SELECT 1 / 0")
    error = page.locator("#error")
    await expect(error).to_be_visible()
    await expect(error.locator(".code")).to_have_text("query_error")
    await expect(error.locator(".sqlstate")).to_have_text("22012")
    await expect(error).to_contain_text("division by zero")


async def test_the_error_position_is_marked_in_the_editor(
    page: Page, client: GatewayClient
) -> None:
    await open_console(page, client)
    # "é" is one character to PostgreSQL and JavaScript alike; "😀" one to PostgreSQL, two to JS
    await run_sql(page, "SELECT 'é😀' AS v,\n  1 FROM nowhere_here")
    error = page.locator("#error")
    await expect(error.locator(".sqlstate")).to_have_text("42P01")
    await expect(error).to_contain_text("line 2, column 10")
    mark = page.locator("#backdrop #error-mark")
    await expect(mark).to_have_text("nowhere_here")  # the word the position points at
    backdrop = await page.locator("#backdrop").text_content()
    assert backdrop == "SELECT 'é😀' AS v,\n  1 FROM nowhere_here\n"
    caret = await page.evaluate(
        "() => { const t = document.getElementById('sql');"
        " return t.value.slice(0, t.selectionStart) + '|' + t.value.slice(t.selectionEnd); }"
    )
    assert caret.endswith("FROM |nowhere_here")
    await page.fill("#sql", "SELECT 2")  # editing clears the mark
    await expect(mark).to_have_count(0)


XSS = '<img src=x onerror="window.__xss = 1">'
#: a column name cannot hold the double quotes of `XSS`
XSS_NAME = "<b id=bold><img src=y onerror=window.__xss=3></b>"


async def test_a_value_that_looks_like_html_is_shown_as_text(
    page: Page, page_errors: list[str], client: GatewayClient
) -> None:
    await open_console(page, client)
    sql = f"SELECT '{XSS}' AS \"{XSS_NAME}\", '<script>window.__xss = 2</script>' AS s"
    await run_sql(page, sql)
    await expect(page.locator("#result td").first).to_have_text(XSS)
    assert await table_cells(page) == [[XSS, "<script>window.__xss = 2</script>"]]
    assert await page.locator("#result th .name").first.text_content() == XSS_NAME
    # an error message quoting it is text as well
    await run_sql(page, f'SELECT * FROM "{XSS_NAME}"')
    await expect(page.locator("#error")).to_contain_text(f'relation "{XSS_NAME}" does not exist')
    assert await page.locator("img, script:not([src]), #bold").count() == 0
    assert await page.evaluate("() => window.__xss") is None
    # the policy itself: the page may not turn a string into HTML, nor run inline code
    refused = await page.evaluate(
        """() => {
          try { document.body.insertAdjacentHTML("beforeend", "<b>x</b>"); return "allowed"; }
          catch (error) { return error.name; }
        }"""
    )
    assert refused == "TypeError"
    page_errors.clear()
    assert page_errors == []


async def test_a_100k_row_stream_is_counted(
    page: Page, page_errors: list[str], client: GatewayClient
) -> None:
    await open_console(page, client)
    await page.check("#stream")
    await run_sql(page, "SELECT i, 'row ' || i AS label FROM generate_series(1, 100000) AS i")
    await expect(page.locator("#status")).to_contain_text("Streamed", timeout=120_000)
    assert await rows_counted(page) == 100_000
    assert await page.locator("#result tbody tr").count() == 1000  # the first rows only
    assert await page.locator("#result th .name").all_text_contents() == ["i", "label"]
    first = await table_cells(page)
    assert first[0] == ["1", "row 1"] and first[-1] == ["1000", "row 1000"]
    await expect(page.locator("#result .note")).to_contain_text("1,000 of 100,000")
    assert await page.locator("#stop").is_disabled()
    assert page_errors == []


async def test_a_stream_that_fails_midway_says_so(
    page: Page, client: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> None:
    await open_console(page, client)
    await page.check("#stream")
    # Row 3,000 fails, but only once the test lets it: by then the page has shown
    # the rows before it (the counter too, though no more rows come for a while).
    lock = 21_0021
    await admin.execute("SELECT pg_advisory_lock(%s)", (lock,))
    try:
        failing = f"1 / (length(pg_advisory_xact_lock_shared({lock})::text) * 0)"
        await run_sql(
            page,
            f"SELECT CASE WHEN i < 3000 THEN i ELSE {failing} END AS n"
            " FROM generate_series(1, 5000) AS i",
        )
        await page.wait_for_function(
            "() => +document.getElementById('row-count')?.dataset.rows >= 1000"
        )
    finally:
        await admin.execute("SELECT pg_advisory_unlock(%s)", (lock,))
    await expect(page.locator("#status")).to_contain_text("Failed after")
    assert 1000 <= await rows_counted(page) < 3000
    assert await page.locator("#result tbody tr").count() == 1000
    # The gateway ends the stream with the error line and then cuts the response;
    # Chromium at times drops the bytes that come with the cut (an aiohttp client
    # always gets them), so the page shows the error, or that the stream was cut.
    await expect(page.locator("#error")).to_contain_text(
        re.compile(r"division by zero|the stream was cut")
    )
    if "division by zero" in (await page.locator("#error").text_content() or ""):
        await expect(page.locator("#error .sqlstate")).to_have_text("22012")


async def test_stop_cancels_the_streamed_query_on_the_server(
    page: Page, client: GatewayClient, admin: psycopg.AsyncConnection[Any]
) -> None:
    await open_console(page, client)
    await page.check("#stream")
    mark = marker()
    total = 100_000_000
    # in the select list, generate_series yields its rows as they are asked for
    # (in FROM it would compute all of them before the first)
    await run_sql(page, f'SELECT generate_series(1, {total}) AS "{mark}"')
    await expect(page.locator("#row-count")).not_to_have_attribute("data-rows", "0")
    assert await running(admin, mark) == 1
    await page.click("#stop")
    await expect(page.locator("#status")).to_contain_text("Stopped after")
    assert 0 < await rows_counted(page) < total
    await gone_within(admin, mark, 30)
    assert await page.locator("#stop").is_disabled()


async def test_stop_cancels_a_buffered_query_in_pgqg_serve(
    page: Page, database_dsn: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    # a buffered answer has no rows to fail writing: the gateway learns that the
    # client went away from aiohttp cancelling the handler, as `pgqg serve` has it do
    served = Served(database_dsn)
    try:
        await asyncio.to_thread(served.ready_sync)
        mark = marker()
        await page.goto(served.url + "/")
        await run_sql(page, f'SELECT pg_sleep(60) AS "{mark}"')
        async with asyncio.timeout(30):
            while not await running(admin, mark):
                await asyncio.sleep(0.05)
        await page.click("#stop")
        await expect(page.locator("#status")).to_have_text("Stopped; the query was cancelled.")
        await gone_within(admin, mark, 30)
    finally:
        served.stop()


async def test_a_named_query_runs_from_its_form(
    page: Page, page_errors: list[str], demo_client: GatewayClient
) -> None:
    await open_console(page, demo_client)
    await expect(page.locator("#catalog-status")).to_contain_text("queries")
    form = page.locator('form[data-query="book_by_id"]')
    await page.click('details:has(form[data-query="book_by_id"]) summary')
    await form.locator('input[name="id"]').fill("7")
    await form.locator('button[type="submit"]').click()
    await expect(page.locator("#status")).to_contain_text("book_by_id")
    await expect(page.locator("#row-count")).to_have_attribute("data-rows", "1")
    names = await page.locator("#result th .name").all_text_contents()
    assert names[:2] == ["id", "title"]
    assert (await table_cells(page))[0][0] == "7"
    assert "#query=book_by_id&id=7" in page.url
    assert page_errors == []


async def test_a_named_query_streams(page: Page, demo_client: GatewayClient) -> None:
    await open_console(page, demo_client)
    await page.check("#stream")
    await page.goto(console_url(demo_client, "#query=author_stats&min_books=1&lim=4"))
    await expect(page.locator("#status")).to_contain_text("author_stats: Streamed")
    assert await rows_counted(page) == 4
    names = await page.locator("#result th .name").all_text_contents()
    assert names == ["id", "name", "country", "books", "avg_price", "reviews", "avg_rating"]


async def test_a_named_query_that_writes_reports_its_error(
    page: Page, demo_client: GatewayClient
) -> None:
    await open_console(page, demo_client)
    await expect(page.locator('details:has(form[data-query="add_review"]) .badge')).to_have_text(
        "writes"
    )
    await page.click('details:has(form[data-query="add_review"]) summary')
    form = page.locator('form[data-query="add_review"]')
    for name, value in {
        "book_id": "987654321",
        "rating": "5",
        "reviewer": "t",
        "body": "b",
    }.items():
        await form.locator(f'input[name="{name}"]').fill(value)
    await form.locator('button[type="submit"]').click()  # no such book: nothing is written
    await expect(page.locator("#error .sqlstate")).to_have_text("23503")
    await expect(page.locator("#status")).to_contain_text("HTTP 409")


async def test_a_sql_link_fills_the_editor_and_runs_read_only(
    page: Page, rw_client: GatewayClient
) -> None:
    await open_console(page, rw_client, "#sql=SELECT+42+AS+answer")
    await expect(page.locator("#result td")).to_have_text("42")
    assert await page.input_value("#sql") == "SELECT 42 AS answer"
    await expect(page.locator("#status")).to_contain_text("read-only")
    await page.goto(console_url(rw_client, "#sql=CREATE+TABLE+from_a_link+()"))
    # a gateway in read-write mode: the link still cannot write
    await expect(page.locator("#error .sqlstate")).to_have_text("25006")


async def test_a_link_with_parameters(page: Page, client: GatewayClient) -> None:
    await open_console(page, client, "#sql=SELECT+%241%3A%3Aint+%2B+1+AS+n&p=41")
    await expect(page.locator("#result td")).to_have_text("42")
    assert await page.input_value('input[data-param="1"]') == "41"


async def test_a_query_link_opens_its_form_and_runs(page: Page, demo_client: GatewayClient) -> None:
    await open_console(page, demo_client, "#query=book_by_id&id=3")
    await expect(page.locator("#row-count")).to_have_attribute("data-rows", "1")
    assert (await table_cells(page))[0][0] == "3"
    assert await page.locator('form[data-query="book_by_id"] input[name="id"]').input_value() == "3"
    # a link never runs a query that writes: it only fills the form
    await page.goto(console_url(demo_client, "#query=add_review&book_id=1&rating=5"))
    await expect(page.locator("#status")).to_contain_text("press its Run")
    await expect(page.locator('form[data-query="add_review"] input[name="rating"]')).to_have_value(
        "5"
    )


async def test_csv_download(page: Page, client: GatewayClient) -> None:
    await open_console(page, client)
    await page.fill("#sql", "SELECT i, 'a,b' AS s, NULL AS n FROM generate_series(1, 3) AS i")
    async with page.expect_download() as download_info:
        await page.click("#csv")
    download = await download_info.value
    assert download.suggested_filename == "result.csv"
    path = await download.path()
    assert path.read_text() == 'i,s,n\n1,"a,b",\n2,"a,b",\n3,"a,b",\n'


async def test_token_field_appears_only_with_identity(page: Page, client: GatewayClient) -> None:
    await open_console(page, client)
    await expect(page.locator("#token-box")).to_be_hidden()

    # identity does not exist yet: the page is shown a description that declares it
    async def with_scheme(route: Any) -> None:
        response = await route.fetch()
        body = await response.json()
        body.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}
        }
        await route.fulfill(response=response, json=body)

    await page.route("**/openapi.json", with_scheme)
    sent: list[str | None] = []
    page.on(
        "request",
        lambda r: sent.append(r.headers.get("authorization")) if "v1/query" in r.url else None,
    )
    await open_console(page, client)
    await expect(page.locator("#token-box")).to_be_visible()
    await page.fill("#token", "abc.def.ghi")
    await run_sql(page, "SELECT 1 AS one")
    await expect(page.locator("#row-count")).to_have_attribute("data-rows", "1")
    assert sent == ["Bearer abc.def.ghi"]


async def test_a_401_asking_for_a_token_shows_the_field(page: Page, client: GatewayClient) -> None:
    async def unauthorized(route: Any) -> None:
        await route.fulfill(
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="pgqg"'},
            json={"error": {"code": "unauthorized", "message": "a token is needed"}},
        )

    await page.route("**/v1/queries", unauthorized)
    await open_console(page, client)
    await expect(page.locator("#token-box")).to_be_visible()
    await expect(page.locator("#catalog-status")).to_have_text("unauthorized: a token is needed")


async def test_a_link_only_fills_while_a_token_is_entered(
    page: Page, client: GatewayClient
) -> None:
    await open_console(page, client)
    await page.evaluate("() => { document.getElementById('token').value = 'secret'; }")
    await page.evaluate("() => { location.hash = 'sql=SELECT+1'; }")
    await expect(page.locator("#status")).to_contain_text("press Run")
    assert await page.input_value("#sql") == "SELECT 1"
    assert await page.locator("#result table").count() == 0


# --- the Listen panel (live events, issue 24) -------------------------------------------

#: how long the gateway may take to free a stream the page gave up (a loaded machine)
FREED_S = 30.0


def listen_channel() -> str:
    return "console_" + marker().removeprefix("pgqg-")


async def subscribers_become(client: GatewayClient, count: int, limit: float = FREED_S) -> None:
    """Wait until /v1/stats counts `count` open streams; fails after `limit` seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while (stats := await get_stats(client))["subscribers"] != count:
        assert loop.time() - started < limit, f"subscribers {stats['subscribers']}, not {count}"
        await asyncio.sleep(0.05)


async def subscribe(page: Page, *channels: str) -> None:
    await page.fill("#listen-channels", " ".join(channels))
    await page.click("#subscribe")


async def notify(admin: psycopg.AsyncConnection[Any], channel: str, *payloads: str) -> None:
    async with admin.transaction():
        for payload in payloads:
            await admin.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def test_listen_panel_shows_events_as_text_and_unsubscribe_frees_the_stream(
    page: Page,
    page_errors: list[str],
    gateway_factory: Any,
    admin: psycopg.AsyncConnection[Any],
) -> None:
    name, other = listen_channel(), listen_channel()
    # a quiet stream gets a comment every 0.3 s: the test server (which does not
    # cancel handlers as `pgqg serve` does) notices a client gone at the next one
    client = await gateway_factory(listen_channels={"anon": [name, other]}, listen_heartbeat_s=0.3)
    await open_console(page, client)
    await subscribe(page, name, other)
    status = page.locator("#listen-status")
    await expect(status).to_contain_text(f"Listening to {name}, {other}")
    await subscribers_become(client, 1)
    await notify(admin, name, XSS, "two\nlines")
    await notify(admin, other, "<script>window.__xss = 2</script>")
    events = page.locator("#listen-events li")
    await expect(events).to_have_count(3)
    # newest first; the payload as the characters it is, the channel and number from the id
    assert await events.locator(".payload").all_text_contents() == [
        "<script>window.__xss = 2</script>",
        "two\nlines",
        XSS,
    ]
    assert await events.locator(".channel").all_text_contents() == [other, name, name]
    assert await events.locator(".seq").all_text_contents() == ["#1", "#2", "#1"]
    await expect(page.locator("#event-count")).to_have_attribute("data-events", "3")
    assert await page.locator("img, script:not([src])").count() == 0
    assert await page.evaluate("() => window.__xss") is None

    await page.click("#unsubscribe")
    await expect(status).to_contain_text(f"Unsubscribed from {name}, {other} after 3 events")
    assert await page.locator("#unsubscribe").is_disabled()
    await subscribers_become(client, 0)
    await notify(admin, name, "after")  # nobody listens: the list stays as it was
    await subscribe(page, name)  # and a new subscription works
    await subscribers_become(client, 1)
    await notify(admin, name, "again")
    await expect(events.first.locator(".payload")).to_have_text("again")
    assert page_errors == []


async def test_listen_panel_shows_the_gateways_error(page: Page, gateway_factory: Any) -> None:
    name = listen_channel()
    client = await gateway_factory(listen_channels={"anon": [name]})
    await open_console(page, client)
    error = page.locator("#listen-error")
    await subscribe(page, "other_channel")
    await expect(error.locator(".code")).to_have_text("forbidden")
    await expect(error).to_contain_text("may not listen to other_channel")
    await expect(page.locator("#listen-status")).to_have_text("Not subscribed (HTTP 403).")
    await subscribe(page, "1bad")
    await expect(error.locator(".code")).to_have_text("bad_request")
    await subscribe(page, name)
    await expect(page.locator("#listen-status")).to_contain_text(f"Listening to {name}")
    await expect(error).to_be_hidden()


async def test_listen_panel_shows_missed_and_dropped_apart(
    page: Page, gateway_factory: Any, admin: psycopg.AsyncConnection[Any]
) -> None:
    name = listen_channel()
    client = await gateway_factory(listen_channels={"anon": [name]}, listen_buffer=4)
    await open_console(page, client)
    await subscribe(page, name)
    await expect(page.locator("#listen-status")).to_contain_text("Listening to")
    await subscribers_become(client, 1)
    pid = (await get_stats(client))["listen"]["backend_pid"]
    await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    missed = page.locator('#listen-events li[data-kind="missed"]')
    await expect(missed).to_have_count(1)
    await expect(missed).to_have_attribute("data-reason", "reconnected")
    await expect(missed).to_contain_text("missed")
    # a burst larger than the buffer drops even a fast reader: its stream ends
    await notify(admin, name, *(f"n{i}" for i in range(200)))
    dropped = page.locator('#listen-events li[data-kind="dropped"]')
    await expect(dropped).to_have_count(1)
    await expect(dropped).to_have_attribute("data-reason", "slow")
    assert await page.locator("#listen-events li.notice").count() == 2
    await expect(page.locator("#listen-status")).to_contain_text("ended the stream (slow)")
    assert await page.locator("#unsubscribe").is_disabled()
    await subscribers_become(client, 0)
