#!/usr/bin/env python
"""Every stage's speed on each model family, so a regression in one family shows.

For each policy family (GPT-2, Llama, Qwen2, Mistral, Gemma, GPT-NeoX) a random-initialised model of
the same small size (demo/tiny_models.py: a locally trained tokenizer and the family's real
chat template; nothing downloaded) runs, in one process:
  sft     --sft-steps optimizer steps on chat conversations (or instructions, for the two base families),
          tokens/s = real (unpadded) tokens through forward and backward per second (sft/tokens_per_s);
  sample  --prompts prompts x 2 responses of up to --max-new-tokens, new tokens/s (sample/tokens_per_s);
  ppo     --ppo-steps PPO steps of --batch rollouts against a Qwen2 reward model of the same size,
          rollout tokens/s = response tokens of the steps / their wall time, and episodes/s;
and for each reward family (BERT, Llama, Qwen2 with a score head) the reward stage over --pairs
conversational pairs, tokens/s = real tokens through forward and backward per second of its loop.
The same seeds, prompts and settings for every family; rows differ only in the architecture and
tokenizer. fp32 on CPU.

With --gpu (and CUDA present): a Qwen2-0.5B-shaped random model (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864; the local tokenizer's 1k vocabulary, so embeddings are far smaller than Qwen2.5's
151,936 rows) through the same stages in bf16, with
tokens/s and each stage's peak CUDA memory (torch.cuda.max_memory_allocated).

    .venv/bin/python benchmarks/families.py                # CPU, all families, a few minutes
    .venv/bin/python benchmarks/families.py --gpu          # plus the 0.5B-shaped model on CUDA

Prints one table and, last, one JSON line of every figure.
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

from demo.tiny_models import POLICY_FAMILIES, REWARD_FAMILIES, build_policy, build_reward  # noqa: E402
from training.engine import ppo, reward, sft  # noqa: E402
from training.engine.sample import sample_with_stats  # noqa: E402

BENCH_SIZE = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 384, "max_positions": 512}
QWEN2_05B = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "max_positions": 2048}
CHAT_FAMILIES = {"llama", "qwen2", "mistral", "gemma"}
TOPICS = ("colour", "fruit", "tree", "river", "planet", "metal", "bird", "city")


def conversations(n: int) -> list[list[dict[str, str]]]:
    """SFT conversations: a question and answer, every third with a follow-up turn."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        turns = [{"role": "user", "content": f"Name a {topic} and say one thing about it ({i})."},
                 {"role": "assistant", "content": f"A {topic} I know well is number {i}; it is worth a look."}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "And another one?"},
                      {"role": "assistant", "content": f"Another {topic} would be number {i + 1}."}]
        rows.append(turns)
    return rows


def prompts(n: int) -> list:
    return [turns[:1] for turns in conversations(n)]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sft_rows(family: str, n: int) -> list[dict]:
    if family in CHAT_FAMILIES:
        return [{"messages": turns} for turns in conversations(n)]
    return [{"instruction": t[0]["content"], "output": t[1]["content"]} for t in conversations(n)]


def pair_rows(n: int) -> list[dict]:
    rows = []
    for turns in conversations(n):
        rows.append({"prompt": turns[:1], "chosen": [turns[1]],
                     "rejected": [{"role": "assistant", "content": "I do not know."}]})
    return rows


class PeakMemory:
    """Peak CUDA memory of a block (0 on CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()


def run_policy_family(family: str, work: Path, reward_dir: Path, args, *, size, device: str, dtype: str) -> dict:
    base = build_policy(family, work / family, size=size)
    figures: dict = {"family": family}
    with PeakMemory(device) as mem:
        metrics = sft.main(sft.SFTArgs(model=str(base), train=write_jsonl(work / f"{family}-sft.jsonl",
                                                                          sft_rows(family, args.sft_rows)),
                                       out=str(work / f"{family}-sft"), max_steps=args.sft_steps, batch_size=8,
                                       lr=1e-4, max_length=256, device=device, dtype=dtype, seed=0))
    figures["sft_tokens_per_s"] = metrics["sft/tokens_per_s"]
    figures["sft_peak_bytes"] = mem.peak
    policy = str(work / f"{family}-sft")
    with PeakMemory(device) as mem:
        _, stats, _ = sample_with_stats(policy, prompts(args.prompts), num_per_prompt=2,
                                        max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0, batch_size=16,
                                        device=device, dtype=dtype)
    figures["sample_tokens_per_s"] = stats["sample/tokens_per_s"]
    figures["sample_peak_bytes"] = mem.peak
    started = time.perf_counter()
    tokens = []
    with PeakMemory(device) as mem:
        metrics = ppo.main(ppo.PPOArgs(policy=policy, reward_models=[str(reward_dir)], prompts=prompts(args.prompts),
                                       out=str(work / f"{family}-ppo"), steps=args.ppo_steps, batch_size=args.batch,
                                       samples_per_prompt=2, max_new_tokens=args.max_new_tokens, save_every=0,
                                       device=device, dtype=dtype, seed=0),
                           on_progress=lambda e: tokens.append(e["metrics"]["ppo/response_length"] * args.batch)
                           if e.get("metrics", {}).get("ppo/response_length") is not None else None)
    seconds = time.perf_counter() - started
    figures["ppo_tokens_per_s"] = sum(tokens) / seconds
    figures["ppo_episodes_per_s"] = args.ppo_steps * args.batch / seconds
    figures["ppo_peak_bytes"] = mem.peak
    return figures


def run_reward_family(family: str, work: Path, args, *, size, device: str, dtype: str) -> dict:
    backbone = build_reward(family, work / f"rm-{family}", size=size)
    with PeakMemory(device) as mem:
        metrics = reward.main(reward.RewardArgs(train=write_jsonl(work / "pairs.jsonl", pair_rows(args.pairs)),
                                                model=str(backbone), out=str(work / f"rm-{family}-out"),
                                                batch_size=8, max_length=256, eval_fraction=0.1, eval_every=0,
                                                save_every=0, device=device, dtype=dtype, seed=0))
    return {"family": family, "reward_tokens_per_s": metrics["rm/train_tokens"] / metrics["rm/train_seconds"],
            "reward_pairs_per_s": metrics["rm/pairs_per_second"], "reward_peak_bytes": mem.peak}


def table(policy_rows: list[dict], reward_rows: list[dict], title: str, memory: bool) -> str:
    lines = [title, f"{'family':10} {'sft tok/s':>10} {'sample tok/s':>13} {'ppo tok/s':>10} {'ppo ep/s':>9}"
             + ("  peak GiB sft/sample/ppo" if memory else "")]
    for r in policy_rows:
        line = (f"{r['family']:10} {r['sft_tokens_per_s']:10.0f} {r['sample_tokens_per_s']:13.0f} "
                f"{r['ppo_tokens_per_s']:10.0f} {r['ppo_episodes_per_s']:9.2f}")
        if memory:
            line += "  " + " / ".join(f"{r[k] / 2**30:.2f}" for k in ("sft_peak_bytes", "sample_peak_bytes",
                                                                         "ppo_peak_bytes"))
        lines.append(line)
    lines.append(f"{'reward':10} {'tok/s':>10} {'pairs/s':>13}" + ("  peak GiB" if memory else ""))
    for r in reward_rows:
        lines.append(f"{r['family']:10} {r['reward_tokens_per_s']:10.0f} {r['reward_pairs_per_s']:13.2f}"
                     + (f"  {r['reward_peak_bytes'] / 2**30:.2f}" if memory else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(POLICY_FAMILIES), help="policy families, comma-separated")
    p.add_argument("--reward-families", default=",".join(REWARD_FAMILIES))
    p.add_argument("--sft-rows", type=int, default=64)
    p.add_argument("--sft-steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ppo-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="PPO rollouts per step")
    p.add_argument("--pairs", type=int, default=160, help="reward pairs (10%% held out)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--gpu", action="store_true", help="also a Qwen2-0.5B-shaped model in bf16 on CUDA")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    figures: dict = {"cpu": {"policies": [], "rewards": []}, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="pairloop-families-") as tmp:
        work = Path(tmp)
        judge = build_reward("qwen2", work / "judge", size=BENCH_SIZE)
        for family in [f for f in args.families.split(",") if f]:
            figures["cpu"]["policies"].append(run_policy_family(family, work, judge, args, size=BENCH_SIZE,
                                                                device="cpu", dtype="fp32"))
        for family in [f for f in args.reward_families.split(",") if f]:
            figures["cpu"]["rewards"].append(run_reward_family(family, work, args, size=BENCH_SIZE, device="cpu",
                                                               dtype="fp32"))
        print(table(figures["cpu"]["policies"], figures["cpu"]["rewards"],
                    f"CPU, fp32, {torch.get_num_threads()} threads, every model {BENCH_SIZE}", memory=False))
        if args.gpu:
            if not torch.cuda.is_available():
                print("--gpu: no CUDA device here, so the Qwen2-0.5B-shaped run is skipped")
            else:
                size = {**QWEN2_05B}
                gpu_work = work / "gpu"
                gpu_work.mkdir()
                judge = build_reward("qwen2", gpu_work / "judge", size=size)
                rows = [run_policy_family("qwen2", gpu_work, judge, args, size=size, device="cuda", dtype="bf16")]
                rewards = [run_reward_family("qwen2", gpu_work, args, size=size, device="cuda", dtype="bf16")]
                figures["gpu"] = {"device": torch.cuda.get_device_name(), "policies": rows, "rewards": rewards}
                print()
                print(table(rows, rewards, f"{figures['gpu']['device']}, bf16, Qwen2-0.5B-shaped {size}",
                            memory=True))
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
