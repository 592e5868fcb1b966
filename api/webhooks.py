"""Webhooks: a campaign's subscribers get a signed POST when one of its rounds succeeds or fails and when
its queue empties. One door per state change: add and remove webhooks, record an event's deliveries,
and make one delivery attempt (api/tasks.py retries it with backoff).

Each POST carries the JSON event and the headers
  X-Pairloop-Event      the event's name (round.succeeded, round.failed, campaign.queue_empty)
  X-Pairloop-Delivery   the delivery's id: the same on every retry, so a receiver can skip repeats
  X-Pairloop-Timestamp  Unix seconds when this attempt was signed
  X-Pairloop-Signature  sha256=HMAC-SHA256(secret, "<timestamp>.<body>") in hex
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.error
import urllib.request

from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.utils import timezone

from api.models import EVENT_NAMES, QUEUE_EMPTY, ROUND_FAILED, ROUND_SUCCEEDED, Webhook, WebhookDelivery

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10  # one attempt waits this long for the receiver's answer
MAX_ATTEMPTS = 8  # then the delivery is marked failed
BACKOFF_SECONDS = 30  # before retry n (1, 2, ...): 30 s x 2^(n-1), so the last comes about 2 hours on


class WebhookRefused(ValueError):
    """A webhook that cannot be added as asked (not an http(s) URL, an unknown event)."""


def add_webhook(campaign, url: str, events: list[str] | None = None) -> tuple[Webhook, str]:
    """A new webhook of the campaign; returns (row, secret). Without `events`, every event."""
    if not url.startswith(("http://", "https://")):
        raise WebhookRefused("the URL must start with http:// or https://")
    wanted = sorted(set(events)) if events else list(EVENT_NAMES)
    unknown = [event for event in wanted if event not in EVENT_NAMES]
    if unknown:
        raise WebhookRefused(f"unknown event {', '.join(unknown)}: use {', '.join(EVENT_NAMES)}")
    secret = secrets.token_hex(32)
    return Webhook.objects.create(campaign=campaign, url=url, events=wanted, secret=secret), secret


def remove_webhook(webhook: Webhook) -> None:
    """Stop sending to it (kept with its deliveries as a record)."""
    Webhook.objects.filter(pk=webhook.pk).update(is_active=False)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def record_event(campaign_id: int, event: str, key: str, payload: dict) -> list[WebhookDelivery]:
    """A delivery per active webhook of the campaign that wants `event`, each sent on commit by a Celery
    task; an event already recorded (the same key) is not sent again."""
    from api import tasks

    made = []
    for webhook in Webhook.objects.filter(campaign_id=campaign_id, is_active=True):
        if event not in webhook.events:
            continue
        try:
            with transaction.atomic():
                delivery = WebhookDelivery.objects.create(
                    webhook=webhook, event=event, key=key,
                    payload={"event": event, "campaign": webhook.campaign.slug, **payload})
        except IntegrityError:
            continue  # told already
        transaction.on_commit(lambda pk=delivery.pk: tasks.deliver_webhook.delay(pk))
        made.append(delivery)
    return made


def attempt(delivery_id: int) -> str:
    """POST the delivery once: "delivered", "retry" (the receiver was down, slow, or answered 429 or 5xx:
    worth another try) or "failed" (any other answer; or the webhook is gone or off)."""
    delivery = WebhookDelivery.objects.select_related("webhook").filter(pk=delivery_id).first()
    if delivery is None or delivery.status != WebhookDelivery.PENDING:
        return delivery.status if delivery is not None else WebhookDelivery.FAILED
    webhook = delivery.webhook
    if not webhook.is_active:
        _finish(delivery, WebhookDelivery.FAILED, error="the webhook was removed")
        return WebhookDelivery.FAILED
    body = json.dumps({**delivery.payload, "delivery": delivery.pk}, cls=DjangoJSONEncoder).encode()
    timestamp = int(time.time())
    request = urllib.request.Request(webhook.url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "pairloop-webhook",
        "X-Pairloop-Event": delivery.event, "X-Pairloop-Delivery": str(delivery.pk),
        "X-Pairloop-Timestamp": str(timestamp),
        "X-Pairloop-Signature": signature(webhook.secret, timestamp, body)})
    WebhookDelivery.objects.filter(pk=delivery.pk).update(attempts=delivery.attempts + 1)
    delivery.attempts += 1
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as answer:  # noqa: S310 - http(s) only
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out
        return _retry_or_fail(delivery, None, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
    if 200 <= status < 300:
        _finish(delivery, WebhookDelivery.DELIVERED, status=status)
        return WebhookDelivery.DELIVERED
    if status == 429 or status >= 500:
        return _retry_or_fail(delivery, status, f"the receiver answered {status}")
    _finish(delivery, WebhookDelivery.FAILED, status=status, error=f"the receiver answered {status}")
    return WebhookDelivery.FAILED


def _retry_or_fail(delivery: WebhookDelivery, status: int | None, error: str) -> str:
    if delivery.attempts >= MAX_ATTEMPTS:
        _finish(delivery, WebhookDelivery.FAILED, status=status,
                error=f"{error} (after {delivery.attempts} tries)")
        return WebhookDelivery.FAILED
    WebhookDelivery.objects.filter(pk=delivery.pk).update(response_status=status, error=error)
    return "retry"


def _finish(delivery: WebhookDelivery, outcome: str, *, status: int | None = None, error: str = "") -> None:
    delivered = timezone.now() if outcome == WebhookDelivery.DELIVERED else None
    WebhookDelivery.objects.filter(pk=delivery.pk, status=WebhookDelivery.PENDING).update(
        status=outcome, response_status=status, error=error, delivered_at=delivered)


def backoff(attempts: int) -> int:
    """Seconds before the next try, after `attempts` tries."""
    return BACKOFF_SECONDS * 2 ** max(0, attempts - 1)


# ---------------------------------------------------------------------------------------------
# The events (receivers connected in api/apps.py)
# ---------------------------------------------------------------------------------------------

def on_job_state_changed(sender, job, **kwargs) -> None:
    """A job failed (round.failed), or the last job of its round succeeded (round.succeeded)."""
    from training.models import Job

    round_ = job.round
    if job.status == Job.FAILED:
        key = f"round-{round_.pk}-job-{job.pk}-attempt-{job.attempts}-failed"
        payload = {"round": round_.pk, "number": round_.number, "status": "failed", "job": job.pk,
                   "kind": job.kind, "error": job.error.splitlines()[0] if job.error else ""}
        record_event(round_.campaign_id, ROUND_FAILED, key, payload)
    elif job.status == Job.SUCCEEDED and not round_.jobs.exclude(status=Job.SUCCEEDED).exists():
        final = {other.kind: other.result for other in round_.jobs.all()}
        payload = {"round": round_.pk, "number": round_.number, "status": "succeeded",
                   "policy_checkpoint": round_.policy_checkpoint, "results": final}
        record_event(round_.campaign_id, ROUND_SUCCEEDED, f"round-{round_.pk}-succeeded", payload)


def on_queue_emptied(sender, campaign, judgment, **kwargs) -> None:
    record_event(campaign.pk, QUEUE_EMPTY, f"campaign-{campaign.pk}-empty-after-{judgment.pk}",
                 {"last_judgment": judgment.pk})
