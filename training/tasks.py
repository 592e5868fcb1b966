"""Celery tasks: one per job kind, each taking the Job's id; the work is in training/runner.py.

Training tasks (reward, PPO, sampling) go to the `training` queue (QUEUES below), which a GPU box consumes
with `celery -A pairloop worker -Q training --concurrency 1` (prefetch 1, acks late: settings.py);
export and enqueue are light and go to `default`. Each kind has its own soft and hard time limits
(settings.JOB_SOFT_TIME_LIMITS, PAIRLOOP_TIME_LIMIT_*). A task that did not finish its job (failed,
cancelled, or found it run elsewhere) raises Ignore, so the rest of the chain is not sent.
"""

from __future__ import annotations

from celery import chain, shared_task
from celery.exceptions import Ignore
from django.conf import settings

from training import actions, runner
from training.models import Job

DEFAULT_QUEUE, TRAINING_QUEUE = "default", "training"


def _run(task, job_id: int) -> int:
    if not runner.execute(job_id, task.request.id or f"local-{job_id}"):
        raise Ignore()
    return job_id


@shared_task(bind=True, name="training.export")
def export_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.reward")
def reward_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.ppo")
def ppo_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.sample")
def sample_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(bind=True, name="training.enqueue")
def enqueue_job(self, job_id: int) -> int:
    return _run(self, job_id)


@shared_task(name="training.fail_stale_jobs", ignore_result=True)
def fail_stale_jobs() -> int:
    """Beat's check: running jobs whose worker went silent fail; queued ones nobody takes are flagged."""
    failed = actions.fail_stale_jobs()
    actions.flag_unclaimed_jobs()
    return len(failed)


TASKS = {Job.EXPORT: export_job, Job.REWARD: reward_job, Job.PPO: ppo_job, Job.SAMPLE: sample_job,
         Job.ENQUEUE: enqueue_job}
# Where each kind runs. Set on every signature (Celery 5.7 deprecates the task's `queue` attribute).
QUEUES = {kind: TRAINING_QUEUE if kind in Job.TRAINING_KINDS else DEFAULT_QUEUE for kind in TASKS}


def time_limits(kind: str) -> tuple[int, int]:
    """(soft, hard) time limits of a job kind in s: PAIRLOOP_TIME_LIMIT_<KIND>, plus ..._GRACE."""
    soft = settings.JOB_SOFT_TIME_LIMITS[kind]
    return soft, soft + settings.JOB_TIME_LIMIT_GRACE


def signature_for(job: Job):
    """An immutable signature (the job id is its only argument), routed to its kind's queue, with its
    kind's time limits."""
    soft, hard = time_limits(job.kind)
    return TASKS[job.kind].si(job.pk).set(queue=QUEUES[job.kind], soft_time_limit=soft, time_limit=hard)


def start_chain(job_ids: list[int]) -> None:
    """Send the jobs as one Celery chain, in order. Called on commit by actions.launch_round / resume_job."""
    jobs = {job.pk: job for job in Job.objects.filter(pk__in=job_ids)}
    chain(*[signature_for(jobs[pk]) for pk in job_ids]).apply_async()
