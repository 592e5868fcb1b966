"""The admin lists API tokens (never their secret, which is not stored) and revokes them."""

from __future__ import annotations

from django.contrib import admin

from api import actions
from api.models import ApiToken


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
