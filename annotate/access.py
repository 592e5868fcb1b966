"""Who may see what: one function per object type, used by every view.

A user asking for what is not theirs gets 404 (its existence is not confirmed) and nothing changes.
"""

from __future__ import annotations

from django.http import Http404

from annotate.models import AILabeler, AILabelingRun, Campaign

REVIEWERS_GROUP = "reviewers"


def is_admin(user) -> bool:
    return user.is_authenticated and user.is_active and (user.is_superuser or user.is_staff)


def is_reviewer(user) -> bool:
    """Reviewers read every campaign and round; admins are reviewers too."""
    if is_admin(user):
        return True
    if not user.is_authenticated:
        return False
    cached = getattr(user, "_pairloop_is_reviewer", None)
    if cached is None:
        cached = user.groups.filter(name=REVIEWERS_GROUP).exists()
        user._pairloop_is_reviewer = cached
    return cached


def campaigns_for_user(user):
    if is_reviewer(user):
        return Campaign.objects.all()
    return Campaign.objects.filter(members=user, is_active=True)


def campaign_for_labeler(request, slug: str) -> Campaign:
    """A campaign the user may label: an active one they are a member of (admins: any active one)."""
    user = request.user
    # On every judgment: one plain query rather than a built one (membership checked in the same row, and the
    # further axes read with it as one JSON column, so that Campaign.axes() queries nothing more).
    members = Campaign.members.through._meta.db_table
    campaign = next(iter(Campaign.objects.raw(
        f"""SELECT c.*, {Campaign.further_axes_json_sql("c.id")} AS further_axes_json
            FROM {Campaign._meta.db_table} c WHERE c.slug = %s AND c.is_active
            AND (%s OR EXISTS (SELECT 1 FROM {members} m WHERE m.campaign_id = c.id AND m.user_id = %s)) LIMIT 1""",
        [slug, is_admin(user), user.pk],
    )), None)
    if campaign is None:
        raise Http404("no such campaign")
    return campaign


def campaign_for_reviewer(request, slug: str) -> Campaign:
    if not is_reviewer(request.user):
        raise Http404("no such campaign")
    campaign = Campaign.objects.filter(slug=slug).first()
    if campaign is None:
        raise Http404("no such campaign")
    return campaign


def campaign_for_admin(request, slug: str) -> Campaign:
    if not is_admin(request.user):
        raise Http404("no such campaign")
    campaign = Campaign.objects.filter(slug=slug).first()
    if campaign is None:
        raise Http404("no such campaign")
    return campaign


def ai_labeler_for_admin(request, slug: str, labeler_id: int) -> AILabeler:
    campaign = campaign_for_admin(request, slug)
    labeler = AILabeler.objects.filter(pk=labeler_id, campaign=campaign).select_related("campaign").first()
    if labeler is None:
        raise Http404("no such AI labeler")
    return labeler


def ai_labeling_run_for_admin(request, slug: str, labeler_id: int, run_id: int) -> AILabelingRun:
    labeler = ai_labeler_for_admin(request, slug, labeler_id)
    run = labeler.runs.filter(pk=run_id).select_related("labeler").first()
    if run is None:
        raise Http404("no such run")
    return run
