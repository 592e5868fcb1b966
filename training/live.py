"""Pushes job changes to the browsers watching a round (RoundConsumer renders them).

The event names the job only: the consumer re-reads the row and renders it, so what a browser
sees is always the database's state, and a lost message is healed by the next one or a reload.
"""

from __future__ import annotations

from annotate.live import send


def job_changed(job) -> None:
    job_progressed(job.round_id, job.pk)


def job_progressed(round_id: int, job_id: int) -> None:
    send(f"round-{round_id}", {"type": "job.update", "job_id": job_id})
