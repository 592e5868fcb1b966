"""GRPO against one or more reward sources: group-relative advantages, no critic.

Shao et al. 2024 (DeepSeekMath, §4.1, Algorithm 1), with RLOO's leave-one-out baseline (Ahmadian et al. 2024,
"Back to Basics") as an option. Each step of main() samples samples_per_prompt responses per prompt
(rollouts.sample_groups), scores them (reward.CombinedReward: reward models and rule judges), takes each
response's advantage from its group's scores, and makes num_iterations passes of the clipped policy-ratio
loss with a k3 KL term to the frozen reference (or the KL in the reward instead); its numbered comments cite
each step. grpo_loss() equals TRL 1.16 GRPOTrainer's loss_type="grpo" on the same batch
(tests/test_engine_grpo.py). This module never imports Django.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.engine.checkpoints import (
    resumable_state,
    resume_dir,
    resume_source,
    save_checkpoint,
    weights_source,
)
from training.engine.cli import run_cli
from training.engine.common import (
    EngineError,
    MemoryArgs,
    ProgressFn,
    Prompt,
    adam_class,
    adapters_off,
    entropy_from_logits,
    forward_response,
    no_progress,
    render_prompt,
    rng_state,
    set_rng_state,
    set_seed,
    trim_padding,
)
from training.engine.common import step_generator as _step_generator
from training.engine.data import read_prompts
from training.engine.ranks import Ranks
from training.engine.reward import CombinedReward, RewardFn, check_reward_sources
from training.engine.rollouts import (
    Rollouts,
    check_context,
    leave_one_out,
    load_policy_and_reference,
    local_minibatches,
    penalised_scores,
    place,
    report_step,
    sample_groups,
)
from training.engine.sources import RewardMixArgs

STAGE = "grpo"
BASELINES = ("group", "rloo")
STD_EPS = 1e-4  # added to a group's std before dividing by it (TRL GRPOTrainer's value)


@dataclass
class GRPOArgs(RewardMixArgs, MemoryArgs):
    """Settings of one GRPO run; defaults from Shao et al. 2024 and TRL 1.16 GRPOConfig, as each field says."""

    policy: str = ""
    """Causal LM to train (save_pretrained directory or hub name in the local cache)."""
    ref_policy: str | None = None
    """Frozen KL reference; None: the starting policy (Shao et al. 2024), under LoRA with adapters off."""
    reward_models: list[str] = field(default_factory=list)
    """Reward sources: reward-model checkpoint paths, or "rule:NAME" for a rule judge of demo_tasks."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward source (empty: all 1.0), summed before the group normalisation (TRL's default)."""
    prompts: str | list[Prompt] = ""
    """JSONL with a "prompt" (text or chat turns; or "instruction"/"input") per line, text lines or a list."""
    system_prompt: str = ""
    """System turn before each prompt without one (chat models; else before the instruction template)."""
    stop_strings: list[str] = field(default_factory=list)
    """Texts that end a response besides the model's end-of-turn tokens; none by default."""
    out: str = "var/models/grpo-policy"
    """Directory of the final policy; the resumable checkpoint goes to `<out>.resume/`."""
    steps: int = 30
    """GRPO iterations (sampling + optimisation); 30, PPOArgs' default, so a round costs about the same."""
    batch_size: int = 64
    """Responses per step, samples_per_prompt of each prompt (Shao et al.: 1024; PPOArgs' 64 here)."""
    samples_per_prompt: int = 8
    """Group size G: responses per prompt, normalised against each other (TRL GRPOConfig num_generations 8)."""
    mini_batch_size: int | None = None
    """Responses per gradient step; None: the whole batch, one update per batch (Shao et al. 2024)."""
    generation_batch_size: int = 64
    """Sequences sampled (and scored without gradients) together; 64, the default batch, in one pass."""
    num_iterations: int = 1
    """Passes over each batch, mu of Shao et al. Algorithm 1 (1 there and in TRL GRPOConfig)."""
    lr: float = 1e-4
    """AdamW learning rate (Shao et al. 1e-6 for 7B; TRL 1e-6); 1e-4 as PPO's: benchmarks/README.md#ppo-defaults."""
    beta: float = 0.04
    """KL coefficient (Shao et al. 2024 §4.2: 0.04; TRL 1.16 GRPOConfig defaults to 0.0, no reference)."""
    kl_in_reward: bool = False
    """Subtract beta x the response's KL (k1) from its score instead of the k3 term in the loss (PPO's way)."""
    epsilon: float = 0.2
    """Ratio clip epsilon (Schulman et al. 2017; Shao et al. 2024 and TRL GRPOConfig: 0.2)."""
    baseline: str = "group"
    """group: each score less its group's mean (Shao et al. 2024); rloo: less the others' mean (Ahmadian et al.)."""
    scale_rewards: bool = True
    """Divide by the group's std (Shao et al. 2024; TRL scale_rewards="group"); off as Dr. GRPO (Liu et al. 2025)."""
    max_grad_norm: float = 1.0
    """Global gradient norm clip (TRL / transformers TrainingArguments default 1.0)."""
    max_new_tokens: int = 48
    """Response length cap, as PPOArgs (the demo tasks' answers need < 40 tokens)."""
    temperature: float = 1.0
    """Sampling temperature, and logits / temperature when scoring (TRL GRPOConfig 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 samples the full distribution, which the likelihood ratio assumes (TRL 1.0)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of responses with no EOS; 0 as TRL GRPOConfig (which has no such penalty)."""
    seed: int = 0
    """Seed of prompts order, sampling and minibatch order (each step reseeded from it: resumable)."""
    save_every: int = 10
    """Write the resumable checkpoint every N steps (0: only when stopped)."""
    resume: bool = True
    """Continue from `<out>.resume/` when it exists."""
    resume_from: str = ""
    """Resumable checkpoint to continue from when `<out>.resume/` has none (an earlier attempt's)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """Compute dtype: auto (fp32 on CPU, bf16 autocast on CUDA), fp32, bf16, fp16. Trained weights: fp32."""


def group_advantages(scores: torch.Tensor, group: int, baseline: str, scale: bool) -> torch.Tensor:
    """Outcome supervision (Shao et al. 2024 §4.1.2): every token of response i gets A_i = (r_i - mean(r)) / std(r)
    over its group of `group` adjacent rows; with baseline rloo the mean leaves r_i out (Ahmadian et al. 2024).
    std is the unbiased one, plus STD_EPS, as TRL GRPOTrainer. (B,) -> (B,)."""
    grouped = scores.view(-1, group)  # (B / G, G)
    if baseline == "rloo":
        centred = leave_one_out(scores, group).view(-1, group)
    else:
        centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + STD_EPS)
    return centred.reshape(-1)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, epsilon: float, beta: float):
    """The GRPO objective (Shao et al. 2024, eq. 3), negated for gradient descent. logprobs, old_logprobs,
    ref_logprobs and mask (B, T); advantages (B,). Returns the loss and its terms (detached), for the metrics."""
    adv = advantages[:, None]  # (B, 1): one advantage for every token of a response
    # (1) The ratio pi_theta / pi_theta_old of each token (Schulman et al. 2017).
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    # (2) The clipped surrogate min(ratio A, clip(ratio, 1 - eps, 1 + eps) A).
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv
    surrogate = torch.min(unclipped, clipped)  # (B, T)
    # (3) KL to the reference by the k3 estimator, unbiased and positive (Shao et al. eq. 4; Schulman 2020,
    # "Approximating KL divergence"): pi_ref / pi_theta - log(pi_ref / pi_theta) - 1.
    if ref_logprobs is not None:
        log_ref_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (B, T)
    else:
        kl = torch.zeros_like(logprobs)
    per_token = -(surrogate - beta * kl)  # (B, T)
    # (4) 1/|o_i| sum over the tokens of each response, then 1/G sum over responses (eq. 3's two means).
    lengths = mask.sum(-1).clamp(min=1.0)  # (B,)
    loss = ((per_token * mask).sum(-1) / lengths).mean()

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        terms = {
            "policy_loss": -((surrogate * mask).sum(-1) / lengths).mean(),
            "token_kl": (kl * mask).sum() / tokens,  # k3 per token, as TRL logs "kl"
            "clipfrac": ((clipped < unclipped).float() * mask).sum() / tokens,  # clipped tokens, as TRL
        }
    return loss, terms


def _validate_args(args: GRPOArgs) -> None:
    if not args.policy:
        raise EngineError("no policy given: pass --policy PATH")
    positive = ("steps", "batch_size", "samples_per_prompt", "mini_batch_size", "generation_batch_size",
                "num_iterations", "max_new_tokens")
    for name in positive:
        value = getattr(args, name)
        if value is not None and int(value) < 1:  # None: the field's own meaning (mini_batch_size: all)
            raise EngineError(f"{name} must be at least 1, got {value}")
    if args.samples_per_prompt < 2:
        raise EngineError("samples_per_prompt must be at least 2: GRPO compares each response with its group")
    if args.batch_size % args.samples_per_prompt:
        raise EngineError(f"batch_size ({args.batch_size}) is not a multiple of samples_per_prompt "
                          f"({args.samples_per_prompt})")
    if args.mini_batch_size is not None and args.mini_batch_size > args.batch_size:
        raise EngineError(f"mini_batch_size ({args.mini_batch_size}) is larger than batch_size "
                          f"({args.batch_size})")
    if args.baseline not in BASELINES:
        raise EngineError(f"baseline must be one of {', '.join(BASELINES)}, got {args.baseline!r}")
    if args.temperature <= 0:
        raise EngineError(f"temperature must be positive, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1], got {args.top_p}")
    if args.beta < 0 or args.epsilon <= 0:
        raise EngineError(f"beta must be at least 0 and epsilon positive, got {args.beta} and {args.epsilon}")


RESUME_KEYS = ("policy", "ref_policy", "seed", "batch_size", "samples_per_prompt", "mini_batch_size", "prompts",
               "lora_r", "lora_target_modules")
"""Settings a resumable checkpoint must share with the run it continues (checkpoints.resumable_state)."""


@dataclass
class Setup:
    """What GRPO's loop works with, built once by setup(): the settings, the models, the optimizer and the
    state that a resumable checkpoint carries (the step, the last metrics)."""

    args: GRPOArgs
    ranks: Ranks
    autocast_dtype: torch.dtype | None
    formatted: list[str]  # the prompts as the policy sees them
    instructions: list[Prompt]  # the prompts as the reward sources see them
    recorded_args: GRPOArgs  # args as a checkpoint's JSON records them (prompts by count and hash)
    data_version: str
    checkpoint: Path  # `<out>.resume/`
    policy: nn.Module
    tokenizer: Any
    ref_policy: nn.Module | None  # None when beta is 0: no KL, no reference
    reward: CombinedReward
    params: list[nn.Parameter]  # everything the update trains, for the gradient clip
    optimizer: torch.optim.Optimizer
    reuse_rollout_logprobs: bool
    start_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    trained_policy: nn.Module | None = None  # the policy as Accelerate wraps it for the update


@dataclass
class Batch(Rollouts):
    """One step's groups of responses, filled in phase by phase: sampled (rollout), scored (score), with their
    log-probs and advantages (advantages). Rows are this process's share of the global batch."""

    old_logprobs: torch.Tensor | None = None  # (B, Tr) under the policy that sampled them
    ref_logprobs: torch.Tensor | None = None  # (B, Tr) under the reference (None without KL)
    kl: torch.Tensor | None = None  # (B,) k1 estimate of KL(pi || ref) per response, nats
    rewards: torch.Tensor | None = None  # (B,) what the groups compare: the score, less the KL with kl_in_reward
    advantages: torch.Tensor | None = None  # (B,)


def setup(args: GRPOArgs, on_progress: ProgressFn, reward_fn: RewardFn | None) -> Setup:
    """Check everything before the first step, load the models, build the optimizer and, when a resumable
    checkpoint may continue this run, take its weights, optimizer and RNG state."""
    _validate_args(args)
    prompts = read_prompts(args.prompts)
    weights = check_reward_sources(args.reward_models, args.reward_weights, reward_fn is not None, args)
    ranks, compute_dtype, autocast_dtype = place(args)
    device = ranks.device

    checkpoint = resume_dir(args.out)
    data_version = hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()[:16]
    # The checkpoint's JSON names the prompts by count and hash, not by listing them all.
    recorded_args = (
        args
        if isinstance(args.prompts, str)
        else replace(args, prompts=f"<{len(prompts)} prompts, sha256 {data_version}>")
    )
    source = resume_source(args.out, args.resume, args.resume_from)
    state = resumable_state(source, stage=STAGE, args=recorded_args, keys=RESUME_KEYS, data_version=data_version)
    source = source if state is not None else None

    set_seed(args.seed)
    policy, tokenizer, ref_policy = load_policy_and_reference(args, device, compute_dtype, weights_source(source))
    formatted = [render_prompt(tokenizer, ins, inp, args.system_prompt) for ins, inp in prompts]
    check_context(args, tokenizer, policy, formatted)
    reward = CombinedReward(args.reward_models, weights, device, reward_fn, args.system_prompt, args,
                            gather=lambda values: ranks.gather(values.to(device)).cpu())

    trained = [p for p in policy.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    # AdamW without weight decay, as TRL's trainers (transformers TrainingArguments: weight_decay 0, eps 1e-8).
    optimizer = adam_class(args, device)(trained, lr=args.lr, weight_decay=0.0, eps=1e-8)
    run = Setup(
        args=args, ranks=ranks, autocast_dtype=autocast_dtype, formatted=formatted,
        instructions=[p[0] for p in prompts], recorded_args=recorded_args, data_version=data_version,
        checkpoint=checkpoint, policy=policy, tokenizer=tokenizer, ref_policy=ref_policy if args.beta else None,
        reward=reward, params=trained, optimizer=optimizer,
        # In fp32 the sampler's log-probs are the rollout policy's (as PPO); under autocast they are recomputed.
        reuse_rollout_logprobs=autocast_dtype is None,
    )
    if state is not None:
        if "optimizer" in state:  # else in the checkpoint's shards, set after prepare
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        reward.load_state_dict(state.get("reward_stats") or {})
        run.start_step = int(state["step"])
        run.metrics = dict(state.get("metrics") or {})
        ranks.report(on_progress, {"stage": STAGE, "step": run.start_step, "total": args.steps,
                                   "metrics": run.metrics, "log": f"resuming from {source} at step {run.start_step}"})

    # Accelerate's wrapper (DDP) for the update; sampling and scoring use the model itself.
    run.trained_policy, run.optimizer = ranks.prepare(policy, optimizer)
    if state is not None:
        ranks.load_resumable(source, model=policy, optimizer=run.optimizer)
    run.params = [p for group in run.optimizer.param_groups for p in group["params"]]  # FSDP's shards
    return run


def rollout(run: Setup, step: int) -> Batch:
    """1. For each prompt q, a group of G = samples_per_prompt responses o_1..o_G from pi_theta_old (Algorithm 1)."""
    return sample_groups(run, step, Batch)


def score(run: Setup, batch: Batch) -> None:
    """2. The reward r_i of each response, from the reward models and rule judges, on decoded text."""
    started = time.perf_counter()
    penalised_scores(run, batch)  # (B,) less the missing-EOS penalty
    batch.seconds["reward"] = time.perf_counter() - started


@torch.no_grad()
def advantages(run: Setup, batch: Batch) -> None:
    """3. Log-probs of the responses under pi_theta_old and pi_ref. 4. With kl_in_reward, each reward less
    beta x its KL. 5. Group-relative advantages."""
    args, mask = run.args, batch.mask
    started = time.perf_counter()
    old_logprobs, ref_logprobs = [], []
    for start in range(0, len(batch.rows), args.generation_batch_size):
        sl = slice(start, start + args.generation_batch_size)
        chunk = (batch.query_ids[sl], batch.query_mask[sl], batch.response_ids[sl], batch.response_mask[sl])
        if not run.reuse_rollout_logprobs:
            old_logprobs.append(forward_response(run.policy, *chunk, args.temperature, run.autocast_dtype)[0])
        if run.ref_policy is not None:
            with adapters_off(run.ref_policy):
                ref_logprobs.append(forward_response(run.ref_policy, *chunk, args.temperature, run.autocast_dtype)[0])
    if old_logprobs:
        batch.old_logprobs = torch.cat(old_logprobs) * mask  # (B, Tr)
    else:
        batch.old_logprobs = batch.rollout.logprobs[:, : mask.shape[1]].to(run.ranks.device).float() * mask
    batch.rewards = batch.scores
    if ref_logprobs:
        batch.ref_logprobs = torch.cat(ref_logprobs) * mask  # (B, Tr)
        batch.kl = ((batch.old_logprobs - batch.ref_logprobs) * mask).sum(1)  # (B,) k1, as ppo/kl
        # 4. KL in the reward (Ziegler et al. 2019; PPO's way) instead of in the loss: r_i - beta KL_i.
        if args.kl_in_reward:
            batch.rewards = batch.scores - args.beta * batch.kl
    # 5. A_i from the rewards of its group (Shao et al. §4.1.2), the same for every token of o_i.
    batch.advantages = group_advantages(batch.rewards, args.samples_per_prompt, args.baseline, args.scale_rewards)
    batch.seconds["forward"] = time.perf_counter() - started


def update(run: Setup, batch: Batch, step: int) -> dict[str, float]:
    """6. num_iterations passes of the GRPO loss over shuffled minibatches (Algorithm 1's inner loop); returns
    the mean of each loss term over the minibatches, and the policy's entropy on its own samples."""
    args, ranks, device, rows = run.args, run.ranks, run.ranks.device, batch.rows
    started = time.perf_counter()
    stats: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "token_kl", "clipfrac")}
    entropy_sum, entropy_tokens = 0.0, 0.0
    beta_in_loss = 0.0 if args.kl_in_reward else args.beta
    order_gen = _step_generator(args.seed, step, 2, torch.device("cpu"))
    run.policy.train(args.gradient_checkpointing)
    for iteration in range(args.num_iterations):
        order = torch.randperm(args.batch_size, generator=order_gen).to(device)  # global rows, as with one process
        for mb, empty in local_minibatches(order, rows, args.mini_batch_size or args.batch_size):
            q_ids, q_mask, r_ids, r_mask = trim_padding(
                batch.query_ids[mb], batch.query_mask[mb], batch.response_ids[mb], batch.response_mask[mb]
            )
            tr = r_ids.shape[1]
            mb_mask = r_mask.float() * (not empty)  # (b, tr)
            logprobs, logits, _ = forward_response(
                run.trained_policy, q_ids, q_mask, r_ids, r_mask, args.temperature, run.autocast_dtype,
                # checkpointed blocks drop the shared cache; DDP allows one forward per backward
                share_prefix=not args.gradient_checkpointing and ranks.world == 1,
            )
            if iteration == 0:  # the policy's entropy on its own samples, read off the first pass
                with torch.no_grad():
                    entropy_sum += (entropy_from_logits(logits) * mb_mask).sum().item()
                    entropy_tokens += mb_mask.sum().item()
            ref = batch.ref_logprobs[mb, :tr] if batch.ref_logprobs is not None and beta_in_loss else None
            loss, terms = grpo_loss(logprobs, batch.old_logprobs[mb, :tr], ref, batch.advantages[mb], mb_mask,
                                    args.epsilon, beta_in_loss)
            # Several processes: the mean over the global minibatch's responses once DDP averages the gradients.
            responses = torch.tensor(float(0 if empty else mb.numel()), device=device)
            share = responses * ranks.world / ranks.sum(responses).clamp(min=1) if ranks.world > 1 else 1.0

            ranks.backward(loss * share)
            ranks.clip_grad_norm_(run.params, args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)  # freed now, not held through the next forward
            for name, value in (("loss", loss.detach()), *terms.items()):
                stats[name].append(value.item() if ranks.world == 1 else ranks.mean(value * share))

    run.policy.eval()
    batch.seconds["train"] = time.perf_counter() - started
    means = {name: sum(values) / len(values) for name, values in stats.items()}
    means["entropy"] = float(ranks.sum(entropy_sum)) / max(float(ranks.sum(entropy_tokens)), 1.0)
    return means


def log(run: Setup, batch: Batch, losses: dict[str, float], elapsed: float) -> dict[str, Any]:
    """The step's metrics over the global batch; keys PPO also reports (reward, score, kl, entropy, clipfrac,
    response_length, eos_rate, samples_per_second, the phases' seconds) mean the same under grpo/."""
    args, ranks, mask, beta = run.args, run.ranks, batch.mask, run.args.beta
    scores = ranks.gather(batch.scores)
    group_std = ranks.gather(batch.rewards.view(-1, args.samples_per_prompt).std(1))  # (B / G,)
    kl = ranks.gather(batch.kl) if batch.kl is not None else torch.zeros_like(scores)
    seconds = batch.seconds
    metrics = {
        "grpo/reward": ranks.gather(batch.raw_scores).mean().item(),
        "grpo/score": scores.mean().item(),
        "grpo/rlhf_reward": (scores - beta * kl).mean().item(),
        "grpo/reward_std": group_std.mean().item(),  # within a group: what the advantages divide by
        "grpo/zero_std_fraction": (group_std < 1e-6).float().mean().item(),  # groups that teach nothing
        "grpo/kl": kl.mean().item(),  # nats per response (k1 on the samples), as ppo/kl
        "grpo/kl_coef": beta,
        "grpo/token_kl": losses["token_kl"],  # the loss's k3 term per token
        "grpo/loss": losses["loss"],
        "grpo/policy_loss": losses["policy_loss"],
        "grpo/clipfrac": losses["clipfrac"],
        "grpo/entropy": losses["entropy"],
        "grpo/response_length": ranks.gather(mask.sum(1)).mean().item(),
        "grpo/eos_rate": ranks.gather(batch.ended.float()).mean().item(),
        "grpo/samples_per_second": args.batch_size / elapsed,
        "grpo/generate_seconds": seconds["generate"],
        "grpo/reward_seconds": seconds["reward"],
        "grpo/forward_seconds": seconds["forward"],
        "grpo/train_seconds": seconds["train"],
        "grpo/step_seconds": elapsed,
    }
    if len(batch.score_parts) > 1:
        metrics.update({f"grpo/reward/{name}": ranks.mean(value) for name, value in batch.score_parts.items()})
    return metrics


def save_resume(run: Setup, step: int) -> None:
    """Write the resumable checkpoint at `<out>.resume/`: policy (or its adapter), optimizer, RNG, step (every
    process: under FSDP each writes its shards)."""
    run.ranks.save_resumable(
        run.checkpoint, model=run.policy, tokenizer=run.tokenizer, optimizer=run.optimizer, stage=STAGE,
        args=run.recorded_args, step=step, metrics=run.metrics, data_version=run.data_version,
        trainer_state={"rng": rng_state(), "step": step, "reward_stats": run.reward.state_dict(),
                       "metrics": run.metrics},
    )


def report(run: Setup, step: int, on_progress: ProgressFn) -> None:
    """Tell on_progress about the step; save the resumable checkpoint every save_every steps, and before an
    exception from on_progress (unless StopWithoutSaving: the run was taken away)."""
    report_step(run, step, on_progress, STAGE, save_resume)


def main(
    args: GRPOArgs, on_progress: ProgressFn = no_progress, reward_fn: RewardFn | None = None
) -> dict[str, Any]:
    """Run GRPO; return the final metrics. Saves the policy at args.out and, while running, a resumable
    checkpoint at `<out>.resume/` (every save_every steps, and before an exception from on_progress)."""
    run = setup(args, on_progress, reward_fn)
    for step in range(run.start_step, args.steps):
        started = time.perf_counter()
        batch = rollout(run, step)
        score(run, batch)
        advantages(run, batch)
        losses = update(run, batch, step)
        run.metrics = log(run, batch, losses, time.perf_counter() - started)
        report(run, step, on_progress)

    # ---- the final policy -------------------------------------------------------------------------
    trained = run.ranks.trained_model(run.policy, run.tokenizer)  # every process gathers its shards under FSDP
    if run.ranks.main:
        save_checkpoint(
            args.out, stage=STAGE, args=run.recorded_args, step=args.steps, metrics=run.metrics,
            data_version=run.data_version, pretrained={"": trained},
        )
        shutil.rmtree(run.checkpoint, ignore_errors=True)  # finished: a later run starts afresh
    run.ranks.wait()
    return {**run.metrics, "grpo/rendered_prompt": run.formatted[0]}


def cli(argv: list[str] | None = None) -> int:
    return run_cli(GRPOArgs, main, argv, stage="grpo", required=("policy", "prompts", "out"),
                   flag_names={"reward_models": "reward-model", "reward_weights": "reward-weight",
                               "reward_names": "reward-name", "reward_roles": "reward-role",
                               "stop_strings": "stop-string"},
                   description="GRPO of a causal LM against reward models (paths or rule:NAME): group-relative "
                               "advantages, no critic.")


if __name__ == "__main__":
    raise SystemExit(cli())
