"""How a round's jobs reach the workers: one Celery task per job kind, sent by its name (so nothing that
sends a job imports training/tasks.py, which imports the actions back), on its kind's queue, with its
kind's time limits.

Job.QUEUES says which kind goes to the `training` queue, which a GPU box consumes with
`celery -A pairloop worker -Q training --concurrency 1` (prefetch 1, acks late: settings.py), and which
light ones go to `default`. Each kind has its own soft and hard time limits
(settings.JOB_SOFT_TIME_LIMITS, PAIRLOOP_TIME_LIMIT_*).
"""

from __future__ import annotations

from celery import chain, current_app
from django.conf import settings

from training.models import Job

TASK_NAMES = {Job.EXPORT: "training.export", Job.SFT: "training.sft", Job.REWARD: "training.reward", Job.PPO: "training.ppo",
              Job.DPO: "training.dpo", Job.GRPO: "training.grpo", Job.SAMPLE: "training.sample",
              Job.ENQUEUE: "training.enqueue", Job.EVALUATE: "training.evaluate"}


def time_limits(kind: str) -> tuple[int, int]:
    """(soft, hard) time limits of a job kind in s: PAIRLOOP_TIME_LIMIT_<KIND>, plus ..._GRACE."""
    soft = settings.JOB_SOFT_TIME_LIMITS[kind]
    return soft, soft + settings.JOB_TIME_LIMIT_GRACE


def signature_for(job: Job):
    """An immutable signature of the job's task, by name (the job id is its only argument), routed to its
    kind's queue, with its kind's time limits."""
    soft, hard = time_limits(job.kind)
    # The queue is set on every signature (Celery 5.7 deprecates the task's `queue` attribute).
    return current_app.signature(TASK_NAMES[job.kind], args=(job.pk,), immutable=True).set(
        queue=job.queue, soft_time_limit=soft, time_limit=hard)


def start_chain(job_ids: list[int]) -> None:
    """Send the jobs as one Celery chain, in order. Called on commit by actions.launch_round / resume_job."""
    jobs = {job.pk: job for job in Job.objects.filter(pk__in=job_ids)}
    chain(*[signature_for(jobs[pk]) for pk in job_ids]).apply_async()
