"""Experiment tracking, optional: with PAIRLOOP_REPORT_TO set, a job's metric points also go to
TensorBoard, Trackio or Weights & Biases, from the same progress callback that writes them to the row.

One class per backend behind one interface, `log(metrics, step)` and `close()`. `start(job)` checks
at job start, before anything is trained, that the backend's package is installed on this worker
(as transformers' Trainer and Lightning's loggers do when built), so a missing package fails the job
at once with the package named, never midway. A run opens at the job's first metrics (export and
enqueue jobs, which report none, open none) and is named after what the user knows:
`<campaign slug>/round-<n>/<job kind>`, plus `-attempt-<k>` for a resumed job.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from training.models import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """What a tracker needs to name and file one job's run."""

    name: str  # <slug>/round-<n>/<kind>[-attempt-<k>]
    group: str  # <slug>/round-<n>: a round's jobs side by side
    kind: str
    directory: Path  # PAIRLOOP_DATA_DIR/runs/<name>: TensorBoard's log dir, W&B's files
    config: dict[str, Any]


class Tracker:
    """One job's run in an experiment tracker; opened at the first metrics, closed by the runner."""

    package = ""  # the PyPI package the backend needs
    module_name = ""  # what is imported at job start to prove it works: the package itself by default

    def __init__(self, run: Run):
        self.run = run
        self.module = self.require()
        self.opened = False

    @classmethod
    def require(cls):
        try:
            return importlib.import_module(cls.module_name or cls.package)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"PAIRLOOP_REPORT_TO={settings.PAIRLOOP['REPORT_TO']} needs the `{cls.package}` package on "
                f"this training worker (pip install {cls.package}), which failed to import ({exc}). Nothing "
                "was trained: install it and resume the job, or unset PAIRLOOP_REPORT_TO.") from exc

    def log(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if not numbers:
            return
        if not self.opened:
            self.open(step)
            self.opened = True
        self.write(numbers, step)

    def close(self) -> None:
        """Finish the run; a tracker failing here is logged, never the job's outcome."""
        if self.opened:
            self.opened = False
            try:
                self.finish()
            except Exception:  # noqa: BLE001 - the job's own result is already decided
                log.warning("closing the %s run %s failed", self.package, self.run.name, exc_info=True)

    def open(self, step: int) -> None:
        raise NotImplementedError

    def write(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    """Event files under PAIRLOOP_DATA_DIR/runs/: `tensorboard --logdir $PAIRLOOP_DATA_DIR/runs`."""

    package = "tensorboard"
    module_name = "torch.utils.tensorboard"  # torch's writer, which needs the tensorboard package

    def open(self, step: int) -> None:
        # purge_step: events an earlier database's run of the same name left at these steps are hidden.
        self.writer = self.module.SummaryWriter(log_dir=str(self.run.directory), purge_step=step)

    def write(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # the user watches the run live

    def finish(self) -> None:
        self.writer.close()


class Trackio(Tracker):
    """A run in the `pairloop` Trackio project (stored where TRACKIO_DIR says, or on a Space)."""

    package = "trackio"

    def open(self, step: int) -> None:
        self.handle = self.module.init(project="pairloop", name=self.run.name, group=self.run.group,
                                       config=self.run.config)

    def write(self, metrics: dict[str, float], step: int) -> None:
        self.handle.log(metrics, step=step)

    def finish(self) -> None:
        self.handle.finish()


class WandB(Tracker):
    """A run in the `pairloop` W&B project; WANDB_MODE=offline keeps it on disk for `wandb sync`."""

    package = "wandb"

    def open(self, step: int) -> None:
        self.run.directory.mkdir(parents=True, exist_ok=True)
        self.handle = self.module.init(project="pairloop", name=self.run.name, group=self.run.group,
                                       job_type=self.run.kind, config=self.run.config,
                                       dir=str(self.run.directory))

    def write(self, metrics: dict[str, float], step: int) -> None:
        self.handle.log(metrics, step=step)

    def finish(self) -> None:
        self.handle.finish()


BACKENDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": WandB}


def start(job: Job) -> Tracker | None:
    """The tracker PAIRLOOP_REPORT_TO names for this job, or None when it is unset."""
    backend = settings.PAIRLOOP["REPORT_TO"]
    if not backend:
        return None
    round_ = job.round
    group = f"{round_.campaign.slug}/round-{round_.number}"
    name = f"{group}/{job.kind}" + (f"-attempt-{job.attempts}" if job.attempts > 1 else "")
    config = {**round_.config, "campaign": round_.campaign.slug, "round": round_.number, "job": job.pk,
              "kind": job.kind, "attempt": job.attempts}
    run = Run(name=name, group=group, kind=job.kind, config=config,
              directory=Path(settings.PAIRLOOP["RUNS_DIR"]) / name)
    return BACKENDS[backend](run)
