"""API tokens: a user's named, scoped, revocable keys for /api/v1/. Only a hash of each secret is kept.

State changes go through api/actions.py.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

LABEL, IMPORT, EXPORT, REVIEW, ADMIN = "label", "import", "export", "review", "admin"
SCOPES = [
    (LABEL, "label the campaigns the user is a member of"),
    (IMPORT, "add pairs to campaigns (admins)"),
    (EXPORT, "download preferences and judgments (reviewers)"),
    (REVIEW, "read campaigns' queues, rounds, samples and ratings (reviewers)"),
    (ADMIN, "create and change campaigns, launch, cancel and resume rounds (admins)"),
]
SCOPE_NAMES = [name for name, _ in SCOPES]


class ApiToken(models.Model):
    """One API key of a user: `pl_<prefix>_<secret>`, looked up by its prefix and checked by its sha256."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for (a pipeline, a notebook).")
    scopes = models.JSONField(default=list,
                              help_text="What it may do; the user's role caps it on every request.")
    prefix = models.CharField(max_length=16, unique=True, help_text="The token's public part, for lookup.")
    hash = models.CharField(max_length=64, help_text="sha256 of the whole token: the secret is never stored.")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, help_text="Refused from this moment on.")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.name} ({self.prefix}) of {self.user}"

    def is_revoked(self) -> bool:
        return self.revoked_at is not None


ROUND_SUCCEEDED, ROUND_FAILED, QUEUE_EMPTY = "round.succeeded", "round.failed", "campaign.queue_empty"
EVENTS = [
    (ROUND_SUCCEEDED, "a round's last job succeeded"),
    (ROUND_FAILED, "a job of a round failed"),
    (QUEUE_EMPTY, "a judgment closed the campaign's last open pair"),
]
EVENT_NAMES = [name for name, _ in EVENTS]


class Webhook(models.Model):
    """A campaign's subscriber: a signed POST to `url` on each of its events (api/webhooks.py)."""

    campaign = models.ForeignKey("annotate.Campaign", on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=500, help_text="Where the POSTs go (http or https).")
    events = models.JSONField(default=list, help_text="Which events it gets; all of them when made without.")
    secret = models.CharField(max_length=64,
                              help_text="Signs each body (HMAC-SHA256); shown once, at creation.")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self):
        return f"{self.url} ({self.campaign})"


class WebhookDelivery(models.Model):
    """One event sent (or being sent) to one webhook: the record of its attempts."""

    PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
    STATUSES = [(PENDING, "pending"), (DELIVERED, "delivered"), (FAILED, "failed")]

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=40, choices=EVENTS)
    key = models.CharField(max_length=100, help_text="What happened, once: the same event is sent once.")
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=10, choices=STATUSES, default=PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True,
                                                       help_text="The last attempt's HTTP status.")
    error = models.TextField(blank=True, help_text="Why the last attempt failed.")
    next_try_at = models.DateTimeField(
        default=timezone.now, db_index=True,
        help_text="When its next try is due (during a try: when that try is given up as lost); the beat "
                  "sweep sends again a pending delivery long overdue.")
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["webhook", "key"], name="one_delivery_per_event")]

    def __str__(self):
        return f"{self.event} to {self.webhook.url}"
