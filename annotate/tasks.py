"""Celery tasks of the labeling app: a web upload's import, on the default queue.

The task takes the ImportJob's id; the work and every write to the row are in annotate/importing.py.
"""

from __future__ import annotations

from celery import shared_task

from annotate import importing


@shared_task(name="annotate.import_job", ignore_result=True)
def import_job(job_id: int) -> None:
    importing.run_import_job(job_id)
