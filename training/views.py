"""Round pages: thin functions — check access, call an action, render.

A campaign's rounds (with the launch form for admins), a round's jobs (live over a WebSocket,
the same state from the database on reload), cancel and resume, and the review of what the
round's policy writes. Model outputs are untrusted text: the templates only ever escape them.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRefresh

from annotate.access import campaign_for_admin, campaign_for_reviewer, is_admin
from annotate.models import Pair
from annotate.transfer import whole_number
from training import actions, evaluation, starting_policy
from training.access import job_for_admin, round_for_admin, round_for_reviewer, sees_tracebacks
from training.forms import LaunchRoundForm
from training.models import Job, Round
from training.review import round_review


@login_required
@require_http_methods(["GET", "POST"])
def campaign_rounds(request, slug):
    campaign = campaign_for_reviewer(request, slug)
    admin = is_admin(request.user)
    form = None
    if admin:
        preset = request.GET.get("preset") or settings.PAIRLOOP["DEMO_POLICY_PRESET"]
        if request.method == "POST":
            campaign_for_admin(request, slug)
            form = LaunchRoundForm(request.POST, preset=request.POST.get("preset", preset), campaign=campaign)
            if form.is_valid():
                try:
                    round_ = actions.launch_round(campaign, request.user, form.config,
                                                  force=request.POST.get("force") == "1")
                except actions.RoundRefused as exc:
                    messages.error(request, str(exc))
                else:
                    messages.success(request, f"Round {round_.number} launched.")
                    return redirect(round_)
        else:
            form = LaunchRoundForm(preset=preset, campaign=campaign)
    elif request.method == "POST":
        campaign_for_admin(request, slug)  # 404 for a reviewer
    rounds = Round.objects.filter(campaign=campaign).prefetch_related("jobs").order_by("-number")
    usable, minimum = actions.usable_judgments(campaign), settings.PAIRLOOP["MIN_JUDGMENTS"]
    return render(request, "training/campaign_rounds.html", {
        "campaign": campaign,
        "rounds": rounds,
        "form": form,
        "is_admin": admin,
        "usable": usable,
        "minimum": minimum,
        "needed": max(0, minimum - usable),
        "active": actions.active_round(campaign),
        "freshness": actions.launch_freshness(campaign) if admin else None,
        "starts_from": starting_policy.parent_policy(campaign, settings.PAIRLOOP["DEMO_POLICY_PRESET"]) if admin else "",
    })


@login_required
def round_detail(request, round_id):
    round_ = round_for_reviewer(request, round_id)
    jobs = list(round_.jobs.all())
    return render(request, "training/round_detail.html", {
        "round": round_,
        "campaign": round_.campaign,
        "jobs": jobs,
        "is_admin": is_admin(request.user),
        "show_traceback": sees_tracebacks(request.user),
        "review": round_review(round_),
        "evaluation": evaluation.round_evaluation(round_),
    })


@login_required
@require_POST
def round_to_labelers(request, round_id):
    """Send the round's last evaluation to labelers as a blind batch, at the priority the admin gave."""
    round_ = round_for_admin(request, round_id)
    try:
        priority = whole_number(request.POST.get("priority"), "Priority", *Pair.PRIORITY_RANGE) or 0
        added = actions.send_evaluation_to_labelers(round_, priority=priority)
    except (ValueError, actions.RoundRefused) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Sent {added} blind evaluation pairs to the labelers (priority {priority}).")
    return redirect(round_)


@login_required
@require_POST
def round_evaluate(request, round_id):
    round_ = round_for_admin(request, round_id)
    try:
        actions.evaluate_round(round_)
    except actions.RoundRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Evaluating round {round_.number}: the table below appears when it is done.")
    return redirect(round_)


def _job_response(request, job: Job):
    if request.htmx:
        job = Job.objects.select_related("round__campaign").get(pk=job.pk)
        return render(request, "training/round_detail.html#job-live",
                      {"job": job, "round": job.round, "is_admin": True,
                       "show_traceback": sees_tracebacks(request.user)})
    return redirect(job.round)


@login_required
@require_POST
def job_cancel(request, round_id, job_id):
    job = job_for_admin(request, round_id, job_id)
    try:
        actions.cancel_job(job)
    except actions.RoundRefused as exc:
        messages.error(request, str(exc))
    return _job_response(request, job)


@login_required
@require_POST
def job_resume(request, round_id, job_id):
    job = job_for_admin(request, round_id, job_id)
    try:
        actions.resume_job(job)
    except actions.RoundRefused as exc:
        messages.error(request, str(exc))
        if request.htmx:
            return HttpResponseClientRefresh()
    return _job_response(request, job)
