"""The admin lists API tokens (never their secret, which is not stored) and revokes them, and lists
webhooks (never their secret) and their deliveries."""

from __future__ import annotations

from django.contrib import admin

from api import actions
from api.models import ApiToken, Webhook, WebhookDelivery


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "scopes", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "prefix", "user__username"]
    readonly_fields = ["user", "name", "scopes", "prefix", "created_at", "last_used_at", "revoked_at"]
    exclude = ["hash"]
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # a token is made by `manage.py create_api_token`, which shows it once

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            actions.revoke_token(token)
        self.message_user(request, f"Revoked {queryset.count()} token(s).")


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    list_display = ["url", "campaign", "events", "is_active", "created_at"]
    list_filter = ["is_active", "campaign"]
    readonly_fields = ["campaign", "url", "events", "is_active", "created_at"]
    exclude = ["secret"]

    def has_add_permission(self, request):
        return False  # made through the API, which shows the secret once


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ["event", "webhook", "status", "attempts", "response_status", "created_at", "delivered_at"]
    list_filter = ["status", "event"]
    readonly_fields = ["webhook", "event", "key", "payload", "status", "attempts", "response_status", "error",
                       "next_try_at", "created_at", "delivered_at"]

    def has_add_permission(self, request):
        return False
