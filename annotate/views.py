"""Labeling views: thin functions — parse input, check access, call an action, render.

The labeling path is one round trip per judgment: the submit's response is the next pair's
fragment, which htmx swaps in.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import Count, Q
from django.http import Http404, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from annotate import actions, statistics
from annotate.access import (
    ai_labeler_for_admin,
    campaign_for_admin,
    campaign_for_labeler,
    campaign_for_reviewer,
    campaigns_for_user,
    is_admin,
    is_reviewer,
)
from annotate.importing import ImportFailed, start_import_job
from annotate.models import Assignment, Exclusion, ImportJob, Judgment
from annotate.transfer import (
    CappedUpload,
    ExportRefused,
    export_download,
    import_options,
    readable_size,
    upload_too_large,
)


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
        "axes": campaign.axes(),
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
    if campaign.warning_pending_for(request.user):
        return render(request, "annotate/label.html", {"campaign": campaign, "warning_pending": True})
    return _render_pair(request, campaign)


@login_required
@require_POST
def acknowledge_warning(request, slug):
    campaign = campaign_for_labeler(request, slug)
    actions.acknowledge_content_warning(campaign, request.user)
    return redirect("label", slug)


def _int_or_none(value):
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _posted_choices(request, campaign) -> tuple[dict | None, dict | None]:
    """With further axes, the page posts choice-KEY and strength-KEY per axis: ({key: choice}, {key: strength})."""
    axes = campaign.axes()
    if len(axes) == 1:
        return None, None
    return ({axis.key: request.POST.get(f"choice-{axis.key}", "") for axis in axes},
            {axis.key: _int_or_none(request.POST.get(f"strength-{axis.key}")) for axis in axes})


@login_required
@require_POST
def judge(request, slug, assignment_id):
    campaign = campaign_for_labeler(request, slug)
    milliseconds = _int_or_none(request.POST.get("ms"))
    choices, strengths = _posted_choices(request, campaign)
    try:
        judgment, created = actions.submit_judgment(
            assignment_id=assignment_id,
            labeler=request.user,
            choice=request.POST.get("choice", ""),
            strength=_int_or_none(request.POST.get("strength")),
            choices=choices,
            strengths=strengths,
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
    from annotate.exporting import has_chat_prompts, left_out  # pyarrow: loaded by the first export page

    campaign = campaign_for_reviewer(request, slug)
    queue = statistics.queue_state(campaign)
    context = {
        "campaign": campaign,
        "pair_count": queue.pairs,
        "open_count": queue.open_pairs,
        "judgment_count": queue.judgments,
        "by_choice": statistics.judgments_by_choice(campaign),
        "usable": statistics.usable_judgments(campaign),
        "labelers": statistics.labeler_figures(campaign),
        "is_admin": is_admin(request.user),
        "rounds": campaign.rounds.all()[:20],
        "left_out": left_out(campaign),
        "chat": has_chat_prompts(campaign),
        "axes": campaign.axes(),
        "ai_labelers": list(campaign.ai_labelers.all()) if is_admin(request.user) else [],
    }
    return render(request, "annotate/campaign_detail.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def quality(request, slug):
    """The campaign's label quality for reviewers; admins also exclude judgments and include them again."""
    error = ""
    if request.method == "POST":
        campaign = campaign_for_admin(request, slug)
        try:
            done = _change_exclusions(request, campaign)
        except actions.ExclusionError as exc:
            error = str(exc)
        else:
            messages.success(request, done)
            return redirect("quality", slug)
    else:
        campaign = campaign_for_reviewer(request, slug)
    from annotate.quality import FRESH_SECONDS, quality_report  # krippendorff: loaded by the first report

    return render(request, "annotate/quality.html", {
        "campaign": campaign,
        "report": quality_report(campaign),
        "fresh_seconds": FRESH_SECONDS,
        "is_admin": is_admin(request.user),
        "error": error,
        "form": request.POST if error else {},
    }, status=400 if error else 200)


def _change_exclusions(request, campaign) -> str:
    """Parse the quality page's exclude / include form and call the action; returns what was done."""
    data = request.POST
    if data.get("action") == "include":
        pk = _int_or_none(data.get("exclusion"))
        exclusion = Exclusion.objects.filter(campaign=campaign, pk=pk).first()
        if exclusion is None:
            raise actions.ExclusionError("exclusion: no such exclusion in this campaign")
        actions.include_again(exclusion, by=request.user)
        return f"Included again: {exclusion.describe()}"
    if data.get("action") != "exclude":
        raise actions.ExclusionError("action: exclude or include")
    labeler = judgment = since = None
    if given := data.get("judgment", "").strip():
        judgment = Judgment.objects.filter(pk=_int_or_none(given), pair__campaign=campaign).first()
        if judgment is None:
            raise actions.ExclusionError(f"judgment: no judgment {given!r} in this campaign")
    else:
        username = data.get("labeler", "").strip()
        labeler = (get_user_model().objects.filter(username=username, judgments__pair__campaign=campaign)
                   .first())
        if labeler is None:
            raise actions.ExclusionError(f"labeler: no labeler {username!r} judged in this campaign")
        if data.get("since", "").strip():
            since = parse_datetime(data["since"].strip())
            if since is None:
                raise actions.ExclusionError("since: give a date and time, e.g. 2026-05-01T09:00")
            if timezone.is_naive(since):
                since = timezone.make_aware(since)
    exclusion = actions.exclude_judgments(campaign, by=request.user, labeler=labeler, since=since,
                                          judgment=judgment, reason=data.get("reason", ""))
    return f"Excluded {exclusion.describe()}"


@login_required
@require_GET
def export(request, slug):
    campaign = campaign_for_reviewer(request, slug)
    try:
        return export_download(campaign, format=request.GET.get("format", "jsonl"),
                               raw=request.GET.get("raw") == "1",
                               trl_format=request.GET.get("trl_format", "auto"),
                               axis=request.GET.get("axis") or None)
    except ExportRefused as exc:
        return HttpResponseBadRequest(str(exc))


@csrf_exempt  # the upload cap must be in place before the body is read; CSRF is checked just below
@login_required
@require_http_methods(["GET", "POST"])
def import_pairs_view(request, slug):
    campaign = campaign_for_admin(request, slug)
    capped = CappedUpload.install(request)
    return _import_page(request, campaign, capped)


@csrf_protect
def _import_page(request, campaign, capped: CappedUpload):
    error, status = "", 200
    if request.method == "POST":
        upload = request.FILES.get("file")
        if capped.refused:
            error, status = (f"{upload_too_large(capped.cap)} Import it on the server with manage.py "
                             "import_pairs, or ask for a higher limit."), 413
        elif upload is None:
            error, status = "Choose a file to import.", 400
        else:
            try:
                pairs_per_prompt, priority = import_options(request.POST)
            except ValueError as exc:
                error, status = str(exc), 400
            else:
                job = start_import_job(campaign, request.user, upload, pairs_per_prompt=pairs_per_prompt,
                                       priority=priority)
                return redirect(job)
    jobs = ImportJob.objects.filter(campaign=campaign)[:10]
    return render(request, "annotate/import.html", {
        "campaign": campaign, "error": error, "jobs": jobs, "max_upload": readable_size(capped.cap),
    }, status=status)


@login_required
@require_GET
def import_job(request, slug, import_id):
    campaign = campaign_for_admin(request, slug)
    job = get_object_or_404(ImportJob, pk=import_id, campaign=campaign)
    template = "annotate/import_job.html#status" if request.htmx else "annotate/import_job.html"
    return render(request, template, {"campaign": campaign, "job": job})


@csrf_exempt  # the upload cap must be in place before the body is read; CSRF is checked just below
@login_required
@require_http_methods(["GET", "POST"])
def eval_sets_view(request, slug):
    campaign = campaign_for_admin(request, slug)
    capped = CappedUpload.install(request)
    return _eval_sets_page(request, campaign, capped)


@csrf_protect
def _eval_sets_page(request, campaign, capped: CappedUpload):
    from annotate.evalsets import eval_sets_of, import_eval_upload  # pyarrow: loaded by the first upload

    errors, status = [], 200
    if request.method == "POST":
        upload = request.FILES.get("file")
        if capped.refused:
            errors, status = [upload_too_large(capped.cap)], 413
        elif upload is None:
            errors, status = ["Choose a file to import."], 400
        else:
            try:
                eval_set, created = import_eval_upload(campaign, upload, request.POST.get("name", "").strip())
            except ImportFailed as exc:
                errors, status = exc.lines(), 400
            else:
                count = eval_set.prompts.count()
                messages.success(request, f"Imported {eval_set.name} version {eval_set.version} ({count} prompts)."
                                 if created else f"Version {eval_set.version} is already here: nothing changed.")
                return redirect("eval_sets", campaign.slug)
    return render(request, "annotate/eval_sets.html", {
        "campaign": campaign, "errors": errors, "eval_sets": eval_sets_of(campaign),
        "max_upload": readable_size(capped.cap),
    }, status=status)


@login_required
@require_GET
def ai_labeler_card(request, slug, labeler_id):
    """An AI labeler's card on the campaign page: its last run's progress (htmx polls it while it runs)."""
    labeler = ai_labeler_for_admin(request, slug, labeler_id)
    return _ai_labeler_card(request, labeler)


@login_required
@require_POST
def ai_labeler_start(request, slug, labeler_id):
    labeler = ai_labeler_for_admin(request, slug, labeler_id)
    try:
        count = int(request.POST.get("count", ""))
    except ValueError:
        error = "Say how many pairs to take, a whole number."
    else:
        try:
            actions.start_ai_labeling(labeler, count=count, user=request.user)
            error = ""
        except ValidationError as exc:
            error = " ".join(exc.messages)
    return _ai_labeler_card(request, labeler, error)


@login_required
@require_POST
def ai_labeler_stop(request, slug, labeler_id):
    labeler = ai_labeler_for_admin(request, slug, labeler_id)
    run = labeler.last_run()
    if run is not None:
        actions.stop_ai_labeling(run)
    return _ai_labeler_card(request, labeler)


def _ai_labeler_card(request, labeler, error: str = ""):
    if not request.htmx:
        if error:
            messages.error(request, error)
        return redirect(labeler.campaign)
    return render(request, "annotate/campaign_detail.html#ai-labeler",
                  {"campaign": labeler.campaign, "labeler": labeler, "run": labeler.last_run(), "ai_error": error})  # 200: htmx swaps the card with its error
