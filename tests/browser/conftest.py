"""A real server and a real browser for the browser tests.

The app is served for real: daphne runs `pairloop.asgi:application` in a subprocess (HTTP and
WebSockets; started by tests/services.py) against the test database, with the same Redis and data
directory as the tests. The tests use `django_db(transaction=True)`, so what they write is committed
and the server sees it. Debian's chromium is driven through Playwright (never `playwright install`:
nothing is downloaded).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.services import database_url, serve_app

# Playwright's sync API keeps an asyncio loop running in this thread between calls; Django would
# then refuse every ORM call as "async unsafe". The tests are plain synchronous code, so allow it.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def app_server(django_db_setup, django_db_blocker):
    """Base URL of daphne serving the app on a free loopback port, against the test database.

    Session-scoped and torn down before the test database is dropped (it depends on
    django_db_setup), so no server connection keeps the database open.
    """
    from django.db import connection

    with django_db_blocker.unblock():
        url_of_db = database_url(connection.settings_dict)
    with serve_app(url_of_db) as served:
        yield served.url


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_server):
    """A fresh browser context (no cookies) whose relative URLs go to the app server."""
    context = browser.new_context(base_url=app_server, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    yield page
    context.close()


def off_the_loop(fn, *args, **kwargs):
    """Run fn in a plain thread and return its result.

    Needed for code that itself bridges to asyncio (Channels' async_to_sync refuses to run in a
    thread with a running event loop, and Playwright keeps one running here). The thread's
    database connection is closed at the end.
    """
    from django.db import connection

    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
