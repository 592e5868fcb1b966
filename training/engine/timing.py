"""How long a training loop took, measured by a timer the caller may pass in (benchmarks read its figures):
the steps' own time, and the loop's wall and CPU time less what it paused for (evaluation, checkpoints).

Plain Python over torch; this package never imports Django.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Lap:
    """The wall time of one step, known once its `with` block ends."""

    seconds: float = 0.0


class LoopTimer:
    """Step time (CUDA synchronised), and the loop's wall and CPU time (this process, all threads) less its
    pauses; its state_dict goes into a resumable checkpoint, so a resumed run keeps counting."""

    def __init__(self) -> None:
        self.train_seconds = 0.0  # the steps' own time
        self.loop_seconds = 0.0  # wall time of the loop, less its pauses
        self.loop_cpu_seconds = 0.0  # the same in CPU time
        self._started: tuple[float, float] | None = None  # (wall, cpu) while running

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self._started is not None:
            wall, cpu = self._running()
            self.loop_seconds, self.loop_cpu_seconds = self.loop_seconds + wall, self.loop_cpu_seconds + cpu
            self._started = None

    def _running(self) -> tuple[float, float]:
        if self._started is None:
            return 0.0, 0.0
        return time.perf_counter() - self._started[0], time.process_time() - self._started[1]

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as the loop's (an evaluation, a checkpoint save)."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @contextmanager
    def step(self, device: torch.device) -> Iterator[Lap]:
        """One training step; on CUDA it waits for the step's kernels before reading the clock."""
        lap, started = Lap(), time.perf_counter()
        yield lap
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        lap.seconds = time.perf_counter() - started
        self.train_seconds += lap.seconds

    def state_dict(self) -> dict[str, float]:
        wall, cpu = self._running()
        return {"train_seconds": self.train_seconds, "loop_seconds": self.loop_seconds + wall,
                "loop_cpu_seconds": self.loop_cpu_seconds + cpu}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state["train_seconds"])
        self.loop_seconds, self.loop_cpu_seconds = float(state["loop_seconds"]), float(state["loop_cpu_seconds"])
