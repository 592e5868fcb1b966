"""Atomic, self-describing checkpoints: the write-then-rename save, finding what a crash left, reading
its metadata and trainer state, and the one check of whether a checkpoint may resume a run.

Plain Python over torch; this package never imports Django.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.engine.errors import EngineError
from training.engine.stop import StopWithoutSaving

CHECKPOINT_META = "pairloop.json"
TRAINER_STATE = "trainer_state.pt"
SHARDS_DIR = "shards"
"""Where a sharded run's resumable checkpoint holds its weights and optimizer state: Distributed Checkpoint files,
one per process that wrote them, and their `.metadata`."""


def to_jsonable(value: Any) -> Any:
    """Settings and metrics as JSON values, as a checkpoint's pairloop.json records them."""
    if is_dataclass(value):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (torch.Tensor, np.generic)):
        return value.item()
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return value


def save_checkpoint(
    out_dir: str | Path,
    *,
    stage: str,
    args: Any,
    step: int,
    metrics: dict[str, Any],
    pretrained: dict[str, Any],
    data_version: str | None = None,
    trainer_state: dict[str, Any] | None = None,
    shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically: a temp dir beside `out_dir`, then rename.

    `pretrained` maps a subdirectory name ("" for the top) to objects with `save_pretrained`
    (models, tokenizers). `trainer_state` (optimizer, scheduler, RNG, anything torch can save)
    goes to trainer_state.pt, so a resumed run continues exactly. `shards`, when given, writes a sharded
    run's Distributed Checkpoint into the directory it is passed (`shards/` of the temp dir), every
    process its own files (Ranks.save_resumable).

    Every file is fsynced before pairloop.json is written (last), and the swap (old -> aside,
    new -> `out_dir`) is fsynced too: a failure before the swap leaves the previous checkpoint
    where it was, one between the two renames puts it back, and a crash there leaves both
    complete beside `out_dir`, where `find_checkpoint` finds them.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = None
    try:
        for sub, obj in pretrained.items():
            target = tmp / sub if sub else tmp
            target.mkdir(parents=True, exist_ok=True)
            obj.save_pretrained(target)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        if shards is not None:
            shards(tmp / SHARDS_DIR)
        _fsync_tree(tmp)
        meta = {
            "stage": stage,
            "step": step,
            "args": to_jsonable(args),
            "metrics": to_jsonable(metrics),
            "data_version": data_version,
            "saved_at": time.time(),
            "torch": torch.__version__,
        }
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        _fsync(tmp / CHECKPOINT_META)
        _fsync(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        _fsync(out_dir.parent)
    except BaseException:
        if old is not None and not out_dir.exists():
            old.rename(out_dir)  # the new one never took its place: the previous one stays in use
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _discard(old)
    return out_dir


def _fsync(path: Path) -> None:
    """Flush a file or a directory (its entries: renames, new files) to the disk."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def _discard(path: Path) -> None:
    """Delete a checkpoint directory, its pairloop.json first: a half-deleted one never looks complete."""
    (path / CHECKPOINT_META).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _swap_leftovers(out_dir: Path) -> list[Path]:
    """What interrupted swaps left beside `out_dir`: set-aside old checkpoints and temp dirs."""
    return sorted(p for pattern in (f".{out_dir.name}.old-*", f".{out_dir.name}.tmp-*")
                  for p in out_dir.parent.glob(pattern) if p.is_dir())


def _remove_leftovers(out_dir: Path) -> None:
    """Before a save: once `out_dir` holds a complete checkpoint, what earlier swaps left is not needed."""
    if _complete_meta(out_dir) is not None:
        for leftover in _swap_leftovers(out_dir):
            _discard(leftover)


def _complete_meta(path: Path) -> dict[str, Any] | None:
    """The pairloop.json of a checkpoint written in full (it is written last), else None."""
    try:
        return json.loads((path / CHECKPOINT_META).read_text())
    except (OSError, ValueError):
        return None


def resume_dir(out: str | Path) -> Path:
    """The resumable checkpoint of a run writing to `out` (reward model, PPO): `<out>.resume/`."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def find_checkpoint(path: str | Path) -> Path | None:
    """`path` when it holds a complete checkpoint; else, after a crash in the middle of a swap, the
    complete checkpoint with the highest step that the swap left beside it; None when there is none."""
    path = Path(path)
    if _complete_meta(path) is not None:
        return path
    if not path.parent.is_dir():
        return None
    found = []
    for leftover in _swap_leftovers(path):
        meta = _complete_meta(leftover)
        if meta is not None:
            found.append((int(meta.get("step") or 0), float(meta.get("saved_at") or 0), leftover))
    return max(found)[2] if found else None


def holds_shards(path: str | Path | None) -> bool:
    """Whether a checkpoint holds its weights and optimizer state as Distributed Checkpoint shards (a sharded run's
    resumable one), set after sharding; else they are save_pretrained weights and trainer_state.pt's optimizer."""
    return path is not None and (Path(path) / SHARDS_DIR / ".metadata").is_file()


def weights_source(source: str | Path | None) -> Path | None:
    """Where a resuming stage loads its weights from before sharding: `source` when it holds save_pretrained
    weights; None (the run's start, then Ranks.load_resumable) when it holds shards or there is none."""
    return None if source is None or holds_shards(source) else Path(source)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any] | None:
    """The pairloop.json of a checkpoint directory, or None when there is none."""
    meta = Path(path) / CHECKPOINT_META
    if not meta.exists():
        return None
    return json.loads(meta.read_text())


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """trainer_state.pt of a checkpoint, read with weights_only=True: tensors and plain values only, so a
    file planted on a shared checkpoint volume cannot run code in the worker that loads it."""
    state = Path(path) / TRAINER_STATE
    if not state.exists():
        return None
    try:
        return torch.load(state, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise EngineError(f"{state} holds more than tensors and plain values, so it is not loaded (an "
                          f"older pairloop's file, or not ours): delete it to start over ({exc})") from exc


def resume_source(out: str | Path, resume: bool, resume_from: str | Path = "") -> Path | None:
    """Where a run writing to `out` continues from: its own `<out>.resume/`, else `resume_from` (an earlier
    attempt's); a crash in the middle of a checkpoint swap left it beside its place (find_checkpoint)."""
    if not resume:
        return None
    source = find_checkpoint(resume_dir(out))
    if source is None and resume_from:
        source = find_checkpoint(resume_from)
    return source


def resumable_state(source: str | Path | None, *, stage: str, args: Any, keys: tuple[str, ...],
                    data_version: str | None) -> dict[str, Any] | None:
    """May this checkpoint resume this run? The trainer state of `source` when it may; None when it holds
    none (start afresh); EngineError when another stage wrote it, or other data (a checkpoint that recorded
    none passes; data_version None checks nothing), or other values of the settings `keys`. Every stage asks
    this one function."""
    if source is None or not (Path(source) / TRAINER_STATE).exists():
        return None
    meta = read_checkpoint_meta(source)
    if meta is None:
        return None
    if meta.get("stage") != stage:
        raise EngineError(f"{source} is a {meta.get('stage')} checkpoint, not a {stage} one: delete it or pass "
                          "resume=False (--no-resume) to start over")
    saved, now = meta.get("args") or {}, to_jsonable(args)
    differ = [k for k in keys if k in saved and saved[k] != now[k]]
    if data_version is not None and meta.get("data_version") not in (None, data_version):
        differ.append("training data")
    if differ:
        raise EngineError(f"the resumable checkpoint {source} was made with other settings ({', '.join(differ)} "
                          "differ): delete it or pass resume=False (--no-resume) to start over")
    return load_trainer_state(source)


def report_and_save(ranks, on_progress, event: dict[str, Any], save: Callable[[], None] | None, *, due: bool) -> None:
    """Report one step through `ranks` (rank 0 calls on_progress); call `save` when `due`, and before an exception
    from on_progress, unless it is StopWithoutSaving (the run was taken away: its checkpoints are another's now)."""
    try:
        ranks.report(on_progress, {**event, **({"checkpoint": True} if due else {})})
    except StopWithoutSaving:
        raise
    except BaseException:
        if save is not None:
            save()  # stopped at a step boundary: keep what was done, then let the caller see why
        raise
    if due and save is not None:
        save()
