"""The API's endpoints: thin functions, as the web's views are — check the token's scope, check access
with the web's access function, call the web's action, return the rows: each endpoint's response schema
(api/schemas.py) says what of them the JSON shows. Nothing here changes a row itself."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from ninja import Field, Query, Router, Schema, Status
from ninja.errors import HttpError
from ninja.pagination import paginate

from annotate import actions, statistics
from annotate.access import (
    ai_labeler_for_admin,
    ai_labeling_run_for_admin,
    campaign_for_admin,
    campaign_for_labeler,
    campaign_for_reviewer,
    campaigns_for_user,
    is_reviewer,
)
from annotate.importing import ImportFailed, import_rows, pairs_asked, start_import_job
from annotate.models import Assignment, Axis, Campaign, ImportJob, Judgment, Pair, Prompt
from annotate.transfer import CappedUpload, ExportRefused, export_download, import_options, upload_too_large
from api import schemas, webhooks
from api.auth import require_scope
from api.models import ADMIN, EXPORT, IMPORT, LABEL, REVIEW, Webhook
from api.pagination import Pages
from training import actions as training_actions
from training import evaluation
from training.access import job_for_admin, round_for_admin, round_for_reviewer
from training.config import ConfigError
from training.models import Job, Round
from training.review import policy_ratings

campaigns = Router(tags=["campaigns"])
labeling = Router(tags=["labeling"])
rounds = Router(tags=["rounds"])

# What any endpoint may answer besides its own: no token (401), a scope missing (403), not found or not
# the user's (404), input the schema refuses (422, django-ninja's validation).
REFUSED = {401: schemas.Error, 403: schemas.Error, 404: schemas.Error, 422: schemas.Invalid}
LABELING_REFUSED = {**REFUSED, 429: schemas.Error}  # a token over PAIRLOOP_API_RATE_LIMIT (api/auth.py)


# ---------------------------------------------------------------------------------------------
# Campaigns
# ---------------------------------------------------------------------------------------------

@campaigns.get("/campaigns", response={200: list[schemas.CampaignOut], **REFUSED})
def campaign_list(request):
    """The campaigns the token's user may label (members) or read (reviewers: all of them)."""
    return campaigns_for_user(request.user)


def _refused_settings(exc: ValidationError) -> Status:
    errors = {name: " ".join(messages) for name, messages in exc.message_dict.items()}
    return Status(400, {"detail": "; ".join(f"{name}: {message}" for name, message in errors.items()),
                        "errors": errors})


@campaigns.post("/campaigns", response={201: schemas.CampaignOut, 400: schemas.SettingsError, **REFUSED})
def campaign_create(request, body: schemas.CampaignCreate):
    """Create a campaign with these settings (the defaults for the rest). Scope: admin."""
    require_scope(request, ADMIN)  # the admin scope is an admin's only
    try:
        campaign = actions.create_campaign(**body.dict(exclude_unset=True))
    except ValidationError as exc:
        return _refused_settings(exc)
    return Status(201, campaign)


@campaigns.patch("/campaigns/{unislug:slug}", response={200: schemas.CampaignOut, 400: schemas.SettingsError,
                                                     **REFUSED})
def campaign_update(request, slug: str, body: schemas.CampaignSettings):
    """Change the settings sent (the others stay); a new overlap reopens or closes pairs to match.
    Scope: admin."""
    require_scope(request, ADMIN)
    campaign = campaign_for_admin(request, slug)
    try:
        campaign = actions.change_campaign_settings(campaign, **body.dict(exclude_unset=True))
    except ValidationError as exc:
        return _refused_settings(exc)
    return campaign


def _campaign_for_reader(request, slug: str) -> Campaign:
    """Reviewers read any campaign; a labeler only the active ones they are members of."""
    if is_reviewer(request.user):
        return campaign_for_reviewer(request, slug)
    return campaign_for_labeler(request, slug)


@campaigns.get("/campaigns/{unislug:slug}", response={200: schemas.CampaignOut, **REFUSED})
def campaign_read(request, slug: str):
    """A campaign's settings."""
    return _campaign_for_reader(request, slug)


@campaigns.get("/campaigns/{unislug:slug}/queue", response={200: schemas.QueueOut, **REFUSED})
def campaign_queue(request, slug: str):
    """The campaign's queue: open pairs, judgments per pair, live leases. Scope: review."""
    require_scope(request, REVIEW)
    return statistics.queue_state(campaign_for_reviewer(request, slug))


MAX_JSON_IMPORT_PAIRS = 10_000  # pairs one JSON import request may make; more go through an upload


@campaigns.post("/campaigns/{unislug:slug}/pairs",
                response={201: schemas.ImportOut, 400: schemas.ImportError_, 413: schemas.Error, **REFUSED})
def pairs_import(request, slug: str, body: schemas.ImportIn):
    """Add pairs, checked as `manage.py import_pairs` checks a JSONL file (row N is line N): any bad row
    and nothing is added, with the same messages; at most MAX_JSON_IMPORT_PAIRS pairs. Scope: import."""
    require_scope(request, IMPORT)
    campaign = campaign_for_admin(request, slug)
    asked = pairs_asked(body.rows, body.pairs_per_prompt)
    if asked > MAX_JSON_IMPORT_PAIRS:
        return Status(413, {"detail": f"these rows make {asked} pairs, more than the "
                                      f"{MAX_JSON_IMPORT_PAIRS} one request may add: nothing was imported. "
                                      "Upload them as a file to "
                                      f"POST /api/v1/campaigns/{campaign.slug}/imports, imported in the "
                                      "background, or sample fewer with pairs_per_prompt."})
    try:
        result = import_rows(campaign, body.rows, pairs_per_prompt=body.pairs_per_prompt, seed=body.seed,
                             priority=body.priority)
    except ImportFailed as exc:
        return Status(400, {"detail": f"nothing was imported: {exc}", "errors": exc.lines(),
                            "total": exc.total})
    return Status(201, {"created": result.created, "skipped": result.skipped, "rows": result.rows})


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "JSONL, CSV, Parquet (optionally .gz), as import_pairs reads them."},
        "pairs_per_prompt": {"type": "integer", "minimum": 1},
        "priority": {"type": "integer", "minimum": Pair.PRIORITY_RANGE[0], "maximum": Pair.PRIORITY_RANGE[1]},
    }}}}}}


EVAL_SET_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "Rows of prompt and optional reference, in any format import_pairs reads."},
        "name": {"type": "string", "description": "What to call it (default: the file's name)."},
    }}}}}}


@campaigns.post("/campaigns/{unislug:slug}/imports", openapi_extra=UPLOAD_BODY,
                response={202: schemas.ImportJobOut, 400: schemas.Error, 413: schemas.Error, **REFUSED})
def import_upload(request, slug: str):
    """Upload a file of pairs to import in the background, as the Import page does (up to
    PAIRLOOP_MAX_UPLOAD_BYTES); follow it at imports/<id>. Scope: import."""
    require_scope(request, IMPORT)
    campaign = campaign_for_admin(request, slug)
    capped = CappedUpload.install(request)  # the body is not read yet: the cap applies before storing
    upload = request.FILES.get("file")
    if capped.refused:
        return Status(413, {"detail": upload_too_large(capped.cap)})
    if upload is None:
        return Status(400, {"detail": "send the file as the multipart/form-data field 'file'"})
    try:
        pairs_per_prompt, priority = import_options(request.POST)
    except ValueError as exc:
        return Status(400, {"detail": str(exc)})
    job = start_import_job(campaign, request.user, upload, pairs_per_prompt=pairs_per_prompt,
                           priority=priority)
    return Status(202, job)


@campaigns.get("/campaigns/{unislug:slug}/eval-sets", response={200: list[schemas.EvalSetListedOut], **REFUSED})
def eval_set_list(request, slug: str):
    """The campaign's evaluation sets, newest first (the first is the one new rounds are evaluated on), as the
    Evaluation sets page lists them. Scope: import."""
    from annotate.evalsets import eval_sets_of  # pyarrow: loaded by the first call

    require_scope(request, IMPORT)
    return eval_sets_of(campaign_for_admin(request, slug))


@campaigns.post("/campaigns/{unislug:slug}/eval-sets", openapi_extra=EVAL_SET_BODY,
                response={200: schemas.EvalSetListedOut, 201: schemas.EvalSetListedOut, 400: schemas.ImportError_,
                          413: schemas.Error, **REFUSED})
def eval_set_upload(request, slug: str):
    """Upload an evaluation set, as the Evaluation sets page does (up to PAIRLOOP_MAX_UPLOAD_BYTES): 201 with
    the new version, 200 when the same content is there already; 400 naming each bad row's line and field,
    nothing stored. Scope: import."""
    from annotate.evalsets import eval_sets_of, import_eval_upload  # pyarrow: loaded by the first upload

    require_scope(request, IMPORT)
    campaign = campaign_for_admin(request, slug)
    capped = CappedUpload.install(request)  # the body is not read yet: the cap applies before storing
    upload = request.FILES.get("file")
    if capped.refused:
        return Status(413, {"detail": upload_too_large(capped.cap)})
    if upload is None:
        return Status(400, {"detail": "send the file as the multipart/form-data field 'file'", "errors": [],
                            "total": 0})
    try:
        eval_set, created = import_eval_upload(campaign, upload, request.POST.get("name", "").strip())
    except ImportFailed as exc:
        return Status(400, {"detail": f"nothing was imported: {exc}", "errors": exc.lines(), "total": exc.total})
    return Status(201 if created else 200, eval_sets_of(campaign).get(pk=eval_set.pk))


@campaigns.get("/campaigns/{unislug:slug}/imports/{int:import_id}",
               response={200: schemas.ImportJobOut, **REFUSED})
def import_read(request, slug: str, import_id: int):
    """An uploaded import's progress, then its pairs added or its errors. Scope: import."""
    require_scope(request, IMPORT)
    campaign = campaign_for_admin(request, slug)
    job = ImportJob.objects.filter(campaign=campaign, pk=import_id).first()
    if job is None:
        raise HttpError(404, "no such import")
    return job


@campaigns.get("/campaigns/{unislug:slug}/ai-labelers", response={200: list[schemas.AILabelerOut], **REFUSED})
def ai_labeler_list(request, slug: str):
    """The campaign's AI labelers, each with its latest run, as the campaign page lists them. Scope: admin."""
    require_scope(request, ADMIN)
    campaign = campaign_for_admin(request, slug)
    return campaign.ai_labelers.prefetch_related("principles").order_by("name")


@campaigns.post("/campaigns/{unislug:slug}/ai-labelers",
                response={201: schemas.AILabelerOut, 400: schemas.SettingsError, 409: schemas.Error, **REFUSED})
def ai_labeler_create(request, slug: str, body: schemas.AILabelerIn):
    """Add an AI labeler with its constitution, as the admin's AI labeler page does: 400 naming each bad field
    (a principle by its index, principles[i].text), nothing stored; 409 when the name is taken. Scope: admin."""
    require_scope(request, ADMIN)
    campaign = campaign_for_admin(request, slug)
    values = body.dict(exclude_unset=True, exclude={"principles"})
    principles = [(row.text, row.axis) for row in body.principles]
    try:
        labeler = actions.create_ai_labeler(campaign, principles=principles, **values)
    except actions.AILabelerTaken as exc:
        return Status(409, {"detail": " ".join(exc.messages)})
    except ValidationError as exc:
        return _refused_settings(exc)
    return Status(201, labeler)


@campaigns.put("/campaigns/{unislug:slug}/ai-labelers/{int:labeler_id}/principles",
               response={200: schemas.AILabelerOut, 400: schemas.SettingsError, 409: schemas.Error, **REFUSED})
def ai_labeler_principles(request, slug: str, labeler_id: int, body: schemas.PrinciplesIn):
    """Replace the AI labeler's constitution (its verdicts keep the principles they were asked with): 400 naming
    each bad principle by its index, 409 while a run of it is live. Scope: admin."""
    require_scope(request, ADMIN)
    labeler = ai_labeler_for_admin(request, slug, labeler_id)
    try:
        labeler = actions.replace_principles(labeler, [(row.text, row.axis) for row in body.principles])
    except ValidationError as exc:
        return _refused_settings(exc)
    except actions.AILabelerBusy as exc:
        return Status(409, {"detail": str(exc)})
    return labeler


@campaigns.delete("/campaigns/{unislug:slug}/ai-labelers/{int:labeler_id}",
                  response={204: None, 409: schemas.Error, **REFUSED})
def ai_labeler_delete(request, slug: str, labeler_id: int):
    """Delete an AI labeler that never judged, with its principles and runs; 409 once it has verdicts (they are
    kept) or while it runs. Scope: admin."""
    require_scope(request, ADMIN)
    labeler = ai_labeler_for_admin(request, slug, labeler_id)
    try:
        actions.delete_ai_labeler(labeler)
    except actions.AILabelerBusy as exc:
        return Status(409, {"detail": str(exc)})
    return Status(204, None)


@campaigns.post("/campaigns/{unislug:slug}/ai-labelers/{int:labeler_id}/runs",
                response={202: schemas.AILabelingRunOut, 400: schemas.Error, 409: schemas.Error, **REFUSED})
def ai_labeling_start(request, slug: str, labeler_id: int, body: schemas.AILabelingRunIn):
    """Start a run of the AI labeler over up to `count` pairs, as the campaign page's Start does; 409 while
    another of its runs is live or when its principles leave an axis unanswered. Scope: admin."""
    require_scope(request, ADMIN)
    labeler = ai_labeler_for_admin(request, slug, labeler_id)
    try:
        run = actions.start_ai_labeling(labeler, count=body.count, user=request.user)
    except ValidationError as exc:
        return Status(409, {"detail": " ".join(exc.messages)})
    return Status(202, run)


@campaigns.get("/campaigns/{unislug:slug}/ai-labelers/{int:labeler_id}/runs/{int:run_id}",
               response={200: schemas.AILabelingRunOut, **REFUSED})
def ai_labeling_read(request, slug: str, labeler_id: int, run_id: int):
    """A run's progress, then how it ended. Scope: admin."""
    require_scope(request, ADMIN)
    return ai_labeling_run_for_admin(request, slug, labeler_id, run_id)


@campaigns.post("/campaigns/{unislug:slug}/ai-labelers/{int:labeler_id}/runs/{int:run_id}/stop",
                response={200: schemas.AILabelingRunOut, **REFUSED})
def ai_labeling_stop(request, slug: str, labeler_id: int, run_id: int):
    """Stop a run before its next pair (a second stop ends one whose worker died), as the page's Stop does.
    Scope: admin."""
    require_scope(request, ADMIN)
    return actions.stop_ai_labeling(ai_labeling_run_for_admin(request, slug, labeler_id, run_id))


class ExportQuery(Schema):
    format: str = "jsonl"
    raw: bool = False
    axis: str | None = Field(None, description="The axis whose pairs to export, by key; default: the first. "
                                               "A raw export holds every axis.")
    trl_format: str = Field("auto", description="TRL's dataset format: conversational (prompt as messages, "
                            "chosen/rejected as assistant messages), standard (text), or auto (default): "
                            "conversational when the campaign has chat prompts.")


@campaigns.get("/campaigns/{unislug:slug}/export", response={200: None, 400: schemas.Error, **REFUSED},
               openapi_extra={"responses": {200: {"description": "The file, streamed: JSONL or Parquet.",
                                                  "content": {"application/octet-stream": {}}}}})
def campaign_export(request, slug: str, query: Query[ExportQuery]):
    """Preference pairs in TRL's prompt/chosen/rejected columns (or, with raw, every judgment), as
    `manage.py export_pairs` writes them: format jsonl or parquet; trl_format auto, conversational or
    standard. Scope: export."""
    require_scope(request, EXPORT)
    campaign = campaign_for_reviewer(request, slug)
    try:
        return export_download(campaign, format=query.format, raw=query.raw, trl_format=query.trl_format,
                               axis=query.axis)
    except ExportRefused as exc:
        return Status(400, {"detail": str(exc)})


# ---------------------------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------------------------

@campaigns.get("/campaigns/{unislug:slug}/webhooks", response={200: list[schemas.WebhookOut], **REFUSED})
@paginate(Pages)
def webhook_list(request, slug: str):
    """The campaign's webhooks with their latest deliveries (never their secret), oldest first, a page at a
    time: ?limit= (20 by default, at most 100) and ?offset=, answered as {"items": [...], "count": N}. Scope: admin."""
    require_scope(request, ADMIN)
    campaign = campaign_for_admin(request, slug)
    return Webhook.objects.filter(campaign=campaign, is_active=True)


@campaigns.post("/campaigns/{unislug:slug}/webhooks",
                response={201: schemas.WebhookCreated, 400: schemas.SettingsError, **REFUSED})
def webhook_add(request, slug: str, body: schemas.WebhookIn):
    """Send a signed POST to this URL on these events of the campaign; the answer shows the signing secret,
    once. Scope: admin."""
    require_scope(request, ADMIN)
    campaign = campaign_for_admin(request, slug)
    try:
        webhook, _ = webhooks.add_webhook(campaign, body.url, body.events)
    except webhooks.WebhookRefused as exc:
        return Status(400, {"detail": f"{exc.field}: {exc}", "errors": {exc.field: str(exc)}})
    return Status(201, webhook)  # the only answer that shows its secret


@campaigns.delete("/campaigns/{unislug:slug}/webhooks/{int:webhook_id}", response={204: None, **REFUSED})
def webhook_remove(request, slug: str, webhook_id: int):
    """Stop sending to a webhook. Scope: admin."""
    require_scope(request, ADMIN)
    campaign = campaign_for_admin(request, slug)
    webhook = Webhook.objects.filter(campaign=campaign, pk=webhook_id, is_active=True).first()
    if webhook is None:
        raise HttpError(404, "no such webhook")
    webhooks.remove_webhook(webhook)
    return Status(204, None)


# ---------------------------------------------------------------------------------------------
# Labeling: the same leases, overlap and fairness as the labeling page
# ---------------------------------------------------------------------------------------------

@labeling.post("/campaigns/{unislug:slug}/claim",
               response={200: schemas.ClaimOut, 409: schemas.WarningPending, **LABELING_REFUSED})
def label_claim(request, slug: str):
    """Lease the next pair to the token's user (or get back the one they hold); 409 with the campaign's
    content warning until the user acknowledged it, as the page shows it first. Scope: label."""
    require_scope(request, LABEL)
    campaign = campaign_for_labeler(request, slug)
    if campaign.warning_pending_for(request.user):
        return Status(409, {"detail": "acknowledge the campaign's content warning first (POST .../warning)",
                            "content_warning": campaign.content_warning})
    return _claim(request, campaign)


@labeling.post("/campaigns/{unislug:slug}/warning", response={200: schemas.Acknowledged, **LABELING_REFUSED})
def label_acknowledge_warning(request, slug: str):
    """Acknowledge the campaign's content warning (once per user), as the labeling page asks. Scope: label."""
    require_scope(request, LABEL)
    campaign = campaign_for_labeler(request, slug)
    return {"acknowledged_at": actions.acknowledge_content_warning(campaign, request.user).acknowledged_at}


def _claim(request, campaign: Campaign) -> dict:
    claim = actions.claim_next_pair(campaign, request.user)
    return {"assignment": claim.assignment, "reason": claim.reason, "choices": campaign.choices_offered(),
            "ask_strength": campaign.ask_strength, "ask_rationale": campaign.ask_rationale, "axes": campaign.axes(),
            "judged_today": actions.judged_today(campaign, request.user),
            "left_in_campaign": actions.judgments_left(campaign)}


@labeling.post("/campaigns/{unislug:slug}/assignments/{int:assignment_id}/judgment",
               response={200: schemas.JudgmentOut, 201: schemas.JudgmentOut, 400: schemas.Error,
                         **LABELING_REFUSED})
def label_judge(request, slug: str, assignment_id: int, body: schemas.JudgmentIn, next: bool = False):
    """Judge a leased pair (201; 200 when it was judged already); with ?next=true the answer holds the next
    pair too. Scope: label."""
    require_scope(request, LABEL)
    campaign = campaign_for_labeler(request, slug)
    try:
        judgment, created = actions.submit_judgment(
            assignment_id=assignment_id, labeler=request.user, choice=body.choice or "", strength=body.strength,
            choices=body.choices, strengths=body.strengths, rationale=body.rationale,
            milliseconds=body.milliseconds, source=Judgment.API, campaign=campaign)
    except Assignment.DoesNotExist:
        raise HttpError(404, "no such assignment") from None
    except actions.JudgmentError as exc:
        return Status(400, {"detail": str(exc)})
    return Status(201 if created else 200, {
        "id": judgment.pk, "pair_id": judgment.pair_id, "choice": judgment.choice,
        "strength": judgment.strength, "choices": judgment.choices_by_axis(campaign),
        "source": judgment.source, "created": created,
        "next": _claim(request, campaign) if next else None})


@labeling.post("/campaigns/{unislug:slug}/assignments/{int:assignment_id}/skip",
               response={200: schemas.SkipOut, **LABELING_REFUSED})
def label_skip(request, slug: str, assignment_id: int):
    """Give a leased pair back unjudged; it is not offered to this user again. Scope: label."""
    require_scope(request, LABEL)
    campaign = campaign_for_labeler(request, slug)
    try:
        assignment = actions.skip_assignment(assignment_id=assignment_id, labeler=request.user,
                                             campaign=campaign)
    except Assignment.DoesNotExist:
        raise HttpError(404, "no such assignment") from None
    return {"assignment_id": assignment.pk, "skipped": assignment.skipped}


@labeling.post("/campaigns/{unislug:slug}/undo",
               response={200: schemas.UndoOut, 400: schemas.Error, 409: schemas.Error, **LABELING_REFUSED})
def label_undo(request, slug: str, body: schemas.UndoIn):
    """Take back your last judgment while it is recent (PAIRLOOP_UNDO_SECONDS); its pair is leased to you
    again. 409 when it is not your last or too old. Scope: label."""
    require_scope(request, LABEL)
    campaign = campaign_for_labeler(request, slug)
    try:
        undone = actions.undo_last_judgment(campaign, request.user, judgment_id=body.judgment_id)
    except actions.UndoRefused as exc:
        return Status(409, {"detail": str(exc)})
    if undone is None:
        return Status(409, {"detail": "Nothing to undo (only the last few minutes can be undone)."})
    return {"judgment_id": body.judgment_id, "pair_id": undone.pair_id}


# ---------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------

@rounds.get("/campaigns/{unislug:slug}/rounds", response={200: list[schemas.RoundOut], **REFUSED})
@paginate(Pages)
def round_list(request, slug: str):
    """The campaign's rounds, newest first, with their jobs, a page at a time (?limit=, ?offset=).
    Scope: review."""
    require_scope(request, REVIEW)
    campaign = campaign_for_reviewer(request, slug)
    found = Round.objects.filter(campaign=campaign).select_related("campaign").prefetch_related("jobs")
    return found.order_by("-number")


@rounds.post("/campaigns/{unislug:slug}/rounds",
             response={201: schemas.RoundOut, 400: schemas.SettingsError, 409: schemas.Error, **REFUSED})
def round_launch(request, slug: str, body: schemas.RoundIn):
    """Launch the campaign's next round with these settings over the campaign's own model settings and the
    preset's (as the launch form and launch_round build them); 409 below PAIRLOOP_MIN_JUDGMENTS, while
    another round runs, or when too little is new since the last successful round and `force` is not set.
    Scope: admin."""
    require_scope(request, ADMIN)
    campaign = campaign_for_admin(request, slug)

    try:
        config = training_actions.launch_config(campaign, body.preset, body.settings)
    except ConfigError as exc:
        return Status(400, {"detail": str(exc), "errors": exc.problems})
    except ValueError as exc:
        return Status(400, {"detail": str(exc), "errors": {}})
    try:
        round_ = training_actions.launch_round(campaign, request.user, config, force=body.force)
    except training_actions.RoundRefused as exc:
        return Status(409, {"detail": str(exc)})
    return Status(201, round_)


@rounds.get("/campaigns/{unislug:slug}/launch-report", response={200: schemas.LaunchReport, **REFUSED})
def round_launch_report(request, slug: str):
    """What the campaign's next round would learn that its last successful round did not. Scope: admin."""
    require_scope(request, ADMIN)
    campaign = campaign_for_admin(request, slug)
    return training_actions.launch_freshness(campaign).as_dict()


@rounds.get("/rounds/{int:round_id}", response={200: schemas.RoundOut, **REFUSED})
def round_read(request, round_id: int):
    """A round's status and each job's progress, latest metrics and final result. Scope: review."""
    require_scope(request, REVIEW)
    return round_for_reviewer(request, round_id)


def _job_action(request, round_id: int, job_id: int, action):
    require_scope(request, ADMIN)
    job = job_for_admin(request, round_id, job_id)
    try:
        action(job)
    except training_actions.RoundRefused as exc:
        return Status(409, {"detail": str(exc)})
    return Status(200, Round.objects.select_related("campaign").get(pk=job.round_id))


@rounds.post("/rounds/{int:round_id}/jobs/{int:job_id}/cancel",
             response={200: schemas.RoundOut, 409: schemas.Error, **REFUSED})
def job_cancel(request, round_id: int, job_id: int):
    """Cancel the round at this job (a running one stops at its next step). Scope: admin."""
    return _job_action(request, round_id, job_id, training_actions.cancel_job)


@rounds.post("/rounds/{int:round_id}/jobs/{int:job_id}/resume",
             response={200: schemas.RoundOut, 409: schemas.Error, **REFUSED})
def job_resume(request, round_id: int, job_id: int):
    """Run a failed or cancelled job again from its last checkpoint, then the rest of the round.
    Scope: admin."""
    return _job_action(request, round_id, job_id, training_actions.resume_job)


@rounds.get("/rounds/{int:round_id}/samples", response={200: list[schemas.SampleOut], **REFUSED})
def round_samples(request, round_id: int):
    """What the round's policy wrote for the sampled prompts (empty until its sample job succeeded).
    Scope: review."""
    require_scope(request, REVIEW)
    round_ = round_for_reviewer(request, round_id)
    job = round_.jobs.filter(kind=Job.SAMPLE, status=Job.SUCCEEDED).first()
    samples = (job.result or {}).get("samples", []) if job else []
    turns = dict(Prompt.objects.filter(pk__in=[s.get("prompt_id") for s in samples]).values_list("pk", "turns"))
    return [{"prompt": sample["prompt"], "prompt_turns": turns.get(sample.get("prompt_id")) or None,
             "responses": sample.get("new", [])} for sample in samples]


@rounds.get("/rounds/{int:round_id}/evaluation", response={200: schemas.EvaluationOut | None, **REFUSED})
def round_evaluation(request, round_id: int):
    """The round's evaluation on the campaign's evaluation set: every two policies' win/tie/loss, win rate with
    its 95% interval, length-controlled win rate and mean lengths per judge, and the same for earlier rounds;
    null until an evaluate job succeeded. Scope: review."""
    require_scope(request, REVIEW)
    return evaluation.round_evaluation(round_for_reviewer(request, round_id))


@rounds.post("/rounds/{int:round_id}/evaluate", response={202: schemas.RoundOut, 409: schemas.Error, **REFUSED})
def round_evaluate(request, round_id: int):
    """Evaluate a finished round again (a new evaluate job at the end of its chain); 409 while it or another
    round of the campaign runs, or when one of its jobs failed. Scope: admin."""
    require_scope(request, ADMIN)
    round_ = round_for_admin(request, round_id)
    try:
        training_actions.evaluate_round(round_)
    except training_actions.RoundRefused as exc:
        return Status(409, {"detail": str(exc)})
    return Status(202, Round.objects.select_related("campaign").get(pk=round_.pk))


@rounds.get("/rounds/{int:round_id}/ratings", response={200: schemas.RatingsOut | None, **REFUSED})
def round_ratings(request, round_id: int, axis: str | None = None):
    """Bradley-Terry ratings of the SFT policy and each round's policy up to this one, with 95% intervals,
    as the round's page shows them, on one axis (?axis=KEY; default: the campaign's first); null until two
    policies have been compared. Scope: review."""
    require_scope(request, REVIEW)
    round_ = round_for_reviewer(request, round_id)
    try:
        chosen = round_.campaign.axis(axis)
    except Axis.DoesNotExist as exc:
        raise HttpError(404, str(exc)) from None
    return policy_ratings(round_, chosen)
