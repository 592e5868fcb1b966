"""Pushes job changes to the browsers watching a round (RoundConsumer renders them).

The event names the job only: the consumer re-reads the row and renders it, so what a browser
sees is always the database's state, and a lost message is healed by the next one or a reload.
"""

from __future__ import annotations

import logging

from django.dispatch import Signal

from annotate.live import send

# Sent (job=) after a job's status changed and was committed, from every door that changes it (finish,
# fail, a stale heartbeat, an unpublished chain, cancel, resume): the API's webhooks listen to it.
job_state_changed = Signal()
log = logging.getLogger(__name__)


def job_changed(job) -> None:
    job_progressed(job.round_id, job.pk)
    for receiver, failure in job_state_changed.send_robust(sender=type(job), job=job):
        if failure is not None:  # the change is committed already: a listener's fault must not undo the caller
            log.error("%s failed on %s: %r", receiver, job, failure)


def job_progressed(round_id: int, job_id: int) -> None:
    send(f"round-{round_id}", {"type": "job.update", "job_id": job_id})
