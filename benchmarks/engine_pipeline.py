#!/usr/bin/env python
"""The three engine stages end to end on one device, no Django: sample -> reward model -> PPO -> sample.

What it runs, on --device (auto: CUDA when present, else CPU) and --dtype (auto: bf16 on CUDA, fp32 on CPU):
  1. the demo SFT policy (built once with --preset, or --policy) answers --prompts training prompts of
     the demo task families twice each (sample.sample_responses: batched, KV cache, left padding);
  2. the demo rule judge picks the better of each two (ties dropped): a pairs file in the export
     format (prompt, chosen, rejected), the way a labeling campaign would produce it;
  3. reward.main trains a Bradley-Terry reward model on it (--reward-backbone: by default the packaged
     all-MiniLM-L6-v2; any sequence-classification model or causal LM directory works, e.g. the policy);
  4. ppo.main optimises the policy against that reward model (KL penalty to the SFT policy);
  5. the SFT and the PPO policy answer the same held-out prompts; the judge scores both.
Printed: per stage its wall time and its headline metrics, the device and dtype each stage ran on,
and one JSON line of all figures. It checks the CUDA path (the same code as on CPU) where a GPU is
present, and gives a per-device time for each stage to compare machines with.

    .venv/bin/python benchmarks/engine_pipeline.py --preset tiny                     # CPU smoke run, minutes
    .venv/bin/python benchmarks/engine_pipeline.py --device cuda --reward-backbone var/models/demo-policy
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo import demo_tasks  # noqa: E402
from demo.policy import DEFAULT_DIR, DEFAULT_TINY_DIR, ensure_demo_policy  # noqa: E402
from training.engine import ppo, reward  # noqa: E402
from training.engine.common import pick_device, pick_dtype  # noqa: E402
from training.engine.sample import sample_responses  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("demo", "tiny"), default="demo", help="demo policy preset to build (once)")
    p.add_argument("--policy", default="", help="an SFT policy directory (default: the demo policy of --preset)")
    p.add_argument("--reward-backbone", default="", help="reward model backbone (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--prompts", type=int, default=512, help="training prompts, answered twice each for the pairs")
    p.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts for the final comparison")
    p.add_argument("--reward-epochs", type=int, default=2)
    p.add_argument("--ppo-steps", type=int, default=30)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="", help="directory for the pairs and models (default: a temporary one)")
    return p.parse_args(argv)


def judged_pairs(instructions: list[str], responses: list[list[str]]) -> list[dict[str, str]]:
    """One pair per prompt whose two answers the rule judge tells apart (ties dropped)."""
    rows = []
    for instruction, (a, b) in zip(instructions, responses):
        score_a, score_b = demo_tasks.judge_score(instruction, a), demo_tasks.judge_score(instruction, b)
        if score_a != score_b:
            chosen, rejected = (a, b) if score_a > score_b else (b, a)
            rows.append({"prompt": instruction, "chosen": chosen, "rejected": rejected})
    return rows


def timed(figures: dict, name: str, fn):
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    figures[f"{name}/seconds"] = round(time.perf_counter() - started, 2)
    print(f"  {name:<14} {figures[f'{name}/seconds']:>8.1f} s", flush=True)
    return result


def run(args: argparse.Namespace, work: Path) -> dict:
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    figures: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                     "torch": torch.__version__, "python": platform.python_version(),
                     "threads": torch.get_num_threads()}
    if device.type == "cuda":  # CUDA context and kernels load outside the timings
        (torch.ones(256, 256, device=device) @ torch.ones(256, 256, device=device)).sum().item()
    print(f"device {figures['device']} ({figures['gpu'] or platform.processor() or 'cpu'}), dtype {figures['dtype']}, "
          f"torch {torch.__version__}", flush=True)
    policy = args.policy or str(timed(figures, "build_policy", lambda: ensure_demo_policy(
        DEFAULT_DIR if args.preset == "demo" else DEFAULT_TINY_DIR, args.preset)))

    train_prompts = demo_tasks.make_prompts(args.prompts, args.seed, "train")
    responses = timed(figures, "sample_pairs", lambda: sample_responses(
        policy, train_prompts, num_per_prompt=2, seed=args.seed, device=args.device, dtype=args.dtype, batch_size=64))
    rows = judged_pairs(train_prompts, responses)
    if len(rows) < 10:
        raise SystemExit(f"only {len(rows)} of {len(train_prompts)} prompts gave two answers the judge tells apart")
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    figures["pairs"] = len(rows)

    backbone = {"model": args.reward_backbone} if args.reward_backbone else {}  # default: the packaged MiniLM
    reward_args = reward.RewardArgs(train=str(pairs), out=str(work / "reward"), epochs=args.reward_epochs,
                                    batch_size=16, max_length=256, eval_every=0, save_every=0, seed=args.seed,
                                    device=args.device, dtype=args.dtype, resume=False, **backbone)
    rm = timed(figures, "reward", lambda: reward.main(reward_args))
    figures.update({k: rm[k] for k in ("rm/accuracy", "rm/pairs_per_second", "rm/train_seconds") if k in rm})

    ppo_args = ppo.PPOArgs(policy=policy, reward_models=[str(work / "reward")],
                           prompts=demo_tasks.make_prompts(2048, args.seed + 1, "train"), out=str(work / "ppo"),
                           steps=args.ppo_steps, seed=args.seed, save_every=0, resume=False,
                           device=args.device, dtype=args.dtype)
    trained = timed(figures, "ppo", lambda: ppo.main(ppo_args))
    figures.update({k: trained[k] for k in ("ppo/samples_per_second", "ppo/kl", "ppo/score", "ppo/reward", "ppo/generate_seconds", "ppo/train_seconds") if k in trained})

    held_out = demo_tasks.make_prompts(args.eval_prompts, args.seed + 2, "heldout")
    for name, path in (("sft", policy), ("ppo", str(work / "ppo"))):
        texts = timed(figures, f"eval_{name}", lambda: sample_responses(
            path, held_out, num_per_prompt=1, seed=args.seed, device=args.device, dtype=args.dtype, batch_size=64))
        scores = [demo_tasks.judge_score(i, r[0]) for i, r in zip(held_out, texts)]
        figures[f"{name}/judge_mean"] = round(sum(scores) / len(scores), 4)
    return figures


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        figures = run(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="pairloop-pipeline-") as tmp:
            figures = run(args, Path(tmp))
    print(f"pairs {figures['pairs']}, reward accuracy {figures.get('rm/accuracy', float('nan')):.3f}, "
          f"judge mean SFT {figures['sft/judge_mean']:.3f} -> PPO {figures['ppo/judge_mean']:.3f}, "
          f"PPO KL {figures.get('ppo/kl', float('nan')):.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
