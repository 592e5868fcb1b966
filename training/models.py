"""Training rounds and their jobs. The Job row is the record of truth for a running job."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone


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

    def status(self) -> str:
        statuses = [job.status for job in self.jobs.all()]
        if not statuses:
            return Job.QUEUED
        for status in (Job.FAILED, Job.CANCELLED, Job.RUNNING):
            if status in statuses:
                return status
        if all(s == Job.SUCCEEDED for s in statuses):
            return Job.SUCCEEDED
        return Job.QUEUED if all(s == Job.QUEUED for s in statuses) else Job.RUNNING

    def is_active(self) -> bool:
        return self.jobs.filter(status__in=Job.ACTIVE).exists()


class Job(models.Model):
    EXPORT, REWARD, PPO, SAMPLE, ENQUEUE, SFT = "export", "reward", "ppo", "sample", "enqueue", "sft"
    KINDS = [(EXPORT, "export pairs"), (SFT, "supervised fine-tuning"), (REWARD, "reward model"),
             (PPO, "PPO"), (SAMPLE, "sample responses"), (ENQUEUE, "enqueue pairs")]
    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
    STATUSES = [(s, s) for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)]
    ACTIVE = (QUEUED, RUNNING)
    TRAINING_KINDS = (REWARD, PPO, SAMPLE, SFT)

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=10, choices=KINDS)
    order = models.PositiveSmallIntegerField(help_text="Position in the round's chain.")
    status = models.CharField(max_length=10, choices=STATUSES, default=QUEUED)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
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

    def progress_fraction(self) -> float:
        if self.status == self.SUCCEEDED:
            return 1.0
        if not self.total_steps:
            return 0.0
        return min(1.0, self.step / self.total_steps)

    def eta_seconds(self) -> float | None:
        if self.status != self.RUNNING or not self.started_at or not self.step or not self.total_steps:
            return None
        elapsed = (timezone.now() - self.started_at).total_seconds()
        return max(0.0, elapsed / self.step * (self.total_steps - self.step))

    def duration_seconds(self) -> float | None:
        if not self.started_at:
            return None
        end = self.finished_at or timezone.now()
        return (end - self.started_at).total_seconds()
