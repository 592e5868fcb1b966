"""Round pages: thin functions — check access, call an action, render.

A campaign's rounds (with the launch form for admins), a round's jobs (live over a WebSocket,
the same state from the database on reload), cancel and resume, and the review of what the
round's policy writes. Model outputs are untrusted text: the templates only ever escape them.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from annotate.access import campaign_for_admin, campaign_for_reviewer, is_admin
from annotate.models import Judgment, content_hash
from training import actions, starting_policy
from training.access import job_for_admin, round_for_reviewer, sees_tracebacks
from training.forms import LaunchRoundForm
from training.models import Job, Round
from training.ratings import bradley_terry
from training.review import REVIEW_PROMPTS, SHOWN_PER_CELL, is_empty, review_table

RATING_BOOTSTRAP = 200  # resamples for the ratings' 95% intervals


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
        "review": review(round_),
    })


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
            from django_htmx.http import HttpResponseClientRefresh

            return HttpResponseClientRefresh()
    return _job_response(request, job)


# ---------------------------------------------------------------------------------------------
# Review
# ---------------------------------------------------------------------------------------------

def review(round_: Round) -> dict | None:
    """What the round's policy writes beside earlier rounds' for the same prompts, with this round's
    reward-model scores, and human (and, apart, simulated) win rates of each round's responses."""
    sample_job = round_.jobs.filter(kind=Job.SAMPLE, status=Job.SUCCEEDED).first()
    rates = _win_rates(round_)
    if sample_job is None and not rates:
        return None
    ratings = policy_ratings(round_)
    if sample_job is None:
        return {"rows": [], "columns": [], "rates": rates, "ratings": ratings, "summary": None}
    result = sample_job.result or {}
    scores = result.get("scores", {})
    opponent = result.get("opponent") or ""
    table = review_table(round_, result.get("samples", [])[:REVIEW_PROMPTS], opponent)

    def cell(prompt: str, responses: list[str]) -> list[dict]:
        return [{"text": r, "empty": is_empty(r), "score": scores.get(content_hash(prompt, r))}
                for r in responses[:SHOWN_PER_CELL]]

    rows = [{"prompt": prompt, "cells": [cell(prompt, responses) for responses in cells]}
            for prompt, cells in table.rows]
    keys = ("sample/reward_new", "sample/reward_opponent", "sample/judge_new", "sample/judge_other",
            "sample/empty_new", "sample/empty_opponent")
    summary = {key.split("/", 1)[1]: result.get(key) for key in keys}
    return {"rows": rows, "columns": table.columns, "rates": rates, "ratings": ratings, "summary": summary,
            "opponent": opponent}


RATING_OUTCOME = {Judgment.A: 1.0, Judgment.B: 0.0, Judgment.TIE: 0.5, Judgment.BOTH_BAD: 0.5}


def _checkpoint_key(path: str) -> str:
    return os.path.normpath(os.path.abspath(path)) if path else ""


def policy_ratings(round_: Round) -> dict | None:
    """Bradley-Terry ratings of the SFT policy and every round's policy up to this one, from the judgments
    of pairs whose two responses came from two of them; humans, else simulated labelers (said which)."""
    rounds = list(Round.objects.filter(campaign=round_.campaign, number__lte=round_.number).order_by("number"))
    names = {}
    base = rounds[0].config.get("base_policy", "") if rounds else ""
    if base:
        names[_checkpoint_key(base)] = "SFT policy"
    for other in rounds:
        if other.policy_checkpoint:
            names[_checkpoint_key(other.policy_checkpoint)] = f"Round {other.number}"
    if len(names) < 2:
        return None
    outcomes: dict[str, list[tuple[str, str, float]]] = {Judgment.HUMAN: [], Judgment.SIMULATED: []}
    judgments = (Judgment.objects.filter(pair__campaign=round_.campaign, source__in=list(outcomes))
                 .filter(Q(pair__round__isnull=True) | Q(pair__round__number__lte=round_.number))
                 .values_list("source", "choice", "pair__response_a__checkpoint", "pair__response_b__checkpoint"))
    for source, choice, checkpoint_a, checkpoint_b in judgments.iterator():
        a, b = names.get(_checkpoint_key(checkpoint_a)), names.get(_checkpoint_key(checkpoint_b))
        if a and b and a != b and choice in RATING_OUTCOME:
            outcomes[source].append((a, b, RATING_OUTCOME[choice]))
    source = Judgment.HUMAN if outcomes[Judgment.HUMAN] else Judgment.SIMULATED
    if not outcomes[source]:
        return None
    anchor = "SFT policy" if base else None
    return {"source": source, "judgments": len(outcomes[source]),
            "players": bradley_terry(outcomes[source], anchor=anchor, bootstrap=RATING_BOOTSTRAP)}


def _win_rates(round_: Round) -> list[dict]:
    """Per round up to this one (pairing against another policy): its responses' record, humans and
    simulated labelers apart (simulated never count in the human figures)."""
    rows = []
    rounds = Round.objects.filter(campaign=round_.campaign, number__lte=round_.number).order_by("number")
    for other in rounds:
        if other.config.get("pairing") == "self":
            continue
        rates = other.win_rates()
        human, simulated = rates.get(Judgment.HUMAN), rates.get(Judgment.SIMULATED)
        if human is None and simulated is None:
            continue
        sft = other.config.get("pairing") == "sft" or other.number == 1
        against = "SFT policy" if sft else "previous round"
        rows.append({"round": other, "against": against, "human": human, "simulated": simulated})
    return rows
