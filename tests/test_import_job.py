"""Importing from the web: the upload is kept in the data directory and imported by a Celery task on the
default queue; its page shows the progress, then the result or the errors (line and field)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from annotate.importing import run_import_job, uploads_dir
from annotate.models import ImportJob, Pair
from tests.conftest import make_campaign
from tests.worker import Worker

pytestmark = pytest.mark.django_db

ROWS = [{"prompt": f"What is {i} + {i}?", "response_a": f"It is {2 * i}.", "response_b": f"Maybe {i}."}
        for i in range(5)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def client_for(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def upload(client, campaign, name: str, content: bytes, **fields):
    file = SimpleUploadedFile(name, content)
    return client.post(f"/campaigns/{campaign.slug}/import/", {"file": file, **fields})


def uploads() -> set[str]:
    return {p.name for p in uploads_dir().iterdir()} if uploads_dir().is_dir() else set()


def test_it_queues_an_upload_then_shows_its_result(admin_user, django_capture_on_commit_callbacks):
    campaign = make_campaign("web")
    client = client_for(admin_user)

    with django_capture_on_commit_callbacks() as enqueued:
        response = upload(client, campaign, "pairs.jsonl", jsonl(ROWS + ROWS[:1]), priority="3")

    job = ImportJob.objects.get(campaign=campaign)
    assert response.status_code == 302 and response["Location"] == job.get_absolute_url()
    assert len(enqueued) == 1  # the task is sent once the job's row is committed
    assert (job.status, job.file_name, job.uploaded_by, job.options["priority"]) == ("queued", "pairs.jsonl",
                                                                                      admin_user, 3)
    assert Path(job.file_path).parent == uploads_dir()
    assert Path(job.file_path).read_bytes() == jsonl(ROWS + ROWS[:1])
    assert not Pair.objects.filter(campaign=campaign).exists()  # nothing happens inside the request
    page = client.get(job.get_absolute_url())
    assert b"Waiting for a worker" in page.content and b'hx-trigger="every 1s"' in page.content

    run_import_job(job.pk)  # what the worker runs

    job.refresh_from_db()
    assert (job.status, job.pairs_created, job.pairs_skipped, job.rows_total) == ("succeeded", 5, 1, 6)
    assert not Path(job.file_path).exists()  # the upload is not kept once imported
    assert set(Pair.objects.filter(campaign=campaign).values_list("priority", flat=True)) == {3}
    card = client.get(job.get_absolute_url(), headers={"HX-Request": "true"})
    body = card.content.decode()
    assert body.lstrip().startswith('<article class="card import-job" id="import-job"')  # the card alone
    assert "Imported 5 pairs from 6 rows; skipped 1 duplicate." in body
    assert "hx-trigger" not in body  # finished: the card stops polling
    listing = client.get(f"/campaigns/{campaign.slug}/import/")
    assert b"pairs.jsonl" in listing.content and b"imported" in listing.content


def test_it_shows_the_line_and_field_of_a_bad_upload_and_imports_nothing(admin_user):
    campaign = make_campaign("webbad")
    client = client_for(admin_user)
    rows = [dict(row) for row in ROWS]
    rows[1]["response_b"] = "<b>x</b>"
    rows[3]["prompt"] = [{"role": "wizard", "content": "Hi"}]
    del rows[4]["response_a"]
    upload(client, campaign, "bad.jsonl.gz", gzip.compress(jsonl(rows)))
    job = ImportJob.objects.get(campaign=campaign)

    run_import_job(job.pk)

    job.refresh_from_db()
    assert job.status == "failed" and not Pair.objects.filter(campaign=campaign).exists()
    assert job.errors == ["line 4, field 'prompt': turn 1 has role 'wizard': use system, user, assistant",
                          "line 5, field 'response_a': missing"]
    body = client.get(job.get_absolute_url()).content.decode()
    assert "Nothing was imported." in body
    assert "line 4, field &#x27;prompt&#x27;: turn 1 has role &#x27;wizard&#x27;" in body
    assert not Path(job.file_path).exists()


def test_it_tells_the_format_from_the_content_when_the_name_does_not(admin_user, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    campaign = make_campaign("sniff")
    client = client_for(admin_user)
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), tmp_path / "p.parquet")
    upload(client, campaign, "export (1)", (tmp_path / "p.parquet").read_bytes())
    upload(client, campaign, "pairs.download", jsonl(ROWS))
    for job in ImportJob.objects.filter(campaign=campaign).order_by("pk"):
        run_import_job(job.pk)
    jobs = ImportJob.objects.filter(campaign=campaign).order_by("pk")
    assert [(j.status, j.pairs_created, j.pairs_skipped) for j in jobs] == [("succeeded", 3, 0),
                                                                            ("succeeded", 2, 3)]


def test_a_job_delivered_twice_imports_once(admin_user):
    campaign = make_campaign("twice")
    upload(client_for(admin_user), campaign, "pairs.jsonl", jsonl(ROWS))
    job = ImportJob.objects.get(campaign=campaign)
    run_import_job(job.pk)
    finished_at = ImportJob.objects.get(pk=job.pk).finished_at

    again = run_import_job(job.pk)

    assert (again.status, again.pairs_created, again.finished_at) == ("succeeded", 5, finished_at)
    assert run_import_job(job.pk + 1000) is None  # a job that no longer exists: nothing to do


@pytest.mark.parametrize("size", [5_000, 200_000])  # under and over the form's slack around the cap
def test_it_refuses_an_upload_over_the_cap_before_storing_it(admin_user, settings, size):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MAX_UPLOAD_BYTES": 4096}
    campaign = make_campaign("big")
    before = uploads()

    response = upload(client_for(admin_user), campaign, "big.jsonl", b"\n" * size)

    assert response.status_code == 413
    assert b"larger than the upload limit of 4096 bytes (PAIRLOOP_MAX_UPLOAD_BYTES)" in response.content
    assert not ImportJob.objects.exists() and uploads() == before


def test_it_refuses_a_bad_form_without_queueing_anything(admin_user):
    campaign = make_campaign("form")
    client = client_for(admin_user)
    refusals = (({"pairs_per_prompt": "0"}, b"Pairs per prompt must be at least 1."),
                ({"priority": "high"}, b"Priority must be a whole number, not &#x27;high&#x27;."),
                ({"priority": str(2**31)}, b"Priority must be at most 2147483647."))
    for fields, message in refusals:
        response = upload(client, campaign, "pairs.jsonl", jsonl(ROWS), **fields)
        assert response.status_code == 400 and message in response.content
    response = client.post(f"/campaigns/{campaign.slug}/import/", {})
    assert response.status_code == 400 and b"Choose a file to import." in response.content
    assert not ImportJob.objects.exists()


def test_it_checks_csrf_and_access(admin_user, labeler, reviewer, outsider):
    campaign = make_campaign("guard", members=[labeler])
    forged = upload(client_for(admin_user, enforce_csrf_checks=True), campaign, "pairs.jsonl", jsonl(ROWS))
    assert forged.status_code == 403 and not ImportJob.objects.exists()

    upload(client_for(admin_user), campaign, "pairs.jsonl", jsonl(ROWS))
    job = ImportJob.objects.get()
    for user in (labeler, reviewer, outsider):
        client = client_for(user)
        assert client.get(job.get_absolute_url()).status_code == 404
        assert upload(client, campaign, "pairs.jsonl", jsonl(ROWS)).status_code == 404
    other = make_campaign("other")
    assert client_for(admin_user).get(f"/campaigns/{other.slug}/import/{job.pk}/").status_code == 404
    assert ImportJob.objects.count() == 1


@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_imports_uploads_and_reports_errors(admin_user):
    campaign = make_campaign("worker")
    client = client_for(admin_user)
    with Worker(queues="default", purge=True) as worker:
        upload(client, campaign, "good.jsonl", jsonl(ROWS))
        upload(client, campaign, "bad.jsonl", jsonl([{"prompt": "Q", "responses": ["one"]}]))
        deadline = time.monotonic() + 90
        while ImportJob.objects.exclude(status__in=ImportJob.FINISHED).exists():
            assert time.monotonic() < deadline, worker.log()[-4000:]
            time.sleep(0.25)

    good, bad = ImportJob.objects.filter(campaign=campaign).order_by("pk")
    assert (good.status, good.pairs_created, good.rows_total) == ("succeeded", 5, 5)
    assert bad.status == "failed"
    assert bad.errors == ["line 1, field 'responses': needs at least 2 different responses, got 1"]
    assert Pair.objects.filter(campaign=campaign).count() == 5
    assert b"Imported 5 pairs from 5 rows" in client.get(good.get_absolute_url()).content
    assert not Path(good.file_path).exists() and not Path(bad.file_path).exists()


def test_an_upload_the_job_queue_cannot_take_fails_with_the_reason(admin_user, monkeypatch,
                                                                    django_capture_on_commit_callbacks):
    from pairloop.celery import app

    # Redis is down: nothing listens where the broker should be. The task is published for real.
    monkeypatch.setitem(app.conf, "broker_url", "redis://127.0.0.1:9/0")
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    campaign = make_campaign("no-queue")
    client = client_for(admin_user)
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(client, campaign, "pairs.jsonl", jsonl(ROWS))
    job = ImportJob.objects.get(campaign=campaign)
    assert response.status_code == 302 and response["Location"] == job.get_absolute_url()
    assert job.status == ImportJob.FAILED and job.finished_at is not None
    assert job.errors[0].startswith("Could not reach the job queue (Redis): ")
    assert "upload the file again once the queue is back" in job.errors[0]
    assert not Path(job.file_path).exists() and not Pair.objects.filter(campaign=campaign).exists()
    assert b"Could not reach the job queue" in client.get(job.get_absolute_url()).content


# --- jobs left behind: beat's sweep fails them (or sends a lost one again) and deletes their uploads -----

def sweep() -> int:
    """What Celery beat runs every minute."""
    from annotate.tasks import recover_stale_import_jobs

    return recover_stale_import_jobs()


def test_beat_runs_the_import_job_sweep():
    from pairloop.celery import app

    entries = [entry for entry in app.conf.beat_schedule.values()
               if entry["task"] == "annotate.recover_stale_import_jobs"]
    assert entries and entries[0]["schedule"] <= 60
    app.loader.import_default_modules()  # what a worker does at start: autodiscover the apps' tasks
    assert "annotate.recover_stale_import_jobs" in app.tasks


def test_a_queued_job_whose_message_was_lost_is_sent_again_once_then_failed(
        admin_user, settings, monkeypatch, django_capture_on_commit_callbacks):
    from datetime import timedelta

    from django.utils import timezone

    from annotate import importing
    from annotate.tasks import import_job

    assert importing.IMPORT_TASK == import_job.name  # what the sweep sends is the task that imports
    settings.PAIRLOOP = {**settings.PAIRLOOP, "IMPORT_QUEUED_SECONDS": 600}
    campaign = make_campaign("lost")
    with django_capture_on_commit_callbacks():  # not run: the message never reaches a worker
        upload(client_for(admin_user), campaign, "pairs.jsonl", jsonl(ROWS))
        upload(client_for(admin_user), campaign, "fresh.jsonl", jsonl(ROWS))
    lost, fresh = ImportJob.objects.filter(campaign=campaign).order_by("pk")
    ImportJob.objects.filter(pk=lost.pk).update(created_at=timezone.now() - timedelta(seconds=601))
    sent = []
    monkeypatch.setattr(importing, "send_import", sent.append)

    assert sweep() == 0
    assert sent == [lost.pk]  # sent once more; the fresh job is left to wait
    lost.refresh_from_db()
    assert lost.status == "queued" and lost.resent_at is not None and Path(lost.file_path).exists()
    assert sweep() == 0 and sent == [lost.pk]  # not sent a third time

    ImportJob.objects.filter(pk=lost.pk).update(resent_at=timezone.now() - timedelta(seconds=601))
    assert sweep() == 1

    lost.refresh_from_db()
    assert lost.status == "failed" and lost.finished_at is not None
    assert lost.errors[0].startswith("No worker took this import in 10 min, though it was sent twice")
    assert "celery -A pairloop worker -Q default" in lost.errors[0]
    assert not Path(lost.file_path).exists() and not Pair.objects.filter(campaign=campaign).exists()
    fresh.refresh_from_db()
    assert fresh.status == "queued" and Path(fresh.file_path).exists()
    run_import_job(lost.pk)  # the resent message arriving late finds the job failed and does nothing
    assert ImportJob.objects.get(pk=lost.pk).status == "failed"


def test_a_resent_job_is_imported_by_the_worker_that_gets_it(admin_user, settings, monkeypatch,
                                                              django_capture_on_commit_callbacks):
    from datetime import timedelta

    from django.utils import timezone

    from annotate import importing

    settings.PAIRLOOP = {**settings.PAIRLOOP, "IMPORT_QUEUED_SECONDS": 600}
    campaign = make_campaign("resent")
    with django_capture_on_commit_callbacks():
        upload(client_for(admin_user), campaign, "pairs.jsonl", jsonl(ROWS))
    job = ImportJob.objects.get(campaign=campaign)
    ImportJob.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(seconds=601))
    monkeypatch.setattr(importing, "send_import", run_import_job)  # the worker takes the message at once

    sweep()

    job.refresh_from_db()
    assert (job.status, job.pairs_created) == ("succeeded", 5) and not Path(job.file_path).exists()


def test_a_job_whose_worker_died_while_checking_is_failed_and_its_upload_deleted(admin_user, settings):
    from datetime import timedelta

    from django.utils import timezone

    settings.PAIRLOOP = {**settings.PAIRLOOP, "HEARTBEAT_STALE_SECONDS": 45}
    campaign = make_campaign("died")
    client = client_for(admin_user)
    for name in ("dead.jsonl", "alive.jsonl", "importing.jsonl"):
        upload(client, campaign, name, jsonl(ROWS))
    dead, alive, importing = ImportJob.objects.filter(campaign=campaign).order_by("pk")
    # What a killed worker leaves: the job taken, its heartbeat a minute old; the live one beat just now.
    minute_ago = timezone.now() - timedelta(seconds=60)
    ImportJob.objects.filter(pk=dead.pk).update(status="checking", started_at=minute_ago,
                                                heartbeat_at=minute_ago)
    ImportJob.objects.filter(pk=alive.pk).update(status="checking", started_at=minute_ago,
                                                 heartbeat_at=timezone.now())
    ImportJob.objects.filter(pk=importing.pk).update(status="importing", started_at=minute_ago,
                                                     heartbeat_at=minute_ago)

    assert sweep() == 2

    dead.refresh_from_db(), alive.refresh_from_db(), importing.refresh_from_db()
    assert dead.status == "failed" and dead.finished_at is not None
    assert dead.errors == ["The worker stopped while checking the file: no heartbeat for over 45 s "
                           "(PAIRLOOP_HEARTBEAT_STALE_SECONDS); it was probably killed. Nothing was "
                           "imported; upload the file again."]
    assert importing.status == "failed" and "The pairs it had added stay" in importing.errors[0]
    assert not Path(dead.file_path).exists() and not Path(importing.file_path).exists()
    assert alive.status == "checking" and Path(alive.file_path).exists()
    page = client.get(dead.get_absolute_url()).content.decode()
    assert "The worker stopped while checking the file" in page and 'hx-trigger="every 1s"' not in page


def test_the_sweep_deletes_an_old_upload_no_job_holds(admin_user, settings):
    import os

    settings.PAIRLOOP = {**settings.PAIRLOOP, "IMPORT_QUEUED_SECONDS": 600}
    campaign = make_campaign("orphan")
    upload(client_for(admin_user), campaign, "pairs.jsonl", jsonl(ROWS))
    held = Path(ImportJob.objects.get(campaign=campaign).file_path)
    orphan, recent = uploads_dir() / "0123abcd.jsonl", uploads_dir() / "4567abcd.jsonl"
    for path in (orphan, recent, held):
        path.write_bytes(b"{}\n")
    old = time.time() - 601
    os.utime(orphan, (old, old))
    os.utime(held, (old, old))

    sweep()

    assert not orphan.exists() and recent.exists() and held.exists()
    recent.unlink()


@pytest.mark.django_db(transaction=True)
def test_a_long_import_keeps_its_heartbeat_fresh_and_a_failed_one_stops(admin_user, settings, monkeypatch):
    from annotate import importing

    settings.PAIRLOOP = {**settings.PAIRLOOP, "HEARTBEAT_STALE_SECONDS": 1}
    monkeypatch.setattr(importing, "COMMIT_PAIRS", 2)
    campaign = make_campaign("beat")
    upload(client_for(admin_user), campaign, "pairs.jsonl", jsonl(ROWS))
    job = ImportJob.objects.get(campaign=campaign)
    real_add_pairs, swept = importing.add_pairs, []

    def slow_add_pairs(*args, **kwargs):  # each batch takes longer than the heartbeat may stay silent
        time.sleep(1.6)
        swept.append(sweep())  # beat's sweep, mid-import: only the heartbeat thread keeps the job alive
        return real_add_pairs(*args, **kwargs)

    monkeypatch.setattr(importing, "add_pairs", slow_add_pairs)
    finished = run_import_job(job.pk)
    assert (finished.status, finished.pairs_created) == ("succeeded", 5) and swept == [0, 0, 0]

    # A job the sweep failed while it ran (its worker lost the database for a while) stops at its next
    # report and is never written again: it stays failed.
    upload(client_for(admin_user), campaign, "again.jsonl", jsonl([{**row, "prompt": row["prompt"] + "!"}
                                                                   for row in ROWS]))
    again = ImportJob.objects.filter(campaign=campaign).latest("pk")
    stopped = []

    def failed_meanwhile(*args, **kwargs):
        added = real_add_pairs(*args, **kwargs)
        ImportJob.objects.filter(pk=again.pk).update(status="failed", errors=["failed by the sweep"])
        stopped.append(True)
        return added

    monkeypatch.setattr(importing, "add_pairs", failed_meanwhile)
    run_import_job(again.pk)
    again.refresh_from_db()
    assert stopped == [True] and (again.status, again.errors, again.pairs_created) == (
        "failed", ["failed by the sweep"], 0)
    assert Pair.objects.filter(campaign=campaign).count() == 7  # the batch it had committed stays


@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_job_whose_real_worker_was_killed_mid_check_is_failed_by_the_sweep(admin_user, settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "HEARTBEAT_STALE_SECONDS": 1}
    campaign = make_campaign("killed")
    rows = [{"prompt": f"Q{i}", "response_a": "a" * 40, "response_b": "b" * 40} for i in range(400_000)]
    with Worker(queues="default", purge=True) as worker:
        upload(client_for(admin_user), campaign, "many.jsonl", jsonl(rows))
        job = ImportJob.objects.get(campaign=campaign)
        deadline = time.monotonic() + 60
        while not ImportJob.objects.filter(pk=job.pk, status="checking", rows_done__gt=0).exists():
            assert time.monotonic() < deadline, worker.log()[-4000:]
            time.sleep(0.05)
        worker.kill()  # SIGKILL mid-check: no clean-up, no final write
    job.refresh_from_db()
    assert job.status == "checking" and Path(job.file_path).exists()

    time.sleep(1.5)
    assert sweep() == 1

    job.refresh_from_db()
    assert job.status == "failed" and job.errors[0].startswith("The worker stopped while checking the file")
    assert not Path(job.file_path).exists() and not Pair.objects.filter(campaign=campaign).exists()
