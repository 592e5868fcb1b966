"""Faults on purpose, as a labeler lives through them in a real browser: Redis killed mid-labeling and
PostgreSQL restarted mid-labeling. Every judgment the page confirmed (it showed the next pair) is
stored; pages keep answering or say to retry, never a traceback; live updates come back by themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.db import connection

from annotate.models import Judgment
from tests.browser.test_labeling_browser import (
    current_assignment_id,
    log_in,
    open_label_page,
    wait_for_another_pair,
)
from tests.conftest import make_campaign
from tests.services import REPO, PrivateRedis, database_url, pg_ctl, postgres_cluster, serve_app

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def private_redis():
    server = PrivateRedis().start()
    yield server
    server.close()


def new_page(browser, base_url: str):
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    return watched(context.new_page())


def watched(page):
    """The page, keeping the errors its scripts raise."""
    page.js_errors = []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    return page


# What the page's sockets do, kept on window.__ws: how many opened and closed, which element's socket is open,
# and the text of every message pushed to the page (htmx's ws extension fires these events on the element).
WATCH_SOCKETS = """
window.__ws = {opens: 0, closes: 0, open: new WeakSet(), pushes: []};
document.addEventListener("htmx:wsOpen", (event) => {
  window.__ws.opens += 1;
  window.__ws.open.add(event.target);
});
document.addEventListener("htmx:wsClose", (event) => {
  window.__ws.closes += 1;
  window.__ws.open.delete(event.target);
});
document.addEventListener("htmx:wsAfterMessage", (event) => {
  window.__ws.pushes.push(String(event.detail.message));
});
"""
# The waiting page's socket is open on the element now in the page (not one a refresh swapped out)...
SOCKET_OPEN = ("() => { const el = document.querySelector('[ws-connect]'); "
               "return !!el && window.__ws.open.has(el); }")
# ...and that element came after the fault (it is not the one marked data-before-fault).
NEW_SOCKET_OPEN = ("() => { const el = document.querySelector('[ws-connect]'); "
                   "return !!el && !el.dataset.beforeFault && window.__ws.open.has(el); }")


def judge_tie(page) -> int:
    """Press 3 (tie: submitted at once) and wait for the next pair; returns the judged assignment's id."""
    judged = current_assignment_id(page)
    page.keyboard.press("3")
    wait_for_another_pair(page, judged)
    assert page.is_hidden("#request-error")
    return judged


def judged_assignments(labeler) -> set[int]:
    connection.close()  # this process's connection may predate the fault
    return set(Judgment.objects.filter(labeler=labeler).values_list("assignment_id", flat=True))


def test_it_keeps_labeling_while_redis_is_down_and_live_updates_resume(browser, labeler, private_redis, tmp_path):
    campaign = make_campaign("redis-fault", n_pairs=8, members=[labeler])
    waiting = make_campaign("redis-wait", members=[labeler])
    url_of_db = database_url(connection.settings_dict)
    with serve_app(url_of_db, REDIS_URL=private_redis.url, PAIRLOOP_CHANNEL_PREFIX="fault") as served:
        page = new_page(browser, served.url)
        log_in(page, labeler)
        # A second tab waits on the empty campaign for pushed pairs.
        watcher = watched(page.context.new_page())
        watcher.add_init_script(WATCH_SOCKETS)
        watcher.goto(waiting.label_url())
        watcher.wait_for_selector("#queue-empty")
        watcher.wait_for_function(SOCKET_OPEN)
        watcher.evaluate("document.querySelector('[ws-connect]').dataset.beforeFault = '1'")
        page.goto("/")
        open_label_page(page, campaign)
        confirmed = {judge_tie(page), judge_tie(page)}

        private_redis.stop()
        watcher.wait_for_function("() => window.__ws.closes >= 1")  # the waiting tab's socket lost its Redis
        for _ in range(3):
            confirmed.add(judge_tie(page))
        page.reload()  # a full page load works too, with the count of what is left from the database
        page.wait_for_selector("#pair[data-assignment]")
        page.evaluate("window.__marker = 'no reload since'")
        assert page.inner_text("#left-in-campaign") == str(8 - len(confirmed))
        confirmed.add(judge_tie(page))

        private_redis.start()
        confirmed.add(judge_tie(page))
        assert judged_assignments(labeler) == confirmed

        # New pairs imported beside the restarted Redis reach the waiting tab without a reload.
        rows = tmp_path / "pairs.jsonl"
        rows.write_text("".join(json.dumps({"prompt": f"Later question {i}?", "response_a": f"x{i}",
                                            "response_b": f"y{i}"}) + "\n" for i in range(3)))
        # The tab's socket reconnects (htmx retries with a jittered back-off of up to a minute); reopened, it
        # asks for pairs once, and the page that answers opens a socket of its own: wait for that one.
        watcher.wait_for_function(NEW_SOCKET_OPEN, timeout=90_000)
        assert watcher.evaluate("window.__ws.pushes") == []
        imported = subprocess.run(
            [sys.executable, "manage.py", "import_pairs", waiting.slug, str(rows)], cwd=REPO,
            env={**_env(), "DATABASE_URL": url_of_db, "REDIS_URL": private_redis.url,
                 "PAIRLOOP_CHANNEL_PREFIX": "fault"},
            capture_output=True, text=True, timeout=120)
        assert imported.returncode == 0, imported.stdout + imported.stderr
        # Pushed, not polled: the fragment comes through the socket, and it fetches the pair.
        watcher.wait_for_function("() => window.__ws.pushes.some((m) => m.includes('3 new pairs arrived'))")
        watcher.wait_for_selector("#pair[data-assignment]:not([data-assignment=''])")
        assert "Later question" in watcher.inner_text("#prompt")
        assert page.js_errors == [] and watcher.js_errors == []


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    return env


@pytest.mark.restarts_postgres  # it breaks every other open connection of this test session
def test_it_tells_labelers_to_retry_while_postgres_restarts_and_loses_nothing(page, labeler):
    cluster = postgres_cluster()
    if connection.vendor != "postgresql" or cluster is None:
        pytest.skip("needs this machine's PostgreSQL cluster, restartable with pg_ctlcluster")
    campaign = make_campaign("pg-fault", n_pairs=6, members=[labeler])
    log_in(page, labeler)
    open_label_page(page, campaign)
    confirmed = {judge_tie(page), judge_tie(page)}

    shown = current_assignment_id(page)
    pg_ctl("stop", cluster)
    try:
        page.keyboard.press("3")
        page.wait_for_selector("#request-error", state="visible")
        message = page.inner_text("#request-error")
        assert "database is unavailable" in message and "Nothing you confirmed is lost" in message
        assert "Traceback" not in page.content()
        assert current_assignment_id(page) == shown  # the same pair stays, to be judged again
    finally:
        pg_ctl("start", cluster)
    confirmed.add(judge_tie(page))  # the same key again, now the database is back
    assert page.is_hidden("#request-error")
    confirmed.add(judge_tie(page))
    assert shown in confirmed
    assert judged_assignments(labeler) == confirmed
