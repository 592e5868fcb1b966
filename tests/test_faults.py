"""Faults the labeling path must outlive without a browser: Redis unreachable (cache and channel layer
on a port nobody listens on) and a database connection that fails mid-request; and a training worker
killed mid-job, on PostgreSQL and on the embedded SQLite alike."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.exceptions
from django.core.cache import caches
from django.test import override_settings

from annotate import actions
from annotate.actions import PairInput, add_pairs
from annotate.models import Judgment, Pair
from pairloop import redis_guard
from tests.services import free_port
from tests.test_labeling_http import client_for, current_assignment
from tests.test_rounds import claim, judged_campaign, launch
from training.actions import fail_stale_jobs, heartbeat
from training.models import Job

pytestmark = pytest.mark.django_db


@pytest.fixture
def redis_unreachable(settings):
    address = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    with override_settings(
        CACHES={"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": address,
                            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}},
        CHANNEL_LAYERS={"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                    "CONFIG": {"hosts": [{"address": address, "socket_connect_timeout": 1}]}}},
    ):
        from channels.layers import channel_layers

        channel_layers.backends.clear()
        redis_guard.reset()
        actions._LEFT_IN_PROCESS.clear()
        yield
        channel_layers.backends.clear()
        redis_guard.reset()
    caches["default"].clear()


class ManualClock:
    """redis_guard's clock, moved by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = ManualClock()
    monkeypatch.setattr(redis_guard, "_clock", clock)
    redis_guard.reset()
    yield clock
    redis_guard.reset()


@pytest.mark.django_db(False)
def test_after_a_redis_failure_it_leaves_redis_alone_until_the_back_off_elapses(clock, caplog):
    tries: list[float] = []
    redis_up = False

    def use_redis():
        with redis_guard.guard("test operation"):
            tries.append(clock.now)
            if not redis_up:
                raise redis.exceptions.ConnectionError("Connection refused")

    with pytest.raises(redis_guard.RedisDown, match="Connection refused"):
        use_redis()
    assert tries == [1000.0]
    for later in (0.0, 1.0, redis_guard.RETRY_SECONDS - 0.001):  # inside the back-off: Redis is not tried
        clock.now = 1000.0 + later
        with pytest.raises(redis_guard.RedisDown, match="unavailable less than"):
            use_redis()
    assert tries == [1000.0]
    clock.now = 1000.0 + redis_guard.RETRY_SECONDS  # the back-off elapsed: one try, which fails again...
    with pytest.raises(redis_guard.RedisDown, match="Connection refused"):
        use_redis()
    assert tries == [1000.0, 1005.0]
    clock.now = 1005.0 + redis_guard.RETRY_SECONDS - 0.001  # ...and starts a new back-off from then
    with pytest.raises(redis_guard.RedisDown, match="unavailable less than"):
        use_redis()
    assert tries == [1000.0, 1005.0]
    redis_up, clock.now = True, 1010.0
    use_redis()
    use_redis()
    assert tries == [1000.0, 1005.0, 1010.0, 1010.0]  # back: every call goes to Redis again
    warnings = [r for r in caplog.records if r.name == "pairloop.redis_guard"]
    assert len(warnings) == 2  # one line per outage window, not one per refused call


def left_shown(response) -> int:
    return int(re.search(rb'id="left-in-campaign">(\d+)<', response.content).group(1))


def test_it_keeps_labeling_and_importing_while_redis_is_unreachable(labeler, campaign, redis_unreachable):
    client = client_for(labeler)
    started = time.monotonic()
    page = client.get(campaign.label_url())
    assert page.status_code == 200 and left_shown(page) == 10  # counted from the database
    shown = current_assignment(page)
    response = client.post(f"{campaign.label_url()}{shown.pk}/judge/", {"choice": "a", "strength": "2", "ms": "900"},
                           HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert current_assignment(response).pk != shown.pk
    assert Judgment.objects.get().assignment_id == shown.pk
    # Pairs added while Redis is down are stored; their push is dropped, not raised.
    added = add_pairs(campaign, [PairInput("New question?", "yes", "no")])
    assert added.created == 1 and Pair.objects.filter(campaign=campaign).count() == 11
    actions._LEFT_IN_PROCESS.clear()
    assert left_shown(client.get(campaign.label_url())) == 10  # 11 wanted, 1 judged
    undo = client.post(f"{campaign.label_url()}undo/", {"judgment": Judgment.objects.get().pk},
                       HTTP_HX_REQUEST="true")
    assert undo.status_code == 200 and not Judgment.objects.exists()
    assert time.monotonic() - started < 10, "requests waited on the unreachable Redis"


def test_it_answers_503_with_a_retry_message_while_the_database_refuses_queries(labeler, campaign):
    """The database-unavailable page without restarting anything: every query fails as on a lost connection."""
    from django.db import OperationalError, connection

    client = client_for(labeler)
    shown = current_assignment(client.get(campaign.label_url()))
    judge_url = f"{campaign.label_url()}{shown.pk}/judge/"
    choice = {"choice": "a", "strength": "2", "ms": "900"}

    def refuse(execute, sql, params, many, context):
        raise OperationalError("server closed the connection unexpectedly")

    with connection.execute_wrapper(refuse):
        page = client.get(campaign.label_url())
        judged = client.post(judge_url, choice, HTTP_HX_REQUEST="true")
    for response in (page, judged):
        body = response.content.decode()
        assert response.status_code == 503 and response["Retry-After"] == "5"
        assert "The database is unavailable for a moment" in body and "Nothing you confirmed is lost" in body
        assert "Traceback" not in body and "OperationalError" not in body
    assert page.content.startswith(b"<!doctype html>")  # a whole page for a page load...
    # ...and the message in place for an htmx request.
    assert judged.content.decode().startswith('<p class="error" role="alert" id="unavailable">')
    assert not Judgment.objects.exists()
    again = client.post(judge_url, choice, HTTP_HX_REQUEST="true")  # the same choice, once the database is back
    assert again.status_code == 200 and Judgment.objects.get().assignment_id == shown.pk


def test_a_training_job_whose_worker_was_killed_after_its_last_beat_is_failed(settings):
    """Its heartbeat is the database's own time (Now()), as a real worker writes it, on either database."""
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 5, "HEARTBEAT_STALE_SECONDS": 1}
    job = launch(judged_campaign(usable=5)).jobs.get(kind=Job.EXPORT)
    claim(job, "killed-worker")
    assert heartbeat(job.pk, "killed-worker")  # its last beat; then the worker is killed
    assert fail_stale_jobs() == []  # not silent long enough yet
    time.sleep(1.2)
    assert fail_stale_jobs() == [job]
    job.refresh_from_db()
    assert job.status == Job.FAILED and job.error.startswith("The worker stopped: no heartbeat for 1 s")


@pytest.mark.django_db(False)
def test_a_postgres_restart_session_whose_test_skipped_fails(tmp_path):
    """scripts/test runs the PostgreSQL restart in a session of its own: a skip there must fail it
    (tests/must_run.py). Shown on a stand-in marked test that skips, never on the real one (it stops the
    shared PostgreSQL)."""
    (tmp_path / "test_stand_in.py").write_text(
        "import pytest\n\n\n@pytest.mark.restarts_postgres\ndef test_restart():\n"
        "    pytest.skip(\"needs this machine's PostgreSQL cluster\")\n\n\ndef test_other():\n"
        "    pytest.skip(\"an ordinary skip\")\n")
    repo = Path(__file__).resolve().parents[1]

    def session(marks: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-c", "pyproject.toml", "-p", "tests.must_run",
                               "-p", "no:cacheprovider", "-q", "-m", marks, str(tmp_path / "test_stand_in.py")],
                              cwd=repo, capture_output=True, text=True, timeout=120)

    restart = session("restarts_postgres")
    assert restart.returncode == 1, restart.stdout + restart.stderr
    assert "restarts_postgres test must run, not skip (Skipped: needs this machine's PostgreSQL" in restart.stdout
    other = session("not restarts_postgres")  # any other test may still skip
    assert other.returncode == 0 and "1 skipped" in other.stdout, other.stdout + other.stderr
