"""PAIRLOOP_REPORT_TO: a job's metric points also reach the experiment tracker; unset, nothing is
written; a tracker whose package is missing fails the job at its start, before anything is trained."""

from __future__ import annotations

import sys

import pytest

from tests.test_round_worker import tiny_reward_backbone
from tests.test_rounds import judged_campaign
from training import actions, runner, tracking
from training.config import build_config
from training.models import Job

PAIRS = 40


@pytest.fixture
def runs_dir(settings, tmp_path):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 5, "RUNS_DIR": tmp_path / "runs"}
    return tmp_path / "runs"


def launch(campaign, **overrides):
    return actions.launch_round(campaign, None, build_config("tiny", overrides))


def reporting(job, progress):
    """A job kind standing in for a trainer: three steps of engine progress events with metrics."""
    for step in (1, 2, 3):
        progress({"stage": "rm", "step": step, "total": 3, "metrics": {"rm/loss": 1.0 / step, "rm/ok": True}})
    return runner.Outcome({})


@pytest.mark.django_db
def test_it_writes_no_run_anywhere_when_no_tracker_is_named(runs_dir, monkeypatch):
    job = launch(judged_campaign()).jobs.get(kind=Job.EXPORT)
    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, reporting)
    assert runner.execute(job.pk, "task-1") is True
    job.refresh_from_db()
    assert [p["rm/loss"] for p in job.metrics] == [1.0, 0.5, 1 / 3]  # the row got them
    assert not runs_dir.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("backend", sorted(tracking.BACKENDS))
def test_it_fails_a_job_at_its_start_naming_the_tracker_s_missing_package(backend, runs_dir, settings,
                                                                            monkeypatch):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "REPORT_TO": backend}
    tracker = tracking.BACKENDS[backend]
    for name in {tracker.package, tracker.module_name or tracker.package}:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed on this worker
    job = launch(judged_campaign()).jobs.get(kind=Job.EXPORT)
    ran = []

    def trainer(job, progress):
        ran.append(job)
        return reporting(job, progress)

    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, trainer)
    assert runner.execute(job.pk, "task-1") is False
    job.refresh_from_db()
    assert job.status == Job.FAILED and not ran and job.step == 0
    assert f"PAIRLOOP_REPORT_TO={backend} needs the `{tracker.package}` package" in job.error
    assert f"pip install {tracker.package}" in job.error.splitlines()[0]
    assert not runs_dir.exists()


@pytest.mark.django_db
def test_it_sends_a_reward_job_s_metric_points_to_tensorboard_as_scalars(runs_dir, settings, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard comes with the dev extra (scripts/setup --dev)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The heartbeat thread's own connection cannot see this test's uncommitted rows: no beat in this run.
    settings.PAIRLOOP = {**settings.PAIRLOOP, "REPORT_TO": "tensorboard", "HEARTBEAT_STALE_SECONDS": 3600}
    backbone = tiny_reward_backbone(tmp_path / "backbone")
    round_ = launch(judged_campaign(slug="shop", usable=PAIRS), reward_model=str(backbone),
                    reward_batch_size=4)
    export, reward = round_.jobs.get(kind=Job.EXPORT), round_.jobs.get(kind=Job.REWARD)
    assert runner.execute(export.pk, "task-export") is True
    assert not runs_dir.exists()  # the export reports no metrics: no run for it
    assert runner.execute(reward.pk, "task-reward") is True
    reward.refresh_from_db()

    run = runs_dir / "shop" / f"round-{round_.number}" / "reward"
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert len(reward.metrics) >= 3  # points at several steps, each with several keys
    assert "rm/loss" in scalars and "rm/accuracy" in scalars
    # Every metric point the job's row holds is in the event file, at the same step with the same value.
    for point in reward.metrics:
        for key, value in point.items():
            if key != "step":
                logged = {e.step: e.value for e in events.Scalars(key)}
                assert logged[point["step"]] == pytest.approx(value, rel=1e-6), (key, point["step"])
    assert max(e.step for e in events.Scalars("rm/loss")) == reward.step
