"""Celery tasks of the labeling app, on the default queue: a web upload's import, beat's sweep of import
jobs left behind, and refreshing a campaign's cached quality report.

The import task takes the ImportJob's id; the work and every write to the row are in annotate/importing.py.
"""

from __future__ import annotations

from celery import shared_task

from annotate import importing, quality
from annotate.models import Campaign


@shared_task(name="annotate.import_job", ignore_result=True)  # importing.IMPORT_TASK
def import_job(job_id: int) -> None:
    importing.run_import_job(job_id)


@shared_task(name="annotate.recover_stale_import_jobs", ignore_result=True)
def recover_stale_import_jobs() -> int:
    """Beat's sweep: import jobs whose worker died fail, lost ones are sent again (recover_stale_jobs)."""
    return len(importing.recover_stale_jobs())


@shared_task(name="annotate.refresh_quality_report", ignore_result=True)  # quality.REFRESH_TASK
def refresh_quality_report(campaign_id: int) -> None:
    campaign = Campaign.objects.filter(pk=campaign_id).first()
    if campaign is not None:
        quality.refresh(campaign)
