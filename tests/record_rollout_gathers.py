"""`python -m tests.record_rollout_gathers DIR <ppo flags>`: the PPO stage as `python -m training.engine.ppo` runs
it, also writing DIR/rank-<RANK>.json: per call of sample.generate (a chunk of a rollout batch), how many weight
all-gathers FSDP made during it and how many tokens it generated. tests/test_distributed.py launches it under
`accelerate launch`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from training.engine import ppo, sample

_gathers = [0]
_calls: list[dict[str, int]] = []
_all_gather_single, _generate = dist.all_gather_single, sample.generate


def all_gather_single(*args, **kwargs):  # FSDP2's all-gather of a unit's weights
    _gathers[0] += 1
    return _all_gather_single(*args, **kwargs)


def generate(*args, **kwargs):
    before = _gathers[0]
    rollout = _generate(*args, **kwargs)
    _calls.append({"gathers": _gathers[0] - before, "tokens": int(rollout.response_ids.shape[1])})
    return rollout


def main(argv: list[str]) -> int:
    out, flags = Path(argv[0]), argv[1:]
    dist.all_gather_single, sample.generate = all_gather_single, generate
    code = ppo.cli(flags)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"generate": _calls}))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
