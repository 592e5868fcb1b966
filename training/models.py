"""Training rounds and their jobs. The Job row is the record of truth for a running job."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from django.conf import settings
from django.db import models
from django.db.models import Case, Count, Q, Value, When
from django.urls import reverse
from django.utils import timezone

from annotate.models import Judgment, Pair
from training.config import RoundConfig


def half_first(seed: int, batch: str, count: int) -> list[bool]:
    """Per item of a batch of `count` pairs, whether the side that would give it away (a new policy's response, an
    AI's revision) is stored as response A: half of them (the odd one A), in an order drawn from `seed` and the
    batch's name, so the same batch under the same seed gives the same sides (Round.new_policy_first, cai_revise)."""
    first = [index < (count + 1) // 2 for index in range(count)]
    random.Random(f"{seed}:{batch}").shuffle(first)
    return first


@dataclass
class WinRate:
    """One side of a round's pairs against the other, counted from judgments."""

    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0

    @property
    def total(self) -> int:
        return self.wins + self.losses + self.ties + self.both_bad

    @property
    def rate(self) -> float | None:
        """Wins plus half the ties and both-bad, over all judgments (None without judgments)."""
        if not self.total:
            return None
        return (self.wins + 0.5 * (self.ties + self.both_bad)) / self.total


class Round(models.Model):
    campaign = models.ForeignKey("annotate.Campaign", on_delete=models.CASCADE, related_name="rounds")
    number = models.PositiveIntegerField()
    config = models.JSONField(default=dict, blank=True)
    parent_policy = models.CharField(max_length=500, help_text="Policy checkpoint this round starts from.")
    policy_checkpoint = models.CharField(max_length=500, blank=True, help_text="The new policy, when PPO is done.")
    reward_checkpoint = models.CharField(max_length=500, blank=True)
    dataset_path = models.CharField(max_length=500, blank=True, help_text="The exported pairs it trained on.")
    data_version = models.CharField(max_length=64, blank=True)
    launched_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["campaign", "-number"]
        constraints = [models.UniqueConstraint(fields=["campaign", "number"], name="round_number_per_campaign")]

    def __str__(self):
        return f"{self.campaign.slug} round {self.number}"

    def get_absolute_url(self):
        return reverse("round_detail", args=[self.pk])

    def group_name(self) -> str:
        return f"round-{self.pk}"

    @property
    def algorithm(self) -> str:
        """How it trained its policy (RoundConfig.algorithm); rounds stored before there was a choice ran PPO."""
        return self.config.get("algorithm", RoundConfig.algorithm)

    def status(self) -> str:
        """running while any job runs; else failed or cancelled when one is; succeeded when all are;
        queued before the first job starts, running between jobs."""
        statuses = [job.status for job in self.jobs.all()]
        if not statuses:
            return Job.QUEUED
        for status in (Job.RUNNING, Job.FAILED, Job.CANCELLED):
            if status in statuses:
                return status
        if all(s == Job.SUCCEEDED for s in statuses):
            return Job.SUCCEEDED
        return Job.QUEUED if all(s == Job.QUEUED for s in statuses) else Job.RUNNING

    def current_job(self) -> Job | None:
        """The job the round is at: the first one that has not succeeded (None when all have)."""
        return next((job for job in self.jobs.all() if job.status != Job.SUCCEEDED), None)

    def is_active(self) -> bool:
        """Queued or running. A round whose job failed or was cancelled is not, though its later jobs
        still wait (as queued) for a resume."""
        return self.status() in Job.ACTIVE

    def new_policy_first(self, batch: str, count: int) -> list[bool]:
        """Per pair of a batch of `count` that sets the new policy against another (`batch` names it: the enqueue
        job's, or an evaluation's other role), whether the new policy's response is stored as response A: half of
        them (the odd one A), in an order drawn from the round's seed, so the stored order says nothing of which
        is new, a position bias weighs on both policies alike, and the same batch again gives the same pairs."""
        return half_first(self.config.get("seed", 0), batch, count)

    def win_rates(self) -> dict[str, WinRate]:
        """Judgments on this round's training pairs, by judgment source, each read by which response this round's
        policy wrote (Response.checkpoint), never by position (it is response A of about half: new_policy_first).
        Pairs of two of its own responses (pairing "self"), or where neither is recorded as its own, are left out."""
        rates: dict[str, WinRate] = {}
        if not self.policy_checkpoint:
            return rates
        new_a = Q(pair__response_a__checkpoint=self.policy_checkpoint)
        new_b = Q(pair__response_b__checkpoint=self.policy_checkpoint)
        rows = (Judgment.objects.filter(pair__round=self, pair__purpose=Pair.TRAINING)
                .annotate(new_side=Case(When(new_a & ~new_b, then=Value(Judgment.A)),
                                        When(new_b & ~new_a, then=Value(Judgment.B)), default=Value("")))
                .exclude(new_side="").values_list("source", "choice", "new_side")
                .annotate(n=Count("id")).order_by())
        for source, choice, new_side, n in rows:
            rate = rates.setdefault(source, WinRate())
            if choice == new_side:
                rate.wins += n
            elif choice in (Judgment.A, Judgment.B):
                rate.losses += n
            elif choice == Judgment.TIE:
                rate.ties += n
            else:
                rate.both_bad += n
        return rates


class Job(models.Model):
    EXPORT, REWARD, PPO, SAMPLE, ENQUEUE, SFT = "export", "reward", "ppo", "sample", "enqueue", "sft"
    DPO, GRPO, EVALUATE = "dpo", "grpo", "evaluate"
    KINDS = [(EXPORT, "export pairs"), (SFT, "supervised fine-tuning"), (REWARD, "reward model"),
             (PPO, "PPO"), (DPO, "DPO"), (GRPO, "GRPO"), (SAMPLE, "sample responses"), (ENQUEUE, "enqueue pairs"),
             (EVALUATE, "evaluate")]
    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
    STATUSES = [(s, s) for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)]
    ACTIVE = (QUEUED, RUNNING)
    # The Celery queue each kind runs on: training kinds on the one a GPU box consumes, the light ones on default.
    DEFAULT_QUEUE, TRAINING_QUEUE = "default", "training"
    QUEUES = {EXPORT: DEFAULT_QUEUE, SFT: TRAINING_QUEUE, REWARD: TRAINING_QUEUE, PPO: TRAINING_QUEUE,
              DPO: TRAINING_QUEUE, GRPO: TRAINING_QUEUE,
              SAMPLE: TRAINING_QUEUE, ENQUEUE: DEFAULT_QUEUE, EVALUATE: TRAINING_QUEUE}

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=10, choices=KINDS)
    order = models.PositiveSmallIntegerField(help_text="Position in the round's chain.")
    status = models.CharField(max_length=10, choices=STATUSES, default=QUEUED)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    start_step = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="The step this run started from: 0, or for a resumed job the lowest step it has reported "
                  "(its checkpoint's). The ETA counts from it.")
    metrics = models.JSONField(default=list, blank=True, help_text="Metric points: [{step, key: value...}].")
    result = models.JSONField(default=dict, blank=True, help_text="Final metrics and outputs.")
    log = models.TextField(blank=True, help_text="The tail of the job's log.")
    error = models.TextField(blank=True, help_text="Error message and traceback when failed.")
    checkpoint_path = models.CharField(max_length=500, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    cancel_requested = models.BooleanField(default=False)
    attempts = models.PositiveSmallIntegerField(default=0)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(
        null=True, blank=True,
        help_text="When it became ready for a worker (launched, resumed, or its previous job done); "
                  "empty while an earlier job still has to finish.")
    warning = models.TextField(
        blank=True,
        help_text="Why it looks stuck (queued, no worker took it); cleared when a worker claims it.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["round", "order"]
        constraints = [models.UniqueConstraint(fields=["round", "order"], name="job_order_per_round")]
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="job_heartbeat_idx",
                                condition=Q(status="running"))]

    def __str__(self):
        return f"{self.round} / {self.get_kind_display()}"

    def group_name(self) -> str:
        return f"job-{self.pk}"

    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def queue(self) -> str:
        """The Celery queue this job's kind runs on (Job.QUEUES)."""
        return self.QUEUES[self.kind]

    def progress_fraction(self) -> float:
        if self.status == self.SUCCEEDED:
            return 1.0
        if not self.total_steps:
            return 0.0
        return min(1.0, self.step / self.total_steps)

    def eta_seconds(self) -> float | None:
        """Seconds left at this run's pace: its time so far over the steps it made. A resumed job
        counts from the step it resumed at, not from 0; None until it has made a step."""
        if self.status != self.RUNNING or not self.started_at or not self.total_steps:
            return None
        done = self.step - self.start_step if self.start_step is not None else 0
        if done <= 0:
            return None
        elapsed = (timezone.now() - self.started_at).total_seconds()
        return max(0.0, elapsed / done * (self.total_steps - self.step))

    # Charted metric keys: losses, accuracies, rewards, margins, KL and entropy, and each named reward source's
    # reward, ppo/reward/<name> (not the KL coefficient or the approximate KL of the PPO update, nor a source
    # named by its path, ppo/reward//runs/rm).
    CHART_KEY = re.compile(r"^[a-z]+/([a-z_]*(loss|accuracy|reward|margin|kl|entropy|score)[a-z_]*"
                           r"|reward/[a-z][a-z0-9_]*)$")
    CHART_SKIP = ("kl_coef", "approx_kl")

    @classmethod
    def is_chart_key(cls, key: str) -> bool:
        return bool(cls.CHART_KEY.match(key)) and not key.endswith(cls.CHART_SKIP)

    def chart_points(self, last: int | None = None) -> list[dict]:
        """Metric points with only the charted keys (the last `last` points when given)."""
        points = self.metrics[-last:] if last else self.metrics
        charted = []
        for point in points:
            values = {k: v for k, v in point.items() if k != "step" and self.is_chart_key(k)}
            if values:
                charted.append({"step": point.get("step", 0), **values})
        return charted

    def error_summary(self) -> str:
        """The first paragraph of the error (the message; the traceback follows a blank line)."""
        return self.error.split("\n\n", 1)[0]

    def duration_seconds(self) -> float | None:
        if not self.started_at:
            return None
        end = self.finished_at or timezone.now()
        return (end - self.started_at).total_seconds()
