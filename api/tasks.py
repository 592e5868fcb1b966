"""Celery tasks of the API: a webhook delivery, by its id, retried with backoff (api/webhooks.py), on the
`webhooks` queue (settings.CELERY_TASK_ROUTES) so a slow receiver never holds up jobs or imports; and
beat's check for lost deliveries, on the default queue."""

from __future__ import annotations

from celery import shared_task

from api import webhooks


@shared_task(bind=True, name="api.deliver_webhook", max_retries=None, acks_late=True,  # webhooks.DELIVER_TASK
             time_limit=webhooks.time_limit())
def deliver_webhook(self, delivery_id: int, tries: int | None = None) -> str:
    """One try of a delivery, as its try number `tries` + 1 (webhooks.attempt bounds the tries)."""
    outcome, tries = webhooks.attempt(delivery_id, tries)
    if outcome == webhooks.RETRY:
        raise self.retry(args=[delivery_id, tries], countdown=webhooks.backoff(tries))
    return outcome


@shared_task(name="api.resend_stale_webhook_deliveries", ignore_result=True)
def resend_stale_webhook_deliveries() -> int:
    """Beat's check: deliveries whose message or worker was lost are sent again, or failed."""
    resent, failed = webhooks.resend_stale_deliveries()
    return len(resent) + len(failed)
