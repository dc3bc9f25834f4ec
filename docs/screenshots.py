"""Screenshots of the query console for docs/console.md, taken in headless Chromium.

Run by hand from the repository (not by the test suite), after changing the page:

    .venv/bin/python docs/screenshots.py

It starts ``pgqg serve`` with an embedded PostgreSQL holding the demo bookshop
(in a temporary directory, removed after), drives Debian's Chromium (the tests'
set-up, tests/browser.py: installed with apt-get when missing) through the
console, and writes PNGs into docs/images/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from playwright.async_api import Page, async_playwright, expect

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "docs" / "images"
sys.path.insert(0, str(REPO / "tests"))

from browser import CHROMIUM, CHROMIUM_ARGS, install_chromium  # noqa: E402
from support import Served  # noqa: E402

from gateway._settings import DEFAULT_SQL_DIR  # noqa: E402
from gateway.cli._demo import load_demo  # noqa: E402
from gateway.embedded._postgres import EmbeddedPostgres  # noqa: E402

VIEWPORT = {"width": 1360, "height": 860}
TIMEOUT_MS = 60_000

BOOKS_SQL = """SELECT b.id, b.title, a.name AS author, b.published, b.price, b.tags
FROM book b JOIN author a ON a.id = b.author_id
WHERE b.price > $1
ORDER BY b.price DESC
LIMIT 12"""

ERROR_SQL = """SELECT b.title, count(r.id) AS reviews
FROM book b
LEFT JOIN reviews r ON r.book_id = b.id
GROUP BY b.title"""

ENDLESS_SQL = "SELECT generate_series(1, 1000000000) AS n, 'and so on' AS more"
STREAM_SQL = "SELECT i, md5(i::text) AS digest, now() AS at FROM generate_series(1, 100000) AS i"

LISTEN_CHANNELS = {"anon": ["orders_*"]}
ORDERS = [
    ("orders_new", '{"order": 1041, "book": 7, "qty": 1}'),
    ("orders_new", '{"order": 1042, "book": 3, "qty": 2}'),
    ("orders_paid", '{"order": 1041, "amount": "24.90"}'),
]
AFTER_MISSED = [
    ("orders_new", '{"order": 1043, "book": 12, "qty": 1}'),
    ("orders_paid", "<img src=x onerror=alert(1)>"),
]


@contextlib.contextmanager
def demo_gateway() -> Iterator[tuple[str, str]]:
    """``pgqg serve`` on the demo bookshop in a throwaway embedded PostgreSQL, anyone
    allowed to listen to ``orders_*``; yields its URL and the database's DSN."""
    with tempfile.TemporaryDirectory(prefix="pgqg-shots-") as tmp:
        os.chmod(tmp, 0o755)  # as root, the embedded server runs as another user
        with EmbeddedPostgres(Path(tmp) / "pgdata", fast=True) as pg:
            load_demo(pg.dsn, DEFAULT_SQL_DIR)
            # the gateway logs in as the least-privileged role of the embedded server
            listen = {"PGQG_LISTEN_CHANNELS": json.dumps(LISTEN_CHANNELS)}
            served = Served(pg.gateway_dsn, env=listen, privileged=True)
            try:
                served.ready_sync()
                yield served.url, pg.dsn
            finally:
                served.stop()


async def open_console(page: Page, url: str) -> None:
    await page.goto(url + "/")
    await expect(page.locator("#catalog-status")).to_contain_text("queries")


async def shoot(page: Page, name: str) -> None:
    path = IMAGES / f"{name}.png"
    await page.screenshot(path=path)
    print(f"wrote {path.relative_to(REPO)}")


async def notify(dsn: str, notes: list[tuple[str, str]]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for channel, payload in notes:
            await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def kill_listener(dsn: str) -> None:
    """Ends the gateway's LISTEN connection: it comes back and sends ``missed``."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'pgqg-listen'"
        )


async def take(url: str, dsn: str) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for scheme in ("light", "dark"):
                context = await browser.new_context(viewport=VIEWPORT, color_scheme=scheme)
                context.set_default_timeout(TIMEOUT_MS)
                page = await context.new_page()
                await open_console(page, url)
                await page.fill("#sql", BOOKS_SQL)
                await page.fill('input[data-param="1"]', "20")
                await page.press("#sql", "Control+Enter")
                await expect(page.locator("#status")).to_contain_text("SELECT")
                await shoot(
                    page, f"console-result-{scheme}" if scheme == "dark" else "console-result"
                )
                await context.close()

            context = await browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(TIMEOUT_MS)
            page = await context.new_page()
            await open_console(page, url)
            await page.fill("#sql", ERROR_SQL)
            await page.press("#sql", "Control+Enter")
            await expect(page.locator("#error .sqlstate")).to_be_visible()
            await shoot(page, "console-error")

            await context.close()

            context = await browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(TIMEOUT_MS)
            page = await context.new_page()
            await page.goto(url + "/#query=search_books&q=dragon&lim=5")
            await expect(page.locator("#status")).to_contain_text("search_books")
            await expect(page.locator("#row-count")).to_be_visible()
            await shoot(page, "console-named-query")

            await open_console(page, url)
            await page.check("#stream")
            await page.fill("#sql", STREAM_SQL)
            await page.press("#sql", "Control+Enter")
            await expect(page.locator("#status")).to_contain_text("Streamed")
            await shoot(page, "console-stream")

            # a stream still under way, Stop at hand; then stopped
            await page.fill("#sql", ENDLESS_SQL)
            await page.press("#sql", "Control+Enter")
            await expect(page.locator("#row-count")).not_to_have_attribute("data-rows", "0")
            await page.wait_for_function(
                "() => +document.getElementById('row-count').dataset.rows > 20000"
            )
            await shoot(page, "console-streaming")
            await page.click("#stop")
            await expect(page.locator("#status")).to_contain_text("Stopped after")
            await context.close()

            context = await browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(TIMEOUT_MS)
            page = await context.new_page()
            await open_console(page, url)
            await page.fill("#listen-channels", "orders_new, orders_paid")
            await page.click("#subscribe")
            await expect(page.locator("#listen-status")).to_contain_text("Listening to")
            events = page.locator("#listen-events li")
            await notify(dsn, ORDERS)
            await expect(events).to_have_count(len(ORDERS))
            await kill_listener(dsn)
            await expect(events).to_have_count(len(ORDERS) + 1)
            await notify(dsn, AFTER_MISSED)
            await expect(events).to_have_count(len(ORDERS) + 1 + len(AFTER_MISSED))
            await page.locator("#listen").scroll_into_view_if_needed()
            await shoot(page, "console-listen")
            await context.close()
        finally:
            await browser.close()


def main() -> None:
    if not CHROMIUM.exists():
        install_chromium()
    with demo_gateway() as (url, dsn):
        asyncio.run(take(url, dsn))


if __name__ == "__main__":
    main()
