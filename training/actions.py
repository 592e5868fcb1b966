"""One door per state change of rounds and jobs.

Views, management commands, Celery tasks and tests call these; nothing else creates rounds or
moves a job's status. A worker owns a running job through its Celery task id: every write it
makes is a conditional UPDATE on (status=running, celery_task_id=its id), so a job taken away
from it (marked failed because its heartbeat went stale, then resumed elsewhere) is never
written by the old worker again. Heartbeats and their staleness are both read on the database's
clock (Now()), so hosts whose clocks disagree never make a live job look dead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from datetime import timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, DateTimeField, ExpressionWrapper, F, Value
from django.db.models.functions import Coalesce, Least, Now
from django.utils import timezone

from annotate.actions import PairInput, add_pairs
from annotate.models import Campaign, EvalPrompt, Judgment, Pair, Response
from annotate.statistics import usable_judgments
from training import dispatch, live, starting_policy
from training.config import DPO, GRPO, PPO, ConfigError, RoundConfig, build_config, refuse_unused
from training.engine.chat_date import CHAT_DATE_FORMAT
from training.engine.stop import StopWithoutSaving
from training.models import Job, Round

log = logging.getLogger(__name__)

POLICY_JOBS = {PPO: Job.PPO, GRPO: Job.GRPO, DPO: Job.DPO}  # each round type's job that trains the policy


def round_chain(config: RoundConfig) -> tuple[str, ...]:
    """The kinds of a round's jobs, in order. An offline DPO round trains no reward model: DPO needs none, and one
    trained only to score the review would cost a job as long as the DPO job itself (the demo rule judges and
    the labelers' win rates still measure its policy); online DPO's reward model labels its fresh pairs. The
    evaluation comes last, after the new pairs are enqueued: labelers get them without waiting for three policies
    to answer the evaluation set, and an evaluation that fails (or is run again on demand) never holds labeling
    back. With cai_revisions, an SFT job on the accepted AI revisions comes before the reward job (the CAI paper's
    supervised stage before its RL stage, Bai et al. 2022)."""
    sft = (Job.SFT,) if config.cai_revisions else ()  # the policy learns the accepted AI revisions first
    reward = (Job.REWARD,) if config.trains_reward_model() else ()
    return (Job.EXPORT, *sft, *reward, POLICY_JOBS[config.algorithm], Job.SAMPLE, Job.ENQUEUE, Job.EVALUATE)


class RoundRefused(ValueError):
    """A launch or resume that must not happen; the message says why, for the admin."""


class StaleLaunch(RoundRefused):
    """A launch with too few judgments new since the last round that succeeded; forcing it launches it."""


class JobLost(StopWithoutSaving):
    """The worker no longer owns this job (it was marked failed or cancelled meanwhile): the engine stops
    without writing its resumable checkpoint, which is the next attempt's to write."""


PEOPLE = (Judgment.HUMAN, Judgment.API)


@dataclass(frozen=True)
class Freshness:
    """What a launch would learn that the last round that succeeded did not: usable judgments new since
    its export, by who made them, and how many of the pairs it sent back are still unjudged."""

    usable: int
    new_people: int = 0
    new_simulated: int = 0
    new_imported: int = 0
    since_round: int | None = None
    new_pairs: int = 0
    unjudged_new_pairs: int = 0
    min_new_share: float = 0.0

    @property
    def new(self) -> int:
        return self.new_people + self.new_simulated + self.new_imported

    @property
    def needed(self) -> int:
        """New usable judgments a launch needs unforced: the campaign's share of the pairs the last successful
        round sent back, and at least one. The share is of those pairs, not of all judgments, so a campaign
        seeded with thousands of judgments still launches unforced once its new pairs are labeled."""
        return max(1, math.ceil(self.min_new_share * self.new_pairs - 1e-9))

    @property
    def stale(self) -> bool:
        """True when a round succeeded before and fewer than `needed` new usable judgments arrived since."""
        return self.since_round is not None and self.new < self.needed

    def sentence(self) -> str:
        if self.since_round is None:
            return f"{self.usable} usable judgments; no round of this campaign has succeeded yet."
        parts = [f"{self.new_people} by people", f"{self.new_simulated} simulated"]
        if self.new_imported:
            parts.append(f"{self.new_imported} imported")
        return (f"{self.usable} usable judgments, {self.new} of them new since round {self.since_round} "
                f"({', '.join(parts)}); {self.unjudged_new_pairs} new pairs from round {self.since_round} "
                "are still unjudged.")

    def refusal(self) -> str:
        share = f"{self.min_new_share:.0%}"
        return (f"Nothing new to learn from: {self.sentence()} A round on the same labels re-trains its reward "
                f"model on them and pushes the policy further against it (the campaign asks for at least "
                f"{self.needed} new: {share} of the {self.new_pairs} pairs round {self.since_round} sent back, "
                f"at least one). Label round {self.since_round}'s pairs first, or force the launch.")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "new": self.new, "needed": self.needed, "stale": self.stale}


def last_succeeded_round(campaign: Campaign) -> Round | None:
    """The campaign's newest round whose every job succeeded."""
    for round_ in Round.objects.filter(campaign=campaign).prefetch_related("jobs").order_by("-number"):
        if round_.status() == Job.SUCCEEDED:
            return round_
    return None


def launch_freshness(campaign: Campaign) -> Freshness:
    """The campaign's usable judgments now, and those that arrived after the last successful round's export
    read them (its export job's start; the round's launch when that is unknown)."""
    usable = usable_judgments(campaign)
    last = last_succeeded_round(campaign)
    if last is None:
        return Freshness(usable=usable, min_new_share=campaign.min_new_share)
    export = next((job for job in last.jobs.all() if job.kind == Job.EXPORT), None)
    since = (export.started_at if export is not None and export.started_at else None) or last.created_at
    new = (Judgment.objects.filter(pair__campaign=campaign, pair__purpose=Pair.TRAINING,
                                   choice__in=[Judgment.A, Judgment.B], created_at__gt=since)
           .values("source").annotate(n=Count("id")))
    by_source = {row["source"]: row["n"] for row in new}
    return Freshness(
        usable=usable,
        new_people=sum(by_source.get(source, 0) for source in PEOPLE),
        new_simulated=by_source.get(Judgment.SIMULATED, 0),
        new_imported=by_source.get(Judgment.IMPORTED, 0),
        since_round=last.number,
        new_pairs=last.pairs.filter(purpose=Pair.TRAINING).count(),
        unjudged_new_pairs=last.pairs.filter(purpose=Pair.TRAINING, judgments_count=0).count(),
        min_new_share=campaign.min_new_share,
    )


def active_round(campaign: Campaign) -> Round | None:
    """The campaign's round that is queued or running, if any (a failed or cancelled one is not)."""
    candidates = (Round.objects.filter(campaign=campaign, jobs__status__in=Job.ACTIVE)
                  .distinct().prefetch_related("jobs").order_by("-number"))
    for round_ in candidates:
        if round_.status() in Job.ACTIVE:
            return round_
    return None


def round_dir(round_: Round) -> Path:
    """Where a round's jobs write, named by ids: a campaign deleted and created again under the same
    slug gets new rounds in new directories, never over the checkpoints older rounds name as parent."""
    checkpoints = Path(settings.PAIRLOOP["CHECKPOINTS_DIR"])
    return checkpoints / f"campaign-{round_.campaign_id}" / f"round-{round_.pk}"


def attempt_dir(job: Job, attempt: int | None = None) -> Path:
    """The directory of one attempt of a job (its current one by default): each attempt writes only its
    own, so a worker that lost the job can never overwrite what the attempt that took it over uses."""
    return round_dir(job.round) / f"{job.kind}-{attempt or job.attempts}"


def campaign_settings(campaign: Campaign) -> dict[str, Any]:
    """The round settings a campaign names (its models, system prompt and generation settings), to go
    over the preset's: only those it fills in."""
    named = {"reference": campaign.reference_model, "reward_model": campaign.reward_model,
             "system_prompt": campaign.system_prompt, "stop_strings": campaign.stop_strings,
             "ppo_max_new_tokens": campaign.max_new_tokens, "sample_temperature": campaign.temperature,
             "top_p": campaign.top_p, "safety_axis": campaign.safety_axis}
    return {name: value for name, value in named.items() if value not in ("", None)}


def chat_date_on(moment) -> str:
    """A moment's UTC date as chat templates write it: the date a round launched then pins for its prompts."""
    return moment.astimezone(dt_timezone.utc).strftime(CHAT_DATE_FORMAT)


def launch_config(campaign: Campaign, preset: str, values: dict[str, Any] | None = None) -> RoundConfig:
    """A round's settings as every door launches it (the page, launch_round, the API): the preset's, then the
    campaign's own (campaign_settings), then `values`. Raises ConfigError / ValueError naming bad settings."""
    config = build_config(preset, {**campaign_settings(campaign), **(values or {})})
    refuse_unused(config, values or {})
    check_axes(campaign, config)
    return config


def check_axes(campaign: Campaign, config: RoundConfig) -> None:
    """Raise ConfigError when safety_axis or dpo_axis names no axis of the campaign, or the safety axis would leave
    no quality axis beside it."""
    keys = [axis.key for axis in campaign.axes()]
    problems = {name: f"{name}={getattr(config, name)!r} is not an axis of campaign {campaign.slug}: its axes are "
                      + ", ".join(keys)
                for name in ("safety_axis", "dpo_axis") if getattr(config, name) and getattr(config, name) not in keys}
    if not problems and config.safety_axis and len(keys) == 1:
        problems["safety_axis"] = (f"safety_axis={config.safety_axis!r} is the campaign's only axis: a round needs a "
                                   "quality axis beside the safety one")
    if problems:
        raise ConfigError(problems)


def launch_round(campaign: Campaign, user, config: RoundConfig, *, force: bool = False) -> Round:
    """Create round N+1 of the campaign with its chain of jobs and enqueue the chain on commit.

    Refuses (RoundRefused) below PAIRLOOP["MIN_JUDGMENTS"] usable judgments, or while another round
    of the campaign is queued or running; and (StaleLaunch) when too little is new since the last
    round that succeeded, unless forced. The campaign row is locked, so two launches at once
    cannot both pass the checks.
    """
    config.validate()
    minimum = settings.PAIRLOOP["MIN_JUDGMENTS"]
    with transaction.atomic():
        campaign = Campaign.objects.select_for_update().get(pk=campaign.pk)
        usable = usable_judgments(campaign)
        if usable < minimum:
            raise RoundRefused(
                f"Not enough judgments to train on: {usable} usable (A or B preferred), at least "
                f"{minimum} needed (PAIRLOOP_MIN_JUDGMENTS). Label {minimum - usable} more pairs first."
            )
        running = active_round(campaign)
        if running is not None:
            raise RoundRefused(f"Round {running.number} of this campaign is still {running.status()}: "
                               "two rounds of one campaign never run at once. Wait for it or cancel it.")
        freshness = launch_freshness(campaign)
        if freshness.stale and not force:
            raise StaleLaunch(freshness.refusal())
        numbers = Round.objects.filter(campaign=campaign).order_by("-number").values_list("number", flat=True)
        number = (numbers.first() or 0) + 1
        stored = config.as_dict()
        stored["base_policy"] = starting_policy.base_policy(campaign, config.preset)
        stored["usable_judgments"] = usable
        stored["launch"] = {**freshness.as_dict(), "forced": bool(force and freshness.stale)}
        stored["chat_date"] = chat_date_on(timezone.now())  # what its chat templates write as today's date
        round_ = Round.objects.create(
            campaign=campaign, number=number, config=stored,
            parent_policy=starting_policy.parent_policy(campaign, config.preset),
            launched_by=user if getattr(user, "is_authenticated", False) else None,
        )
        jobs = [Job.objects.create(round=round_, kind=kind, order=order,
                                   queued_at=Now() if order == 0 else None)  # the first is ready at once
                for order, kind in enumerate(round_chain(config))]
        job_ids = [job.pk for job in jobs]
        transaction.on_commit(lambda: _start_chain(job_ids))
    log.info("launched %s (%d usable judgments)", round_, usable)
    return round_


def evaluate_round(round_: Round) -> Job:
    """Evaluate a finished round again (after its evaluation set changed, say): a new evaluate job at the end
    of its chain, sent at once; its result replaces the earlier evaluation's on the page and in the API."""
    with transaction.atomic():
        Campaign.objects.select_for_update().get(pk=round_.campaign_id)
        round_ = Round.objects.select_related("campaign").get(pk=round_.pk)
        if round_.status() != Job.SUCCEEDED:
            raise RoundRefused(f"Round {round_.number} is {round_.status()}: only a round whose jobs all succeeded "
                               "is evaluated on demand (resume a failed job instead).")
        running = active_round(round_.campaign)
        if running is not None:
            raise RoundRefused(f"Round {running.number} of this campaign is {running.status()}: "
                               "wait for it before evaluating another.")
        last = round_.jobs.order_by("-order").values_list("order", flat=True).first()
        job = Job.objects.create(round=round_, kind=Job.EVALUATE, order=last + 1, queued_at=Now())
        transaction.on_commit(lambda: _start_chain([job.pk]))
        transaction.on_commit(lambda: live.job_changed(job))
    log.info("evaluating %s on demand (job %s)", round_, job.pk)
    return job


def send_evaluation_to_labelers(round_: Round, *, priority: int = 0) -> int:
    """Put the round's last evaluation's answers before labelers as blind pairs that never train anything (the
    new policy's answer against the SFT policy's and the previous round's, per prompt, as response A of half of
    them: Round.new_policy_first); returns the pairs added.
    The same answers again add nothing. Raises RoundRefused when the round has no evaluation with answers."""
    from training import evaluation  # imports the demo's rule judges: loaded when an evaluation is sent

    job = evaluation.latest(round_)
    if job is None or not job.result.get("answers"):
        raise RoundRefused(f"Round {round_.number} has no evaluation with answers to send: evaluate it first.")
    low, high = Pair.PRIORITY_RANGE
    if not low <= priority <= high:
        raise RoundRefused(f"priority must be from {low} to {high}, got {priority}")
    checkpoints = {p["role"]: p["checkpoint"] for p in job.result["policies"]}
    rows = job.result["answers"]
    turns = dict(EvalPrompt.objects.filter(pk__in=[row["eval_prompt_id"] for row in rows]).values_list("pk", "turns"))
    added = 0
    with transaction.atomic():
        for other in (role for role in (evaluation.SFT, evaluation.PREVIOUS) if role in checkpoints):
            firsts = round_.new_policy_first(other, len(rows))
            items = []
            for row, new_first in zip(rows, firsts, strict=True):
                a, b = (evaluation.NEW, other) if new_first else (other, evaluation.NEW)
                items.append(PairInput(turns.get(row["eval_prompt_id"]) or row["prompt"], row["answers"][a],
                                       row["answers"][b], checkpoints=(checkpoints[a], checkpoints[b])))
            added += add_pairs(round_.campaign, items, round=round_, priority=priority, source=Response.POLICY,
                               purpose=Pair.EVALUATION).created
    log.info("sent %s evaluation pairs of %s to labelers", added, round_)
    return added


def _start_chain(job_ids: list[int]) -> None:
    """Publish the chain (on commit); when the broker cannot take it, fail the chain's first job with
    the reason, so the round does not sit queued for ever and block the next launch."""
    try:
        dispatch.start_chain(job_ids)
    except Exception as exc:  # noqa: BLE001 - kombu and redis-py raise several types for a lost broker
        log.exception("could not publish the chain of jobs %s", job_ids)
        fail_unpublished(job_ids[0], f"{type(exc).__name__}: {exc}")


def fail_unpublished(job_id: int, reason: str) -> Job | None:
    """Mark a queued job failed because its Celery message could not be sent (None if it is not queued)."""
    error = (f"Could not reach the job queue (Redis): {reason}. Nothing ran; press Resume once "
             "the queue is back.")
    now = timezone.now()
    job = Job.objects.filter(pk=job_id).first()
    if job is None or not Job.objects.filter(pk=job_id, status=Job.QUEUED).update(
            status=Job.FAILED, finished_at=now, error=error, warning="",
            log=_append_log(job.log, "Failed: the job queue could not be reached.")):
        return None
    job.refresh_from_db()
    live.job_changed(job)
    return job


def cancel_job(job: Job) -> Job:
    """Stop a round at its current job: a queued one is cancelled at once, a running one at its next
    step boundary (the worker's progress callback sees cancel_requested and raises). Later jobs stay
    queued (a resume runs them); they never start while an earlier one has not succeeded."""
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        earlier = Job.objects.filter(round_id=job.round_id, order__lt=job.order).exclude(status=Job.SUCCEEDED)
        if earlier.exists():
            raise RoundRefused("An earlier job of this round has not finished: "
                               "cancel the round's current job.")
        now = timezone.now()
        if job.status == Job.QUEUED:
            job.status, job.finished_at = Job.CANCELLED, now
            job.log = _append_log(job.log, "Cancelled before it started.")
            job.save(update_fields=["status", "finished_at", "log"])
        elif job.status == Job.RUNNING and not job.cancel_requested:
            job.cancel_requested = True
            job.log = _append_log(job.log, "Cancel requested: stopping at the next step.")
            job.save(update_fields=["cancel_requested", "log"])
        else:
            return job
        transaction.on_commit(lambda: live.job_changed(job))
    return job


def resume_job(job: Job) -> Job:
    """Run a failed or cancelled job again from its resumable checkpoint, then the rest of its chain."""
    with transaction.atomic():
        Campaign.objects.select_for_update().get(pk=job.round.campaign_id)
        job = Job.objects.select_for_update().select_related("round").get(pk=job.pk)
        if job.status not in (Job.FAILED, Job.CANCELLED):
            raise RoundRefused(f"Only a failed or cancelled job can be resumed; this one is {job.status}.")
        if Job.objects.filter(round=job.round, order__lt=job.order).exclude(status=Job.SUCCEEDED).exists():
            raise RoundRefused("An earlier job of this round has not succeeded: resume that one first.")
        running = active_round(job.round.campaign)
        if running is not None and running.pk != job.round_id:
            raise RoundRefused(f"Round {running.number} of this campaign is {running.status()}: "
                               "two rounds of one campaign never run at once.")
        job.status, job.cancel_requested, job.finished_at = Job.QUEUED, False, None
        job.warning = ""
        job.log = _append_log(job.log, "Resumed: continuing from the last checkpoint.")
        job.save(update_fields=["status", "cancel_requested", "finished_at", "warning", "log"])
        Job.objects.filter(pk=job.pk).update(queued_at=Now())
        later = list(Job.objects.filter(round=job.round, order__gt=job.order).order_by("order"))
        for other in later:
            if other.status in (Job.FAILED, Job.CANCELLED, Job.QUEUED):
                other.status, other.cancel_requested, other.finished_at = Job.QUEUED, False, None
                other.queued_at, other.warning = None, ""
                other.save(update_fields=["status", "cancel_requested", "finished_at", "queued_at",
                                          "warning"])
        job_ids = [job.pk] + [other.pk for other in later if other.status != Job.SUCCEEDED]
        transaction.on_commit(lambda: _start_chain(job_ids))
        transaction.on_commit(lambda: live.job_changed(job))
    return job


# ---------------------------------------------------------------------------------------------
# The worker's side: claim, progress, heartbeat, finish
# ---------------------------------------------------------------------------------------------

def claim_job(job_id: int, task_id: str) -> tuple[Job | None, str]:
    """Move a queued job to running for this Celery task; returns (job, "") or (None, why not).

    A conditional UPDATE: of two deliveries of one job (a redelivered message and a resume), one wins.
    """
    job = Job.objects.select_related("round__campaign").filter(pk=job_id).first()
    if job is None:
        return None, "gone"
    if job.status != Job.QUEUED:
        return None, job.status
    earlier = Job.objects.filter(round_id=job.round_id, order__lt=job.order).exclude(status=Job.SUCCEEDED)
    if earlier.exists():
        return None, "waiting"
    claimed = Job.objects.filter(pk=job_id, status=Job.QUEUED).update(
        status=Job.RUNNING, celery_task_id=task_id, started_at=Now(), heartbeat_at=Now(), finished_at=None,
        start_step=0 if job.step == 0 else None, error="", warning="", attempts=F("attempts") + 1,
        cancel_requested=False,
    )
    if not claimed:
        return None, "taken"
    job.refresh_from_db()
    live.job_changed(job)
    return job, ""


def _mine(job_id: int, task_id: str):
    return Job.objects.filter(pk=job_id, status=Job.RUNNING, celery_task_id=task_id)


def record_progress(job_id: int, task_id: str, *, step: int, total: int, metrics: list,
                    log_text: str) -> bool:
    """Write a running job's progress, metric points and log tail, and refresh its heartbeat.

    Returns whether a cancel was requested. Raises JobLost when this task no longer owns the job.
    """
    updated = _mine(job_id, task_id).update(
        step=step, total_steps=total, metrics=metrics, log=log_text, heartbeat_at=Now(),
        start_step=Least(Coalesce(F("start_step"), Value(step)), Value(step)),
    )
    if not updated:
        raise JobLost(f"job {job_id} is no longer running under task {task_id}")
    return cancel_requested(job_id)


def cancel_requested(job_id: int) -> bool:
    return bool(Job.objects.filter(pk=job_id).values_list("cancel_requested", flat=True).first())


def heartbeat(job_id: int, task_id: str) -> bool:
    """Refresh the heartbeat of a running job; False when this task no longer owns it."""
    return bool(_mine(job_id, task_id).update(heartbeat_at=Now()))


def finish_job(job_id: int, task_id: str, *, result: dict, checkpoint_path: str = "", step: int | None = None,
               total: int | None = None, metrics: list | None = None, log_text: str | None = None,
               round_fields: dict | None = None) -> Job:
    """Mark a job succeeded with its final result, and record what it produced on the round."""
    now = timezone.now()
    with transaction.atomic():
        job = _mine(job_id, task_id).select_for_update().select_related("round").first()
        if job is None:
            raise JobLost(f"job {job_id} is no longer running under task {task_id}")
        job.status, job.finished_at, job.heartbeat_at, job.result = Job.SUCCEEDED, now, now, result
        job.checkpoint_path = checkpoint_path or job.checkpoint_path
        fields = ["status", "finished_at", "heartbeat_at", "result", "checkpoint_path"]
        for name, value in (("step", step), ("total_steps", total), ("metrics", metrics), ("log", log_text)):
            if value is not None:
                setattr(job, name, value)
                fields.append(name)
        if step is None and job.total_steps:
            job.step = job.total_steps
            fields.append("step")
        job.save(update_fields=fields)
        round_ = job.round
        Job.objects.filter(round=round_, order=job.order + 1, status=Job.QUEUED).update(queued_at=Now())
        changed = dict(round_fields or {})
        if not Job.objects.filter(round=round_).exclude(pk=job.pk).exclude(status=Job.SUCCEEDED).exists():
            changed["finished_at"] = now
        if changed:
            for name, value in changed.items():
                setattr(round_, name, value)
            round_.save(update_fields=list(changed))
        transaction.on_commit(lambda: live.job_changed(job))
    return job


def fail_job(job_id: int, task_id: str, *, error: str, log_text: str | None = None,
             metrics: list | None = None, step: int | None = None, status: str = Job.FAILED) -> Job | None:
    """Mark a running job failed (error: message, then traceback) or cancelled. None if it is not ours."""
    now = timezone.now()
    values = {"status": status, "finished_at": now, "error": error, "cancel_requested": False}
    if log_text is not None:
        values["log"] = log_text
    if metrics is not None:
        values["metrics"] = metrics
    if step is not None:
        values["step"] = step
    if not _mine(job_id, task_id).update(**values):
        return None
    job = Job.objects.select_related("round").get(pk=job_id)
    live.job_changed(job)
    return job


def _seconds_ago(seconds: int) -> ExpressionWrapper:
    """The database's now minus `seconds`: compared with times the database wrote (Now()), so the
    clocks of the hosts that run workers and beat never enter the comparison."""
    return ExpressionWrapper(Now() - Value(timedelta(seconds=seconds)), output_field=DateTimeField())


def fail_stale_jobs() -> list[Job]:
    """Running jobs whose heartbeat is older than PAIRLOOP["HEARTBEAT_STALE_SECONDS"] are marked failed:
    their worker was killed or lost the database. Called by Celery beat (and `launch_round --wait`)."""
    stale_after = settings.PAIRLOOP["HEARTBEAT_STALE_SECONDS"]
    failed = []
    stale = Job.objects.filter(status=Job.RUNNING, heartbeat_at__lt=_seconds_ago(stale_after))
    for job in stale.annotate(db_now=Now()).select_related("round"):
        seen = job.heartbeat_at
        ago = int((job.db_now - seen).total_seconds())
        error = (f"The worker stopped: no heartbeat for {ago} s (a job is marked failed after "
                 f"{stale_after} s of silence). It was probably killed or lost its connection at "
                 f"{timezone.localtime(seen):%Y-%m-%d %H:%M:%S}. Resume continues from the last checkpoint.")
        # Still stale as it is failed: a beat meanwhile keeps it running. Not `heartbeat_at=seen`: SQLite
        # stores Now() as text to the millisecond ("…:18.555") and a time as a parameter to the microsecond
        # ("…:18.555000"), so the two never compare equal there.
        if stale.filter(pk=job.pk).update(
                status=Job.FAILED, finished_at=Now(), error=error,
                log=_append_log(job.log, "Marked failed: the worker's heartbeat went stale.")):
            job.refresh_from_db()
            live.job_changed(job)
            failed.append(job)
            log.warning("%s: %s", job, error)
    return failed


def flag_unclaimed_jobs() -> list[Job]:
    """Jobs ready for a worker longer than PAIRLOOP_UNCLAIMED_WARN_SECONDS that none has claimed get a
    warning on their card (they stay queued: a worker may still come). Called by Celery beat."""
    warn_after = settings.JOB_UNCLAIMED_WARN_SECONDS
    flagged = []
    waiting = Job.objects.filter(status=Job.QUEUED, warning="", queued_at__lt=_seconds_ago(warn_after))
    for job in waiting.annotate(db_now=Now()).select_related("round"):
        minutes = max(1, int((job.db_now - job.queued_at).total_seconds() // 60))
        warning = (f"Queued for {minutes} min and no worker has taken it (warned after {warn_after} s, "
                   f"PAIRLOOP_UNCLAIMED_WARN_SECONDS): is a worker consuming the {job.queue} queue "
                   f"(celery -A pairloop worker -Q {job.queue}) and is Redis reachable from it?")
        if Job.objects.filter(pk=job.pk, status=Job.QUEUED, warning="").update(warning=warning):
            job.refresh_from_db()
            live.job_changed(job)
            flagged.append(job)
            log.warning("%s: %s", job, warning)
    return flagged


LOG_TAIL_CHARS = 8000


def _append_log(text: str, line: str) -> str:
    stamp = timezone.localtime().strftime("%H:%M:%S")
    return tail(f"{text}{'' if not text or text.endswith(chr(10)) else chr(10)}[{stamp}] {line}\n")


def tail(text: str, limit: int = LOG_TAIL_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    return cut[cut.find("\n") + 1:] if "\n" in cut else cut
