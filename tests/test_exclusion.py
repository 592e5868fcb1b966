"""Leaving judgments out of export and training, reversibly: a labeler's (all, or from a time on) or one
judgment; nothing is deleted, exports and round jobs say how many were left out and why, and including
them again gives the same export byte for byte."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from annotate import actions
from annotate.models import Exclusion, Judgment
from annotate.quality import quality_report
from tests.conftest import make_campaign, make_user
from training import actions as training_actions
from training import runner
from training.config import build_config
from training.models import Job

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def small_minimum(settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 5}


def judge_all(campaign, labeler, choice="a", start=None):
    """The labeler judges every pair the queue gives them, a minute apart from `start`."""
    start = start or timezone.now() - timedelta(hours=1)
    made = []
    for step in range(1000):
        claim = actions.claim_next_pair(campaign, labeler, now=start + timedelta(minutes=step))
        if claim.assignment is None:
            return made
        judgment, _ = actions.submit_judgment(assignment_id=claim.assignment.pk, labeler=labeler,
                                              choice=choice, strength=2,
                                              now=start + timedelta(minutes=step, seconds=20))
        made.append(judgment)
    raise AssertionError("the queue never ran out")


@pytest.fixture
def judged(admin_user):
    careful, sloppy = make_user("carl-careful"), make_user("sid-sloppy")
    campaign = make_campaign(n_pairs=6, members=[careful, sloppy], overlap=2)
    judge_all(campaign, careful, "a")
    judge_all(campaign, sloppy, "b")
    return campaign, careful, sloppy


def export(campaign, path: Path, fmt="jsonl") -> tuple[bytes, str]:
    out = io.StringIO()
    call_command("export_pairs", campaign.slug, str(path), "--format", fmt, stdout=out)
    return path.read_bytes(), out.getvalue()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_it_leaves_an_excluded_labeler_out_and_restores_the_export_byte_for_byte(judged, admin_user, tmp_path,
                                                                                  fmt):
    campaign, careful, sloppy = judged
    before, said = export(campaign, tmp_path / f"before.{fmt}", fmt)
    assert "Wrote 12 pairs" in said and "Left out" not in said

    exclusion = actions.exclude_judgments(campaign, by=admin_user, labeler=sloppy, reason="picks B blindly")
    during, said = export(campaign, tmp_path / f"during.{fmt}", fmt)
    assert during != before
    assert "Wrote 6 pairs" in said
    assert "Left out 6 judgments excluded by an admin: sid-sloppy's judgments: picks B blindly (6)" in said
    if fmt == "jsonl":
        assert {json.loads(line)["labeler"] for line in during.splitlines()} == {"carl-careful"}
    assert Judgment.objects.filter(labeler=sloppy).count() == 6  # nothing deleted

    actions.include_again(exclusion, by=admin_user)
    after, said = export(campaign, tmp_path / f"after.{fmt}", fmt)
    assert after == before
    assert "Left out" not in said
    exclusion.refresh_from_db()
    assert exclusion.lifted_by == admin_user and exclusion.lifted_at is not None


def test_it_excludes_from_a_time_on_and_single_judgments(judged, admin_user, tmp_path):
    campaign, careful, sloppy = judged
    sloppy_judgments = list(Judgment.objects.filter(labeler=sloppy).order_by("created_at"))
    # From the fourth of sloppy's judgments on: three are left out, the first three stay.
    actions.exclude_judgments(campaign, by=admin_user, labeler=sloppy, since=sloppy_judgments[3].created_at,
                              reason="tired after lunch")
    one = Judgment.objects.filter(labeler=careful).order_by("pk").first()
    actions.exclude_judgments(campaign, by=admin_user, judgment=one, reason="typo in the rationale")
    data, said = export(campaign, tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in data.splitlines()]
    assert len(rows) == 12 - 3 - 1
    assert "4 judgments excluded" in said
    assert "tired after lunch (3)" in said and f"judgment {one.pk}: typo in the rationale (1)" in said
    # The quality report counts each labeler's excluded judgments once, however many exclusions cover them.
    actions.exclude_judgments(campaign, by=admin_user, judgment=sloppy_judgments[4], reason="covered already")
    excluded = {row["username"]: row["excluded"] for row in quality_report(campaign, fresh=True)["labelers"]}
    assert excluded == {"sid-sloppy": 3, "carl-careful": 1}
    raw = io.StringIO()
    call_command("export_pairs", campaign.slug, str(tmp_path / "raw.jsonl"), "--raw", stdout=raw)
    kept = {json.loads(line)["judgment_id"] for line in (tmp_path / "raw.jsonl").read_text().splitlines()}
    assert one.pk not in kept and sloppy_judgments[2].pk in kept and sloppy_judgments[3].pk not in kept


def test_it_refuses_an_exclusion_without_a_reason_or_of_another_campaign(judged, admin_user):
    campaign, careful, sloppy = judged
    other = make_campaign(slug="other")
    with pytest.raises(actions.ExclusionError, match="say why"):
        actions.exclude_judgments(campaign, by=admin_user, labeler=sloppy, reason="  ")
    with pytest.raises(actions.ExclusionError, match="either a labeler's judgments or one judgment"):
        actions.exclude_judgments(campaign, by=admin_user, reason="both", labeler=sloppy,
                                  judgment=Judgment.objects.filter(labeler=sloppy).first())
    with pytest.raises(actions.ExclusionError, match="is not in campaign other"):
        actions.exclude_judgments(other, by=admin_user, judgment=Judgment.objects.first(),
                                  reason="wrong place")
    assert not Exclusion.objects.exists()


def run_round_export(campaign, monkeypatch) -> tuple[bytes, Job]:
    """Launch a round and run its export job for real; the rest of its chain is marked done. The rounds follow
    each other with no new labels, only exclusions, so each launch is forced."""
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)
    round_ = training_actions.launch_round(campaign, None, build_config("tiny", {}), force=True)
    job = round_.jobs.get(kind=Job.EXPORT)
    assert runner.execute(job.pk, "task-export") is True
    job.refresh_from_db()
    for later in round_.jobs.exclude(pk=job.pk).order_by("order"):
        training_actions.claim_job(later.pk, f"task-{later.pk}")
        training_actions.finish_job(later.pk, f"task-{later.pk}", result={}, round_fields={})
    return Path(job.result["path"]).read_bytes(), job


def test_it_leaves_excluded_judgments_out_of_the_next_rounds_training_data(judged, admin_user, monkeypatch):
    campaign, careful, sloppy = judged
    first, job = run_round_export(campaign, monkeypatch)
    assert job.result["excluded"] == 0

    exclusion = actions.exclude_judgments(campaign, by=admin_user, labeler=sloppy, reason="picks B blindly")
    second, job = run_round_export(campaign, monkeypatch)
    assert len(second.splitlines()) == 6 and second != first
    assert job.result["excluded"] == 6
    assert job.result["excluded_reasons"] == ["sid-sloppy's judgments: picks B blindly (6)"]
    assert "Left out 6 judgments excluded by an admin" in job.log  # the round page shows the job's log

    actions.include_again(exclusion, by=admin_user)
    third, job = run_round_export(campaign, monkeypatch)
    assert third == first and job.result["excluded"] == 0


def test_excluded_judgments_do_not_count_toward_a_rounds_minimum(judged, admin_user, settings):
    campaign, careful, sloppy = judged
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 12}
    assert training_actions.usable_judgments(campaign) == 12
    actions.exclude_judgments(campaign, by=admin_user, labeler=sloppy, reason="picks B blindly")
    assert training_actions.usable_judgments(campaign) == 6  # what the round's export would train on
    with pytest.raises(training_actions.RoundRefused, match="6 usable"):
        training_actions.launch_round(campaign, admin_user, build_config("tiny", {}))
