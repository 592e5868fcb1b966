"""Our PPO against TRL 1.16's RLOOTrainer on the demo policy, side by side in one run.

Both optimise the same objective, E[judge(response)] - beta * KL(pi || ref), from the same demo
SFT GPT-2: the same reward (the demo rule judge, default correct_sentence, scored on decoded text,
unnormalised on our side too, and no missing-EOS penalty, so beta means the same), the same beta,
learning rate, training prompts, max_new_tokens / temperature / top_p, number of episodes (sampled
responses trained on) and torch threads, fp32 on CPU. Each trainer keeps its own defaults otherwise
(ours: PPOArgs; TRL: RLOOConfig with k=4 samples per prompt, one update per batch).

Printed:
- reward against KL: every --eval-every steps both policies are evaluated by the same code on the
  same held-out prompts (mean judge score, and KL(pi || ref) per response estimated on the samples
  as the sum over tokens of log pi - log ref); evaluation time is excluded from the timings;
- ours interpolated at TRL's final KL (and the other way round), to compare reward at equal KL;
- episodes per second of each trainer and the ratio;
- the fraction of this machine's fp32 matmul peak (a plain torch GEMM measured in this run) that
  each trainer reached: 2 FLOPs per matmul parameter per token forward, 4 backward (Kaplan et al.
  2020), over every sampling, scoring and training pass it made, divided by its training time.

    .venv/bin/python benchmarks/policy_vs_trl.py [--steps 30] [--threads 2] [--eval-every 10]

A few minutes on 2 CPU cores (the first run also builds the demo policy, up to 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import typing
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo import demo_tasks  # noqa: E402
from demo.policy import ensure_demo_policy  # noqa: E402
from training.engine.cli import value_type  # noqa: E402
from training.engine.common import format_prompt, load_causal_lm  # noqa: E402
from training.engine.ppo import PPOArgs, resume_dir  # noqa: E402
from training.engine.ppo import main as ppo_main  # noqa: E402
from training.engine.sample import generate, sequence_logprobs  # noqa: E402


def gemm_peak_flops(n: int = 1024, repeats: int = 20) -> float:
    """Best observed fp32 FLOP/s of a plain square torch.mm on this machine, with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but the position embeddings (the token
    embedding counts once, as the tied output projection)."""
    total = sum(p.numel() for p in model.parameters())
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    return total - (wpe.weight.numel() if wpe is not None else 0)


class Evaluator:
    """The same held-out evaluation for every policy: one sample per prompt, judge mean and KL to ref."""

    def __init__(self, ref, tokenizer, instructions: list[str], judge, args):
        self.ref, self.tokenizer, self.instructions, self.judge, self.args = (
            ref,
            tokenizer,
            instructions,
            judge,
            args,
        )
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(1234)
        rollout = generate(
            model,
            self.tokenizer,
            [format_prompt(i) for i in self.instructions],
            max_new_tokens=self.args.max_new_tokens,
            temperature=self.args.temperature,
            top_p=1.0,
            batch_size=50,
            generator=generator,
        )
        logp = sequence_logprobs(model, rollout, self.args.temperature)  # (N, Tr)
        logp_ref = sequence_logprobs(self.ref, rollout, self.args.temperature)
        kl = float(((logp - logp_ref) * rollout.response_mask).sum()) / len(self.instructions)
        scores = [self.judge(i, r) for i, r in zip(self.instructions, rollout.texts, strict=True)]
        summary = demo_tasks.evaluate(self.instructions, rollout.texts)
        model.train(was_training)
        self.seconds += time.perf_counter() - started
        return {
            "judge": sum(scores) / len(scores),
            "kl": kl,
            "correct": summary["demo/correct"],
            "sentence": summary.get("demo/style_sentence", float("nan")),
        }


def run_ours(
    policy: str,
    instructions: list[str],
    out: Path,
    args,
    evaluator: Evaluator,
    prompt_tokens: float,
    params: int,
) -> dict:
    history: list[dict] = []
    curve: list[tuple[int, dict]] = []
    shared = dict(
        policy=policy,
        reward_models=[f"rule:{args.judge}"],
        prompts=instructions,
        out=str(out),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_coef=args.beta,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        missing_eos_penalty=0.0,
        reward_norm="none",
        seed=args.seed,
        save_every=args.eval_every,
        resume=False,
        device="cpu",
        dtype="fp32",
    )
    # --ours KEY=VALUE overrides the shared settings too (e.g. lr=5e-5 for ours alone).
    ppo_args = PPOArgs(**{**shared, **args.ours})

    def on_progress(event):
        if "log" in event:
            return
        history.append(event["metrics"])
        step = event["step"]
        # The resumable checkpoint of step - 1 was written after the previous event: evaluate it now.
        if (step - 1) % args.eval_every == 0 and step > 1:
            model, _ = load_causal_lm(str(resume_dir(out)), torch.device("cpu"))
            curve.append((step - 1, evaluator(model)))

    before = evaluator.seconds
    started = time.perf_counter()
    ppo_main(ppo_args, on_progress)
    seconds = time.perf_counter() - started - (evaluator.seconds - before)
    model, _ = load_causal_lm(str(out), torch.device("cpu"))
    curve.append((args.steps, evaluator(model)))
    flops = 0.0
    for m in history:
        tokens = args.batch_size * (prompt_tokens + m["ppo/response_length"])
        # sampling (prefill + decode) and the reference: 2 forwards (the rollout's log-probs are reused);
        # then ppo_epochs x (forward + backward). The shared-header saving is not counted as work done.
        flops += 2 * params * tokens * 2 + 6 * params * tokens * ppo_args.ppo_epochs
    return {
        "seconds": seconds,
        "episodes": args.steps * args.batch_size,
        "flops": flops,
        "curve": curve,
        "train": [(m["ppo/reward"], m["ppo/kl"]) for m in history],
    }


def run_trl(
    policy: str,
    instructions: list[str],
    out: Path,
    args,
    evaluator: Evaluator,
    prompt_tokens: float,
    params: int,
) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    judge = demo_tasks.RULE_JUDGES[args.judge]

    def judge_reward(prompts, completions, instruction, **kwargs):
        return [judge(i, c.strip()) for i, c in zip(instruction, completions, strict=True)]

    judge_reward.__name__ = args.judge
    curve: list[tuple[int, dict]] = []

    class Evaluate(TrainerCallback):
        def on_step_end(self, train_args, state, control, model=None, **kwargs):
            if state.global_step % args.eval_every == 0 and state.global_step < args.steps:
                curve.append((state.global_step, evaluator(model)))

    n_prompts = args.steps * args.batch_size // args.num_generations
    rows = [instructions[i % len(instructions)] for i in range(n_prompts)]
    dataset = Dataset.from_dict({"prompt": [format_prompt(i) for i in rows], "instruction": rows})
    config = RLOOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        beta=args.beta,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=args.steps,
        num_iterations=1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_dropout=True,
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        shuffle_dataset=True,
        log_completions=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=judge_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Evaluate()],
    )
    before = evaluator.seconds
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started - (evaluator.seconds - before)
    curve.append((args.steps, evaluator(trainer.model)))
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    flops, train = 0.0, []
    for entry in logs:
        length = entry.get("completions/mean_length", 0.0)
        tokens = args.batch_size * (prompt_tokens + length)
        # sampling, old log-probs, reference: 3 forwards; one forward + backward (num_iterations=1)
        flops += 2 * params * tokens * 3 + 6 * params * tokens
        train.append(
            (entry["reward"], entry.get("kl", float("nan")) * length)
        )  # per-token KL -> per response
    return {
        "seconds": seconds,
        "episodes": args.steps * args.batch_size,
        "flops": flops,
        "curve": curve,
        "train": train,
    }


def parse_ours(items: list[str]) -> dict:
    """KEY=VALUE settings of PPOArgs, each converted to its field's type."""
    hints = typing.get_type_hints(PPOArgs)
    values = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in hints:
            raise SystemExit(f"--ours {item}: PPOArgs has no setting {key!r}")
        kind = value_type(hints[key])  # as the engine's CLI converts it: mini_batch_size (int | None) -> int
        values[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
    return values


def interpolate(curve: list[tuple[float, float]], kl: float) -> float | None:
    """Judge score of a (KL, judge) curve at `kl`, linear between points; None outside its range."""
    points = sorted(curve)
    for (k0, j0), (k1, j1) in zip(points, points[1:]):
        if k0 <= kl <= k1:
            return j0 if k1 == k0 else j0 + (j1 - j0) * (kl - k0) / (k1 - k0)
    return None


def print_curves(results: dict, sft: dict, args) -> None:
    """Judge / KL of every evaluated step, one column per trainer."""
    print(
        f"\n# reward against KL on {args.eval_prompts} held-out prompts "
        f"(one sample each, T={args.temperature}): judge / KL(pi||ref) per response"
    )
    names = list(results)
    print(f"{'step':>5}  " + "  ".join(f"{name:>16}" for name in names))
    print(f"{0:>5}  " + "  ".join(f"{sft['judge']:>7.3f} / {sft['kl']:>6.2f}" for _ in names) + "   (SFT)")
    at = [dict(results[name]["curve"]) for name in names]
    for step in sorted({step for curve in at for step in curve}):
        cells = [f"{c[step]['judge']:>7.3f} / {c[step]['kl']:>6.2f}" if step in c else " " * 16 for c in at]
        print(f"{step:>5}  " + "  ".join(cells))


def print_table(results: dict, sft: dict, peak: float) -> dict:
    """The final evaluation, speed and share of the GEMM peak of each trainer; returns them by name."""
    print(
        f"\n{'':<11} {'judge':>6} {'KL':>6} {'correct':>8} {'sentence':>9} {'episodes/s':>11} {'train s':>8} "
        f"{'of GEMM peak':>13}"
    )
    print(f"{'SFT':<11} {sft['judge']:>6.3f} {sft['kl']:>6.2f} {sft['correct']:>8.3f} {sft['sentence']:>9.3f}")
    summary = {}
    for name, r in results.items():
        e = r["curve"][-1][1]
        eps = r["episodes"] / r["seconds"]
        peak_fraction = r["flops"] / r["seconds"] / peak
        print(
            f"{name:<11} {e['judge']:>6.3f} {e['kl']:>6.2f} {e['correct']:>8.3f} {e['sentence']:>9.3f} "
            f"{eps:>11.2f} {r['seconds']:>8.1f} {peak_fraction:>12.1%}"
        )
        summary[name] = {
            **e,
            "episodes_per_s": eps,
            "train_seconds": r["seconds"],
            "peak_fraction": peak_fraction,
            "curve": r["curve"],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=PPOArgs.steps, help="iterations, each of --batch-size episodes"
    )
    parser.add_argument(
        "--batch-size", type=int, default=PPOArgs.batch_size, help="episodes per iteration, both"
    )
    parser.add_argument("--num-generations", type=int, default=4, help="TRL RLOO: samples per prompt (k)")
    parser.add_argument("--lr", type=float, default=PPOArgs.lr, help="learning rate, both")
    parser.add_argument("--beta", type=float, default=PPOArgs.kl_coef, help="KL coefficient, both")
    parser.add_argument("--max-new-tokens", type=int, default=PPOArgs.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=PPOArgs.temperature)
    parser.add_argument(
        "--judge", default=demo_tasks.DEFAULT_RULE_JUDGE, choices=sorted(demo_tasks.RULE_JUDGES)
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps")
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument(
        "--policy", default=str(REPO / "var/models/demo-policy"), help="the demo policy (built if missing)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="a PPOArgs setting of ours, e.g. mini_batch_size=64; lr=5e-5 overrides --lr for ours alone (repeatable)")
    parser.add_argument("--only", choices=["ours", "trl"],
                        help="run one trainer (to try settings; the comparison needs both)")
    args = parser.parse_args()
    args.ours = parse_ours(args.ours)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    policy = args.policy
    if Path(policy).resolve() == (REPO / "var/models/demo-policy").resolve():
        policy = str(ensure_demo_policy(policy))
    ref, tokenizer = load_causal_lm(policy, torch.device("cpu"))
    ref.eval()
    params = matmul_params(ref)
    train_instructions = demo_tasks.make_prompts(1024, seed=args.seed, split="train")
    heldout = demo_tasks.make_prompts(args.eval_prompts, seed=args.seed + 1, split="heldout")
    prompt_tokens = sum(len(tokenizer(format_prompt(i))["input_ids"]) for i in train_instructions) / len(
        train_instructions
    )
    evaluator = Evaluator(ref, tokenizer, heldout, demo_tasks.RULE_JUDGES[args.judge], args)
    peak = gemm_peak_flops()
    print(
        f"# policy {policy}: {params / 1e6:.2f}M matmul params; mean prompt {prompt_tokens:.1f} tokens; "
        f"{args.steps} x {args.batch_size} episodes; beta {args.beta}; lr {args.lr}; judge {args.judge}; "
        f"threads {args.threads}; fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s",
        flush=True,
    )

    sft = evaluator(ref)
    results = {}
    workdir = Path(tempfile.mkdtemp(prefix="policy_vs_trl-"))
    try:
        if args.only != "trl":
            results["ours (PPO)"] = run_ours(
                policy, train_instructions, workdir / "ours", args, evaluator, prompt_tokens, params
            )
            print(f"# ours done in {results['ours (PPO)']['seconds']:.1f} s", flush=True)
        if args.only != "ours":
            results["TRL RLOO"] = run_trl(
                policy, train_instructions, workdir / "trl", args, evaluator, prompt_tokens, params
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.only:
        print_curves(results, sft, args)
        print(json.dumps({"sft": sft, "only": args.only, **print_table(results, sft, peak)}))
        return
    ours, trl = results["ours (PPO)"], results["TRL RLOO"]

    print_curves(results, sft, args)

    ours_final, trl_final = ours["curve"][-1][1], trl["curve"][-1][1]
    ours_points = [(0.0, sft["judge"])] + [(e["kl"], e["judge"]) for _, e in ours["curve"]]
    trl_points = [(0.0, sft["judge"])] + [(e["kl"], e["judge"]) for _, e in trl["curve"]]
    ours_at_trl_kl = interpolate(ours_points, trl_final["kl"])
    trl_at_ours_kl = interpolate(trl_points, ours_final["kl"])
    print("\n# equal KL")
    if ours_at_trl_kl is not None:
        print(
            f"at TRL's final KL {trl_final['kl']:.2f}: "
            f"ours {ours_at_trl_kl:.3f} vs TRL {trl_final['judge']:.3f}"
        )
    if trl_at_ours_kl is not None:
        print(
            f"at our final KL {ours_final['kl']:.2f}: "
            f"ours {ours_final['judge']:.3f} vs TRL {trl_at_ours_kl:.3f}"
        )

    summary = {"sft": sft, **print_table(results, sft, peak)}
    ratio = summary["ours (PPO)"]["episodes_per_s"] / summary["TRL RLOO"]["episodes_per_s"]
    print(f"\nepisodes/s ours / TRL: {ratio:.2f}x (target 1.5x)")
    summary.update(
        {
            "ratio_episodes_per_s": ratio,
            "ours_judge_at_trl_kl": ours_at_trl_kl,
            "trl_judge_at_our_kl": trl_at_ours_kl,
            "gemm_peak_gflops": peak / 1e9,
            "ours_settings": args.ours,
        }
    )
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
