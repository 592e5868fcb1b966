from django.contrib import admin

from training.models import Job, Round


class JobInline(admin.TabularInline):
    model = Job
    extra = 0
    fields = ["order", "kind", "status", "step", "total_steps", "checkpoint_path"]


@admin.register(Round)
class RoundAdmin(admin.ModelAdmin):
    list_display = ["id", "campaign", "number", "created_at", "finished_at"]
    inlines = [JobInline]


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "round", "kind", "status", "step", "total_steps", "heartbeat_at"]
    list_filter = ["kind", "status"]
