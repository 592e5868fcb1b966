"""The Django admin for rounds and jobs. A round's and a job's rows are the record of truth of a run (its
settings, checkpoints, progress): read-only here, their state changes go through training/actions.py."""

from django.contrib import admin

from annotate.admin import ReadOnlyAdmin
from training.models import Job, Round


class JobInline(admin.TabularInline):
    model = Job
    extra = 0
    fields = ["order", "kind", "status", "step", "total_steps", "checkpoint_path"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Round)
class RoundAdmin(ReadOnlyAdmin):
    list_display = ["id", "campaign", "number", "created_at", "finished_at"]
    inlines = [JobInline]


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = ["id", "round", "kind", "status", "step", "total_steps", "heartbeat_at"]
    list_filter = ["kind", "status"]
    list_select_related = ["round__campaign"]
