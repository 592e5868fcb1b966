"""Celery tasks: one per job kind, each taking the Job's id; the work is in training/runner.py.

They are sent by name, on their kind's queue with its time limits, by training/dispatch.py. A task that
did not finish its job (failed, cancelled, or found it run elsewhere) raises Ignore, so the rest of the
chain is not sent.
"""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import Ignore

from annotate.actions import fail_stale_ai_labeling_runs
from training import actions, ai_labeling, runner
from training.models import Job


def _run(task, job_id: int) -> int:
    if not runner.execute(job_id, task.request.id or f"local-{job_id}"):
        raise Ignore()
    return job_id


@shared_task(bind=True, name="training.export")
def export_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.sft")
def sft_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.reward")
def reward_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.ppo")
def ppo_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.dpo")
def dpo_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.grpo")
def grpo_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.sample")
def sample_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.enqueue")
def enqueue_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.evaluate")
def evaluate_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(name="training.fail_stale_jobs", ignore_result=True)
def fail_stale_jobs() -> int:
    """Beat's check: running jobs and AI labeling runs whose worker went silent fail; queued jobs nobody takes
    are flagged."""
    failed = actions.fail_stale_jobs()
    actions.flag_unclaimed_jobs()
    return len(failed) + len(fail_stale_ai_labeling_runs())


TASKS = {Job.EXPORT: export_job, Job.SFT: sft_job, Job.REWARD: reward_job, Job.PPO: ppo_job, Job.DPO: dpo_job,
         Job.GRPO: grpo_job, Job.SAMPLE: sample_job, Job.ENQUEUE: enqueue_job, Job.EVALUATE: evaluate_job}


@shared_task(name="training.ai_label", ignore_result=True)  # annotate.actions.AI_LABELING_TASK
def ai_label_run(run_id: int) -> None:
    """An AI labeling run, by its AILabelingRun's id (on the training queue for a local model)."""
    ai_labeling.run_ai_labeling(run_id)
