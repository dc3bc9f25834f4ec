"""A real headless Chromium for the browser tests, driven by Playwright (pytest plugin).

The browser is Debian's ``chromium`` package, never one Playwright downloads:
when it is missing and a collected test needs it, it is installed with apt-get
before the tests start, if we are root (the suite's only set-up is ``pip
install -e '.[dev]'``); otherwise those tests fail with what to do. Only the
tests that ask for a `page` pay for it.

Chromium gets the switches that keep it from calling out (updates, sync, QUIC
probes); Playwright gives every launch a fresh, temporary profile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    async_playwright,
    expect,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: apt-get's time to fetch and unpack chromium (about a minute here) on a slow mirror
INSTALL_TIMEOUT_S = 900
#: what a browser action or assertion waits for before it fails (a loaded 2-core machine)
ACTION_TIMEOUT_MS = 30_000
expect.set_options(timeout=ACTION_TIMEOUT_MS)


class ChromiumMissing(RuntimeError):
    """Chromium is not installed, and could not be installed here."""


def install_chromium() -> None:
    """Install Debian's chromium with apt-get.

    Raises:
        ChromiumMissing: not root, no apt-get, or the install failed.
    """
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ChromiumMissing(
            f"the browser tests need Chromium at {CHROMIUM}: install Debian's package"
            " (apt-get install chromium) or run the tests as root on Debian, where they"
            " install it themselves"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
    ):
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            raise ChromiumMissing(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")


#: why Chromium could not be installed, when it could not
_install_failures: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Install Chromium once the tests are known, if any of them needs it.

    Here, before the first test starts, the install does not count against
    that test's timeout (pytest-timeout's, which a slow mirror could exceed).
    """
    if CHROMIUM.exists():
        return
    if any("chromium_path" in getattr(item, "fixturenames", ()) for item in items):
        try:
            install_chromium()
        except (ChromiumMissing, subprocess.TimeoutExpired) as exc:
            _install_failures.append(str(exc))


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    """Debian's Chromium (installed at collection when it was missing)."""
    if not CHROMIUM.exists():
        reason = _install_failures[0] if _install_failures else "it was not installed"
        pytest.fail(f"no Chromium at {CHROMIUM}: {reason}", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="session")
async def browser(chromium_path: Path) -> AsyncIterator[Browser]:
    """One headless Chromium for the session."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def browser_context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh context (cookies, storage, cache) for one test; closed after."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    try:
        yield context
    finally:
        await context.close()


@pytest.fixture
async def page(browser_context: BrowserContext) -> Page:
    """A new tab in the test's own context."""
    return await browser_context.new_page()


@pytest.fixture
def page_errors(page: Page) -> list[str]:
    """What `page` reports as errors: uncaught exceptions and console errors, which
    include every Content-Security-Policy violation. Chromium's own note of an
    HTTP error status ("Failed to load resource") is left out: tests ask for those."""
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(f"console: {message.text}")

    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("console", on_console)
    return errors
