"""Our GRPO stage against TRL 1.16's GRPOTrainer: completions per second at equal settings, in one run.

Both train the same tiny random-initialised policy (demo.tiny_models, the family's chat template) on the
same demo prompts, from the same weights, with the same reward (the demo rule judge, default
correct_sentence, on decoded text), group size, completions per step, max_new_tokens, temperature,
learning rate (constant), beta (so both run the reference model), epsilon, one pass per batch, the
paper's loss (TRL loss_type="grpo") and torch threads, fp32 on CPU (or bf16 autocast on CUDA when
--device cuda). TRL runs with its HF-generate sampling (no vLLM), as this box has no vLLM.

Printed: completions per second of each trainer over its training steps (model loading and the final save
excluded: ours sums its steps' wall time, TRL's is timed from its first step's start to its last step's end
by a callback), the ratio (goal >= 1.5x), and each trainer's mean reward over the run as a sanity check.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--family qwen2] [--size tiny] [--steps 10] [--threads 2]

About a minute per family on 2 CPU cores with the tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo import demo_tasks  # noqa: E402
from demo.tiny_models import SIZES, build_policy  # noqa: E402
from training.engine.grpo import GRPOArgs  # noqa: E402
from training.engine.grpo import main as grpo_main  # noqa: E402


def prompts(n: int) -> list[str]:
    made = demo_tasks.make_prompts(n, seed=0, split="train")
    return [p if isinstance(p, str) else p.get("prompt", p.get("instruction")) for p in made]


def run_ours(policy: Path, instructions: list[str], out: Path, args) -> dict:
    history: list[dict] = []
    grpo_main(
        GRPOArgs(
            policy=str(policy), prompts=instructions, out=str(out), reward_models=[f"rule:{args.judge}"],
            steps=args.steps, batch_size=args.batch_size, samples_per_prompt=args.num_generations,
            generation_batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, lr=args.lr, beta=args.beta, seed=args.seed, save_every=0,
            resume=False, device=args.device,
        ),
        lambda event: history.append(event["metrics"]),
    )
    seconds = sum(m["grpo/step_seconds"] for m in history)
    return {"seconds": seconds, "completions": args.steps * args.batch_size,
            "reward": sum(m["grpo/reward"] for m in history) / len(history),
            "length": sum(m["grpo/response_length"] for m in history) / len(history)}


def run_trl(policy: Path, instructions: list[str], out: Path, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    judge = demo_tasks.RULE_JUDGES[args.judge]

    def judge_reward(prompts, completions, instruction, **kwargs):
        return [judge(i, c[0]["content"] if isinstance(c, list) else c) for i, c in zip(instruction, completions,
                                                                                        strict=True)]

    judge_reward.__name__ = args.judge
    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, train_args, state, control, **kwargs):
            if not steps:
                steps.append(time.perf_counter())

        def on_step_end(self, train_args, state, control, **kwargs):
            steps.append(time.perf_counter())

    n_prompts = args.steps * args.batch_size // args.num_generations
    rows = [instructions[i % len(instructions)] for i in range(n_prompts)]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": r}] for r in rows], "instruction": rows})
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, beta=args.beta, epsilon=0.2, loss_type="grpo",
        use_bias_correction_kl=False, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=args.steps, num_iterations=1, logging_steps=1, report_to="none",
        use_cpu=args.device == "cpu", bf16=args.device != "cpu", fp16=False, gradient_checkpointing=False,
        disable_dropout=True, save_strategy="no", seed=args.seed, dataloader_num_workers=0, max_grad_norm=1.0,
        log_completions=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=judge_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {"seconds": steps[-1] - steps[0], "completions": args.steps * args.batch_size,
            "reward": sum(e["reward"] for e in logs) / len(logs),
            "length": sum(e.get("completions/mean_length", 0.0) for e in logs) / len(logs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=("qwen2", "llama"),
                        help="tiny policy family (repeat for several; default qwen2 and llama)")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="demo.tiny_models size preset")
    parser.add_argument("--steps", type=int, default=10, help="training steps, both")
    parser.add_argument("--batch-size", type=int, default=32, help="completions per step, both")
    parser.add_argument("--num-generations", type=int, default=GRPOArgs.samples_per_prompt, help="group size")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion length cap, both")
    parser.add_argument("--temperature", type=float, default=GRPOArgs.temperature, help="sampling temperature")
    parser.add_argument("--lr", type=float, default=GRPOArgs.lr, help="learning rate, both (constant)")
    parser.add_argument("--beta", type=float, default=GRPOArgs.beta, help="KL coefficient, both")
    parser.add_argument("--judge", default=demo_tasks.DEFAULT_RULE_JUDGE, help="demo rule judge as reward")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", default="trl-first", choices=("trl-first", "ours-first"),
                        help="which trainer runs first for each family")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    families = args.family or ["qwen2", "llama"]
    instructions = prompts(256)
    results = {}
    with tempfile.TemporaryDirectory(prefix="grpo-vs-trl-") as tmp:
        work = Path(tmp)
        for family in families:
            policy = build_policy(family, work / f"{family}-policy", size=args.size, seed=args.seed)
            runs = [("trl", run_trl), ("ours", run_ours)]
            if args.order == "ours-first":
                runs.reverse()
            figures = {name: run(policy, instructions, work / f"{family}-{name}", args) for name, run in runs}
            for figure in figures.values():
                figure["completions_per_s"] = figure["completions"] / figure["seconds"]
            figures["ratio"] = figures["ours"]["completions_per_s"] / figures["trl"]["completions_per_s"]
            results[family] = figures

    print(f"\n# GRPO completions/s, {args.size} {'/'.join(families)} policies, {args.steps} steps of "
          f"{args.batch_size} completions (G={args.num_generations}, max_new_tokens {args.max_new_tokens}), "
          f"beta {args.beta}, {args.device}, {args.threads} threads")
    print(f"{'family':<8} {'ours/s':>8} {'TRL/s':>8} {'ratio':>6}  {'reward ours':>11} {'reward TRL':>10}"
          f"  {'length ours':>11} {'length TRL':>10}")
    for family, f in results.items():
        print(f"{family:<8} {f['ours']['completions_per_s']:>8.1f} {f['trl']['completions_per_s']:>8.1f} "
              f"{f['ratio']:>5.2f}x  {f['ours']['reward']:>11.3f} {f['trl']['reward']:>10.3f}"
              f"  {f['ours']['length']:>11.1f} {f['trl']['length']:>10.1f}")
    print("goal: ours >= 1.5x TRL's completions/s")
    print(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "results": results}, sort_keys=True))


if __name__ == "__main__":
    main()
