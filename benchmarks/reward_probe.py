#!/usr/bin/env python
"""Reward probe: what did a reward model learn about the demo tasks? Its mean score by task family,
answer style and correctness.

For --tasks held-out demo tasks (demo.demo_tasks), the generator writes the right answer in
every style (terse, sentence, padded, curt), and for arithmetic also a wrong answer (off by a small
number) in every style. The reward model scores each (prompt, answer) with its own tokenizer
(reward.RewardScorer). A model that learned the demo rule scores right above wrong and the preferred
style (`sentence`) above the others in every family; equal scores for right and wrong mean it cannot
see correctness there.

    .venv/bin/python benchmarks/closed_loop.py --rounds 1 --keep     # prints its data directory
    .venv/bin/python benchmarks/reward_probe.py DATA_DIR/checkpoints/demo/round-1/reward

The last line is one JSON object with every mean.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WRONG_BY = (-3, -1, 1, 2, 5)  # how far the wrong arithmetic answers miss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reward_model", help="reward model directory (a round's reward checkpoint) or name")
    p.add_argument("--tasks", type=int, default=300, help="held-out demo tasks (spread over the families)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    from demo import demo_tasks
    from training.engine.reward import RewardScorer

    scorer = RewardScorer(args.reward_model, device=args.device)
    rng = random.Random(args.seed)
    groups: dict[tuple[str, str, bool], list[tuple[str, str]]] = {}
    for task in demo_tasks.make_tasks(args.tasks, seed=args.seed, split="heldout"):
        answers = [(True, None)]
        if task.family == "arithmetic":
            answers.append((False, str(int(task.answer) + rng.choice(WRONG_BY))))
        for correct, answer in answers:
            for style in demo_tasks.STYLES:
                response = demo_tasks.respond(task, style, rng, answer)
                groups.setdefault((task.family, style, correct), []).append((task.instruction, response))

    means: dict[str, dict[str, dict[str, float]]] = {}
    for (family, style, correct), rows in sorted(groups.items()):
        prompts, responses = zip(*rows)
        score = float(scorer.score(list(prompts), list(responses)).mean())
        means.setdefault(family, {}).setdefault(style, {})["right" if correct else "wrong"] = score

    print(f"mean reward by family and style ({args.reward_model}; preferred style "
          f"{demo_tasks.PREFERRED_STYLE!r}; right / wrong answer)")
    styles = list(demo_tasks.STYLES)
    print(f"{'family':<12}" + "".join(f"{s:>18}" for s in styles))
    for family, by_style in means.items():
        cells = []
        for style in styles:
            value = by_style.get(style, {})
            text = f"{value['right']:+.3f}" if "right" in value else "-"
            if "wrong" in value:
                text += f" / {value['wrong']:+.3f}"
            cells.append(f"{text:>18}")
        print(f"{family:<12}" + "".join(cells))
    print(json.dumps({"reward_model": args.reward_model, "tasks": args.tasks, "means": means}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
