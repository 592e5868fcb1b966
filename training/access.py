"""Who may see rounds: one function per object type, used by every view and the consumer.

Reviewers (and admins) read rounds; only admins launch, cancel and resume. Anyone else gets 404.
A failed job's traceback is an admin's to read; reviewers see its summary, on the pages and in the API.
"""

from __future__ import annotations

from django.http import Http404

from annotate.access import is_admin, is_reviewer
from training.models import Job, Round


def round_for_reviewer(request, round_id: int) -> Round:
    if not is_reviewer(request.user):
        raise Http404("no such round")
    round_ = Round.objects.select_related("campaign").filter(pk=round_id).first()
    if round_ is None:
        raise Http404("no such round")
    return round_


def round_for_admin(request, round_id: int) -> Round:
    if not is_admin(request.user):
        raise Http404("no such round")
    round_ = Round.objects.select_related("campaign").filter(pk=round_id).first()
    if round_ is None:
        raise Http404("no such round")
    return round_


def job_for_admin(request, round_id: int, job_id: int) -> Job:
    round_ = round_for_admin(request, round_id)
    job = Job.objects.select_related("round__campaign").filter(pk=job_id, round=round_).first()
    if job is None:
        raise Http404("no such job")
    return job


def sees_tracebacks(user) -> bool:
    """Whether a user is shown a failed job's whole error with its traceback (admins) or only its summary."""
    return is_admin(user)


def job_error_for(user, job: Job) -> str:
    """A job's error as this user may read it: whole for admins, its first paragraph for reviewers."""
    return job.error if sees_tracebacks(user) else job.error_summary()
