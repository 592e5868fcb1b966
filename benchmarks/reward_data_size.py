#!/usr/bin/env python
"""How many noisy comparisons does the demo's reward model need? Agreement with the rule, by data size.

For each --prompts N: the demo SFT policy answers N training prompts three times (temperature 1.0,
as `seed_demo` seeds the demo campaign); every two distinct answers the rule judge tells apart make
a pair, labelled by the rule with --noise of the labels flipped (the closed loop's simulated
labeler). reward.main trains on those pairs (--backbone: the SFT policy itself by default, as the
rounds' reward_model=sft does), and the trained model orders pairs of answers to HELD-OUT prompts
(two samples at temperature 0.7, as the rounds sample); printed is how often it orders them as the
noise-free rule does, with the train time. Accuracy on the noisy held-out split (at most 1 - noise)
is printed too.

    .venv/bin/python benchmarks/reward_data_size.py --prompts 120,600,1500
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo import demo_tasks  # noqa: E402
from demo.policy import DEFAULT_DIR, ensure_demo_policy  # noqa: E402
from training.engine import reward  # noqa: E402
from training.engine.sample import sample_responses  # noqa: E402


def rule_pairs(policy: str, instructions: list[str], seed: int, temperature: float, per_prompt: int):
    """(instruction, a, b, a_is_better) for every two distinct answers the rule judge tells apart."""
    samples = sample_responses(policy, instructions, num_per_prompt=per_prompt, temperature=temperature, seed=seed,
                               batch_size=64, device="cpu")
    pairs = []
    for instruction, responses in zip(instructions, samples):
        for a, b in itertools.combinations(list(dict.fromkeys(r for r in responses if r.strip())), 2):
            score_a, score_b = demo_tasks.judge_score(instruction, a), demo_tasks.judge_score(instruction, b)
            if score_a != score_b:
                pairs.append((instruction, a, b, score_a > score_b))
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="120,600,1500", help="comma list of training prompt counts")
    p.add_argument("--policy", default="", help="SFT policy directory (default: the demo policy, built once)")
    p.add_argument("--backbone", default="", help="reward backbone (default: the SFT policy)")
    p.add_argument("--noise", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-prompts", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy = args.policy or str(ensure_demo_policy(DEFAULT_DIR, "demo"))
    backbone = args.backbone or policy
    held_out = rule_pairs(policy, demo_tasks.make_prompts(args.eval_prompts, 1, "heldout"), 1, 0.7, 2)
    results = []
    with tempfile.TemporaryDirectory(prefix="pairloop-rm-size-") as tmp:
        for n in (int(x) for x in args.prompts.split(",")):
            rng = random.Random(0)
            rows = []
            for instruction, a, b, a_better in rule_pairs(policy, demo_tasks.make_prompts(n, 0, "train"), 0, 1.0, 3):
                if rng.random() < args.noise:
                    a_better = not a_better
                chosen, rejected = (a, b) if a_better else (b, a)
                rows.append({"prompt": instruction, "chosen": chosen, "rejected": rejected})
            path = Path(tmp) / f"pairs-{n}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            started = time.perf_counter()
            metrics = reward.main(reward.RewardArgs(
                train=str(path), out=str(Path(tmp) / f"rm-{n}"), model=backbone, epochs=args.epochs, lr=args.lr,
                max_length=256, eval_every=0, save_every=0, resume=False, device="cpu"))
            seconds = time.perf_counter() - started
            scorer = reward.RewardScorer(str(Path(tmp) / f"rm-{n}"), device="cpu")
            prompts = [i for i, _, _, _ in held_out]
            score_a = scorer.score(prompts, [a for _, a, _, _ in held_out])
            score_b = scorer.score(prompts, [b for _, _, b, _ in held_out])
            agree = sum(bool(x > y) == better for x, y, (_, _, _, better) in zip(score_a, score_b, held_out))
            accuracy = round(float(metrics["rm/accuracy"]), 3)
            result = {"prompts": n, "pairs": len(rows), "noisy_heldout_accuracy": accuracy,
                      "agrees_with_rule": round(agree / len(held_out), 3), "rule_pairs": len(held_out),
                      "train_seconds": round(seconds, 1)}
            results.append(result)
            print(f"{n:>6} prompts {len(rows):>6} noisy pairs: agrees with the rule on "
                  f"{result['agrees_with_rule']:.3f} of {len(held_out)} held-out pairs (noisy held-out accuracy "
                  f"{accuracy:.3f}), trained in {seconds:.1f} s", flush=True)
    print(json.dumps({"noise": args.noise, "backbone": backbone, "epochs": args.epochs, "lr": args.lr,
                      "results": results}))


if __name__ == "__main__":
    main()
