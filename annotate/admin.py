"""The Django admin for the labeling domain.

Judgments never disappear through it: deleting what judgments hang on (a campaign, prompt, response, pair
or user) is refused with their count, users are deactivated instead, and judgments and assignments are
read-only here (their state changes go through annotate/actions.py). A campaign's changed settings go
through the same action as the API's.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth import admin as auth_admin
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db.models import Count, Q
from django.forms.models import BaseInlineFormSet

from annotate.actions import (
    ai_labeler_account,
    change_campaign_settings,
    deactivate_user,
    remove_axis,
    save_axis,
)
from annotate.models import (
    AILabeler,
    AIRevision,
    AIVerdict,
    Assignment,
    Axis,
    Campaign,
    Judgment,
    Pair,
    Principle,
    Prompt,
    Response,
)

User = get_user_model()


class ReadOnlyAdmin(admin.ModelAdmin):
    """Lists and shows rows, never adds, changes or deletes them: their state changes go through actions."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class KeepsJudgmentsAdmin(admin.ModelAdmin):
    """Refuses to delete rows that judgments hang on, saying how many, before Django collects every row."""

    judgment_paths: tuple[str, ...] = ()  # lookups from Judgment to this model, e.g. "pair__campaign"

    def judgments_on(self, obj):
        """The judgments deleting this row would take with it (PROTECT refuses it)."""
        if not self.judgment_paths:
            return Judgment.objects.none()
        query = Q()
        for path in self.judgment_paths:
            query |= Q(**{path: obj.pk})
        return Judgment.objects.filter(query)

    def refusal_hint(self) -> str:
        return "Judgments are never deleted, so neither is anything they belong to."

    def held_by(self, objs) -> list[str]:
        """One line per row that may not be deleted, saying what holds it (empty: all may go)."""
        held = []
        for obj in objs:
            n = self.judgments_on(obj).count()
            if n:
                held.append(f"{obj}: {n} judgment{'s' if n != 1 else ''}")
        return held

    def get_deleted_objects(self, objs, request):
        held = self.held_by(objs)
        if held:
            # The admin shows these as protected objects under "Cannot delete", and deletes nothing.
            self.message_user(request, self.refusal_hint(), messages.ERROR)
            return [], {}, set(), held
        return super().get_deleted_objects(objs, request)


@admin.register(Campaign)
class CampaignAdmin(KeepsJudgmentsAdmin):
    list_display = ["name", "slug", "overlap", "is_active", "created_at"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["members"]
    search_fields = ["name", "slug"]

    judgment_paths = ("pair__campaign",)

    def refusal_hint(self):
        return ("Judgments are never deleted, so neither is a campaign that has some: "
                "untick “is active” instead.")

    def get_readonly_fields(self, request, obj=None):
        return ["slug", "created_at"] if obj is not None else []  # a campaign's URLs and history keep them

    def get_prepopulated_fields(self, request, obj=None):
        return self.prepopulated_fields if obj is None else {}

    def save_model(self, request, obj, form, change):
        """A change goes through change_campaign_settings, as the API's does: a new overlap reopens or
        closes pairs. The members are saved with the form's other relations."""
        if not change:
            super().save_model(request, obj, form, change)
            return
        change_campaign_settings(obj, **{name: form.cleaned_data[name] for name in form.changed_data
                                         if name != "members"})


@admin.register(Axis)
class AxisAdmin(KeepsJudgmentsAdmin):
    """A campaign's further axes, asked after its own question (the campaign's axis key and question); one
    that has choices cannot be deleted. Saved and removed through the actions."""

    list_display = ["key", "campaign", "position", "question", "allow_tie", "allow_both_bad", "ask_strength"]
    list_filter = ["campaign"]
    fields = ["campaign", "position", "key", "question", "allow_tie", "allow_both_bad", "ask_strength"]
    judgment_paths = ("axis_choices__axis",)

    def refusal_hint(self):
        return "Judgments are never deleted, so neither is an axis that has choices."

    def save_model(self, request, obj, form, change):
        save_axis(obj)

    def delete_model(self, request, obj):
        remove_axis(obj)

    def delete_queryset(self, request, queryset):
        for axis in queryset:
            remove_axis(axis)


@admin.register(Prompt)
class PromptAdmin(KeepsJudgmentsAdmin):
    list_display = ["id", "campaign", "text", "created_at"]
    list_filter = ["campaign"]
    search_fields = ["text"]
    judgment_paths = ("pair__prompt",)


@admin.register(Response)
class ResponseAdmin(KeepsJudgmentsAdmin):
    list_display = ["id", "prompt", "source", "round", "created_at"]
    list_filter = ["source"]
    raw_id_fields = ["prompt", "round"]
    search_fields = ["text"]
    judgment_paths = ("pair__response_a", "pair__response_b")


@admin.register(Pair)
class PairAdmin(KeepsJudgmentsAdmin):
    list_display = ["id", "campaign", "prompt", "priority", "judgments_count", "is_open", "round"]
    list_filter = ["campaign", "is_open"]
    raw_id_fields = ["prompt", "response_a", "response_b", "round"]
    readonly_fields = ["judgments_count", "extra_judgments"]  # kept by the actions, as judgments come and go
    judgment_paths = ("pair",)


@admin.register(Assignment)
class AssignmentAdmin(ReadOnlyAdmin):
    list_display = ["id", "pair", "labeler", "a_on_left", "expires_at", "completed_at", "skipped"]
    list_select_related = ["pair__prompt", "labeler"]


@admin.register(Judgment)
class JudgmentAdmin(ReadOnlyAdmin):
    list_display = ["id", "pair", "labeler", "choice", "strength", "milliseconds", "source", "created_at"]
    list_filter = ["choice", "source"]
    list_select_related = ["pair__prompt", "labeler"]


if admin.site.is_registered(User):
    admin.site.unregister(User)


@admin.register(User)
class UserAdmin(auth_admin.UserAdmin, KeepsJudgmentsAdmin):
    """Django's user admin, where a labeler who has judged is deactivated rather than deleted."""

    actions = ["deactivate"]

    def held_by(self, objs):
        pks = [obj.pk for obj in objs]
        judgments = dict(Judgment.objects.filter(labeler__in=pks).values_list("labeler")
                         .annotate(n=Count("id")).order_by())
        assignments = dict(Assignment.objects.filter(labeler__in=pks).values_list("labeler")
                           .annotate(n=Count("id")).order_by())
        return [f"{user}: {judgments.get(user.pk, 0)} judgments, {assignments.get(user.pk, 0)} assignments"
                for user in objs if judgments.get(user.pk) or assignments.get(user.pk)]

    def refusal_hint(self):
        return ("Judgments are never deleted, so neither is a user who has labeled: deactivate them instead "
                "(the “Deactivate” action on the user list). Their judgments stay and count.")

    @admin.action(description="Deactivate selected users (sign them out; their judgments stay)",
                  permissions=["change"])
    def deactivate(self, request, queryset):
        released = 0
        users = list(queryset)
        for user in users:
            released += deactivate_user(user)
        self.message_user(
            request,
            f"Deactivated {len(users)} user{'s' if len(users) != 1 else ''}; "
            f"{released} pair lease{'s' if released != 1 else ''} went back to the queue.",
            messages.SUCCESS,
        )

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data and not obj.is_active:
            deactivate_user(obj)  # unticking "active" ends their leases too


class PrincipleFormSet(BaseInlineFormSet):
    """The principles of an AI labeler, refused when they leave an axis of its campaign unanswered."""

    def clean(self):
        super().clean()
        campaign = self.instance.campaign if self.instance.campaign_id else None
        kept = [form.cleaned_data for form in self.forms
                if form.cleaned_data and not form.cleaned_data.get("DELETE")]
        if campaign is not None and kept:
            problem = AILabeler.axes_problem(campaign, [row.get("axis", "") for row in kept])
            if problem:
                raise ValidationError(problem)


class PrincipleInline(admin.TabularInline):
    model = Principle
    formset = PrincipleFormSet
    extra = 1


@admin.register(AILabeler)
class AILabelerAdmin(admin.ModelAdmin):
    """An AI labeler and its constitution; its account is made on the first save (annotate.actions)."""

    list_display = ("name", "campaign", "kind", "model", "principle_mode", "on_disagreement")
    list_filter = ("campaign", "kind")
    exclude = ("account",)
    inlines = [PrincipleInline]

    def get_readonly_fields(self, request, obj=None):
        return ("campaign", "name") if obj is not None else ()

    def save_model(self, request, obj, form, change):
        if not change:
            obj.account = ai_labeler_account(obj.campaign, obj.name)
        super().save_model(request, obj, form, change)

    def has_delete_permission(self, request, obj=None):
        return obj is None or not obj.verdicts.exists()


@admin.register(AIVerdict)
class AIVerdictAdmin(ReadOnlyAdmin):
    list_display = ("id", "labeler", "pair", "outcome", "choice_first", "choice_swapped", "created_at")
    list_filter = ("labeler", "outcome")


@admin.register(AIRevision)
class AIRevisionAdmin(ReadOnlyAdmin):
    list_display = ("id", "labeler", "pair", "proposed_choice", "model", "created_at")
    list_filter = ("labeler",)
