"""Celery task of the API: a webhook delivery, by its id, retried with backoff (api/webhooks.py). It runs on
the `webhooks` queue (settings.CELERY_TASK_ROUTES), so a slow receiver never holds up jobs or imports."""

from __future__ import annotations

from celery import shared_task

from api import webhooks


@shared_task(bind=True, name="api.deliver_webhook", max_retries=webhooks.MAX_ATTEMPTS, acks_late=True,
             time_limit=webhooks.time_limit())
def deliver_webhook(self, delivery_id: int) -> str:
    outcome = webhooks.attempt(delivery_id)
    if outcome == "retry":
        raise self.retry(countdown=webhooks.backoff(self.request.retries + 1))
    return outcome
