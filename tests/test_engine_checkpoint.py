"""Checkpoints survive faults: a write that fails half-way (disk full) or between the two renames of
the swap leaves the previous checkpoint usable, a crash in the swap is recovered from what it left,
and trainer state is read without running code from the file. Tiny stand-ins; CPU, milliseconds."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training.engine import checkpoints
from training.engine.checkpoints import (
    find_checkpoint,
    load_trainer_state,
    read_checkpoint_meta,
    save_checkpoint,
)
from training.engine.common import EngineError, rng_state, set_rng_state


class Weights:
    """Stands in for a model: save_pretrained writes its bytes, in two files like a sharded model."""

    def __init__(self, payload: bytes, fail_after_first_file: bool = False):
        self.payload, self.fail_after_first_file = payload, fail_after_first_file

    def save_pretrained(self, path) -> None:
        (Path(path) / "model-1.bin").write_bytes(self.payload)
        if self.fail_after_first_file:
            raise OSError(errno.ENOSPC, "No space left on device")
        (Path(path) / "model-2.bin").write_bytes(self.payload)


def save(out: Path, step: int, payload: bytes, **kwargs) -> Path:
    return save_checkpoint(out, stage="test", args={"lr": 0.1}, step=step, metrics={"test/loss": 1.0 / step},
                           pretrained={"": Weights(payload, **kwargs)}, trainer_state={"step": step})


def assert_checkpoint(path: Path, step: int, payload: bytes) -> None:
    assert read_checkpoint_meta(path)["step"] == step
    assert (path / "model-1.bin").read_bytes() == (path / "model-2.bin").read_bytes() == payload
    assert load_trainer_state(path)["step"] == step


def test_it_keeps_the_previous_checkpoint_when_the_disk_fills_half_way_through_a_write(tmp_path):
    out = tmp_path / "policy.resume"
    save(out, 1, b"step one")
    with pytest.raises(OSError, match="No space left"):
        save(out, 2, b"step two", fail_after_first_file=True)
    assert_checkpoint(out, 1, b"step one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.resume"]  # the half-written one is gone
    assert find_checkpoint(out) == out


def test_it_puts_the_previous_checkpoint_back_when_the_swap_fails_between_its_renames(tmp_path, monkeypatch):
    out = tmp_path / "policy.resume"
    save(out, 1, b"step one")
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out and ".tmp-" in self.name:  # the new one taking the old one's place
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        save(out, 2, b"step two")
    monkeypatch.undo()
    assert_checkpoint(out, 1, b"step one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.resume"]


def test_it_finds_the_checkpoint_a_crash_between_the_renames_left_beside_its_place(tmp_path):
    out = tmp_path / "policy.resume"
    save(out, 1, b"step one")
    # A crash (power cut, SIGKILL) after the old one was set aside and before the new one took its place:
    # the old one sits aside, the new one in its temp dir, complete; a third, older temp dir is half-written.
    save(tmp_path / "staging", 2, b"step two")
    out.rename(tmp_path / ".policy.resume.old-123-456")
    (tmp_path / "staging").rename(tmp_path / ".policy.resume.tmp-abc")
    half = tmp_path / ".policy.resume.tmp-def"
    half.mkdir()
    (half / "model-1.bin").write_bytes(b"step thr")
    assert find_checkpoint(out) == tmp_path / ".policy.resume.tmp-abc"
    assert_checkpoint(find_checkpoint(out), 2, b"step two")
    # The next save puts a checkpoint in place; the one after it clears what the crash left.
    save(out, 3, b"step three")
    save(out, 4, b"step four")
    assert_checkpoint(out, 4, b"step four")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.resume"]
    assert find_checkpoint(tmp_path / "nothing-here") is None


def test_it_flushes_every_file_and_directory_to_disk_before_the_swap(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = save(tmp_path / "reward", 1, b"weights")
    names = [Path(p).name for p in synced]
    for name in ("model-1.bin", "model-2.bin", checkpoints.TRAINER_STATE, checkpoints.CHECKPOINT_META):
        assert name in names
    assert names.index(checkpoints.CHECKPOINT_META) > max(names.index("model-1.bin"), names.index("model-2.bin"))
    assert synced[-1] == str(out.parent)  # the rename itself is made durable


def test_it_loads_trainer_state_without_running_code_from_the_file(tmp_path):
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "ckpt").mkdir()
    torch.save({"step": 3, "extra": Planted()}, tmp_path / "ckpt" / checkpoints.TRAINER_STATE)
    with pytest.raises(EngineError, match="holds more than tensors and plain values"):
        load_trainer_state(tmp_path / "ckpt")
    assert not marker.exists()


def test_it_restores_every_rng_from_a_state_saved_as_plain_values(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    (tmp_path / "ckpt").mkdir()
    torch.save({"rng": rng_state()}, tmp_path / "ckpt" / checkpoints.TRAINER_STATE)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(load_trainer_state(tmp_path / "ckpt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
