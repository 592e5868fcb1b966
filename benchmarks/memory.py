#!/usr/bin/env python
"""Peak memory of each training stage (SFT, reward model, PPO) for a ~100M-parameter random Llama on CPU:
full training, LoRA, and LoRA with gradient checkpointing; then the same arithmetic for 1B, 8B and 70B on
80 GB GPUs.

Method: every (stage, configuration) runs in a child process of its own, which imports the engine and calls
the stage's main() for two steps, and the parent reads that child's peak resident set size from
os.wait4's rusage (ru_maxrss, the kernel's high-water mark of the process's resident memory). A fresh
process per configuration means no allocator cache or earlier model inflates the next figure, and RSS
counts what torch allocates outside Python's heap (its CPU tensors), which tracemalloc does not see, and
the weights' pages of the safetensors files that transformers maps. The parent imports no torch and builds
the models in a child too: Linux carries a process's high-water mark across exec, so a child spawned by a
big parent would report at least the parent's size. The floor (a child that imports the same modules and
stops) is printed too: it is in every figure.

The models come from demo.tiny_models (size "100m": 16 layers, 768 wide, a 1.2k-token BPE
vocabulary, so the logits are small here; at 128k tokens they are not, which the arithmetic counts).
PPO scores with a 100M Llama reward model (no gradients, in the compute dtype), as a round does; ppo_rule
scores with a rule judge instead, to show the trainer's own share.

    nice -n 10 .venv/bin/python benchmarks/memory.py                # about 10 minutes on 2 CPU cores
    nice -n 10 .venv/bin/python benchmarks/memory.py --stages ppo --configs full lora
    nice -n 10 .venv/bin/python benchmarks/memory.py --stages sft --sharded    # DDP against FSDP2 at 2 processes

With --sharded, each configuration instead runs under `accelerate launch` on 2 gloo processes, with DDP and
with FSDP2 (--fsdp), and every rank reports its own peak (VmHWM of /proc/self/status, which starts afresh at
the exec that started the rank, so the launcher's size is not in it). --timeline adds each rank's phases (load,
shard, each step's forward, backward and optimizer step, the save) with the memory at their start and their exact
peak; --mmap-tensors fixes glibc's mmap threshold in the ranks, so freed tensors go back to the kernel and the
peak counts the tensors alive rather than what glibc's heap kept (see MMAP_THRESHOLD):

    nice -n 10 .venv/bin/python benchmarks/memory.py --stages sft --configs full --sharded --timeline --mmap-tensors
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "full": {},
    "full+ckpt": {"gradient_checkpointing": True},
    "lora": {"lora_r": 16},
    "lora+ckpt": {"lora_r": 16, "gradient_checkpointing": True},
}
SHARDING = {"ddp": {}, "fsdp": {"fsdp": True}}  # --sharded: how 2 processes split the work
PROCESSES = 2
STAGES = ("sft", "reward", "ppo", "ppo_rule")  # ppo_rule: PPO scored by a rule judge, no reward model
GB = 1e9
# --mmap-tensors: glibc's fixed mmap threshold (its default before it starts raising it, up to 32 MB, as large
# blocks are freed): every tensor from 128 KiB up gets a mapping of its own, returned to the kernel when freed.
MMAP_THRESHOLD = 128 * 1024


# ----------------------------------------------------------------------------------------------
# The measured runs (each in a child process)


def prepare(folder: Path) -> dict[str, str]:
    """The 100M policy and reward model and the stage inputs, built once into `folder`."""
    from demo import demo_tasks
    from demo.tiny_models import build_policy, build_reward

    paths = {"policy": folder / "policy-100m", "reward_model": folder / "reward-100m"}
    if not (paths["policy"] / "config.json").exists():
        build_policy("llama", paths["policy"], size="100m")
    if not (paths["reward_model"] / "config.json").exists():
        build_reward("llama", paths["reward_model"], size="100m")
    examples = demo_tasks.make_sft_examples(64, seed=0)
    # Long enough examples that activations count: four answers joined make about 200-250 tokens.
    rows = [{"instruction": examples[i]["instruction"],
             "output": " ".join(e["output"] for e in examples[i:i + 4])} for i in range(0, 64, 4)]
    write = lambda name, items: (folder / name).write_text("".join(json.dumps(r) + "\n" for r in items))  # noqa: E731
    write("sft.jsonl", rows)
    pairs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": rows[(k + 1) % len(rows)]["output"]}
             for k, r in enumerate(rows)]
    write("pairs.jsonl", pairs[:8])
    write("pairs-eval.jsonl", pairs[8:12])
    write("prompts.jsonl", [{"prompt": p} for p in demo_tasks.make_prompts(16, seed=0, split="train")])
    return {**{k: str(v) for k, v in paths.items()}, "folder": str(folder)}


def run_stage(stage: str, config: str, inputs: dict[str, str]) -> dict:
    """One stage for two optimizer steps under `config` (`lora/fsdp`: a config and a SHARDING); its final metrics."""
    from training.engine import ppo, reward, sft

    config, _, sharding = config.partition("/")
    folder, switches = Path(inputs["folder"]), {**CONFIGS[config], **SHARDING.get(sharding, {})}
    config = f"{config}-{sharding}" if sharding else config
    out = str(folder / f"out-{stage}-{config}")
    if stage == "sft":
        return sft.main(sft.SFTArgs(model=inputs["policy"], train=str(folder / "sft.jsonl"), out=out, max_steps=2,
                                    batch_size=8, max_length=512, device="cpu", **switches))
    if stage == "reward":
        return reward.main(reward.RewardArgs(train=str(folder / "pairs.jsonl"), eval=str(folder / "pairs-eval.jsonl"),
                                             model=inputs["reward_model"], out=out, batch_size=4, max_length=512,
                                             eval_every=0, save_every=0, resume=False, device="cpu", **switches))
    scorer = "rule:correct" if stage == "ppo_rule" else inputs["reward_model"]
    return ppo.main(ppo.PPOArgs(policy=inputs["policy"], reward_models=[scorer],
                                prompts=str(folder / "prompts.jsonl"), out=out, steps=2, batch_size=8,
                                samples_per_prompt=2, max_new_tokens=32, save_every=0, resume=False, device="cpu",
                                **switches))


def child(stage: str, config: str, inputs_json: str) -> None:
    if stage == "prepare":
        print(json.dumps(prepare(Path(inputs_json))))
        return
    import torch

    torch.set_num_threads(1)
    # Imported in every child, so the floor is the same for all (data.py imports datasets only to read pairs).
    import datasets  # noqa: F401
    import peft  # noqa: F401

    from training.engine import ppo, reward, sft  # noqa: F401 - the floor imports the same modules

    if stage != "floor":
        inputs = json.loads(inputs_json)
        timeline = Timeline() if inputs.get("timeline") else None
        started = time.perf_counter()
        metrics = run_stage(stage, config, inputs)
        phases = timeline.phases() if timeline else None
        print(json.dumps({"seconds": time.perf_counter() - started, "rank": int(os.environ.get("RANK", "0")),
                          "peak_hwm": max(p["peak"] for p in phases) if phases else _status("VmHWM"), "phases": phases,
                          "loss": metrics.get("sft/loss", metrics.get("rm/loss", metrics.get("ppo/kl")))}), flush=True)


def _status(field: str) -> int:
    """One memory line of /proc/self/status in bytes: VmHWM (the peak since exec) or VmRSS (now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Timeline:
    """--timeline: the phases a stage passes through (load, shard, each step's forward, backward and optimizer
    step, the final save's gather and write), each with the resident memory at its start and its peak. At each
    phase's start the kernel's high-water mark is read (the peak of the phase before) and reset (writing 5 to
    /proc/self/clear_refs), so every peak is exact, not sampled. The marks come from wrapping the engine's own
    functions, in this process only."""

    def __init__(self):
        from torch.optim import optimizer

        from training.engine import common, dpo, ppo, ranks, reward, rollouts, sft

        self.rows: list[dict] = []
        self.step = 1
        for module in (common, sft, reward, ppo, dpo, rollouts):
            for name in ("load_causal_lm", "load_reward_model"):
                if hasattr(module, name):
                    setattr(module, name, self._phase(getattr(module, name), "load", after="setup"))
        ranks.Ranks.prepare = self._phase(ranks.Ranks.prepare, "shard", after="forward 1")
        ranks.Ranks.backward = self._phase(ranks.Ranks.backward, "backward", after="clip")
        ranks.Ranks.trained_model = self._phase(ranks.Ranks.trained_model, "save: gather", after="save: write")
        optimizer.register_optimizer_step_pre_hook(lambda *_: self.mark("optimizer step"))
        optimizer.register_optimizer_step_post_hook(lambda *_: self.mark("forward", next_step=True))
        self.mark("start")

    def mark(self, name: str, next_step: bool = False) -> None:
        """A new phase starts now: the last one's peak is read and the high-water mark reset for this one."""
        if self.rows:
            self.rows[-1]["peak"] = _status("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")
        self.step += next_step
        numbered = name in ("forward", "backward", "optimizer step")
        self.rows.append({"phase": f"{name} {self.step}" if numbered else name, "start": _status("VmRSS")})

    def _phase(self, function, name: str, after: str):
        def wrapped(*args, **kwargs):
            self.mark(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.mark(after)
        return wrapped

    def phases(self) -> list[dict]:
        """Each phase's resident memory at its start and its peak, in bytes, in order (the last one ends now)."""
        self.rows[-1]["peak"] = _status("VmHWM")
        return self.rows


def measure_ranks(stage: str, config: str, inputs: dict[str, str]) -> list[dict]:
    """Each rank's figures when `stage` runs under `config` (e.g. full/fsdp) on PROCESSES gloo processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               __file__, "--child", stage, config, json.dumps(inputs)]
    malloc = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if inputs.get("mmap_tensors") else {}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **malloc})
    if done.returncode:
        raise SystemExit(f"{stage} / {config} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"seconds"')),
                  key=lambda r: r["rank"])


def sharded(stages: list[str], configs: list[str], inputs: dict[str, str]) -> None:
    """The --sharded table: per-rank peak at PROCESSES processes, DDP against FSDP2, and FSDP2's share of DDP's."""
    print(f"{'stage':<8} {'config':<10} {'sharding':<8} {'peak per rank (GB)':>22} {'vs ddp':>7} {'seconds':>8}")
    results: dict[str, list[dict]] = {}
    for stage in stages:
        for config in configs:
            for sharding in SHARDING:
                ranks = measure_ranks(stage, f"{config}/{sharding}", inputs)
                results[f"{stage} {config}/{sharding}"] = ranks
                peak = max(r["peak_hwm"] for r in ranks)
                ddp = results.get(f"{stage} {config}/ddp")
                ratio = f"{peak / max(r['peak_hwm'] for r in ddp):.2f}x" if ddp and sharding != "ddp" else "-"
                each = " ".join(f"{r['peak_hwm'] / GB:.2f}" for r in ranks)
                print(f"{stage:<8} {config:<10} {sharding:<8} {each:>22} {ratio:>7} {ranks[0]['seconds']:>8.1f}",
                      flush=True)
                for phases in zip(*(r["phases"] or [] for r in ranks)):
                    print(f"    {phases[0]['phase']:<22} " + "   ".join(
                        f"rank {k}: {p['start'] / GB:.2f} -> peak {p['peak'] / GB:.2f}" for k, p in enumerate(phases)))
    print(json.dumps({"processes": PROCESSES, "sharded": results}))


def measure(stage: str, config: str, inputs: dict[str, str]) -> dict:
    """Peak RSS (bytes) of a child process that runs `stage` under `config`."""
    process = subprocess.Popen([sys.executable, __file__, "--child", stage, config, json.dumps(inputs)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{stage} / {config} failed (exit {process.returncode}); run it alone with --child")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return {"peak_rss": usage.ru_maxrss * 1024, **(json.loads(lines[-1]) if lines else {})}  # ru_maxrss: KiB


# ----------------------------------------------------------------------------------------------
# The arithmetic for real sizes


# Llama 3.2 1B, 3.1 8B, 3.1 70B: parameters, layers, width, vocabulary.
SHAPES = {"1B": (1.24e9, 16, 2048, 128256), "8B": (8.03e9, 32, 4096, 128256), "70B": (70.6e9, 80, 8192, 128256)}
TOKENS = 8 * 1024  # a micro-batch: 8 sequences of 1,024 tokens (prompt + response)
LORA_SHARE = 0.004  # adapter parameters / base parameters, r=16 on q_proj and v_proj (8B: 6.8M / 8.0B = 0.08%),
# rounded up generously to 0.4% to cover r=64 or more target modules


def arithmetic() -> list[dict]:
    """Bytes per GPU for PPO (the stage with the most models): policy weights, gradients, Adam states,
    reference, reward model (same size as the policy), activations of one micro-batch.

    full: fp32 weights + fp32 grads + fp32 Adam m, v (4 + 4 + 8 bytes per parameter), bf16 reference and reward
      model (2 + 2), activations without checkpointing: 34 bytes per token per layer per width unit (Korthikanti
      et al. 2022, 16-bit, flash attention so no s^2 term) plus fp32 logits and log-probs (8 bytes x vocab).
    lora: the frozen base in bf16 (2), adapters' weights, grads and Adam in fp32 (16 x LORA_SHARE), no reference
      (the base with adapters off), bf16 reward model, activations with checkpointing: each layer's bf16 input
      (2 bytes per token per width unit per layer) + one layer recomputed (34) + the logits.
    zero3/8: full training with weights, grads, Adam, reference and reward model sharded over 8 GPUs
      (DeepSpeed ZeRO-3, Rajbhandari et al. 2020), activations with checkpointing, per GPU.
    lora+z3/8: LoRA with the base, adapters and reward model sharded the same way.
    """
    rows = []
    for name, (params, layers, width, vocab) in SHAPES.items():
        logits = 8 * TOKENS * vocab
        act_full = 34 * TOKENS * width * layers + logits
        act_ckpt = 2 * TOKENS * width * layers + 34 * TOKENS * width + logits
        adapters = LORA_SHARE * params
        configs = {
            "full": (4 * params, 4 * params, 8 * params, 2 * params, 2 * params, act_full),
            "lora": (2 * params + 4 * adapters, 4 * adapters, 8 * adapters, 0.0, 2 * params, act_ckpt),
            "zero3/8": (4 * params / 8, 4 * params / 8, 8 * params / 8, 2 * params / 8, 2 * params / 8, act_ckpt),
            "lora+z3/8": ((2 * params + 4 * adapters) / 8, 4 * adapters / 8, 8 * adapters / 8, 0.0, 2 * params / 8,
                          act_ckpt),
        }
        for config, parts in configs.items():
            rows.append({"model": name, "config": config, **dict(zip(
                ("weights", "grads", "adam", "reference", "reward_model", "activations"), parts)),
                "total": sum(parts)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--configs", nargs="+", default=["full", "lora", "lora+ckpt"], choices=list(CONFIGS))
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "pairloop-memory-bench"),
                        help="where the 100M models and inputs are built once (default: a folder in /tmp)")
    parser.add_argument("--sharded", action="store_true",
                        help=f"per-rank peaks on {PROCESSES} processes, DDP against FSDP2, instead of one process")
    parser.add_argument("--timeline", action="store_true",
                        help="with --sharded, each rank's resident memory phase by phase (load, shard, steps, save)")
    parser.add_argument("--mmap-tensors", action="store_true",
                        help="with --sharded, glibc's mmap threshold fixed at 128 KiB in the ranks, so the peak counts "
                             "the tensors alive, not the freed memory glibc's heap keeps (see MMAP_THRESHOLD)")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "CONFIG", "INPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    prepared = subprocess.run([sys.executable, __file__, "--child", "prepare", "-", str(folder)], cwd=REPO,
                              check=True, capture_output=True, text=True).stdout
    inputs = {**json.loads(prepared.splitlines()[-1]), "timeline": args.timeline, "mmap_tensors": args.mmap_tensors}
    if args.sharded:
        return sharded(args.stages, args.configs, inputs)
    floor = measure("floor", "full", inputs)["peak_rss"]
    print(f"floor (python + torch + transformers + peft imported): {floor / GB:.2f} GB\n")
    print(f"{'stage':<8} {'config':<10} {'peak RSS':>9} {'above floor':>12} {'vs full':>8} {'seconds':>8}")
    results: dict[str, dict[str, dict]] = {}
    for stage in args.stages:
        for config in args.configs:
            result = measure(stage, config, inputs)
            results.setdefault(stage, {})[config] = result
            full = results[stage].get("full")
            ratio = f"{result['peak_rss'] / full['peak_rss']:.0%}" if full else "-"
            above = (result["peak_rss"] - floor) / GB
            print(f"{stage:<8} {config:<10} {result['peak_rss'] / GB:>7.2f} GB {above:>9.2f} GB "
                  f"{ratio:>8} {result.get('seconds', 0):>8.1f}", flush=True)

    rows = arithmetic()
    print(f"\nPPO on 80 GB GPUs, GB per GPU (micro-batch {TOKENS} tokens; see arithmetic()'s docstring):")
    columns = ("weights", "grads", "adam", "reference", "reward_model", "activations", "total")
    print(f"{'model':<5} {'config':<9} " + " ".join(f"{c:>12}" for c in columns) + "  fits")
    for row in rows:
        print(f"{row['model']:<5} {row['config']:<9} " + " ".join(f"{row[c] / GB:>12.1f}" for c in columns)
              + f"  {'yes' if row['total'] <= 80 * GB else 'no'}")
    print(json.dumps({"floor": floor, "measured": results, "arithmetic": rows}))


if __name__ == "__main__":
    main()
