"""A real server and a real browser for the browser tests.

The app is served for real: daphne runs `pairloop.asgi:application` in a subprocess (HTTP and
WebSockets) against the test database, with the same Redis and data directory as the tests. The
tests use `django_db(transaction=True)`, so what they write is committed and the server sees it.
Debian's chromium is driven through Playwright (never `playwright install`: nothing is downloaded).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.services import free_port

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
REPO = Path(__file__).resolve().parents[2]


def database_url(settings_dict: dict) -> str:
    """The URL of the database this test process uses (the test database once it is set up)."""
    engine = settings_dict["ENGINE"]
    if engine == "django.db.backends.sqlite3":
        return f"sqlite:///{Path(settings_dict['NAME']).resolve()}"
    if "postgresql" not in engine:
        raise RuntimeError(f"the browser tests know no URL for {engine}")
    user = quote(settings_dict.get("USER") or "", safe="")
    password = settings_dict.get("PASSWORD") or ""
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{quote(settings_dict['NAME'], safe='')}"


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer {url} within {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")


@contextmanager
def serve_app(url_of_db: str, **extra_env: str):
    """daphne serving the app on a free loopback port against the given database; yields its base URL."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="pairloop-daphne-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    env = dict(os.environ)
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    env.update({
        "DATABASE_URL": url_of_db,
        "DJANGO_SETTINGS_MODULE": "pairloop.settings",
        # DEBUG off, as in production: whitenoise serves static files through the finders
        # (WHITENOISE_USE_FINDERS), so no collectstatic is needed.
        "DEBUG": "0",
        "LOG_LEVEL": "WARNING",
        **extra_env,
    })
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "pairloop.asgi:application"],
        cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base_url}/accounts/login/", process, log_path)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()
        log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def app_server(django_db_setup, django_db_blocker):
    """Base URL of daphne serving the app on a free loopback port, against the test database.

    Session-scoped and torn down before the test database is dropped (it depends on
    django_db_setup), so no server connection keeps the database open.
    """
    from django.db import connection

    with django_db_blocker.unblock():
        url_of_db = database_url(connection.settings_dict)
    with serve_app(url_of_db) as base_url:
        yield base_url


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
