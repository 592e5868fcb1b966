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
