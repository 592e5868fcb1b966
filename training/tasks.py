"""Celery tasks: one per job kind, each taking the Job's id; the work is in training/runner.py.

Training tasks (reward, PPO, sampling) go to the `training` queue (QUEUES below), which a GPU box consumes
with `celery -A pairloop worker -Q training --concurrency 1` (prefetch 1, acks late: settings.py);
export and enqueue are light and go to `default`. A task that did not finish its job (failed,
cancelled, or found it run elsewhere) raises Ignore, so the rest of the chain is not sent.
"""

from __future__ import annotations

from celery import chain, shared_task
from celery.exceptions import Ignore

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
    return len(actions.fail_stale_jobs())


TASKS = {Job.EXPORT: export_job, Job.REWARD: reward_job, Job.PPO: ppo_job, Job.SAMPLE: sample_job,
         Job.ENQUEUE: enqueue_job}
# Where each kind runs. Set on every signature (Celery 5.7 deprecates the task's `queue` attribute).
QUEUES = {kind: TRAINING_QUEUE if kind in Job.TRAINING_KINDS else DEFAULT_QUEUE for kind in TASKS}


def signature_for(job: Job):
    """An immutable signature (the job id is its only argument), routed to its kind's queue."""
    return TASKS[job.kind].si(job.pk).set(queue=QUEUES[job.kind])


def start_chain(job_ids: list[int]) -> None:
    """Send the jobs as one Celery chain, in order. Called on commit by actions.launch_round / resume_job."""
    jobs = {job.pk: job for job in Job.objects.filter(pk__in=job_ids)}
    chain(*[signature_for(jobs[pk]) for pk in job_ids]).apply_async()
