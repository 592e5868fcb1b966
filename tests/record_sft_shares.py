"""`python -m tests.record_sft_shares DIR <sft flags>`: the SFT stage as `python -m training.engine.sft`
runs it, also writing DIR/rank-<RANK>.json: the global batches in order and, per step, the training
examples (by index) this process computed its loss on. tests/test_distributed.py launches it under
`accelerate launch`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from training.engine import sft

_index: dict[int, int] = {}  # id() of an encoded training example -> its index
_batches: list[list[int]] = []
_steps: list[list[int]] = []
_encode, _epoch_batches, _collate = sft.encode_examples, sft.epoch_batches, sft.collate


def encode_examples(*args, **kwargs):
    encoded = _encode(*args, **kwargs)
    if not _index:  # the training examples are encoded first (then any held-out ones)
        _index.update({id(row): i for i, row in enumerate(encoded)})
    return encoded


def epoch_batches(*args, **kwargs):
    batches = _epoch_batches(*args, **kwargs)
    _batches.extend(batches)
    return batches


def collate(batch, *args, **kwargs):
    if batch and all(id(row) in _index for row in batch):  # a training step (evaluation rows are not indexed)
        _steps.append([_index[id(row)] for row in batch])
    return _collate(batch, *args, **kwargs)


def main(argv: list[str]) -> int:
    out, flags = Path(argv[0]), argv[1:]
    sft.encode_examples, sft.epoch_batches, sft.collate = encode_examples, epoch_batches, collate
    code = sft.cli(flags)
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    (out / f"rank-{rank}.json").write_text(json.dumps({"batches": _batches, "steps": _steps}))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
