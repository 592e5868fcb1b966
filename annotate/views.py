"""Labeling views: thin functions — parse input, check access, call an action, render.

The labeling path is one round trip per judgment: the submit's response is the next pair's
fragment, which htmx swaps in.
"""

from __future__ import annotations

import tempfile

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, F, Q
from django.http import FileResponse, Http404, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from annotate import actions
from annotate.access import (
    campaign_for_admin,
    campaign_for_labeler,
    campaign_for_reviewer,
    campaigns_for_user,
    is_admin,
    is_reviewer,
)
from annotate.models import Assignment, Judgment, Pair


@login_required
@require_GET
def home(request):
    campaigns = campaigns_for_user(request.user).annotate(
        open_pairs=Count("pairs", filter=Q(pairs__is_open=True), distinct=True),
    )
    return render(request, "annotate/home.html", {
        "campaigns": campaigns,
        "is_admin": is_admin(request.user),
        "is_reviewer": is_reviewer(request.user),
    })


def _pair_context(request, campaign, claim: actions.Claim | None, error: str = "", note: str = "",
                  last_judgment_id: int | None = None):
    assignment = claim.assignment if claim else None
    left = right = None
    if assignment is not None:
        left, right = assignment.shown()
    return {
        "campaign": campaign,
        "assignment": assignment,
        "prompt": assignment.pair.prompt if assignment else None,
        "left": left,
        "right": right,
        "reason": claim.reason if claim else "",
        "error": error,
        "note": note,
        "judged_today": actions.judged_today(campaign, request.user),
        "left_in_campaign": actions.judgments_left(campaign),
        "choices": campaign.choices_offered(),
        # What "Undo last" takes back: the labeler's last judgment as this page shows it (a submit knows it).
        "last_judgment_id": last_judgment_id or actions.last_undoable_judgment_id(campaign, request.user),
    }


def _render_pair(request, campaign, error: str = "", note: str = "", claim=None, last_judgment_id=None):
    claim = claim or actions.claim_next_pair(campaign, request.user)
    context = _pair_context(request, campaign, claim, error=error, note=note, last_judgment_id=last_judgment_id)
    template = "annotate/label.html#pair" if request.htmx else "annotate/label.html"
    return render(request, template, context)


@login_required
@require_GET
def label(request, slug):
    campaign = campaign_for_labeler(request, slug)
    return _render_pair(request, campaign)


def _int_or_none(value):
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@login_required
@require_POST
def judge(request, slug, assignment_id):
    campaign = campaign_for_labeler(request, slug)
    milliseconds = _int_or_none(request.POST.get("ms"))
    try:
        judgment, created = actions.submit_judgment(
            assignment_id=assignment_id,
            labeler=request.user,
            choice=request.POST.get("choice", ""),
            strength=_int_or_none(request.POST.get("strength")),
            rationale=request.POST.get("rationale", ""),
            milliseconds=milliseconds,
            campaign=campaign,
        )
    except Assignment.DoesNotExist:
        raise Http404("no such assignment") from None
    except actions.JudgmentError as exc:
        return _render_pair(request, campaign, error=str(exc))
    if not created:
        return _render_pair(request, campaign, note="Already recorded.")
    undoable = judgment.source == Judgment.HUMAN and settings.PAIRLOOP["UNDO_SECONDS"] > 0
    return _render_pair(request, campaign, last_judgment_id=judgment.pk if undoable else None)


@login_required
@require_POST
def skip(request, slug, assignment_id):
    campaign = campaign_for_labeler(request, slug)
    try:
        actions.skip_assignment(assignment_id=assignment_id, labeler=request.user, campaign=campaign)
    except Assignment.DoesNotExist:
        raise Http404("no such assignment") from None
    return _render_pair(request, campaign, note="Skipped.")


@login_required
@require_POST
def undo(request, slug):
    campaign = campaign_for_labeler(request, slug)
    judgment_id = _int_or_none(request.POST.get("judgment"))
    if judgment_id is None:  # the page showed no judgment to undo
        return _render_pair(request, campaign, note=NOTHING_TO_UNDO)
    try:
        undone = actions.undo_last_judgment(campaign, request.user, judgment_id=judgment_id)
    except actions.UndoRefused as exc:
        return _render_pair(request, campaign, note=str(exc))
    return _render_pair(request, campaign, note="Undone: judge it again." if undone else NOTHING_TO_UNDO)


NOTHING_TO_UNDO = "Nothing to undo (only the last few minutes can be undone)."


@login_required
@require_GET
def instructions(request, slug):
    campaign = campaign_for_labeler(request, slug)
    template = "annotate/instructions.html#body" if request.htmx else "annotate/instructions.html"
    return render(request, template, {"campaign": campaign})


@login_required
@require_GET
def campaign_detail(request, slug):
    campaign = campaign_for_reviewer(request, slug)
    pairs = Pair.objects.filter(campaign=campaign)
    judgments = Judgment.objects.filter(pair__campaign=campaign)
    by_choice = dict(judgments.values_list("choice").annotate(n=Count("id")))
    on_gold = Q(pair__gold_choice__gt="")
    labelers = (
        judgments.exclude(labeler=None)
        .values("labeler__username", "source")
        .annotate(
            n=Count("id"),
            today=Count("id", filter=Q(created_at__date=timezone.localdate())),
            gold=Count("id", filter=on_gold),
            gold_agreed=Count("id", filter=on_gold & Q(choice=F("pair__gold_choice"))),
        )
        .order_by("-n")
    )
    context = {
        "campaign": campaign,
        "pair_count": pairs.count(),
        "open_count": pairs.filter(is_open=True).count(),
        "judgment_count": judgments.count(),
        "by_choice": [(label, by_choice.get(value, 0)) for value, label in Judgment.CHOICES],
        "usable": judgments.filter(choice__in=[Judgment.A, Judgment.B]).count(),
        "labelers": labelers,
        "is_admin": is_admin(request.user),
        "rounds": campaign.rounds.all()[:20],
    }
    return render(request, "annotate/campaign_detail.html", context)


EXPORT_FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet"}


class TempFileDownload(FileResponse):
    """A download of an open temporary file, closed (and so deleted) with the response.

    Under ASGI, Django's FileResponse reads a plain file whole into memory first; this one reads it a
    block at a time there too."""

    def __init__(self, handle, **kwargs):
        self.handle = handle  # file_to_stream is unset when streaming_content is replaced (the test client)
        super().__init__(handle, **kwargs)

    async def __aiter__(self):
        read = sync_to_async(self.handle.read, thread_sensitive=False)
        while chunk := await read(self.block_size):
            yield chunk


@login_required
@require_GET
def export(request, slug):
    campaign = campaign_for_reviewer(request, slug)
    from annotate.exporting import export_to_file  # pyarrow: loaded by the first export, not every worker

    fmt = request.GET.get("format", "jsonl")
    if fmt not in EXPORT_FORMATS:
        return HttpResponseBadRequest("format must be jsonl or parquet")
    raw = request.GET.get("raw") == "1"
    name = f"{campaign.slug}-{'judgments' if raw else 'pairs'}{EXPORT_FORMATS[fmt]}"
    handle = tempfile.TemporaryFile(prefix="pairloop-export-")  # unnamed: its space returns when it closes
    try:
        export_to_file(campaign, handle, format=fmt, raw=raw)
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return TempFileDownload(handle, as_attachment=True, filename=name)


@login_required
def import_pairs_view(request, slug):
    campaign = campaign_for_admin(request, slug)
    from annotate.importing import ImportFailed, import_upload

    if request.method == "POST":
        upload = request.FILES.get("file")
        if upload is None:
            messages.error(request, "Choose a file to import.")
        else:
            try:
                result = import_upload(
                    campaign,
                    upload,
                    pairs_per_prompt=_int_or_none(request.POST.get("pairs_per_prompt")),
                    priority=_int_or_none(request.POST.get("priority")) or 0,
                )
            except ImportFailed as exc:
                messages.error(request, f"Nothing was imported. {exc}")
            else:
                messages.success(request, f"Imported {result.created} pairs; skipped {result.skipped} duplicates.")
        return redirect("campaign_detail", slug=campaign.slug)
    return render(request, "annotate/import.html", {"campaign": campaign})
