from django.contrib import admin

from annotate.models import Assignment, Campaign, Judgment, Pair, Prompt, Response


@admin.register(Campaign)
class CampaignAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "overlap", "is_active", "created_at"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["members"]
    search_fields = ["name", "slug"]


@admin.register(Prompt)
class PromptAdmin(admin.ModelAdmin):
    list_display = ["id", "campaign", "text", "created_at"]
    list_filter = ["campaign"]
    search_fields = ["text"]


@admin.register(Response)
class ResponseAdmin(admin.ModelAdmin):
    list_display = ["id", "prompt", "source", "round", "created_at"]
    list_filter = ["source"]
    raw_id_fields = ["prompt", "round"]
    search_fields = ["text"]


@admin.register(Pair)
class PairAdmin(admin.ModelAdmin):
    list_display = ["id", "campaign", "prompt", "priority", "judgments_count", "is_open", "round"]
    list_filter = ["campaign", "is_open"]
    raw_id_fields = ["prompt", "response_a", "response_b", "round"]


@admin.register(Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ["id", "pair", "labeler", "a_on_left", "expires_at", "completed_at", "skipped"]
    raw_id_fields = ["pair", "labeler"]


@admin.register(Judgment)
class JudgmentAdmin(admin.ModelAdmin):
    list_display = ["id", "pair", "labeler", "choice", "strength", "milliseconds", "source", "created_at"]
    list_filter = ["choice", "source"]
    raw_id_fields = ["pair", "assignment", "labeler"]
