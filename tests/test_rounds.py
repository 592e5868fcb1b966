"""Training rounds without training: the actions (launch refusals, one round at a time, cancel,
stale heartbeats, resume), a job's life in runner.execute with a stand-in job kind, the pages with
the personas, and the round's WebSocket. The chain is never sent to a broker here; the real
worker runs in tests/test_round_worker.py."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from annotate.actions import PairInput, add_pairs, claim_next_pair, submit_judgment
from annotate.models import Campaign, Judgment, Pair, Response, content_hash
from tests.conftest import PASSWORD, make_campaign, make_user
from training import actions, live, runner
from training.config import ConfigError, build_config
from training.engine.common import EngineError, StopWithoutSaving
from training.models import Job, Round

MIN = 5
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def small_minimum(settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": MIN, "HEARTBEAT_STALE_SECONDS": 30}


@pytest.fixture
def chains(monkeypatch):
    """The chains a test would have sent to Celery: lists of job ids, in order."""
    sent: list[list[int]] = []
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: sent.append(list(job_ids)))
    return sent


def judged_campaign(slug="shop", usable=MIN, members=()):
    campaign = make_campaign(slug=slug, members=members)
    add_pairs(campaign, [PairInput(f"Question {i}?", f"good {i}", f"bad {i}", preferred="a") for i in range(usable)],
              notify=False)
    return campaign


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def launch(campaign, user=None, force=False, **overrides):
    return actions.launch_round(campaign, user, build_config("tiny", overrides), force=force)


def claim(job: Job, task_id="task-1") -> Job:
    got, why = actions.claim_job(job.pk, task_id)
    assert got is not None, why
    return got


def succeed(job: Job, **round_fields) -> None:
    claim(job, f"task-{job.pk}")
    actions.finish_job(job.pk, f"task-{job.pk}", result={}, round_fields=round_fields)


# ---------------------------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_it_refuses_a_launch_below_the_minimum_of_usable_judgments(chains):
    campaign = judged_campaign(usable=MIN - 2)
    # Ties are judgments but not Bradley-Terry pairs: they do not count.
    judge = make_user("judge")
    for _ in range(3):
        assignment = claim_next_pair(campaign, judge).assignment
        if assignment is None:
            break
        submit_judgment(assignment_id=assignment.pk, labeler=judge, choice="tie")
    with pytest.raises(actions.RoundRefused, match=rf"{MIN - 2} usable .* at least {MIN} needed"):
        launch(campaign)
    assert not Round.objects.exists() and chains == []


@pytest.mark.django_db
def test_it_launches_a_round_whose_jobs_are_sent_as_one_chain_on_commit(chains, admin_user,
                                                                         django_capture_on_commit_callbacks):
    campaign = judged_campaign()
    with django_capture_on_commit_callbacks(execute=True):
        round_ = launch(campaign, admin_user, ppo_steps=7, pairing="sft")
    jobs = list(round_.jobs.order_by("order"))
    assert [j.kind for j in jobs] == ["export", "reward", "ppo", "sample", "enqueue", "evaluate"]
    assert all(j.status == Job.QUEUED for j in jobs)
    assert chains == [[j.pk for j in jobs]]
    assert round_.number == 1 and round_.launched_by == admin_user
    assert round_.config["ppo_steps"] == 7 and round_.config["pairing"] == "sft" and round_.config["preset"] == "tiny"
    assert round_.parent_policy.endswith("demo-policy-tiny") and round_.config["base_policy"] == round_.parent_policy
    assert round_.config["usable_judgments"] == MIN


@pytest.mark.django_db
def test_it_refuses_a_second_round_while_one_is_active_and_allows_it_after_a_failure(chains):
    campaign = judged_campaign()
    first = launch(campaign)
    with pytest.raises(actions.RoundRefused, match="Round 1 of this campaign is still queued"):
        launch(campaign)
    export = first.jobs.get(kind=Job.EXPORT)
    claim(export)
    actions.fail_job(export.pk, "task-1", error="boom")
    assert first.status() == Job.FAILED and not first.is_active()
    second = launch(campaign)
    assert second.number == 2
    # The failed round cannot be resumed while the second one is active.
    with pytest.raises(actions.RoundRefused, match="Round 2 .* never run at once"):
        actions.resume_job(export)


@pytest.mark.django_db(transaction=True)
def test_it_never_runs_two_rounds_of_one_campaign_even_when_launched_at_the_same_moment(chains):
    campaign = judged_campaign()
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def attempt():
        from django.db import connection

        try:
            barrier.wait()
            launch(campaign)
            outcomes.append("launched")
        except actions.RoundRefused:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["launched", "refused", "refused", "refused"]
    assert Round.objects.filter(campaign=campaign).count() == 1
    assert len(chains) == 1


@pytest.mark.django_db
def test_it_starts_round_two_from_round_one_s_policy(chains):
    campaign = judged_campaign()
    first = launch(campaign)
    for job in first.jobs.order_by("order"):
        succeed(job, **({"policy_checkpoint": "/ckpt/round-1/policy"} if job.kind == Job.PPO else {}))
    first.refresh_from_db()
    assert first.status() == Job.SUCCEEDED and first.finished_at is not None
    second = launch(campaign, force=True)
    assert second.number == 2
    assert second.parent_policy == "/ckpt/round-1/policy"
    assert second.config["base_policy"] == first.config["base_policy"]


@pytest.mark.django_db
def test_a_rounds_export_of_a_chat_campaign_keeps_the_turns_its_reward_model_reads(chains, settings, tmp_path):
    from training.engine.common import prompt_text
    from training.engine.data import load_pairs

    settings.PAIRLOOP = {**settings.PAIRLOOP, "EXPORTS_DIR": str(tmp_path)}
    campaign = make_campaign("chat")
    add_pairs(campaign, [PairInput([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": f"Question {i}?"}], f"good {i}", f"bad {i}",
                                   preferred="a") for i in range(MIN)], notify=False)
    export = launch(campaign).jobs.get(kind=Job.EXPORT)

    assert runner.execute(export.pk, "task-1")

    export.refresh_from_db()
    pairs = load_pairs(export.result["path"])
    turns = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}]
             for i in range(MIN)]
    assert sorted(pairs["prompt_turns"], key=str) == sorted(turns, key=str)
    # Flattened for a backbone without a chat template exactly as PPO flattens the same prompt to score it.
    assert sorted(pairs["prompt"]) == sorted(prompt_text(t) for t in turns)
    assert sorted(pairs["chosen"]) == [f"good {i}" for i in range(MIN)]


def succeeded_round_with_unjudged_pairs(campaign, unjudged=3) -> Round:
    """Round 1 of the campaign, every job succeeded, whose enqueue job left `unjudged` new pairs."""
    first = launch(campaign)
    for job in first.jobs.order_by("order"):
        succeed(job)
    added = add_pairs(campaign, [PairInput(f"New {i}?", f"new a{i}", f"new b{i}") for i in range(unjudged)],
                      round=first, notify=False)
    assert added.created == unjudged
    return first


@pytest.mark.django_db
def test_it_refuses_a_launch_with_nothing_new_on_every_door_unless_forced(chains, admin_user, monkeypatch):
    from tests.test_api import api_for

    campaign = judged_campaign()
    succeeded_round_with_unjudged_pairs(campaign)
    client = client_for(admin_user)

    page = client.get(f"/campaigns/{campaign.slug}/rounds/")
    assert b'id="launch-stale"' in page.content and b'id="launch-force"' in page.content
    assert (f"{MIN} usable judgments, 0 of them new since round 1 (0 by people, 0 simulated); 3 new pairs from round 1 "
            "are still unjudged.").encode() in page.content
    form = {k: v for k, v in build_config("tiny").as_dict().items() if k != "reward_model"}
    refused = client.post(f"/campaigns/{campaign.slug}/rounds/", form, follow=True)
    assert b"Nothing new to learn from" in refused.content and Round.objects.count() == 1
    with pytest.raises(CommandError, match=r"Nothing new to learn from.*--force"):
        call_command("launch_round", campaign.slug, "--preset", "tiny", stdout=io.StringIO())
    api = api_for(admin_user)
    report = api.get(f"/campaigns/{campaign.slug}/launch-report")
    assert report.status_code == 200
    assert {k: report.json()[k] for k in ("usable", "new", "since_round", "unjudged_new_pairs", "stale")} == {
        "usable": MIN, "new": 0, "since_round": 1, "unjudged_new_pairs": 3, "stale": True}
    refused = api.post(f"/campaigns/{campaign.slug}/rounds", {"preset": "tiny"})
    assert refused.status_code == 409 and "Nothing new to learn from" in refused.json()["detail"]
    assert Round.objects.count() == 1

    forced = api.post(f"/campaigns/{campaign.slug}/rounds", {"preset": "tiny", "force": True})
    assert forced.status_code == 201, forced.content
    assert forced.json()["launch"]["forced"] is True and forced.json()["launch"]["new"] == 0
    second = Round.objects.get(number=2)
    assert b"<strong>forced</strong>: too little was new" in client.get(f"/rounds/{second.pk}/").content


@pytest.mark.django_db
def test_it_confirms_a_stale_launch_on_the_page_and_the_command_with_force(chains, admin_user):
    campaign = judged_campaign()
    succeeded_round_with_unjudged_pairs(campaign)
    form = {k: v for k, v in build_config("tiny").as_dict().items() if k != "reward_model"}
    response = client_for(admin_user).post(f"/campaigns/{campaign.slug}/rounds/", {**form, "force": "1"})
    assert response.status_code == 302 and Round.objects.get(number=2).config["launch"]["forced"] is True
    other = judged_campaign("other")
    succeeded_round_with_unjudged_pairs(other)
    call_command("launch_round", other.slug, "--preset", "tiny", "--force", stdout=io.StringIO())
    assert Round.objects.get(campaign=other, number=2).config["launch"]["forced"] is True


@pytest.mark.django_db
def test_it_launches_unforced_after_new_judgments_and_records_who_made_them(chains, admin_user, labeler):
    # 40 judgments before round 1, which sends 10 pairs back: the share is of those 10 (3 needed), so 3 new
    # judgments launch unforced though they are under a tenth of all 43.
    campaign = judged_campaign(usable=40, members=[labeler])
    campaign.min_new_share = 0.3
    campaign.save(update_fields=["min_new_share"])
    first = succeeded_round_with_unjudged_pairs(campaign, unjudged=10)
    for _ in range(2):
        claim = claim_next_pair(campaign, labeler)
        assert Pair.objects.get(pk=claim.assignment.pair_id).round_id == first.pk
        submit_judgment(assignment_id=claim.assignment.pk, labeler=labeler, choice="a", strength=2)
    freshness = actions.launch_freshness(campaign)
    assert (freshness.usable, freshness.new_people, freshness.new_pairs, freshness.unjudged_new_pairs,
            freshness.needed, freshness.stale) == (42, 2, 10, 8, 3, True)
    assert "at least 3 new: 30% of the 10 pairs round 1 sent back" in freshness.refusal()
    claim = claim_next_pair(campaign, labeler)
    submit_judgment(assignment_id=claim.assignment.pk, labeler=labeler, choice="b", strength=2)
    client = client_for(admin_user)
    page = client.get(f"/campaigns/{campaign.slug}/rounds/")
    assert b'id="launch-stale"' not in page.content
    assert b"43 usable judgments, 3 of them new since round 1 (3 by people, 0 simulated)" in page.content

    out = io.StringIO()
    call_command("launch_round", campaign.slug, "--preset", "tiny", stdout=out)
    assert "3 of them new since round 1" in out.getvalue()
    second = Round.objects.get(number=2)
    assert second.config["launch"] == {**second.config["launch"], "new": 3, "new_people": 3, "new_simulated": 0,
                                       "since_round": 1, "unjudged_new_pairs": 7, "forced": False}
    facts = client.get(f"/rounds/{second.pk}/").content
    assert b"Launched with 3 usable judgments new since round 1 (3 by people, 0 simulated)" in facts
    assert b'<td class="round-new-labels">3</td>' in client.get(f"/campaigns/{campaign.slug}/rounds/").content


@pytest.mark.django_db
def test_a_rounds_chat_prompts_render_and_sample_alike_on_a_later_day(chains, settings, monkeypatch, tmp_path):
    """Llama 3's chat template writes today's date into every prompt: a round pins the day it was launched, so
    its sample job renders, samples and scores the same text when run again on another day."""
    import datetime as real

    import transformers.utils.chat_template_utils as templating

    from demo.tiny_models import build_policy, build_reward
    from training.engine.common import load_tokenizer, render_prompt

    settings.PAIRLOOP = {**settings.PAIRLOOP, "HEARTBEAT_STALE_SECONDS": 3600}  # no heartbeat thread writes here
    policy, reward = build_policy("llama", tmp_path / "policy"), build_reward("llama", tmp_path / "reward")
    campaign = make_campaign(slug="llama", policy_model=str(policy), system_prompt="Be brief.", max_new_tokens=6)
    add_pairs(campaign, [PairInput([{"role": "user", "content": f"What is {i} plus 3?"}], f"good {i}", f"bad {i}",
                                   preferred="a") for i in range(MIN)], notify=False)
    round_ = actions.launch_round(campaign, None, actions.launch_config(campaign, "tiny"))
    jobs = list(round_.jobs.order_by("order"))
    for job in jobs[:3]:
        succeed(job, reward_checkpoint=str(reward), policy_checkpoint=str(policy))

    def on(day: int):
        class Clock(real.datetime):
            @classmethod
            def now(cls, tz=None):
                return real.datetime(2031, 1, day, 12, 0, tzinfo=tz)
        monkeypatch.setattr(templating, "datetime", Clock)

    def sample_job_on(day: int) -> dict:
        on(day)
        Job.objects.filter(pk=jobs[3].pk).update(status=Job.QUEUED)
        assert runner.execute(jobs[3].pk, f"task-day-{day}")
        return Job.objects.get(pk=jobs[3].pk).result

    first, later = sample_job_on(1), sample_job_on(2)
    pinned = round_.config["chat_date"]
    assert pinned == timezone.now().strftime("%d %b %Y")
    assert f"Today Date: {pinned}\n" in first["rendered_prompt"]
    assert first["rendered_prompt"] == later["rendered_prompt"]
    assert (first["samples"], first["scores"]) == (later["samples"], later["scores"])
    # The moved clock is what an unpinned rendering writes: the pin is what kept the round's text.
    tokenizer = load_tokenizer(str(policy))
    assert "Today Date: 02 Jan 2031\n" in render_prompt(tokenizer, "What is 1 plus 3?")


@pytest.mark.django_db
def test_it_cancels_a_queued_job_at_once(chains):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)
    actions.cancel_job(job)
    job.refresh_from_db()
    assert job.status == Job.CANCELLED and job.finished_at is not None
    # Its task, arriving later, does not run it, and the chain stops there.
    assert runner.execute(job.pk, "late-task") is False
    assert round_.status() == Job.CANCELLED
    # Only the round's current job can be cancelled: a later one waits for it.
    with pytest.raises(actions.RoundRefused, match="cancel the round's current job"):
        actions.cancel_job(round_.jobs.get(kind=Job.ENQUEUE))


@pytest.mark.django_db
def test_it_cancels_a_running_job_at_its_next_step_boundary(chains, monkeypatch):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)
    seen_steps = []

    def stand_in(job, progress):
        for step in range(1, 6):
            if step == 3:
                actions.cancel_job(job)  # an admin presses Cancel while step 3 runs
            progress({"stage": "test", "step": step, "total": 5, "metrics": {"test/loss": 1.0 / step}})
            seen_steps.append(step)
        return runner.Outcome({})

    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, stand_in)
    assert runner.execute(job.pk, "task-1") is False
    job.refresh_from_db()
    assert job.status == Job.CANCELLED
    assert seen_steps == [1, 2]  # step 3's progress report raised: the engine stops there
    assert job.step == 3 and "Cancelled at step 3" in job.log
    assert [p["step"] for p in job.metrics] == [1, 2, 3]
    assert round_.jobs.get(kind=Job.REWARD).status == Job.QUEUED


@pytest.mark.django_db
def test_it_records_a_failed_job_with_its_message_and_traceback_and_stops_the_chain(chains, monkeypatch):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)

    def broken(job, progress):
        progress({"stage": "test", "step": 1, "total": 2, "metrics": {"test/loss": 0.5}})
        raise EngineError("pairs file 'x.jsonl' has no 'chosen' column")

    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, broken)
    assert runner.execute(job.pk, "task-1") is False
    job.refresh_from_db()
    assert job.status == Job.FAILED
    assert job.error_summary() == "pairs file 'x.jsonl' has no 'chosen' column"
    assert "Traceback (most recent call last)" in job.error
    assert job.metrics == [{"step": 1, "test/loss": 0.5}]
    # The next job's task (if it were sent anyway) does not run after a failed one.
    reward = round_.jobs.get(kind=Job.REWARD)
    assert runner.execute(reward.pk, "task-2") is False
    reward.refresh_from_db()
    assert reward.status == Job.QUEUED


@pytest.mark.django_db
def test_it_runs_a_job_once_when_its_message_arrives_twice(chains, monkeypatch):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)
    runs = []
    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, lambda job, progress: runs.append(job.pk) or runner.Outcome({"ok": 1}))
    assert runner.execute(job.pk, "task-1") is True
    assert runner.execute(job.pk, "task-1-redelivered") is True  # already succeeded: the chain may go on
    assert runs == [job.pk]
    job.refresh_from_db()
    assert (job.status, job.result, job.attempts, job.celery_task_id) == (Job.SUCCEEDED, {"ok": 1}, 1, "task-1")


@pytest.mark.django_db
def test_it_marks_a_job_whose_heartbeat_went_stale_failed_with_a_clear_reason(chains):
    round_ = launch(judged_campaign())
    stale, fresh = round_.jobs.get(kind=Job.EXPORT), round_.jobs.get(kind=Job.REWARD)
    claim(stale, "dead-worker")
    Job.objects.filter(pk=stale.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=31))
    assert actions.fail_stale_jobs() == [stale]
    stale.refresh_from_db()
    assert stale.status == Job.FAILED
    assert "no heartbeat for 31 s" in stale.error and "Resume continues from the last checkpoint" in stale.error
    # The dead worker, should it wake up, can no longer write to the job.
    with pytest.raises(actions.JobLost):
        actions.record_progress(stale.pk, "dead-worker", step=1, total=2, metrics=[], log_text="")
    assert actions.heartbeat(stale.pk, "dead-worker") is False
    # A job that beats is left alone.
    Job.objects.filter(pk=stale.pk).update(status=Job.SUCCEEDED)
    claim(fresh, "live-worker")
    assert actions.fail_stale_jobs() == []


@pytest.mark.django_db
def test_it_stops_a_worker_that_lost_its_job_without_writing_and_gives_each_attempt_its_own_directory(
        chains, monkeypatch):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)
    seen = {}

    def taken_over_while_running(job, progress):
        seen["first_dir"] = actions.attempt_dir(job)
        progress({"stage": "test", "step": 1, "total": 3, "metrics": {"test/loss": 1.0}})
        # Meanwhile its heartbeat looks stale (clock skew, a failover): beat fails it, an admin resumes it,
        # and another worker claims it.
        Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=60))
        assert actions.fail_stale_jobs()
        actions.resume_job(job)
        seen["second"] = claim(Job.objects.get(pk=job.pk), "second-worker")
        try:
            # The engine is about to write its resumable checkpoint: the report must stop it first.
            progress({"stage": "test", "step": 2, "total": 3, "metrics": {}, "checkpoint": True})
        except StopWithoutSaving as exc:
            seen["stopped"] = exc
            raise
        seen["wrote_checkpoint"] = True
        return runner.Outcome({"from": "the first worker"})

    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, taken_over_while_running)
    assert runner.execute(job.pk, "first-worker") is False
    assert isinstance(seen.get("stopped"), actions.JobLost) and "wrote_checkpoint" not in seen
    job.refresh_from_db()
    # The row is the second attempt's, untouched by the first worker's failure path.
    assert (job.status, job.celery_task_id, job.attempts, job.result) == (Job.RUNNING, "second-worker", 2, {})
    assert job.step == 1 and "Failed" not in job.log.split("Resumed")[-1]  # its step 2 was never written
    assert actions.attempt_dir(seen["second"]) != seen["first_dir"]
    assert seen["first_dir"].name == "export-1" and actions.attempt_dir(job).name == "export-2"
    # A heartbeat that finds the job gone stops the next report before it writes anything.
    assert runner.Heartbeat(job.pk, "second-worker", 1.0).beat() is True  # the owner's beats go on
    progress = runner.Progress(job, "first-worker")
    assert runner.Heartbeat(job.pk, "first-worker", 1.0, progress.lost).beat() is False
    assert progress.lost.is_set()
    with pytest.raises(actions.JobLost):
        progress({"stage": "test", "step": 3, "total": 3, "metrics": {}, "log": "late"})
    assert Job.objects.get(pk=job.pk).step == 1


@pytest.mark.django_db
def test_it_names_checkpoint_directories_by_ids_so_a_campaign_taking_an_old_slug_never_reuses_them(chains):
    first = launch(judged_campaign(slug="again"))
    first_dir = actions.round_dir(first)
    # Its judgments keep the campaign from being deleted; renamed, its slug is free for a new campaign.
    Campaign.objects.filter(pk=first.campaign_id).update(slug="again-before")
    second = launch(judged_campaign(slug="again"))
    assert second.number == first.number == 1
    assert actions.round_dir(second) != first_dir
    assert actions.round_dir(second).name == f"round-{second.pk}"


@pytest.mark.django_db(transaction=True)
def test_it_fails_the_round_with_the_reason_when_the_job_queue_cannot_be_reached(monkeypatch, settings):
    from pairloop.celery import app

    # Redis is down: nothing listens where the broker should be. The chain is published for real.
    monkeypatch.setitem(app.conf, "broker_url", "redis://127.0.0.1:9/0")
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    campaign = judged_campaign()
    started = time.monotonic()
    round_ = launch(campaign)
    assert time.monotonic() - started < 30  # publishing gives up after a few retries, never hangs
    export = round_.jobs.get(kind=Job.EXPORT)
    assert export.status == Job.FAILED and round_.status() == Job.FAILED
    assert export.error.startswith("Could not reach the job queue (Redis): ")
    assert "press Resume once the queue is back" in export.error and "Connection refused" in export.error
    assert actions.active_round(campaign) is None  # it blocks no launch
    # Resuming while the queue is still down fails the same way, with the reason.
    actions.resume_job(export)
    export.refresh_from_db()
    assert export.status == Job.FAILED and "Could not reach the job queue" in export.error


@pytest.mark.django_db
def test_it_flags_a_job_no_worker_claims_and_shows_the_warning_on_the_round_page(chains, settings, reviewer):
    settings.JOB_UNCLAIMED_WARN_SECONDS = 60
    round_ = launch(judged_campaign())
    export, reward = round_.jobs.get(kind=Job.EXPORT), round_.jobs.get(kind=Job.REWARD)
    assert actions.flag_unclaimed_jobs() == []  # just launched
    assert reward.queued_at is None  # it waits on the export: no worker could take it yet
    Job.objects.filter(pk=export.pk).update(queued_at=timezone.now() - timedelta(minutes=11))
    assert actions.flag_unclaimed_jobs() == [export]
    export.refresh_from_db()
    assert export.status == Job.QUEUED  # flagged, not failed: a worker may still come
    assert export.warning.startswith("Queued for 11 min and no worker has taken it")
    assert "celery -A pairloop worker -Q default" in export.warning
    page = client_for(reviewer).get(f"/rounds/{round_.pk}/").content.decode()
    assert f'id="job-{export.pk}-warning"' in page and "no worker has taken it" in page
    assert actions.flag_unclaimed_jobs() == []  # once
    claim(export)
    export.refresh_from_db()
    assert export.warning == ""
    # The job after it becomes ready when it succeeds, and is timed from then.
    actions.finish_job(export.pk, "task-1", result={})
    reward.refresh_from_db()
    assert reward.queued_at is not None and actions.flag_unclaimed_jobs() == []


@pytest.mark.django_db
def test_it_reads_the_round_page_without_writing(chains, reviewer):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)
    claim(job)
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=120))
    page = client_for(reviewer).get(f"/rounds/{round_.pk}/")
    assert page.status_code == 200
    job.refresh_from_db()
    assert job.status == Job.RUNNING  # beat marks it failed, not a reviewer's GET


@pytest.mark.django_db
def test_it_gives_each_job_kind_its_time_limits_and_fails_a_job_past_its_soft_limit(
        chains, settings, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    from training import dispatch

    settings.JOB_SOFT_TIME_LIMITS = {**settings.JOB_SOFT_TIME_LIMITS, "ppo": 7200, "export": 60}
    settings.JOB_TIME_LIMIT_GRACE = 30
    options = dispatch.signature_for(Job(pk=1, kind=Job.PPO)).options
    assert (options["soft_time_limit"], options["time_limit"]) == (7200, 7230)
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)

    def too_long(job, progress):
        progress({"stage": "test", "step": 1, "total": 9, "metrics": {"test/loss": 1.0}})
        raise SoftTimeLimitExceeded()

    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, too_long)
    assert runner.execute(job.pk, "task-1") is False
    job.refresh_from_db()
    assert job.status == Job.FAILED
    assert job.error_summary() == (
        "The job ran past its time limit of 60 s (PAIRLOOP_TIME_LIMIT_EXPORT) and was stopped at step 1. "
        "Resume continues from its last checkpoint; raise the limit for longer jobs.")


@pytest.mark.django_db
def test_it_resumes_a_failed_job_and_then_the_rest_of_its_chain(chains, django_capture_on_commit_callbacks):
    round_ = launch(judged_campaign())
    jobs = {job.kind: job for job in round_.jobs.all()}
    succeed(jobs[Job.EXPORT])
    succeed(jobs[Job.REWARD])
    claim(jobs[Job.PPO], "killed")
    Job.objects.filter(pk=jobs[Job.PPO].pk).update(step=4, total_steps=10)
    actions.fail_job(jobs[Job.PPO].pk, "killed", error="worker lost")
    with pytest.raises(actions.RoundRefused, match="Only a failed or cancelled job"):
        actions.resume_job(jobs[Job.REWARD])
    with django_capture_on_commit_callbacks(execute=True):
        actions.resume_job(jobs[Job.PPO])
    ppo = Job.objects.get(pk=jobs[Job.PPO].pk)
    assert ppo.status == Job.QUEUED and "Resumed" in ppo.log
    assert chains[-1] == [jobs[Job.PPO].pk, jobs[Job.SAMPLE].pk, jobs[Job.ENQUEUE].pk, jobs[Job.EVALUATE].pk]
    assert round_.is_active()
    # The resumed attempt keeps the progress so far: the engine resumes from its checkpoint.
    resumed = claim(ppo, "fresh-worker")
    assert (resumed.attempts, resumed.step, resumed.error) == (2, 4, "")


@pytest.mark.django_db
def test_it_times_a_resumed_job_s_eta_from_the_step_it_resumed_at(chains):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)
    claim(job, "first")
    actions.record_progress(job.pk, "first", step=6, total=10, metrics=[], log_text="")
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(seconds=60))
    job.refresh_from_db()
    assert job.eta_seconds() == pytest.approx(40, abs=2)  # 6 steps in 60 s, 4 to go
    actions.fail_job(job.pk, "first", error="worker lost")
    actions.resume_job(job)
    # The second run restores the checkpoint of step 6 and makes one step in 10 s: its 3 steps to go
    # take 30 s, not the 4 s that "7 steps in 10 s" would promise.
    resumed = claim(Job.objects.get(pk=job.pk), "second")
    assert resumed.eta_seconds() is None  # no step made yet in this run: no guess
    for step in (6, 7):
        actions.record_progress(job.pk, "second", step=step, total=10, metrics=[], log_text="")
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(seconds=10))
    job.refresh_from_db()
    assert job.start_step == 6
    assert job.eta_seconds() == pytest.approx(30, abs=2)


@pytest.mark.django_db(transaction=True)
def test_it_exits_non_zero_when_a_job_of_a_followed_round_fails(monkeypatch):
    campaign = judged_campaign()

    def broken(job, progress):
        raise EngineError("the reward backbone 'nope' does not exist")

    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, broken)
    # A stand-in for the broker and worker: run the chain right here, as a worker would.
    monkeypatch.setattr("training.dispatch.start_chain",
                        lambda ids: all(runner.execute(pk, f"task-{pk}") for pk in ids))
    with pytest.raises(CommandError, match="export pairs job failed: the reward backbone 'nope' does not exist"):
        call_command("launch_round", campaign.slug, "--preset", "tiny", "--wait", "--poll", "0.1",
                     stdout=io.StringIO(), stderr=io.StringIO())
    with pytest.raises(CommandError, match="unknown round settings: stepz"):
        call_command("launch_round", campaign.slug, "--set", "stepz=3", stdout=io.StringIO())


def every_chain() -> list[tuple[str, ...]]:
    """The chain of each round type, DPO's with and without online pairs, and one with its SFT job on AI revisions."""
    from training.config import ALGORITHMS

    return [actions.round_chain(build_config("tiny", {"algorithm": algorithm, "dpo_online": online}))
            for algorithm in ALGORITHMS for online in ((False, True) if algorithm == "dpo" else (False,))] + [
        actions.round_chain(build_config("tiny", {"cai_revisions": True}))]


def test_it_sends_training_jobs_to_the_training_queue_and_light_ones_to_default():
    from training import dispatch

    kinds = {kind for chain in every_chain() for kind in chain}
    queues = {kind: dispatch.signature_for(Job(pk=1, kind=kind)).options["queue"] for kind in kinds}
    assert queues == {"export": "default", "sft": "training", "reward": "training", "ppo": "training",
                      "dpo": "training", "grpo": "training", "sample": "training", "enqueue": "default", "evaluate": "training"}


@pytest.mark.django_db
def test_the_round_page_shows_each_job_on_the_queue_it_is_sent_to(chains, reviewer):
    round_ = launch(judged_campaign())
    page = client_for(reviewer).get(f"/rounds/{round_.pk}/").content.decode()
    shown = dict(re.findall(r'data-kind="(\w+)">\s*<h2>[^<]*<span class="muted queue">(\w+) queue</span>', page))
    assert shown == {"export": "default", "reward": "training", "ppo": "training", "sample": "training",
                     "enqueue": "default", "evaluate": "training"}


def test_each_job_is_sent_by_the_name_of_the_task_that_runs_its_kind():
    from pairloop.celery import app
    from training import dispatch, tasks

    for kind in {kind for chain in every_chain() for kind in chain}:
        name = dispatch.signature_for(Job(pk=1, kind=kind)).task
        assert name in app.tasks and name == tasks.TASKS[kind].name, (kind, name)


def test_it_validates_round_settings_by_name():
    assert build_config("tiny", {"ppo_steps": "4", "sample_temperature": "0.9"}).ppo_steps == 4
    with pytest.raises(ValueError, match="unknown round settings: ppo_stepz"):
        build_config("demo", {"ppo_stepz": "4"})
    with pytest.raises(ValueError, match="ppo_batch_size must be a multiple of ppo_mini_batch_size"):
        build_config("demo", {"ppo_batch_size": "10", "ppo_mini_batch_size": "4"})
    with pytest.raises(ValueError, match="ppo_batch_size must be a multiple of ppo_samples_per_prompt"):
        build_config("demo", {"ppo_samples_per_prompt": "3"})
    with pytest.raises(ValueError, match="pairing must be one of"):
        build_config("demo", {"pairing": "random"})
    # What a DPO or GRPO stage would refuse at its start is refused at launch, before the hours before it.
    with pytest.raises(ValueError, match="grpo_batch_size must be a multiple of grpo_samples_per_prompt"):
        build_config("demo", {"grpo_samples_per_prompt": "6"})
    with pytest.raises(ValueError, match=r"dpo_label_smoothing \(conservative DPO\) applies to the sigmoid loss only"):
        build_config("demo", {"dpo_loss_type": "ipo", "dpo_label_smoothing": "0.1"})
    assert build_config("demo", {"dpo_label_smoothing": "0.1"}).dpo_label_smoothing == 0.1
    # Every numeric setting has a range, checked at launch and named: a priority the database cannot
    # store used to pass and fail the enqueue job after the training.
    for name, value, message in [
        ("priority", 2**31, "priority must be at least -2147483648 and at most 2147483647"),
        ("ppo_steps", 0, "ppo_steps must be at least 1"),
        ("ppo_lr", 0, "ppo_lr must be above 0"),
        ("sample_temperature", "inf", "sample_temperature='inf' is not a finite number"),
        ("ppo_save_every", 10**9, "ppo_save_every must be at least 0 and at most 1000000"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as refused:
            build_config("demo", {name: value})
        assert list(refused.value.problems) == [name]


# ---------------------------------------------------------------------------------------------
# Pages, with the personas
# ---------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_it_refuses_round_pages_and_launching_to_labelers_and_outsiders(chains, labeler, outsider):
    campaign = judged_campaign(members=[labeler])
    round_ = launch(campaign)
    job = round_.jobs.get(kind=Job.EXPORT)
    for user in (labeler, outsider):
        client = client_for(user)
        assert client.get(f"/campaigns/{campaign.slug}/rounds/").status_code == 404
        assert client.get(f"/rounds/{round_.pk}/").status_code == 404
        assert client.post(f"/campaigns/{campaign.slug}/rounds/", {"preset": "tiny"}).status_code == 404
        assert client.post(f"/rounds/{round_.pk}/jobs/{job.pk}/cancel/").status_code == 404
    job.refresh_from_db()
    assert Round.objects.count() == 1 and job.status == Job.QUEUED


@pytest.mark.django_db
def test_it_lets_a_reviewer_read_rounds_but_not_launch_or_cancel(chains, reviewer):
    campaign = judged_campaign()
    round_ = launch(campaign)
    job = round_.jobs.get(kind=Job.EXPORT)
    client = client_for(reviewer)
    page = client.get(f"/rounds/{round_.pk}/")
    assert page.status_code == 200
    assert f'id="job-{job.pk}"'.encode() in page.content and b"job_cancel" not in page.content
    assert f'id="job-{job.pk}-cancel"'.encode() not in page.content
    rounds_page = client.get(f"/campaigns/{campaign.slug}/rounds/")
    assert rounds_page.status_code == 200 and b'id="launch-round"' not in rounds_page.content
    assert client.post(f"/campaigns/{campaign.slug}/rounds/", {"preset": "tiny"}).status_code == 404
    assert client.post(f"/rounds/{round_.pk}/jobs/{job.pk}/cancel/").status_code == 404
    assert Round.objects.count() == 1


@pytest.mark.django_db
def test_it_shows_an_admin_the_usable_judgments_and_refuses_a_launch_below_the_minimum(chains, admin_user):
    campaign = judged_campaign(usable=2)
    client = client_for(admin_user)
    page = client.get(f"/campaigns/{campaign.slug}/rounds/?preset=tiny")
    assert page.status_code == 200
    text = page.content.decode()
    assert 'id="launch-round"' in text and "<strong>2</strong> usable judgments" in text
    assert "label 3 more pairs before launching" in text
    form = {"preset": "tiny", **{k: v for k, v in build_config("tiny").as_dict().items() if k != "reward_model"}}
    refused = client.post(f"/campaigns/{campaign.slug}/rounds/", form, follow=True)
    assert "Not enough judgments to train on: 2 usable" in refused.content.decode()
    assert not Round.objects.exists()


@pytest.mark.django_db
def test_it_launches_a_round_from_the_form(chains, admin_user, django_capture_on_commit_callbacks):
    campaign = judged_campaign()
    client = client_for(admin_user)
    form = {**{k: v for k, v in build_config("tiny").as_dict().items() if k != "reward_model"}, "ppo_steps": 5}
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/campaigns/{campaign.slug}/rounds/", form)
    round_ = Round.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/rounds/{round_.pk}/"
    assert round_.config["ppo_steps"] == 5 and round_.launched_by == admin_user and len(chains) == 1
    page = client.get(response["Location"])
    for job in round_.jobs.all():
        for element in (f'id="job-{job.pk}"', f'id="job-{job.pk}-progress"', f'id="job-{job.pk}-charts"'):
            assert element.encode() in page.content
        # Cancel stops the round at its current job: the only one with the button.
        assert (f'id="job-{job.pk}-cancel"'.encode() in page.content) == (job.kind == Job.EXPORT)
    assert b"plotly/plotly.min.js" in page.content and f'ws-connect="/ws/rounds/{round_.pk}/"'.encode() in page.content
    bad = client.post(f"/campaigns/{campaign.slug}/rounds/", {**form, "ppo_batch_size": 10, "ppo_mini_batch_size": 4})
    assert b"ppo_batch_size must be a multiple" in bad.content
    # An out-of-range value is refused on its own field, and nothing is launched.
    for field, value, message in [("priority", 2**31, "less than or equal to 2147483647"),
                                  ("ppo_lr", 0, "ppo_lr must be above 0 and at most 1, got 0.0")]:
        bad = client.post(f"/campaigns/{campaign.slug}/rounds/", {**form, field: value})
        assert bad.status_code == 200 and Round.objects.count() == 1
        assert list(bad.context["form"].errors) == [field] and message in bad.context["form"].errors[field][0]


def kinds(round_: Round) -> list[str]:
    return [job.kind for job in round_.jobs.order_by("order")]


@pytest.mark.django_db
def test_each_round_type_launches_its_own_chain_and_the_next_round_starts_from_any_type_s_policy(chains):
    campaign = judged_campaign()
    first = launch(campaign, algorithm="dpo")
    assert first.algorithm == "dpo" and kinds(first) == ["export", "dpo", "sample", "enqueue", "evaluate"]
    for job in first.jobs.order_by("order"):
        succeed(job, **({"policy_checkpoint": "/ckpt/round-1/policy"} if job.kind == Job.DPO else {}))
    second = launch(campaign, force=True, algorithm="grpo")
    assert kinds(second) == ["export", "reward", "grpo", "sample", "enqueue", "evaluate"]
    assert second.parent_policy == "/ckpt/round-1/policy" and second.config["base_policy"] == first.config["base_policy"]
    for job in second.jobs.order_by("order"):
        succeed(job, **({"policy_checkpoint": "/ckpt/round-2/policy"} if job.kind == Job.GRPO else {}))
    third = launch(campaign, force=True)
    assert third.algorithm == "ppo" and kinds(third) == ["export", "reward", "ppo", "sample", "enqueue", "evaluate"]
    assert third.parent_policy == "/ckpt/round-2/policy"


@pytest.mark.django_db
def test_an_online_dpo_round_trains_a_reward_model_before_dpo_and_hands_it_to_the_dpo_stage(chains, monkeypatch):
    campaign = judged_campaign()
    offline = launch(campaign, algorithm="dpo")
    assert kinds(offline) == ["export", "dpo", "sample", "enqueue", "evaluate"]
    offline.jobs.update(status=Job.CANCELLED)
    online = launch(campaign, force=True, algorithm="dpo", dpo_online=True, dpo_online_samples=4)
    assert kinds(online) == ["export", "reward", "dpo", "sample", "enqueue", "evaluate"]
    export, reward, dpo_job = online.jobs.order_by("order")[:3]
    succeed(export, dataset_path="/exports/round-2.jsonl")
    succeed(reward, reward_checkpoint="/ckpt/round-2/reward")
    handed = []
    monkeypatch.setattr(runner, "train", lambda stage, args, progress: handed.append(args) or {})
    monkeypatch.setattr(runner, "ensure_policy", lambda path, preset: path)
    assert runner.execute(dpo_job.pk, "task-dpo")
    (args,) = handed
    assert args.reward_models == ["/ckpt/round-2/reward"] and args.online_samples == 4
    assert sorted(args.prompts) == sorted(runner.ppo_prompts(campaign)) and args.prompts


@pytest.mark.django_db
def test_the_launch_form_shows_an_algorithm_s_sections_only_for_it_and_launches_what_it_showed(
        chains, admin_user, django_capture_on_commit_callbacks):
    from training.config import PRESETS

    campaign = judged_campaign()
    client = client_for(admin_user)
    url = f"/campaigns/{campaign.slug}/rounds/"
    response = client.get(f"{url}?preset=tiny")
    page = response.content.decode()
    shown_for = {title: tag for tag, title in
                 re.findall(r'<fieldset(?: data-algorithms="([^"]*)")?><legend>(.*?)</legend>', page)}
    assert shown_for == {"Round type": "", "Models and prompting": "", "Reward model": "ppo grpo dpo_online",
                         "Safety": "ppo grpo",
                         "PPO": "ppo", "DPO": "dpo", "GRPO": "grpo", "Sampling": "", "New pairs": "", "Evaluation": "",
                         "Memory": ""}
    assert '<p data-algorithms="ppo grpo dpo_online"><label for="id_reward_model">Backbone</label>' in page
    assert '<p><label for="id_reference">' in page  # DPO's "sft" reference reads it too
    for algorithm in ("ppo", "dpo", "grpo"):  # hidden by CSS alone, from the algorithm chosen
        assert (f'#launch-form:has(select[name="algorithm"] option[value="{algorithm}"]:checked) '
                f'[data-algorithms]:not([data-algorithms~="{algorithm}"]) {{ display: none; }}') in page
    assert '<option value="ppo" selected>' in page

    # The browser posts the hidden fields too: a DPO round takes its own and launches with the hidden ones unchanged.
    posted = {field.name: field.value() for field in response.context["form"]
              if field.value() is not None and field.value() is not False}
    with django_capture_on_commit_callbacks(execute=True):
        launched = client.post(url, {**posted, "algorithm": "dpo", "dpo_beta": 0.3, "ppo_steps": 7})
    round_ = Round.objects.get()
    assert launched.status_code == 302 and round_.algorithm == "dpo" and round_.config["dpo_beta"] == 0.3
    assert round_.config["ppo_steps"] == PRESETS["tiny"].ppo_steps
    assert kinds(round_) == ["export", "dpo", "sample", "enqueue", "evaluate"]
    listing = client.get(url).content.decode()
    assert f'<tr id="round-row-{round_.pk}"><td><a href="/rounds/{round_.pk}/">Round 1</a></td>' in listing
    assert '<td class="round-algorithm">dpo</td>' in listing
    assert '<strong id="round-algorithm">DPO</strong>' in client.get(f"/rounds/{round_.pk}/").content.decode()


@pytest.mark.django_db
def test_the_command_and_the_api_launch_any_round_type_and_refuse_another_type_s_settings(chains, admin_user):
    from api.actions import create_token

    campaign = judged_campaign()
    call_command("launch_round", campaign.slug, "--preset", "tiny", "--set", "algorithm=dpo", "--set", "dpo_beta=0.2",
                 stdout=io.StringIO())
    round_ = Round.objects.get()
    assert round_.algorithm == "dpo" and round_.config["dpo_beta"] == 0.2
    assert kinds(round_) == ["export", "dpo", "sample", "enqueue", "evaluate"]
    actions.cancel_job(round_.jobs.get(kind=Job.EXPORT))  # so the next launch may go
    with pytest.raises(CommandError, match=r"ppo_steps does not apply to a dpo round \(it is for ppo\)"):
        call_command("launch_round", campaign.slug, "--preset", "tiny", "--set", "algorithm=dpo",
                     "--set", "ppo_steps=3", stdout=io.StringIO())

    token = create_token(admin_user, "launcher", ["admin"])[1]

    def post(settings):
        return Client().post(f"/api/v1/campaigns/{campaign.slug}/rounds", {"preset": "tiny", "settings": settings},
                             content_type="application/json", headers={"Authorization": f"Bearer {token}"})

    answer = post({"algorithm": "grpo", "grpo_steps": 2})
    assert answer.status_code == 201, answer.content
    body = answer.json()
    assert body["algorithm"] == "grpo" and body["config"]["grpo_steps"] == 2
    assert [job["kind"] for job in body["jobs"]] == ["export", "reward", "grpo", "sample", "enqueue", "evaluate"]
    actions.cancel_job(Round.objects.get(pk=body["id"]).jobs.get(kind=Job.EXPORT))
    refused = post({"algorithm": "dpo", "reward_lr": 0.1})
    assert refused.status_code == 400 and list(refused.json()["errors"]) == ["reward_lr"]
    assert post({"algorithm": "sft"}).json()["errors"] == {"algorithm": "algorithm must be one of ppo, dpo, grpo"}
    assert Round.objects.count() == 2


@pytest.mark.django_db
def test_it_shows_the_launch_form_in_sections_of_labelled_fields_with_their_ranges_and_help(chains, admin_user):
    from training.config import field_help

    page = client_for(admin_user).get(f"/campaigns/{judged_campaign().slug}/rounds/?preset=tiny").content.decode()
    sections = re.findall(r'<fieldset(?: data-algorithms="[^"]*")?><legend>(.*?)</legend>(.*?)</fieldset>', page, re.S)
    labels = {title: re.findall(r'<label for="id_\w+">(.*?)</label>', body) for title, body in sections}
    assert labels == {
        "Round type": ["Algorithm", "Judgments", "SFT on accepted AI revisions first", "Revisions accepted by"],
        "Models and prompting": ["Backbone", "Reference policy", "System prompt", "Stop strings"],
        "Reward model": ["Epochs", "Learning rate", "Warm-up share", "Weight per older round", "Batch size",
                         "Max length"],
        "Safety": ["Reward combination", "Safety weight", "Safety threshold", "Safety classifier", "Safe label",
                   "Safety axis"],
        "PPO": ["Steps", "Batch size", "Samples per prompt", "Mini batch size", "KL coefficient", "Learning rate"],
        "DPO": ["Loss", "Beta", "Label smoothing", "Strength weight", "Weight per older round", "Axis",
                "Learning rate", "Epochs", "Batch size", "Max length", "Reference", "Online pairs",
                "Online prompts per refresh", "Online samples per prompt", "Fresh online pairs every N steps"],
        "GRPO": ["Steps", "Batch size", "Group size", "KL coefficient", "Learning rate", "Baseline"],
        "Sampling": ["Max new tokens", "Prompts", "Responses per prompt", "Temperature", "Top-p"],
        "New pairs": ["Pairing", "Priority"],
        "Evaluation": ["Rule judge"],
        "Memory": ["LoRA rank", "Gradient checkpointing", "Shard over the training processes (FSDP2)"],
    }
    assert list(labels) == ["Round type", "Models and prompting", "Reward model", "Safety", "PPO", "DPO", "GRPO",
                            "Sampling", "New pairs", "Evaluation", "Memory"]
    assert 'name="seed"' not in page and 'name="ppo_save_every"' not in page  # the preset's, or --set
    assert re.search(r'<textarea name="stop_strings" cols="40" rows="2"', page)
    assert re.search(r'<input type="number" name="ppo_kl_coef" value="0.15" min="0.0" max="100.0" step="any"', page)
    assert re.search(r'<input type="number" name="priority" value="10" min="-2147483648" max="2147483647"', page)
    assert '<option value="self">two samples of the new policy</option>' in page
    assert field_help("ppo_kl_coef").split("(")[0] in page


@pytest.mark.django_db
def test_the_launch_form_turns_on_the_sft_job_on_accepted_ai_revisions(chains, admin_user):
    campaign = judged_campaign()
    form = {k: v for k, v in build_config("tiny").as_dict().items() if k not in ("reward_model", "cai_revisions")}
    response = client_for(admin_user).post(f"/campaigns/{campaign.slug}/rounds/",
                                           {**form, "cai_revisions": "on", "cai_accept": "ai"})
    assert response.status_code == 302
    round_ = Round.objects.get(campaign=campaign)
    assert [job.kind for job in round_.jobs.order_by("order")][:3] == [Job.EXPORT, Job.SFT, Job.REWARD]
    assert round_.config["cai_revisions"] is True and round_.config["cai_accept"] == "ai"


@pytest.mark.django_db
def test_the_page_the_command_and_the_api_launch_the_same_round_from_the_same_settings(chains, admin_user):
    from api.actions import create_token

    campaign = judged_campaign()
    named = {"reference_model": "/models/sft-reference", "reward_model": "/models/reward-backbone",
             "system_prompt": "Answer in one short sentence.", "stop_strings": "###\nUser:", "temperature": 0.9,
             "top_p": 0.8, "max_new_tokens": 24}
    Campaign.objects.filter(pk=campaign.pk).update(**named)
    chosen = {"ppo_steps": "4", "pairing": "sft", "priority": "7"}
    configs = []

    def launched() -> dict:
        round_ = Round.objects.filter(campaign=campaign).order_by("-number").first()
        actions.cancel_job(round_.jobs.get(kind=Job.EXPORT))  # so the next door may launch
        return {k: v for k, v in round_.config.items()}

    # The page: what a browser posts is the form as shown (the campaign's values filled in), with the changes.
    client = client_for(admin_user)
    shown = client.get(f"/campaigns/{campaign.slug}/rounds/?preset=tiny").context["form"]
    posted = {field.name: field.value() for field in shown if field.value() is not None and field.value() is not False}
    assert client.post(f"/campaigns/{campaign.slug}/rounds/", {**posted, **chosen}).status_code == 302
    configs.append(launched())
    call_command("launch_round", campaign.slug, "--preset", "tiny", *[f"--set={k}={v}" for k, v in chosen.items()],
                 stdout=io.StringIO())
    configs.append(launched())
    token = create_token(admin_user, "launcher", ["admin"])[1]
    answer = Client().post(f"/api/v1/campaigns/{campaign.slug}/rounds", {"preset": "tiny", "settings": chosen},
                           content_type="application/json", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 201, answer.content
    configs.append(launched())

    assert configs[0] == configs[1] == configs[2]
    config = configs[0]
    assert (config["reference"], config["reward_model"], config["system_prompt"], config["stop_strings"],
            config["sample_temperature"], config["top_p"], config["ppo_max_new_tokens"]) == (
        "/models/sft-reference", "/models/reward-backbone", "Answer in one short sentence.", "###\nUser:", 0.9, 0.8, 24)
    assert (config["ppo_steps"], config["pairing"], config["priority"], config["preset"]) == (4, "sft", 7, "tiny")


@pytest.mark.django_db
def test_it_lets_an_admin_cancel_and_resume_from_the_round_page(chains, admin_user, django_capture_on_commit_callbacks):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)
    client = client_for(admin_user)
    response = client.post(f"/rounds/{round_.pk}/jobs/{job.pk}/cancel/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and f'id="job-{job.pk}-resume"'.encode() in response.content
    job.refresh_from_db()
    assert job.status == Job.CANCELLED
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/rounds/{round_.pk}/jobs/{job.pk}/resume/")
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == Job.QUEUED and chains[-1][0] == job.pk


@pytest.mark.django_db
def test_it_shows_a_failed_job_s_error_and_the_state_from_the_database_on_reload(chains, reviewer):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.EXPORT)
    claim(job)
    actions.record_progress(job.pk, "task-1", step=3, total=4,
                            metrics=[{"step": 1, "rm/loss": 0.7}, {"step": 3, "rm/loss": 0.5, "rm/lr": 1e-4}],
                            log_text="[12:00:00] step 3 <b>done</b>\n")
    page = client_for(reviewer).get(f"/rounds/{round_.pk}/").content.decode()
    assert 'aria-valuenow="75"' in page and "step <span" in page and "ETA" in page
    assert "step 3 &lt;b&gt;done&lt;/b&gt;" in page  # the log is escaped
    # The charts start from the points stored on the row (only the charted keys).
    assert '[{"step": 1, "rm/loss": 0.7}, {"step": 3, "rm/loss": 0.5}]' in page
    actions.fail_job(job.pk, "task-1", error="CUDA out of <memory>\n\nTraceback (most recent call last):\n  boom")
    page = client_for(reviewer).get(f"/rounds/{round_.pk}/").content.decode()
    assert f'id="job-{job.pk}-error"' in page and "CUDA out of &lt;memory&gt;" in page
    assert "Traceback" not in page  # for admins only (tests/test_security.py)


@pytest.mark.django_db
def test_it_reviews_a_round_with_escaped_outputs_scores_and_human_win_rates_apart_from_simulated(chains, reviewer):
    campaign = judged_campaign()
    round_ = launch(campaign)
    prompt_id = campaign.prompts.order_by("id").first().pk
    prompt = campaign.prompts.get(pk=prompt_id).text
    evil = "<script>alert('x')</script>"
    sample_job = round_.jobs.get(kind=Job.SAMPLE)
    for job in round_.jobs.order_by("order"):
        succeed(job, policy_checkpoint="/models/round-1")
    Job.objects.filter(pk=sample_job.pk).update(result={
        "samples": [{"prompt_id": prompt_id, "prompt": prompt, "new": [evil, "fine"], "other": ["meh", "ok"]}],
        "scores": {content_hash(prompt, evil): 1.25, content_hash(prompt, "meh"): -0.5},
        "opponent": "SFT policy", "sample/reward_new": 0.6, "sample/reward_opponent": -0.2,
    })
    added = add_pairs(campaign, [PairInput(f"Round q{i}?", f"new {i}", f"old {i}") for i in range(4)],
                      round=round_, source=Response.POLICY, checkpoints=("/models/round-1", "/models/sft"),
                      notify=False)
    assert added.created == 4
    pairs = list(Pair.objects.filter(round=round_).order_by("id"))
    human, bot = make_user("hugo"), make_user("sim-correct_sentence-1")
    for pair, choice in zip(pairs, ["a", "a", "b", "tie"]):
        Judgment.objects.create(pair=pair, labeler=human, choice=choice, source=Judgment.HUMAN)
    for pair in pairs:
        Judgment.objects.create(pair=pair, labeler=bot, choice="b", source=Judgment.SIMULATED)
    page = client_for(reviewer).get(f"/rounds/{round_.pk}/").content.decode()
    assert evil not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "1.25" in page and "-0.50" in page and "Paired against: SFT policy" in page
    round_.refresh_from_db()
    rates = round_.win_rates()
    assert (rates["human"].wins, rates["human"].losses, rates["human"].ties) == (2, 1, 1)
    assert rates["human"].rate == pytest.approx(2.5 / 4) and rates["simulated"].rate == 0.0
    assert '<td class="human-rate">0.63 (4)</td>' in page
    assert '<td class="simulated-rate">0.00 (0 / 4 / 0 / 0)</td>' in page


@pytest.mark.django_db
def test_it_rates_every_policy_on_one_scale_from_the_judgments_between_them(chains, reviewer):
    campaign = judged_campaign()
    first = launch(campaign, algorithm="dpo")  # rounds of any type are rated together
    for job in first.jobs.order_by("order"):
        succeed(job, policy_checkpoint="/models/round-1")
    second = launch(campaign, force=True, algorithm="grpo")
    for job in second.jobs.order_by("order"):
        succeed(job, policy_checkpoint="/models/round-2")
    first.refresh_from_db()
    sft = first.config["base_policy"]
    human, bot = make_user("hugo"), make_user("sim-correct_sentence-1")

    def judged(round_, checkpoints, tag, choices, labeler, source):
        items = [PairInput(f"{tag} {i}?", f"{tag} new {i}", f"{tag} old {i}") for i in range(len(choices))]
        add_pairs(campaign, items, round=round_, source=Response.POLICY, checkpoints=checkpoints, notify=False)
        for pair, choice in zip(Pair.objects.filter(round=round_, prompt__text__startswith=tag).order_by("id"), choices):
            Judgment.objects.create(pair=pair, labeler=labeler, choice=choice, source=source)

    # Simulated labelers alone: the ratings say they come from them.
    judged(first, ("/models/round-1", sft), "sim", ["a"] * 6 + ["b"] * 4, bot, Judgment.SIMULATED)
    page = client_for(reviewer).get(f"/rounds/{first.pk}/").content.decode()
    assert 'id="policy-ratings"' in page and "<strong>simulated-labeler</strong>" in page
    # Humans: round 1 beats the SFT policy 30 to 10, round 2 beats round 1 24 to 16 (a tie counts half).
    judged(first, ("/models/round-1", sft), "r1", ["a"] * 29 + ["b"] * 9 + ["tie"] * 2, human, Judgment.HUMAN)
    judged(second, ("/models/round-2", "/models/round-1"), "r2", ["a"] * 24 + ["b"] * 16, human, Judgment.HUMAN)
    page = client_for(reviewer).get(f"/rounds/{second.pk}/").content.decode()
    table = page.split('id="policy-ratings"')[1].split("</table>")[0]
    assert [row.split("</td>")[0] for row in table.split("<tr><td>")[1:]] == ["Round 2", "Round 1", "SFT policy"]
    assert "From 80 human judgments" in page
    ratings = {row.split("</td>")[0]: row for row in table.split("<tr><td>")[1:]}
    assert '<td class="rating">1000</td>' in ratings["SFT policy"] and "the anchor" in ratings["SFT policy"]
    # 30 of 40, plus the prior's virtual tie: 400 log10(30.5 / 10.5) = 185 Elo points above the SFT policy.
    assert '<td class="rating">1185</td>' in ratings["Round 1"]
    # The API gives the same ratings as the page.
    from api.actions import create_token

    token = create_token(reviewer, "ratings", ["review"])[1]
    answer = Client().get(f"/api/v1/rounds/{second.pk}/ratings", headers={"Authorization": f"Bearer {token}"})
    assert (answer.json()["source"], answer.json()["judgments"]) == ("human", 80)
    players = {player["policy"]: player for player in answer.json()["players"]}
    assert set(players) == {"SFT policy", "Round 1", "Round 2"}
    assert (round(players["SFT policy"]["rating"]), round(players["Round 1"]["rating"])) == (1000, 1185)
    assert players["Round 2"]["rating"] > players["Round 1"]["rating"] and players["Round 1"]["games"] == 80
    # The first round's page rates only what existed then.
    page = client_for(reviewer).get(f"/rounds/{first.pk}/").content.decode()
    table = page.split('id="policy-ratings"')[1].split("</table>")[0]
    assert "Round 2" not in table and "From 40 human judgments" in page


# ---------------------------------------------------------------------------------------------
# The round's WebSocket
# ---------------------------------------------------------------------------------------------

def _communicator(round_, user):
    from pairloop.routing import websocket_urlpatterns

    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/rounds/{round_.pk}/")
    communicator.scope["user"] = user
    return communicator


@pytest.mark.django_db(transaction=True)
def test_it_pushes_a_job_s_fragment_and_metric_points_to_reviewers_only(chains, reviewer, outsider):
    round_ = launch(judged_campaign())
    job = round_.jobs.get(kind=Job.REWARD)
    n_jobs = round_.jobs.count()

    def work_on_the_job():  # what a worker does: write the row, then tell the round's group
        Job.objects.filter(pk=job.pk).update(status=Job.RUNNING, step=2, total_steps=8, started_at=timezone.now(),
                                             metrics=[{"step": 1, "rm/loss": 0.69}, {"step": 2, "rm/loss": 0.6}])
        live.job_changed(job)

    async def session():
        refused = _communicator(round_, outsider)
        connected, _ = await refused.connect()
        assert not connected
        communicator = _communicator(round_, reviewer)
        connected, _ = await communicator.connect()
        assert connected
        for _ in range(n_jobs):  # the current state of every job on connect
            html = await communicator.receive_from(timeout=5)
            assert 'hx-swap-oob="true"' in html
            assert json.loads(await communicator.receive_from(timeout=5))["type"] == "points"
        await sync_to_async(work_on_the_job)()
        html = await communicator.receive_from(timeout=5)
        points = json.loads(await communicator.receive_from(timeout=5))
        await communicator.disconnect()
        return html, points

    html, points = async_to_sync(session)()
    assert f'id="job-{job.pk}-live"' in html and "running" in html and 'aria-valuenow="25"' in html
    assert 'id="round-status"' in html
    assert points == {"type": "points", "job": job.pk, "attempt": 0,
                      "points": [{"step": 1, "rm/loss": 0.69}, {"step": 2, "rm/loss": 0.6}]}


def _engine_fields() -> dict[str, tuple[str, str, str]]:
    """(module, Args class, field) of each round setting that feeds an engine field, by setting name."""
    from training.config import SETTINGS

    return {name: about.engine for name, about in SETTINGS.items() if about.engine is not None}


def test_round_defaults_are_the_engines_or_say_why_not():
    """A round's default equals the engine Args field it feeds, or its why_differs says why not (and it does)."""
    import importlib
    from dataclasses import MISSING, fields

    from training.config import PRESETS, SETTINGS

    round_defaults = PRESETS["demo"]
    for name, (module, cls, field_name) in _engine_fields().items():
        args = getattr(importlib.import_module(f"training.engine.{module}"), cls)
        spec = next(f for f in fields(args) if f.name == field_name)
        engine = spec.default if spec.default is not MISSING else spec.default_factory()
        ours = getattr(round_defaults, name)
        if SETTINGS[name].why_differs:
            assert ours != engine, f"{name} now equals the engine's {field_name}: drop its why_differs"
        else:
            assert ours == engine, f"{name} is {ours!r}, the engine's {cls}.{field_name} is {engine!r}"


def test_round_setting_choices_are_the_engines():
    """A round setting that picks among an engine's variants offers exactly those the engine knows."""
    from training.config import DPO_LOSSES, GRPO_BASELINES, REWARD_COMBINATIONS
    from training.engine import dpo, grpo, sources

    assert tuple(DPO_LOSSES) == dpo.LOSS_TYPES and tuple(GRPO_BASELINES) == grpo.BASELINES
    assert set(REWARD_COMBINATIONS) == set(sources.COMBINATIONS) - {sources.SUM}  # a round names its roles


class _Handed(Exception):
    """Raised by the stand-in for an engine stage, holding what the runner handed it."""

    def __init__(self, handed):
        super().__init__("handed to the engine")
        self.handed = handed


class _Quiet:
    step = 0

    def line(self, text):
        pass

    def section(self, offset, total):
        pass

    def set(self, step, total):
        pass


@pytest.mark.django_db
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_the_policy_stage_optimises_the_reward_model_and_the_safety_classifier_beside_it(chains, monkeypatch,
                                                                                         algorithm):
    def stage(name, args, progress):
        raise _Handed(args)

    monkeypatch.setattr(runner, "train", stage)
    monkeypatch.setattr(runner, "ensure_policy", lambda path, preset: path)
    plain = launch(judged_campaign(slug="plain"), algorithm=algorithm)
    gated = launch(judged_campaign(slug="gated"), algorithm=algorithm, safety_classifier="/models/guard",
                   safety_classifier_label=1, reward_combination="gated")
    handed = {}
    for round_ in (plain, gated):
        Round.objects.filter(pk=round_.pk).update(reward_checkpoint="/ckpt/rm")
        round_.refresh_from_db()
        with pytest.raises(_Handed) as raised:
            runner.RUNNERS[algorithm](round_.jobs.get(kind=algorithm), _Quiet())
        handed[round_.campaign.slug] = raised.value.handed
    assert handed["plain"].reward_models == ["/ckpt/rm"] and handed["plain"].reward_roles == ["quality"]
    args = handed["gated"]
    assert args.reward_models == ["/ckpt/rm", "classifier:1:/models/guard"]
    assert args.reward_names == ["quality", "safety_classifier"] and args.reward_roles == ["quality", "safety"]
    assert (args.reward_combination, args.safety_threshold, args.safety_weight) == ("gated", 0.15, 0.3)


def test_a_dpo_round_refuses_the_safety_settings_of_the_rounds_with_a_reward_model():
    from training.config import refuse_unused

    with pytest.raises(ConfigError, match="safety_classifier does not apply to a dpo round"):
        refuse_unused(build_config("tiny", {"algorithm": "dpo"}), ["safety_classifier"])
    with pytest.raises(ConfigError, match="safety_classifier does not apply to a dpo dpo_online round"):
        refuse_unused(build_config("tiny", {"algorithm": "dpo", "dpo_online": True}), ["safety_classifier"])


@pytest.mark.django_db
def test_an_online_dpo_round_trains_its_reward_model_with_the_round_s_own_reward_settings(
        chains, admin_user, monkeypatch):
    """Every door takes a reward-model setting for online DPO (its chain trains one), and the reward job hands the
    round's value to the engine; offline DPO trains none and still refuses, or on the form drops, them."""
    from training.config import PRESETS

    campaign = judged_campaign()
    call_command("launch_round", campaign.slug, "--preset", "tiny", "--set", "algorithm=dpo", "--set",
                 "dpo_online=true", "--set", "reward_epochs=3", "--set", "reward_lr=0.002", stdout=io.StringIO())
    round_ = Round.objects.get()
    Round.objects.filter(pk=round_.pk).update(dataset_path="/data/round-1.jsonl")
    round_.refresh_from_db()

    def stage(name, args, progress):
        raise _Handed(args)

    monkeypatch.setattr(runner, "train", stage)
    with pytest.raises(_Handed) as raised:
        runner.RUNNERS[Job.REWARD](round_.jobs.get(kind=Job.REWARD), _Quiet())
    assert (raised.value.handed.epochs, raised.value.handed.lr) == (3, 0.002)
    actions.cancel_job(round_.jobs.get(kind=Job.EXPORT))
    with pytest.raises(CommandError, match=r"reward_epochs does not apply to a dpo round"):
        call_command("launch_round", campaign.slug, "--preset", "tiny", "--set", "algorithm=dpo",
                     "--set", "reward_epochs=3", stdout=io.StringIO())

    client = client_for(admin_user)
    url = f"/campaigns/{campaign.slug}/rounds/"
    posted = {field.name: field.value() for field in client.get(f"{url}?preset=tiny").context["form"]
              if field.value() is not None and field.value() is not False}
    for online, epochs in ((True, 4), (False, PRESETS["tiny"].reward_epochs)):
        form = {**posted, "algorithm": "dpo", "reward_epochs": 4, **({"dpo_online": "on"} if online else {})}
        assert client.post(url, form).status_code == 302
        launched = Round.objects.order_by("-number").first()
        assert launched.config["dpo_online"] is online and launched.config["reward_epochs"] == epochs
        actions.cancel_job(launched.jobs.get(kind=Job.EXPORT))


# The jobs each engine module's settings feed (common.MemoryArgs: every training stage of a round).
_JOBS_OF_MODULE = {"reward": (Job.REWARD,), "ppo": (Job.PPO,), "dpo": (Job.DPO,), "grpo": (Job.GRPO,),
                   "sample": (Job.SAMPLE,), "common": (Job.REWARD, Job.PPO, Job.DPO, Job.GRPO),
                   "sources": (Job.PPO, Job.GRPO)}


def _another_value(avoid: tuple, choices: dict | None = None):
    """A round setting's value other than each of `avoid` (its preset's, then the engine's default)."""
    value = avoid[0]
    if choices is not None:
        candidates = list(choices)
    elif isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, int):
        candidates = [value * 2 or 1, value * 3 or 2, value + 1]
    elif isinstance(value, float):
        candidates = [value / 2 or 0.25, value / 3 or 0.3, value * 0.7 or 0.35]
    else:
        raise AssertionError(f"no rule for a {type(value).__name__} setting: add one here")
    return next(c for c in candidates if c not in avoid)


def _engine_default(module: str, cls: str, field_name: str):
    import importlib

    spec = next(f for f in dataclasses.fields(getattr(importlib.import_module(f"training.engine.{module}"), cls))
                if f.name == field_name)
    return spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()


@pytest.mark.django_db
def test_every_engine_fed_round_setting_reaches_its_stage(chains, monkeypatch):
    """Each round setting whose Setting.engine ties it to an engine Args field arrives, with the round's
    value, in what the runner hands the reward, PPO and sample stages (a new one is covered by itself)."""
    import importlib

    from training.config import PRESETS

    engine_fields = _engine_fields()
    unknown = {module for module, _, _ in engine_fields.values()} - set(_JOBS_OF_MODULE)
    assert not unknown, f"say which jobs the settings of {unknown} feed"
    from training.config import SETTINGS

    values = {name: _another_value((getattr(PRESETS["tiny"], name), _engine_default(*where)), SETTINGS[name].choices)
              for name, where in engine_fields.items()}
    if values["grpo_batch_size"] % values["grpo_samples_per_prompt"]:
        values["grpo_samples_per_prompt"] = 2  # a group size that divides the batch, neither preset's nor engine's
    # IPO takes no label smoothing (refused at launch): a second round, on the sigmoid loss, carries it.
    apart = {"dpo_label_smoothing"} if values["dpo_loss_type"] == "ipo" else set()
    launches = [{k: v for k, v in values.items() if k not in apart}, {k: v for k, v in values.items() if k in apart}]

    def stage(name, args, progress):
        raise _Handed(args)

    def sample_with_stats(model_path, prompts, **kwargs):
        raise _Handed(kwargs)

    monkeypatch.setattr(runner, "train", stage)
    monkeypatch.setattr(runner, "ensure_policy", lambda path, preset: path)
    monkeypatch.setattr("training.engine.sample.sample_with_stats", sample_with_stats)
    handed_for = {}  # round setting -> {job kind: what the runner handed its stage}
    for number, chosen in enumerate(launch_values for launch_values in launches if launch_values):
        round_ = launch(judged_campaign(slug=f"shop-{number}"), **chosen)
        Round.objects.filter(pk=round_.pk).update(dataset_path="/data/round-1.jsonl", reward_checkpoint="/ckpt/rm",
                                                  policy_checkpoint="/ckpt/policy")
        round_.refresh_from_db()
        handed = {}
        for kind in (Job.REWARD, Job.PPO, Job.DPO, Job.GRPO, Job.SAMPLE):
            job = round_.jobs.filter(kind=kind).first() or Job(round=round_, kind=kind, order=99)  # another type's
            with pytest.raises(_Handed) as raised:
                runner.RUNNERS[kind](job, _Quiet())
            handed[kind] = raised.value.handed
        handed_for.update({name: handed for name in chosen})

    for name, (module, cls, field_name) in engine_fields.items():
        args_class = getattr(importlib.import_module(f"training.engine.{module}"), cls)
        assert field_name in {f.name for f in dataclasses.fields(args_class)}
        for kind in _JOBS_OF_MODULE[module]:
            got = handed_for[name][kind]
            if isinstance(got, dict):  # the sample job calls sample_with_stats with SampleArgs' names
                assert field_name in got, f"the {kind} job does not pass {field_name} (round setting {name})"
                value = got[field_name]
            else:
                assert isinstance(got, args_class), f"the {kind} job hands {type(got).__name__}, not {cls}"
                value = getattr(got, field_name)
            assert value == values[name], (f"round setting {name}={values[name]!r} reached the {kind} job's "
                                           f"{field_name} as {value!r}")


@pytest.mark.django_db
def test_responses_the_length_limit_cut_are_stored_as_truncated(chains, monkeypatch, settings):
    """The sample job on a real policy with room for two tokens (it answers in sentences, so every response is
    cut), then the enqueue job: each stored policy response says whether the limit cut it."""
    import torch

    from demo.policy import DEFAULT_TINY_DIR, ensure_demo_policy

    class ZeroScores:  # the round's reward model: only its scores' presence matters here
        def __init__(self, checkpoint, **options):
            pass

        def score(self, prompts, responses):
            return torch.zeros(len(responses))

    monkeypatch.setattr("training.engine.reward.RewardScorer", ZeroScores)
    # No heartbeat during the jobs: its thread's own connection cannot see this test's uncommitted rows.
    settings.PAIRLOOP = {**settings.PAIRLOOP, "HEARTBEAT_STALE_SECONDS": 3600}
    policy = str(ensure_demo_policy(REPO / DEFAULT_TINY_DIR, preset="tiny"))
    round_ = launch(judged_campaign(), ppo_max_new_tokens=2, sample_prompts=3)
    Round.objects.filter(pk=round_.pk).update(parent_policy=policy)
    jobs = {job.kind: job for job in round_.jobs.all()}
    for kind, fields in ((Job.EXPORT, {}), (Job.REWARD, {"reward_checkpoint": "/ckpt/rm"}),
                         (Job.PPO, {"policy_checkpoint": policy})):
        succeed(jobs[kind], **fields)

    assert runner.execute(jobs[Job.SAMPLE].pk, "task-sample")
    samples = Job.objects.get(pk=jobs[Job.SAMPLE].pk).result["samples"]
    assert all(s["new_cut"] == [True, True] and s["other_cut"] == [True, True] for s in samples), samples
    assert runner.execute(jobs[Job.ENQUEUE].pk, "task-enqueue")
    stored = Response.objects.filter(round=round_)
    assert stored.count() >= 2
    assert all(response.generation.get("truncated") is True for response in stored), [
        (r.text, r.generation) for r in stored]



@pytest.mark.django_db
def test_a_round_s_new_pairs_put_the_new_policy_on_either_side_and_its_win_rate_reads_it_by_policy(chains,
                                                                                                    settings):
    """The enqueue job on a sample job's answers (8 prompts, the new policy against the SFT policy) under two
    seeds: the new policy's answer is response A of half the pairs, a different half per seed, the same half
    again under the same seed; a labeler who always prefers the new policy's answer (whichever side it is
    stored and shown on) gives it every win."""
    settings.PAIRLOOP = {**settings.PAIRLOOP, "HEARTBEAT_STALE_SECONDS": 3600}
    prompts = 8

    def enqueued(slug: str, seed: int) -> Round:
        round_ = launch(judged_campaign(slug=slug), seed=seed, pairing="sft")
        jobs = {job.kind: job for job in round_.jobs.all()}
        for kind in (Job.EXPORT, Job.REWARD, Job.PPO):
            succeed(jobs[kind], policy_checkpoint="/models/new")
        claim(jobs[Job.SAMPLE], "task-sample")
        actions.finish_job(jobs[Job.SAMPLE].pk, "task-sample", result={
            "samples": [{"prompt": f"Question {i} for the new policy?", "new": [f"new {i}"], "other": [f"old {i}"]}
                        for i in range(prompts)],
            "new_checkpoint": "/models/new", "opponent_checkpoint": "/models/sft", "opponent": "SFT policy"})
        assert runner.execute(jobs[Job.ENQUEUE].pk, "task-enqueue")
        round_.refresh_from_db()
        return round_

    def new_first(round_: Round) -> list[bool]:
        pairs = Pair.objects.filter(round=round_).select_related("response_a", "response_b").order_by("prompt__text")
        assert all({p.response_a.checkpoint, p.response_b.checkpoint} == {"/models/new", "/models/sft"}
                   for p in pairs)
        return [p.response_a.text.startswith("new") and p.response_a.checkpoint == "/models/new" for p in pairs]

    rounds = [enqueued("seed-0", 0), enqueued("seed-1", 1), enqueued("seed-0-again", 0)]
    sides = [new_first(round_) for round_ in rounds]
    assert [len(found) for found in sides] == [prompts] * 3
    assert [sum(found) for found in sides] == [prompts // 2] * 3
    assert sides[0] != sides[1] and sides[0] == sides[2]
    fan = make_user("fan")
    for round_ in rounds[:2]:
        while (assignment := claim_next_pair(round_.campaign, fan).assignment) is not None:
            pair = Pair.objects.select_related("response_a").get(pk=assignment.pair_id)
            new_on_left = pair.response_a.text.startswith("new") == assignment.a_on_left
            submit_judgment(assignment_id=assignment.pk, labeler=fan, choice="a" if new_on_left else "b",
                            strength=3)
        rates = round_.win_rates()[Judgment.HUMAN]
        assert (rates.wins, rates.losses, rates.rate) == (prompts, 0, 1.0)


def test_the_round_page_charts_each_named_reward_sources_curve_but_not_a_path_named_one():
    assert Job.is_chart_key("ppo/reward/quality") and Job.is_chart_key("grpo/reward/safety_classifier")
    assert Job.is_chart_key("ppo/reward/gated") and Job.is_chart_key("ppo/reward")
    assert not Job.is_chart_key("ppo/reward//runs/rm") and not Job.is_chart_key("ppo/reward/rule:correct")


def axes_campaign(slug="axes"):
    """A judged campaign asking "helpful" then "respectful"."""
    from annotate.actions import save_axis
    from annotate.models import Axis

    campaign = judged_campaign(slug=slug)
    Campaign.objects.filter(pk=campaign.pk).update(axis_key="helpful")
    campaign.refresh_from_db()
    save_axis(Axis(campaign=campaign, key="respectful", question="Which answer is more respectful?", position=1))
    return Campaign.objects.get(pk=campaign.pk)


@pytest.mark.django_db
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_the_policy_stage_optimises_each_axis_s_reward_model_with_the_safety_axis_s_as_safety(
        chains, monkeypatch, algorithm):
    def stage(name, args, progress):
        raise _Handed(args)

    monkeypatch.setattr(runner, "train", stage)
    monkeypatch.setattr(runner, "ensure_policy", lambda path, preset: path)
    round_ = launch(axes_campaign(), algorithm=algorithm, safety_axis="respectful", reward_combination="gated")
    succeed(round_.jobs.get(kind=Job.EXPORT))
    reward = round_.jobs.get(kind=Job.REWARD)
    claim(reward, "task-rm")
    actions.finish_job(reward.pk, "task-rm", result={"axes": [["helpful", "/ckpt/h"], ["respectful", "/ckpt/r"]]},
                       round_fields={"reward_checkpoint": "/ckpt/h"})
    with pytest.raises(_Handed) as raised:
        runner.RUNNERS[algorithm](round_.jobs.get(kind=algorithm), _Quiet())
    args = raised.value.handed
    assert args.reward_models == ["/ckpt/h", "/ckpt/r"]
    assert args.reward_names == ["axis_helpful", "axis_respectful"] and args.reward_roles == ["quality", "safety"]
    assert args.reward_combination == "gated"


@pytest.mark.django_db
def test_a_launch_names_the_campaign_s_axes_when_the_safety_or_dpo_axis_is_not_one_of_them(chains):
    campaign = axes_campaign()
    with pytest.raises(ConfigError, match="safety_axis='harmless' is not an axis of campaign axes: its axes are "
                                          "helpful, respectful"):
        actions.launch_config(campaign, "tiny", {"safety_axis": "harmless"})
    with pytest.raises(ConfigError, match="dpo_axis='kind' is not an axis"):
        actions.launch_config(campaign, "tiny", {"algorithm": "dpo", "dpo_axis": "kind"})
    with pytest.raises(ConfigError, match="the campaign's only axis"):
        actions.launch_config(judged_campaign(slug="one"), "tiny", {"safety_axis": "overall"})
    assert actions.launch_config(campaign, "tiny", {"safety_axis": "respectful"}).safety_axis == "respectful"
    assert Round.objects.count() == 0


@pytest.mark.django_db
def test_a_dpo_round_exports_the_axis_it_learns_from_and_a_ppo_round_every_axis(chains, settings, tmp_path):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "EXPORTS_DIR": str(tmp_path)}
    campaign = axes_campaign()
    add_pairs(campaign, [PairInput(f"Ask {i}?", f"good x{i}", f"bad x{i}") for i in range(3)], notify=False)
    judge = make_user("judge-axes")
    campaign.members.add(judge)
    while (claimed := claim_next_pair(campaign, judge)).assignment is not None:
        pair_a, pair_b = ("a", "b") if claimed.assignment.a_on_left else ("b", "a")  # shown terms
        submit_judgment(assignment_id=claimed.assignment.pk, labeler=judge,
                        choices={"helpful": pair_a, "respectful": pair_b}, strengths={"helpful": 2, "respectful": 2})
    dpo = launch(campaign, algorithm="dpo", dpo_axis="respectful", force=True)
    outcome = runner.run_export(claim(dpo.jobs.get(kind=Job.EXPORT)), _Quiet())
    assert [axis["axis"] for axis in outcome.result["axes"]] == ["respectful"]
    rows = [json.loads(line) for line in Path(outcome.round_fields["dataset_path"]).read_text().splitlines()]
    assert rows and all(row["chosen"].startswith("bad") for row in rows)  # the respectful axis preferred B
    Job.objects.filter(round=dpo).update(status=Job.SUCCEEDED)
    ppo = launch(campaign, algorithm="ppo", force=True)
    outcome = runner.run_export(claim(ppo.jobs.get(kind=Job.EXPORT)), _Quiet())
    assert [axis["axis"] for axis in outcome.result["axes"]] == ["helpful", "respectful"]
    helpful = Path(outcome.result["axes"][0]["path"]).read_text()
    assert helpful.splitlines() and all(json.loads(line)["chosen"].startswith("good") for line in helpful.splitlines())


@pytest.mark.django_db
def test_the_review_shows_each_axis_s_reward_score_of_each_response(chains, reviewer):
    campaign = axes_campaign()
    round_ = launch(campaign, safety_axis="respectful")
    prompt_id = campaign.prompts.order_by("id").first().pk
    prompt = campaign.prompts.get(pk=prompt_id).text
    for job in round_.jobs.order_by("order"):
        succeed(job)
    curt, polite = "Whatever. 4", "The answer is 4."
    Job.objects.filter(round=round_, kind=Job.SAMPLE).update(result={
        "samples": [{"prompt_id": prompt_id, "prompt": prompt, "new": [curt, polite], "other": []}],
        "scores": {content_hash(prompt, curt): 0.75, content_hash(prompt, polite): 0.5},
        "axis_scores": {"helpful": {content_hash(prompt, curt): 0.75, content_hash(prompt, polite): 0.5},
                        "respectful": {content_hash(prompt, curt): -1.5, content_hash(prompt, polite): 2.25}},
    })
    page = client_for(reviewer).get(f"/rounds/{round_.pk}/").content.decode()
    assert "reward model of each axis (helpful, respectful)" in page
    cells = re.findall(r'<div class="response-text">([^<]*)</div>((?:<span class="score axis-score"[^>]*>[^<]*</span>)*)',
                       page)
    shown = {text: re.findall(r">([^<]*)</span>", spans) for text, spans in cells}
    assert shown[curt] == ["helpful 0.75", "respectful -1.50"] and shown[polite] == ["helpful 0.50", "respectful 2.25"]


@pytest.mark.django_db
def test_a_round_s_first_axis_stays_its_primary_one_after_the_database_reads_the_axes_back(chains, monkeypatch):
    from annotate.actions import save_axis
    from annotate.models import Axis

    campaign = axes_campaign()
    save_axis(Axis(campaign=campaign, key="kind", question="Which answer is kinder?", position=2))
    campaign = Campaign.objects.get(pk=campaign.pk)
    monkeypatch.setattr(runner, "train", lambda stage, args, progress: {"rm/accuracy": 0.5})
    round_ = launch(campaign)
    export = claim(round_.jobs.get(kind=Job.EXPORT), "task-export")
    paths = [{"axis": key, "path": f"/data/{key}.jsonl"} for key in ("helpful", "respectful", "kind")]
    actions.finish_job(export.pk, "task-export", result={"axes": paths})
    reward = claim(round_.jobs.get(kind=Job.REWARD), "task-rm")
    outcome = runner.run_reward(reward, _Quiet())
    actions.finish_job(reward.pk, "task-rm", result=outcome.result, round_fields=outcome.round_fields)
    round_.refresh_from_db()
    checkpoints = runner.axis_checkpoints(round_)
    assert list(checkpoints) == ["helpful", "respectful", "kind"]  # "kind" is shorter: jsonb would put it first
    assert round_.reward_checkpoint == checkpoints["helpful"] == outcome.checkpoint_path
