"""Our DPO stage against TRL 1.16's DPOTrainer: training tokens per second, same box, same run.

Same for every trainer: a random Llama 3.2 / Qwen2.5 Instruct stand-in of demo/tiny_models.py (the family's
own config class, chat template and special tokens; --size sets its dimensions), the same pairs (demo tasks
as chat prompts, the answer in a sentence preferred to the same answer padded with chatter), fp32 on the
CPU, the same thread count, one epoch, batch size, learning rate, beta, max_length, AdamW, dropout off, the
frozen starting policy as the reference. The rows:

  ours                 training.engine.dpo.main at its defaults: the reference's log-probs in one pass
                       before training, length-grouped batches, one (2B, T) pass with logits for replies only.
  trl                  DPOTrainer as shipped (gradient checkpointing on; the reference run at every step).
  trl-precompute       DPOTrainer at its fastest settings we know: gradient checkpointing off and
                       precompute_ref_log_probs on (also a pass before training).

Training tokens are the real (unpadded) tokens of prompt + chosen and prompt + rejected, as TRL counts them
(its num_tokens); both trainers see the same number. Time: from the start of the reference pass (when there is
one) to the end of the last optimizer step; no tokenization, loading, evaluation or saving. Wall time and this
process's CPU time (all threads) are both reported: on a shared box the CPU time is the steadier measure.

    .venv/bin/python benchmarks/dpo_vs_trl.py --family llama --pairs 256 --batch-size 8

Figures: benchmarks/README.md#dpo-vs-trl.
"""

from __future__ import annotations

import argparse
import copy
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
from demo.tiny_models import build_policy  # noqa: E402
from training.engine import dpo  # noqa: E402
from training.engine.timing import LoopTimer  # noqa: E402

SIZES = {"tiny": "tiny", "small": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 768}}


def make_pairs(n: int, seed: int) -> list[dict]:
    """Demo tasks as chat prompts; the answer in a sentence is chosen over the answer padded with chatter."""
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": task.instruction}],
             "chosen": [{"role": "assistant", "content": demo_tasks.respond(task, "sentence", rng)}],
             "rejected": [{"role": "assistant", "content": demo_tasks.respond(task, "padded", rng)}]}
            for task in demo_tasks.make_tasks(n, seed, "train")]


def run_ours(policy: str, data: str, out: Path, settings: dict) -> dict:
    """dpo.main with the reference pass timed too."""
    timed = {}
    reference = dpo.reference_logps

    def timed_reference(run):
        started, cpu = time.perf_counter(), time.process_time()
        reference(run)
        timed["reference_seconds"] = time.perf_counter() - started
        timed["reference_cpu_seconds"] = time.process_time() - cpu

    dpo.reference_logps = timed_reference
    try:
        timer = LoopTimer()
        metrics = dpo.main(dpo.DPOArgs(policy=policy, train=data, out=str(out), eval_fraction=0.0,
                                       lr=settings["lr"], beta=settings["beta"], batch_size=settings["batch_size"],
                                       max_length=settings["max_length"], warmup_ratio=0.0, save_every=0,
                                       log_every=10**9, device="cpu", dtype="fp32"), timer=timer)
    finally:
        dpo.reference_logps = reference
    seconds = timed["reference_seconds"] + timer.loop_seconds
    cpu_seconds = timed["reference_cpu_seconds"] + timer.loop_cpu_seconds
    tokens = metrics["dpo/train_tokens"]
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "reference_seconds": timed["reference_seconds"], "loss": metrics["dpo/loss"],
            "tokens_per_second": tokens / seconds, "tokens_per_cpu_second": tokens / cpu_seconds}


def run_trl(policy: str, rows: list[dict], out: Path, settings: dict, fastest: bool) -> dict:
    """DPOTrainer.train, timed from its reference pass (precompute) or first step to its last step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times["train_begin"], times["train_begin_cpu"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times["last_step_end"], times["last_step_end_cpu"] = time.perf_counter(), time.process_time()

    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        result = precompute(self, *args, **kwargs)
        times["reference_seconds"] = times.get("reference_seconds", 0.0) + time.perf_counter() - started
        times["reference_cpu_seconds"] = times.get("reference_cpu_seconds", 0.0) + time.process_time() - cpu
        return result

    DPOTrainer._precompute_ref_logps = timed_precompute
    try:
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
        config = DPOConfig(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                           learning_rate=settings["lr"], beta=settings["beta"], num_train_epochs=1,
                           per_device_train_batch_size=settings["batch_size"], max_length=settings["max_length"],
                           lr_scheduler_type="linear", warmup_steps=0, logging_steps=10**9, disable_dropout=True,
                           dataloader_num_workers=0, seed=0,
                           **({"gradient_checkpointing": False, "precompute_ref_log_probs": True} if fastest else {}))
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model) if not fastest else None, args=config,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(policy), callbacks=[Clock()])
        result = trainer.train()
    finally:
        DPOTrainer._precompute_ref_logps = precompute
    seconds = times["last_step_end"] - times["train_begin"] + times.get("reference_seconds", 0.0)
    cpu_seconds = times["last_step_end_cpu"] - times["train_begin_cpu"] + times.get("reference_cpu_seconds", 0.0)
    tokens = trainer._total_train_tokens
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "reference_seconds": times.get("reference_seconds", 0.0), "loss": result.training_loss,
            "tokens_per_second": tokens / seconds, "tokens_per_cpu_second": tokens / cpu_seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="ours,trl,trl-precompute")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {"lr": args.lr, "beta": args.beta, "batch_size": args.batch_size, "max_length": args.max_length}

    work = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    policy = str(build_policy(args.family, work / "policy", size=SIZES[args.size]))
    rows = make_pairs(args.pairs, seed=0)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    results = {}
    for name in args.rows.split(","):
        torch.manual_seed(0)
        if name == "ours":
            results[name] = run_ours(policy, str(data), work / "ours", settings)
        else:
            results[name] = run_trl(policy, rows, work / name, settings, fastest=name == "trl-precompute")
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)

    print(f"\n{args.family} ({args.size}), {args.pairs} pairs, batch {args.batch_size}, {args.threads} threads, fp32 CPU")
    print(f"{'trainer':<16} {'tokens':>8} {'seconds':>8} {'of which ref':>12} {'tokens/s':>9} {'ours is':>8} "
          f"{'tokens/cpu-s':>12} {'ours is':>8}")
    for name, r in results.items():
        ours = results.get("ours")
        wall = ours["tokens_per_second"] / r["tokens_per_second"] if ours else float("nan")
        cpu = ours["tokens_per_cpu_second"] / r["tokens_per_cpu_second"] if ours else float("nan")
        print(f"{name:<16} {r['tokens']:>8} {r['seconds']:>8.1f} {r['reference_seconds']:>12.1f} "
              f"{r['tokens_per_second']:>9.0f} {wall:>7.2f}x {r['tokens_per_cpu_second']:>12.0f} {cpu:>7.2f}x")
    figures = {"family": args.family, "size": args.size, "pairs": args.pairs, "batch_size": args.batch_size,
               "threads": args.threads, "results": results}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
