"""What each kind of job does: plain functions that call the engine and the labeling actions.

`execute(job_id, task_id)` is the whole life of one job in a worker: claim the row, keep its
heartbeat fresh from a thread, run the job kind's function with a progress callback that writes
step, metric points and log tail to the row (and raises to cancel), then mark it succeeded,
failed (message + traceback) or cancelled. The Celery tasks only call it.

Each attempt writes into its own directory (actions.attempt_dir) and resumes from the newest
checkpoint an earlier attempt left; a worker that lost its job (JobLost, a StopWithoutSaving) stops
without writing anything more.

The engine's stages and checkpoints (torch, transformers) and the export (pyarrow, datasets) are
imported inside the functions that use them: every worker imports this module as it starts, those of
the default queue that never train too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import connections
from django.utils import timezone

from annotate.models import Campaign, Prompt, Response, content_hash, storable
from demo import demo_tasks
from pairloop import heartbeat
from training import actions, cai, live, review, tracking
from training.config import (
    DPO,
    PAIRING_PREVIOUS,
    PAIRING_SELF,
    PAIRING_SFT,
    REWARD_FROM_SFT,
    RoundConfig,
    build_config,
)
from training.dispatch import time_limits
from training.engine.chat_date import pinned_chat_date
from training.engine.errors import EngineError
from training.engine.sources import QUALITY, SAFETY, classifier_source
from training.models import Job, Round
from training.starting_policy import ensure_policy

log = logging.getLogger(__name__)

MAX_POINTS = 1000  # metric points kept per job; older ones are thinned out beyond this


class JobCancelled(Exception):
    """Raised from the progress callback when an admin asked to cancel: the engine stops at a step."""


class RunnerError(Exception):
    """A job that cannot run, with a message for the admin (no traceback needed to understand it)."""


@dataclass
class Outcome:
    result: dict[str, Any]
    checkpoint_path: str = ""
    round_fields: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Progress and heartbeat
# ---------------------------------------------------------------------------------------------

class Progress:
    """The engine's on_progress callback for one job.

    Keeps step, metric points (only the values that changed since the last point) and the log tail in
    memory and writes them to the row at most every `min_interval` seconds (and on log lines and the
    last step), through actions.record_progress; raises JobCancelled when a cancel was requested.
    A job with several parts (sampling two policies) maps each part onto one bar with `section`.
    """

    def __init__(self, job: Job, task_id: str, min_interval: float = 0.5, log_every: float = 5.0,
                 lost: threading.Event | None = None):
        self.job_id, self.round_id, self.task_id = job.pk, job.round_id, task_id
        self.lost = lost or threading.Event()  # set by the heartbeat thread when the job was taken away
        self.step, self.total = job.step if job.attempts > 1 else 0, job.total_steps
        self.metrics: list[dict[str, Any]] = list(job.metrics) if job.attempts > 1 else []
        self.log = job.log
        self._last: dict[str, Any] = {}
        self._offset = 0
        self._section_total = False
        self._written_at = 0.0
        self._logged_at = 0.0
        self.min_interval, self.log_every = min_interval, log_every
        self.tracker: tracking.Tracker | None = None  # PAIRLOOP_REPORT_TO's run, set by execute

    # -- the callback -----------------------------------------------------------------------
    def __call__(self, event: dict[str, Any]) -> None:
        if self.lost.is_set():
            raise actions.JobLost(f"job {self.job_id} is no longer running under task {self.task_id}")
        # Before the engine writes a checkpoint, the row is written (and so ownership proved) first.
        force = bool(event.get("checkpoint"))
        if "step" in event:
            self.step = self._offset + int(event["step"])
            if event.get("total") and not self._section_total:
                self.total = int(event["total"])
            force = force or self.step >= self.total > 0
        metrics = event.get("metrics") or {}
        if metrics and "step" in event:
            self._add_point(self.step, metrics)
            if self.tracker:
                self.tracker.log(metrics, self.step)
            if time.monotonic() - self._logged_at >= self.log_every or force:
                self.line(self._summary(event.get("stage", ""), metrics))
        if event.get("log"):
            self.line(str(event["log"]))
            force = True
        if not self.flush(force=force) and "step" in event and actions.cancel_requested(self.job_id):
            raise JobCancelled()  # between writes, a cancel is still seen at the very next step

    def section(self, offset: int, total: int) -> None:
        """Report the next part's steps as offset + step, on a bar of `total` for the whole job."""
        self._offset, self.total, self._section_total = offset, total, True

    def set(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        self.flush(force=True)

    def line(self, text: str) -> None:
        stamp = timezone.localtime().strftime("%H:%M:%S")
        for part in text.splitlines() or [""]:
            self.log += f"[{stamp}] {part}\n"
        self.log = actions.tail(self.log)
        self._logged_at = time.monotonic()

    def flush(self, force: bool = False) -> bool:
        """Write to the row unless one was written less than min_interval ago; True if written."""
        now = time.monotonic()
        if not force and now - self._written_at < self.min_interval:
            return False
        self._written_at = now
        cancel = actions.record_progress(self.job_id, self.task_id, step=self.step, total=self.total,
                                         metrics=self.metrics, log_text=self.log)
        live.job_progressed(self.round_id, self.job_id)
        if cancel:
            raise JobCancelled()
        return True

    # -- metric points ----------------------------------------------------------------------
    def _add_point(self, step: int, metrics: dict[str, Any]) -> None:
        changed = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                continue
            if self._last.get(key) != value:
                changed[key] = value
                self._last[key] = value
        if not changed:
            return
        # A resumed stage reports its steps again from its checkpoint: what it says now is the truth.
        while self.metrics and self.metrics[-1].get("step", 0) >= step:
            self.metrics.pop()
        self.metrics.append({"step": step, **changed})
        if len(self.metrics) > MAX_POINTS:
            half = MAX_POINTS // 2
            self.metrics = self.metrics[: len(self.metrics) - half: 2] + self.metrics[-half:]

    def _summary(self, stage: str, metrics: dict[str, Any]) -> str:
        shown = [f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and Job.is_chart_key(k)]
        return f"{stage} step {self.step}/{self.total}" + (": " + " ".join(shown[:6]) if shown else "")


class Heartbeat(heartbeat.Heartbeat):
    """Keeps a running job's heartbeat fresh while the main thread is busy (loading a model, a long step);
    sets `lost` when the job is no longer this task's, so the next progress report stops the run."""

    def __init__(self, job_id: int, task_id: str, interval: float, lost: threading.Event | None = None):
        super().__init__(f"heartbeat-job-{job_id}", interval, self.beat, on_exit=connections.close_all)
        self.job_id, self.task_id = job_id, task_id
        self.lost = lost or threading.Event()

    def beat(self) -> bool:
        """Refresh the heartbeat once; False (and `lost` set) when the job is no longer this task's."""
        if actions.heartbeat(self.job_id, self.task_id):
            return True
        self.lost.set()
        return False


def heartbeat_interval() -> float:
    return max(1.0, settings.PAIRLOOP["HEARTBEAT_STALE_SECONDS"] / 4)


# ---------------------------------------------------------------------------------------------
# One job's life
# ---------------------------------------------------------------------------------------------

def execute(job_id: int, task_id: str) -> bool:
    """Run one job to its end. Returns True when the rest of the chain may go on (the job succeeded now
    or before), False when the chain must stop here (failed, cancelled, or someone else runs it)."""
    job, why = actions.claim_job(job_id, task_id)
    if job is None:
        log.info("job %s not run by task %s: %s", job_id, task_id, why)
        return why == Job.SUCCEEDED
    lost = threading.Event()
    progress = Progress(job, task_id, lost=lost)
    progress.line(f"Started {job.get_kind_display()} (attempt {job.attempts}) on {_host()}.")
    beat = Heartbeat(job.pk, task_id, heartbeat_interval(), lost)
    beat.start()
    try:
        progress.tracker = tracking.start(job)  # a tracker whose package is missing fails the job here
        with pinned_chat_date(round_chat_date(job.round)):
            outcome = RUNNERS[job.kind](job, progress)
    except JobCancelled:
        progress.line(f"Cancelled at step {progress.step}.")
        actions.fail_job(job_id, task_id, error="", status=Job.CANCELLED, log_text=progress.log,
                         metrics=progress.metrics, step=progress.step)
        return False
    except actions.JobLost:
        log.warning("job %s was taken away from task %s: stopped without writing", job_id, task_id)
        return False
    except SoftTimeLimitExceeded:
        message = (f"The job ran past its time limit of {time_limits(job.kind)[0]} s "
                   f"(PAIRLOOP_TIME_LIMIT_{job.kind.upper()}) and was stopped at step {progress.step}. "
                   "Resume continues from its last checkpoint; raise the limit for longer jobs.")
        progress.line(f"Failed: {message}")
        actions.fail_job(job_id, task_id, error=f"{message}\n\n{traceback.format_exc()}",
                         log_text=progress.log, metrics=progress.metrics, step=progress.step)
        return False
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the row
        message = _error_message(exc)
        progress.line(f"Failed: {message}")
        actions.fail_job(job_id, task_id, error=f"{message}\n\n{traceback.format_exc()}",
                         log_text=progress.log, metrics=progress.metrics, step=progress.step)
        log.exception("job %s failed", job_id)
        return False
    finally:
        beat.stop()
        if progress.tracker:
            progress.tracker.close()
    progress.line("Done.")
    try:
        actions.finish_job(job_id, task_id, result=_jsonable(outcome.result),
                           checkpoint_path=outcome.checkpoint_path, metrics=progress.metrics,
                           log_text=progress.log, round_fields=outcome.round_fields)
    except actions.JobLost:
        return False
    _remove_earlier_attempts(job)
    return True


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, (EngineError, RunnerError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _host() -> str:
    return socket.gethostname()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# ---------------------------------------------------------------------------------------------
# Shared helpers of the job kinds
# ---------------------------------------------------------------------------------------------

def round_config(round_: Round) -> RoundConfig:
    stored = {k: v for k, v in round_.config.items() if k in RoundConfig.__dataclass_fields__}
    return build_config(stored.get("preset", "demo"), stored)


def round_chat_date(round_: Round) -> str:
    """The date a round's chat templates write as today's: the one stored at launch, else its launch day (UTC)."""
    return round_.config.get("chat_date") or actions.chat_date_on(round_.created_at)


def device() -> str:
    return settings.PAIRLOOP["DEVICE"]


def train(stage: str, args: Any, progress: Progress) -> dict[str, Any]:
    """Run an engine stage in this worker, or over PAIRLOOP_TRAINING_PROCESSES processes (engine.launch)."""
    from training.engine import launch

    processes = settings.PAIRLOOP["TRAINING_PROCESSES"]
    if processes == 1:
        return import_module(f"training.engine.{stage}").main(args, progress)
    progress.line(f"{stage} on {processes} processes (accelerate launch)")
    return launch.run(stage, args, progress, processes)


def _fresh_start(job: Job) -> Path:
    """This attempt's own directory, empty: anything there was left by an earlier database whose ids
    were the same, and must not be taken for this attempt's checkpoint."""
    out = actions.attempt_dir(job)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _earlier_checkpoint(job: Job, name: str, resume_dir: Callable[[Path], Path]) -> str:
    """The resumable checkpoint with the highest step that an earlier attempt of this job left
    (`resume_dir(<attempt dir>/<name>)`), or "" for none: a resumed job continues from it."""
    from training.engine.checkpoints import find_checkpoint, read_checkpoint_meta

    found = []
    for attempt in range(job.attempts - 1, 0, -1):
        path = find_checkpoint(resume_dir(actions.attempt_dir(job, attempt) / name))
        if path is not None:
            found.append(((read_checkpoint_meta(path) or {}).get("step") or 0, attempt, path))
    return str(max(found)[2]) if found else ""


def _remove_earlier_attempts(job: Job) -> None:
    """Once an attempt succeeded, the directories of the earlier ones are no longer needed."""
    for attempt in range(1, job.attempts):
        shutil.rmtree(actions.attempt_dir(job, attempt), ignore_errors=True)


def _is_held_out(text: str) -> bool:
    """One prompt in ten (by content hash) stays out of PPO's training prompts."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 10 == 0


def ppo_prompts(campaign: Campaign) -> list[str | list[dict]]:
    """The campaign's prompts PPO trains on (a chat prompt as its turns), less one in ten held out."""
    rows = list(Prompt.training(campaign).order_by("id").values_list("text", "turns"))
    if not rows:
        raise RunnerError(f"campaign {campaign.slug!r} has no prompts to train the policy on")
    train = [turns or text for text, turns in rows if not _is_held_out(text)]
    return train or [turns or text for text, turns in rows]


def sample_prompts(campaign: Campaign, config: RoundConfig) -> list[tuple[int, str, list | None]]:
    """The prompts whose responses become new pairs, as (id, text, chat turns or None): drawn with the
    round's seed from the campaign's prompts, so successive rounds sample the same prompts (the review
    compares them side by side)."""
    rows = list(Prompt.training(campaign).order_by("id").values_list("id", "text", "turns"))
    if not rows:
        raise RunnerError(f"campaign {campaign.slug!r} has no prompts to sample")
    rng = random.Random(config.seed)
    return sorted(rng.sample(rows, min(config.sample_prompts, len(rows))), key=lambda row: row[0])


def eval_and_save_every(round_: Round, batch_size: int, epochs: int, eval_fraction: float) -> tuple[int, int]:
    """Steps between held-out evaluations and between checkpoints of a stage trained on the exported pairs: about
    ten of each a run, at least every 10 and 20 steps (evaluating every 10 steps cost the demo's 7,800-pair round
    more time than training did)."""
    steps = stage_steps(round_, batch_size, epochs, eval_fraction)
    return max(10, steps // 10), max(20, steps // 10)


def stage_steps(round_: Round, batch_size: int, epochs: int, eval_fraction: float) -> int:
    """About how many steps a stage trained on the round's exported pairs takes: its usable judgments at launch,
    less the held-out share, in batches, times the epochs (the first axis's count stands in for every axis's)."""
    trained_on = round_.config.get("usable_judgments", 0) * (1 - eval_fraction)
    return math.ceil(trained_on / batch_size) * epochs


def kl_reference(round_: Round, config: RoundConfig) -> str:
    """The frozen reference of the round's KL penalty (PPO, GRPO) and of DPO's "sft" reference: the `reference`
    setting, else the campaign's SFT policy, in every round (InstructGPT's reference, Ouyang et al. 2022)."""
    return ensure_policy(config.reference or round_.config["base_policy"], config.preset)


@dataclass(frozen=True)
class RewardSource:
    """One reward the policy stage optimises: its name (the metric <stage>/reward/<name>), the engine's source
    (a checkpoint path, rule:NAME or classifier:LABEL:PATH) and its role, quality or safety."""

    name: str
    source: str
    role: str


def reward_sources(round_: Round, config: RoundConfig) -> list[RewardSource]:
    """Every reward the round's PPO or GRPO stage optimises, the one list of them: each axis's reward model (the
    safety_axis's safety, the others quality; one axis alone is named quality) and, with safety_classifier set, that
    classifier's P(safe) (safety)."""
    checkpoints = axis_checkpoints(round_)
    if not checkpoints:
        raise RunnerError("this round has no reward model yet: its reward job has not succeeded")
    if len(checkpoints) == 1 and not config.safety_axis:
        sources = [RewardSource("quality", next(iter(checkpoints.values())), QUALITY)]
    else:
        sources = [RewardSource(axis_source_name(key), path, SAFETY if key == config.safety_axis else QUALITY)
                   for key, path in checkpoints.items()]
    if config.safety_classifier:
        sources.append(RewardSource("safety_classifier",
                                    classifier_source(config.safety_classifier, config.safety_classifier_label),
                                    SAFETY))
    return sources


def axis_source_name(key: str) -> str:
    """The reward source name of an axis's reward model (its metric <stage>/reward/axis_<key>)."""
    return "axis_" + key.lower().replace("-", "_")


def reward_source_args(sources: list[RewardSource]) -> dict[str, list[str]]:
    """The engine's arguments (PPOArgs, GRPOArgs) that list the sources, their names and their roles."""
    return {"reward_models": [s.source for s in sources], "reward_names": [s.name for s in sources],
            "reward_roles": [s.role for s in sources]}


def opponent(round_: Round, config: RoundConfig) -> tuple[str, str]:
    """(label, checkpoint) of what the new policy is paired against; ("", "") for two samples of itself."""
    if config.pairing == PAIRING_PREVIOUS:
        return ("SFT policy" if round_.number == 1 or round_.parent_policy == round_.config.get("base_policy")
                else "previous round's policy"), round_.parent_policy
    if config.pairing == PAIRING_SFT:
        return "SFT policy", round_.config["base_policy"]
    return "", ""


# ---------------------------------------------------------------------------------------------
# The job kinds
# ---------------------------------------------------------------------------------------------

def round_axes(round_: Round, config: RoundConfig) -> list[str]:
    """The keys of the axes a round learns from, the first its primary one (Round.dataset_path, reward_checkpoint):
    a DPO round's dpo_axis (empty: the campaign's first axis), every axis of the campaign for the other types."""
    campaign = round_.campaign
    if config.algorithm == DPO:
        return [config.dpo_axis or campaign.axis_key]
    return [axis.key for axis in campaign.axes()]


def run_export(job: Job, progress: Progress) -> Outcome:
    """Export the campaign's judged pairs on each axis the round learns from (round_axes) to a versioned JSONL file
    (round number, the axis's key but the first's, content hash), of the judgments its `judgments` setting takes."""
    from annotate.exporting import provenance

    round_ = job.round
    selection = round_config(round_).judgments
    keys = round_axes(round_, round_config(round_))
    progress.set(0, len(keys))
    axes = []  # a list, in order: PostgreSQL's jsonb keeps no key order
    for done, key in enumerate(keys):
        axes.append({"axis": key, **_export_axis(job, key, selection, named=key != round_.campaign.axis_key,
                                                 progress=progress)})
        progress.set(done + 1, len(keys))
    primary = axes[0]
    sources = provenance(round_.campaign, ai=selection)
    progress.line(f"Judgments: {selection}; AI labelers made {sources['ai_share']:.0%} of the pairs")
    return Outcome({**primary, "provenance": sources, "axes": axes}, primary["path"],
                   {"dataset_path": primary["path"], "data_version": primary["data_version"]})


def _export_axis(job: Job, key: str, selection: str, *, named: bool, progress: Progress) -> dict[str, Any]:
    """Export one axis's Bradley-Terry pairs of the judgments `selection` takes; what the export job's result says
    of it."""
    from annotate.exporting import export_pairs

    round_ = job.round
    campaign = round_.campaign
    out_dir = Path(settings.PAIRLOOP["EXPORTS_DIR"]) / campaign.slug
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"round-{round_.number}" + (f"-{key}" if named else "")
    tmp = out_dir / f".{stem}-job-{job.pk}.jsonl"
    # A chat campaign's pairs keep their turns (TRL's conversational form): the reward model then reads each
    # prompt as PPO and the sample job score it, in its chat template, or flattened by common.prompt_text.
    exported = export_pairs(campaign, tmp, format="jsonl", raw=False, include_simulated=True, trl_format="auto",
                            axis=key, ai=selection)
    if not exported.rows:
        tmp.unlink(missing_ok=True)
        raise RunnerError(f"the export holds no Bradley-Terry pairs on the axis {key!r} (judgments with A or B "
                          "preferred): nothing to train on")
    digest = hashlib.sha256(Path(exported.path).read_bytes()).hexdigest()[:16]
    final = out_dir / f"{stem}-{digest}.jsonl"
    Path(exported.path).replace(final)
    progress.line(f"Exported {exported.rows} pairs of the axis {key!r} to {final}")
    left_out = exported.left_out
    if left_out and left_out.count:
        progress.line(f"Left out {left_out.sentence()}")
    return {"rows": exported.rows, "path": str(final), "data_version": digest,
            "excluded": left_out.count if left_out else 0,
            "excluded_reasons": left_out.reasons if left_out else []}


def axis_exports(round_: Round) -> dict[str, str]:
    """{axis key: exported pairs} of the round's export job, the primary axis first; a round exported before
    rounds had axes: its dataset_path on the campaign's first axis."""
    export = round_.jobs.filter(kind=Job.EXPORT).first()
    axes = (export.result or {}).get("axes") if export is not None else None
    if axes:
        return {value["axis"]: value["path"] for value in axes}
    return {round_.campaign.axis_key: round_.dataset_path} if round_.dataset_path else {}


def axis_checkpoints(round_: Round) -> dict[str, str]:
    """{axis key: reward model} of the round's reward job, the primary axis first; a round trained before rounds
    had axes: its reward_checkpoint on the campaign's first axis."""
    reward = round_.jobs.filter(kind=Job.REWARD, status=Job.SUCCEEDED).first()
    axes = (reward.result or {}).get("axes") if reward is not None else None
    if axes:
        return dict(axes)  # [[key, checkpoint], ...] in order
    return {round_.campaign.axis_key: round_.reward_checkpoint} if round_.reward_checkpoint else {}


def start_policy(round_: Round) -> str:
    """The policy a round's policy stage starts from: its SFT job's, fine-tuned on the accepted AI revisions, when
    that job learned from any; else its parent_policy."""
    sft = round_.jobs.filter(kind=Job.SFT, status=Job.SUCCEEDED).exclude(checkpoint_path="").first()
    return sft.checkpoint_path if sft is not None else round_.parent_policy


def run_sft(job: Job, progress: Progress) -> Outcome:
    """Fine-tune the round's starting policy on (prompt, accepted AI revision) with the engine's SFT stage, the CAI
    paper's supervised stage (Bai et al. 2022, sec. 3); the revisions accepted under cai_accept are written to a
    file beside the checkpoint. With none accepted there is nothing to learn: the round goes on from its start."""
    from training.engine import sft

    round_ = job.round
    config = round_config(round_)
    examples = cai.sft_examples(round_.campaign, config.cai_accept)
    root = _fresh_start(job)
    summary = {"revisions": len(examples), "accept": config.cai_accept}
    if not examples:
        progress.line(f"No AI revision accepted ({config.cai_accept}): the round goes on from {round_.parent_policy}")
        return Outcome(summary)
    data = root / "revisions.jsonl"
    data.write_text("".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples), encoding="utf-8")
    out = root / "policy"
    args = sft.SFTArgs(
        model=ensure_policy(round_.parent_policy, config.preset), train=str(data), out=str(out), truncate=True,
        system_prompt=config.system_prompt, seed=config.seed + round_.number, log_every=1, device=device(),
        data_version=hashlib.sha256(data.read_bytes()).hexdigest()[:16], **config.engine_args(sft.SFTArgs))
    progress.line(f"SFT of {args.model} on {len(examples)} AI revisions accepted by {config.cai_accept}")
    metrics = train("sft", args, progress)
    return Outcome({**metrics, **summary}, str(out))


def run_reward(job: Job, progress: Progress) -> Outcome:
    """Train one Bradley-Terry reward model per exported axis, each in its own directory (reward, then
    reward-<key> for further axes) and resumed from its own checkpoint; the primary axis's is the round's."""
    from training.engine import reward

    round_ = job.round
    config = round_config(round_)
    exports = axis_exports(round_)
    if not exports:
        raise RunnerError("this round has no exported pairs yet: its export job has not succeeded")
    root = _fresh_start(job)
    backbone = config.reward_model or settings.PAIRLOOP["REWARD_MODEL"]
    if backbone == REWARD_FROM_SFT:
        backbone = round_.config["base_policy"]
    eval_every, save_every = eval_and_save_every(round_, config.reward_batch_size, config.reward_epochs,
                                                 reward.RewardArgs.eval_fraction)
    checkpoints, per_axis, offset = {}, {}, 0
    for index, (key, path) in enumerate(exports.items()):
        name = "reward" if index == 0 else f"reward-{key}"
        # One bar for the whole job: each axis's steps follow the ones before (metric points stay in order).
        progress.section(offset, offset + max(1, stage_steps(round_, config.reward_batch_size, config.reward_epochs,
                                                             reward.RewardArgs.eval_fraction)) * (len(exports) - index))
        args = reward.RewardArgs(
            train=path, out=str(root / name), seed=config.seed, system_prompt=config.system_prompt,
            log_every=2, eval_every=eval_every, save_every=save_every, resume=True,
            resume_from=_earlier_checkpoint(job, name, reward.resume_dir),
            device=device(), **({"model": backbone} if backbone else {}), **config.engine_args(reward.RewardArgs),
        )
        progress.line(f"Reward model of the axis {key!r} from {args.model} on {path}")
        per_axis[key] = train("reward", args, progress)
        checkpoints[key], offset = str(root / name), progress.step
    primary = next(iter(exports))
    result = {**per_axis[primary], "axes": list(checkpoints.items()), "axis_metrics": per_axis}
    return Outcome(result, checkpoints[primary], {"reward_checkpoint": checkpoints[primary]})


def run_ppo(job: Job, progress: Progress) -> Outcome:
    """PPO from the round's starting policy against its reward model, with the KL penalty to the SFT
    policy in every round (InstructGPT's reference, Ouyang et al. 2022): a penalty to the round's own
    start let drift add up over rounds (closed loop: KL to SFT 1.2 -> 2.1 -> 2.8, correctness falling)."""
    from training.engine import ppo

    round_ = job.round
    config = round_config(round_)
    sources = reward_sources(round_, config)
    out = _fresh_start(job) / "policy"
    progress.line(f"Loading the starting policy {start_policy(round_)}")
    policy = ensure_policy(start_policy(round_), config.preset)
    reference = kl_reference(round_, config)
    prompts = ppo_prompts(round_.campaign)
    args = ppo.PPOArgs(
        policy=policy, ref_policy=reference, **reward_source_args(sources), prompts=prompts,
        out=str(out), system_prompt=config.system_prompt, stop_strings=config.stop_list(),
        seed=config.seed + round_.number, resume=True, device=device(),
        resume_from=_earlier_checkpoint(job, "policy", ppo.resume_dir), **config.engine_args(ppo.PPOArgs),
    )
    progress.line(f"PPO on {len(prompts)} prompts for {args.steps} steps of {args.batch_size} rollouts")
    metrics = train("ppo", args, progress)
    metrics["rendered_prompt"] = metrics.pop("ppo/rendered_prompt", "")
    return Outcome(metrics, str(out), {"policy_checkpoint": str(out)})


def run_grpo(job: Job, progress: Progress) -> Outcome:
    """GRPO from the round's starting policy against its reward model: groups of samples per prompt, each
    response's advantage from its group's scores, no critic; the KL term to the SFT policy as PPO's."""
    from training.engine import grpo

    round_ = job.round
    config = round_config(round_)
    sources = reward_sources(round_, config)
    out = _fresh_start(job) / "policy"
    progress.line(f"Loading the starting policy {start_policy(round_)}")
    policy = ensure_policy(start_policy(round_), config.preset)
    prompts = ppo_prompts(round_.campaign)
    args = grpo.GRPOArgs(
        policy=policy, ref_policy=kl_reference(round_, config), **reward_source_args(sources),
        prompts=prompts, out=str(out), system_prompt=config.system_prompt, stop_strings=config.stop_list(),
        max_new_tokens=config.ppo_max_new_tokens, seed=config.seed + round_.number, resume=True, device=device(),
        resume_from=_earlier_checkpoint(job, "policy", grpo.resume_dir), **config.engine_args(grpo.GRPOArgs),
    )
    progress.line(f"GRPO on {len(prompts)} prompts for {args.steps} steps of {args.batch_size} responses "
                  f"in groups of {args.samples_per_prompt}")
    metrics = train("grpo", args, progress)
    metrics["rendered_prompt"] = metrics.pop("grpo/rendered_prompt", "")
    return Outcome(metrics, str(out), {"policy_checkpoint": str(out)})


def online_dpo_args(round_: Round, config: RoundConfig) -> dict[str, Any]:
    """The DPO stage's online arguments: with dpo_online, the round's reward model labels fresh pairs of the policy's
    samples on the prompts PPO would train on, as long and as hot as the sample job's; {} for offline DPO."""
    if not config.dpo_online:
        return {}
    return {"reward_models": [source.source for source in reward_sources(round_, config)],
            "prompts": ppo_prompts(round_.campaign), "max_new_tokens": config.ppo_max_new_tokens,
            "temperature": config.sample_temperature, "stop_strings": config.stop_list()}


def run_dpo(job: Job, progress: Progress) -> Outcome:
    """DPO from the round's starting policy on the round's export (every judged pair of the campaign, each
    round's included), against the reference dpo_reference names; with dpo_online, on fresh pairs of its own
    samples too, labelled by the round's reward model (online_dpo_args)."""
    from training.engine import dpo

    round_ = job.round
    config = round_config(round_)
    if not round_.dataset_path:
        raise RunnerError("this round has no exported pairs yet: its export job has not succeeded")
    online = online_dpo_args(round_, config)
    out = _fresh_start(job) / "policy"
    progress.line(f"Loading the starting policy {start_policy(round_)}")
    policy = ensure_policy(start_policy(round_), config.preset)
    reference = kl_reference(round_, config) if config.dpo_reference == PAIRING_SFT else policy
    eval_every, save_every = eval_and_save_every(round_, config.dpo_batch_size, config.dpo_epochs,
                                                 dpo.DPOArgs.eval_fraction)
    args = dpo.DPOArgs(
        # The starting policy as its own reference: the engine's None, one pass of it before the first step.
        policy=policy, ref_policy=None if reference == policy else reference, train=round_.dataset_path,
        out=str(out), system_prompt=config.system_prompt, seed=config.seed + round_.number, log_every=1,
        eval_every=eval_every, save_every=save_every, resume=True, device=device(),
        resume_from=_earlier_checkpoint(job, "policy", dpo.resume_dir), **config.engine_args(dpo.DPOArgs),
        **online,
    )
    progress.line(f"DPO ({args.loss_type}, beta {args.beta}) on {round_.dataset_path} against "
                  f"{args.ref_policy or 'the starting policy'}"
                  + (f"; online pairs of {args.online_samples} samples on {args.online_prompts} prompts every "
                     f"{args.online_every} steps, labelled by {round_.reward_checkpoint}" if online else ""))
    metrics = train("dpo", args, progress)
    metrics["rendered_prompt"] = metrics.pop("dpo/rendered_prompt", "")
    return Outcome(metrics, str(out), {"policy_checkpoint": str(out)})


def run_sample(job: Job, progress: Progress) -> Outcome:
    """Sample the new policy (and the one it is paired against) on the round's prompts, score every
    response shown in the review with the round's reward model (a DPO round has none: no scores), and keep it
    all on the job."""
    from training.engine.reward import RewardScorer
    from training.engine.sample import SampleArgs, sample_with_stats

    round_ = job.round
    config = round_config(round_)
    if not round_.policy_checkpoint:
        raise RunnerError("this round has no trained policy yet: its policy job (PPO, DPO or GRPO) has not succeeded")
    prompt_rows = sample_prompts(round_.campaign, config)
    rows = [(pid, text) for pid, text, _ in prompt_rows]
    prompts = [turns or text for _, text, turns in prompt_rows]
    texts = [text for _, text in rows]
    label, other_checkpoint = opponent(round_, config)
    per_policy = len(texts) * config.sample_per_prompt
    total = per_policy * (2 if other_checkpoint else 1)
    # The new pairs' responses are as long as PPO's rollouts: one setting for both.
    generation = {**config.engine_args(SampleArgs), "max_new_tokens": config.ppo_max_new_tokens,
                  "seed": config.seed + round_.number, "system_prompt": config.system_prompt,
                  "stop_strings": config.stop_list()}
    kwargs = {**generation, "device": device()}
    progress.section(0, total)
    progress.line(f"Sampling {per_policy} responses from the new policy")
    new, stats, new_cut = sample_with_stats(round_.policy_checkpoint, prompts, on_progress=progress, **kwargs)
    other: list[list[str]] = [[] for _ in texts]
    other_cut: list[list[bool]] = [[] for _ in texts]
    if other_checkpoint:
        progress.section(per_policy, total)
        progress.line(f"Sampling {per_policy} responses from the {label} ({other_checkpoint})")
        other_policy = ensure_policy(other_checkpoint, config.preset)
        # Its own seed: with the new policy's seed, a policy that barely moved would repeat the new
        # policy's answers word for word, and those pairs would be skipped as identical.
        other_kwargs = {**kwargs, "seed": kwargs["seed"] + 10_000}
        other, _, other_cut = sample_with_stats(other_policy, prompts, on_progress=progress, **other_kwargs)

    samples = [{"prompt_id": pid, "prompt": text, "new": _storable(n), "other": _storable(o), "new_cut": nc,
                "other_cut": oc}
               for (pid, text), n, o, nc, oc in zip(rows, new, other, new_cut, other_cut)]
    empty = {side: review.count_empty(samples, side) for side in ("new", "other")}
    if any(empty.values()):
        progress.line(f"Empty answers (the policy ended its turn at once): {empty['new']} of the new policy's"
                      + (f", {empty['other']} of the {label}'s" if other_checkpoint else "")
                      + "; shown as empty, never scored or paired")
    scores: dict[str, float] = {}
    axis_scores: dict[str, dict[str, float]] = {}
    if round_.reward_checkpoint:
        pairs = review.review_table(round_, samples, label).scored()
        turns_of = {text: prompt for (_, text), prompt in zip(rows, prompts)}  # a chat prompt's reward sees its turns
        checkpoints = axis_checkpoints(round_)
        for key, checkpoint in checkpoints.items():
            progress.line(f"Scoring the responses with this round's reward model of the axis {key!r}")
            scorer = RewardScorer(checkpoint, device=device(), system_prompt=config.system_prompt)
            values = scorer.score([turns_of.get(p, p) for p, _ in pairs], [r for _, r in pairs]).tolist() if pairs else []
            axis_scores[key] = {content_hash(p, r): float(v) for (p, r), v in zip(pairs, values)}
        scores = axis_scores[next(iter(checkpoints))]
        axis_scores = axis_scores if len(axis_scores) > 1 else {}  # shown in the campaign's order of axes
    else:
        progress.line(f"No reward model in a {config.algorithm.upper()} round: the responses are not scored")
    out = _fresh_start(job) / "samples.jsonl"
    out.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")

    def mean_score(side: str) -> float | None:
        if not scores:
            return None
        got = [scores[content_hash(s["prompt"], r)] for s in samples for r in s[side] if not review.is_empty(r)]
        return sum(got) / len(got) if got else None

    result = {"samples": samples, "scores": scores, "axis_scores": axis_scores,
              "scored": bool(round_.reward_checkpoint), "opponent": label,
              "opponent_checkpoint": other_checkpoint, "new_checkpoint": round_.policy_checkpoint,
              "generation": generation, "rendered_prompt": stats["sample/rendered_prompt"],
              "sample/cut_new": sum(map(sum, new_cut)), "sample/cut_opponent": sum(map(sum, other_cut)),
              "sample/empty_new": empty["new"], "sample/empty_opponent": empty["other"],
              "sample/reward_new": mean_score("new"), "sample/reward_opponent": mean_score("other")}
    result.update(_rule_judge_summary(samples))
    progress.set(total, total)
    return Outcome(result, str(out))


def _storable(responses: list[str]) -> list[str]:
    """A policy's responses as the database stores them (annotate.models.storable)."""
    return [storable(r) for r in responses]


def _rule_judge_summary(samples: list[dict]) -> dict[str, float]:
    """For demo prompts: the demo rule judge's mean score of each side (what simulated labelers prefer)."""
    summary = {}
    for side in ("new", "other"):
        scored = [demo_tasks.judge_score(s["prompt"], r) for s in samples for r in s[side]
                  if demo_tasks.parse_task(s["prompt"]) is not None]
        if scored:
            summary[f"sample/judge_{side}"] = sum(scored) / len(scored)
    return summary


def run_enqueue(job: Job, progress: Progress) -> Outcome:
    """Add the sampled responses as new pairs of the campaign, tagged with the round, at its priority. Against
    another policy, the new policy's response is response A of half the pairs (Round.new_policy_first), so the
    stored order says nothing of which is new (the labeling page shuffles what is shown left again)."""
    from annotate.actions import PairInput, add_pairs

    round_ = job.round
    config = round_config(round_)
    sample_job = round_.jobs.get(kind=Job.SAMPLE)
    if sample_job.status != Job.SUCCEEDED:
        raise RunnerError("the round's sample job has not succeeded: nothing to enqueue")
    result = sample_job.result
    new_checkpoint = result["new_checkpoint"]
    other_checkpoint = result.get("opponent_checkpoint") or new_checkpoint
    progress.set(0, 1)
    items, versus = [], []
    for sample in result["samples"]:
        cut = dict(zip(sample["new"], sample.get("new_cut") or [])) | dict(zip(sample["other"],
                                                                              sample.get("other_cut") or []))
        if config.pairing == PAIRING_SELF:
            distinct = list(dict.fromkeys(r for r in sample["new"] if not review.is_empty(r)))
            items += [PairInput(sample["prompt"], a, b, truncated=(cut.get(a, False), cut.get(b, False)))
                      for a, b in itertools.combinations(distinct, 2)]
        else:
            versus += [(sample["prompt"], new, other, cut) for new, other in zip(sample["new"], sample["other"])
                       if not review.is_empty(new) and not review.is_empty(other) and new != other]
    for (prompt, new, other, cut), new_first in zip(versus, round_.new_policy_first(Job.ENQUEUE, len(versus)),
                                                    strict=True):
        a, b = (new, other) if new_first else (other, new)
        made_by = (new_checkpoint, other_checkpoint) if new_first else (other_checkpoint, new_checkpoint)
        items.append(PairInput(prompt, a, b, truncated=(cut.get(a, False), cut.get(b, False)), checkpoints=made_by))
    empty = review.count_empty(result["samples"], "new") + review.count_empty(result["samples"], "other")
    added = add_pairs(round_.campaign, items, round=round_, priority=config.priority, source=Response.POLICY,
                      checkpoints=(new_checkpoint, new_checkpoint), generation=result.get("generation", {}))
    progress.line(f"Enqueued {added.created} new pairs at priority {config.priority} "
                  f"({added.skipped} skipped: duplicates or identical responses; "
                  f"{empty} empty answers paired with nothing)")
    progress.set(1, 1)
    return Outcome({"created": added.created, "skipped": added.skipped, "empty": empty, "pairing": config.pairing,
                    "priority": config.priority})


def run_evaluate(job: Job, progress: Progress) -> Outcome:
    """Have the round's policy, the previous round's and the SFT policy answer the campaign's evaluation set
    (training/evaluation.py), one answer per prompt with the round's seed for each, and compare every two under
    the round's reward model and rule judge; the answers and each prompt's outcomes stay on the job."""
    from annotate.models import EvalSet
    from training import evaluation
    from training.engine.reward import RewardScorer
    from training.engine.sample import SampleArgs, sample_with_stats

    round_ = job.round
    config = round_config(round_)
    eval_set = EvalSet.current(round_.campaign)
    if eval_set is None:
        note = "The campaign has no evaluation set: import one (manage.py import_eval_set), then evaluate again."
        progress.line(note)
        progress.set(1, 1)
        return Outcome({"eval_set": None, "note": note})
    if not round_.policy_checkpoint:
        raise RunnerError("this round has no trained policy yet: its policy job (PPO, DPO or GRPO) has not succeeded")
    rows = evaluation.eval_set_rows(eval_set)
    prompts = [turns or text for _, text, turns, _ in rows]
    texts = [text for _, text, _, _ in rows]
    policies = evaluation.policies(round_)
    # The same seed for every policy and round: the SFT policy gives the same answers in each round's evaluation.
    generation = {**config.engine_args(SampleArgs), "num_per_prompt": 1, "max_new_tokens": config.ppo_max_new_tokens,
                  "seed": config.seed, "system_prompt": config.system_prompt, "stop_strings": config.stop_list()}
    answers: dict[str, list[str]] = {}
    for index, policy in enumerate(policies):
        progress.section(index * len(prompts), len(policies) * len(prompts))
        progress.line(f"{policy.label} ({policy.checkpoint}) answers {len(prompts)} evaluation prompts")
        sampled, _, _ = sample_with_stats(ensure_policy(policy.checkpoint, config.preset), prompts,
                                          on_progress=progress, device=device(), **generation)
        answers[policy.role] = _storable([group[0] for group in sampled])
    judges = evaluation.rule_judges_for(texts, [config.eval_rule_judge] if config.eval_rule_judge else [])
    if round_.reward_checkpoint:
        scorer = RewardScorer(round_.reward_checkpoint, device=device(), system_prompt=config.system_prompt)
        judges.append(evaluation.Judge(f"reward model (round {round_.number})",
                                       lambda _, ps, rs: scorer.score(ps, rs).tolist()))
    if not judges:
        raise RunnerError("no judge for this evaluation: the round has no reward model and its evaluation prompts "
                          "are not demo tasks a rule judge reads")
    scores = {judge.name: {role: judge.score(texts, prompts, said) for role, said in answers.items()}
              for judge in judges}
    comparisons = evaluation.compare(answers, scores, [p.role for p in policies], seed=config.seed)
    for row in comparisons:
        progress.line(f"{row['judge']}: {row['a']} vs {row['b']}: win rate {row['win_rate']:.3f} "
                      f"(length-controlled {row['lc_win_rate']:.3f}) over {row['prompts']} prompts")
    total = len(policies) * len(prompts)
    progress.set(total, total)
    return Outcome({
        "eval_set": {"id": eval_set.pk, "name": eval_set.name, "version": eval_set.version, "prompts": len(rows)},
        "policies": [{"role": p.role, "label": p.label, "checkpoint": p.checkpoint} for p in policies],
        "judges": [judge.name for judge in judges], "generation": generation,
        "answers": [{"eval_prompt_id": pid, "prompt": text, "reference": reference,
                     "answers": {role: answers[role][i] for role in answers}}
                    for i, (pid, text, _, reference) in enumerate(rows)],
        "comparisons": comparisons,
    })


RUNNERS: dict[str, Callable[[Job, Progress], Outcome]] = {
    Job.EXPORT: run_export,
    Job.SFT: run_sft,
    Job.REWARD: run_reward,
    Job.PPO: run_ppo,
    Job.DPO: run_dpo,
    Job.GRPO: run_grpo,
    Job.SAMPLE: run_sample,
    Job.ENQUEUE: run_enqueue,
    Job.EVALUATE: run_evaluate,
}
