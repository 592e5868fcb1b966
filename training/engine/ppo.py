"""PPO against one or more reward models, with a per-token KL penalty to a frozen reference.

Ziegler et al. 2019, Stiennon et al. 2020 and Ouyang et al. 2022 (InstructGPT), with the details catalogued
by Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"), cited as [N+ §n], and TRL's PPOv2
conventions. Each step of main() samples samples_per_prompt responses per prompt (sample.generate), scores
them (reward.CombinedReward, less RLOO's leave-one-out baseline), adds a per-token KL penalty to the
reference, takes GAE advantages and makes ppo_epochs passes of the clipped losses; its numbered comments
cite each detail. The critic is a value head on the frozen reference's last hidden state, a
critic separate from the policy as in Stiennon et al. 2020 and [N+] (why, measured:
benchmarks/README.md#ppo-defaults). This module never imports Django.
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
from safetensors.torch import load_file, save_file
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
    RunningMoments,
    adam_class,
    adapters_off,
    entropy_from_logits,
    forward_response,
    masked_mean,
    masked_whiten,
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

STAGE = "ppo"
VALUE_HEAD_DIR = "value_head"
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PPOArgs(RewardMixArgs, MemoryArgs):
    """Settings of one PPO run; defaults fit the demo policy on a CPU (benchmarks/README.md#ppo-defaults)."""

    policy: str = ""
    """Causal LM to train (save_pretrained directory or hub name in the local cache)."""
    ref_policy: str | None = None
    """Frozen KL reference; None: the starting policy (Ziegler et al. 2019), under LoRA with adapters off."""
    reward_models: list[str] = field(default_factory=list)
    """Reward sources: reward-model checkpoint paths, or "rule:NAME" for a rule judge of demo_tasks."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward source (empty: all 1.0), e.g. quality + safety as in the seed material."""
    prompts: str | list[Prompt] = ""
    """JSONL with a "prompt" (text or chat turns; or "instruction"/"input") per line, text lines or a list."""
    system_prompt: str = ""
    """System turn before each prompt without one (chat models; else before the instruction template)."""
    stop_strings: list[str] = field(default_factory=list)
    """Texts that end a response besides the model's end-of-turn tokens; none by default."""
    out: str = "var/models/ppo-policy"
    """Directory of the final policy; the resumable checkpoint goes to `<out>.resume/`."""
    steps: int = 30
    """PPO iterations (rollout batch + optimisation); 30 as in benchmarks/README.md#policy-vs-trl."""
    batch_size: int = 64
    """Rollouts per step (TRL PPOv2 uses 64 per device x accumulation; Stiennon et al. 512)."""
    samples_per_prompt: int = 4
    """Responses per prompt, each baselined by the others' mean (RLOO): benchmarks/README.md#ppo-defaults."""
    mini_batch_size: int | None = None
    """Rollouts per gradient step; None: the whole batch, as RLOO (benchmarks/README.md#ppo-gae-lambda)."""
    generation_batch_size: int = 64
    """Sequences sampled (and scored without gradients) together; 64, the default batch, in one pass."""
    ppo_epochs: int = 1
    """Passes over each rollout batch; 1 as OpenRLHF (TRL PPOv2: 4); benchmarks/README.md#ppo-defaults."""
    lr: float = 1e-4
    """Adam learning rate (Stiennon et al. 2020: 1.5e-5 for 1.3B); 1e-4: benchmarks/README.md#ppo-defaults."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty, fixed as in Stiennon et al. 2020 (TRL PPOv2 kl_coef 0.05)."""
    gamma: float = 1.0
    """Discount; 1 for episodic text generation (Ziegler et al. 2019; [N+ §-PPO])."""
    lam: float = 1.0
    """GAE lambda; 1 as Ahmadian et al. 2024 (Back to Basics); benchmarks/README.md#ppo-gae-lambda."""
    cliprange: float = 0.2
    """PPO ratio clip epsilon (Schulman et al. 2017; TRL 0.2)."""
    cliprange_value: float = 0.2
    """Value clip around the rollout's values (OpenAI baselines ppo2; TRL 0.2)."""
    value_lr: float | None = 1e-3
    """Value head learning rate (None: lr); 1e-3 on frozen features (benchmarks/README.md#ppo-defaults)."""
    vf_coef: float = 0.1
    """Weight of the value loss on the shared trunk (TRL PPOv2 vf_coef 0.1)."""
    max_grad_norm: float = 1.0
    """Global gradient norm clip (TRL / transformers TrainingArguments default 1.0)."""
    max_new_tokens: int = 48
    """Response length cap (TL;DR [N+] uses 53; the demo tasks' answers need < 40 tokens)."""
    temperature: float = 0.7
    """Sampling temperature; logits are divided by it when scoring too ([N+ §... "temperature"]; TRL 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 samples the full distribution, which PPO's likelihood ratio assumes."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of responses with no EOS (TRL PPOv2; [N+] replaces such scores by -1)."""
    reward_norm: str = "running"
    """Score normalisation: running (mean / std of all scores so far, Ziegler et al. 2019) or none."""
    whiten_advantages: bool = True
    """Whiten the advantages of each batch to mean 0 / std 1 ([N+ §"advantage whitening"]; TRL PPOv2)."""
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


class ValueHead(nn.Module):
    """V(s_t) from the frozen reference's last hidden state: a linear layer (TRL's ValueHead, without dropout)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # Zero init of the output: the first advantages are the plain returns, no random critic noise.
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        return self.summary(hidden.float()).squeeze(-1)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()},
                  str(path / VALUE_HEAD_FILE))
        (path / "config.json").write_text(json.dumps({"hidden_size": self.summary.in_features}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ValueHead:
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        head = cls(int(config["hidden_size"]))
        head.load_state_dict(load_file(str(path / VALUE_HEAD_FILE)))
        return head


def per_token_rewards(kl: torch.Tensor, scores: torch.Tensor, response_mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """PPO's reward at each response token: -kl_coef times the token's KL to the reference (Ziegler et al.
    2019 eq. 1; Stiennon et al. 2020), plus the sequence's score at its last real token ([N+ §"reward at
    EOS"]). kl and response_mask (B, T), scores (B,) -> (B, T)."""
    rewards = -kl_coef * kl
    last = (response_mask.sum(1) - 1).clamp(min=0)  # (B,) index of the last real token
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens, all (B, T). Past the end
    mask, value and reward are 0, so the last real token bootstraps from 0 (the episode ends there).
    Returns advantages and returns = advantages + values (the critic's target, as in TRL / [N+])."""
    values = values * mask
    rewards = rewards * mask
    t_len = rewards.shape[1]
    advantages_reversed = []
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(t_len)):
        next_values = values[:, t + 1] if t + 1 < t_len else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = advantages + values
    return advantages * mask, returns * mask


def _validate_args(args: PPOArgs) -> None:
    if not args.policy:
        raise EngineError("no policy given: pass --policy PATH")
    positive = ("steps", "batch_size", "samples_per_prompt", "mini_batch_size", "generation_batch_size",
                "ppo_epochs", "max_new_tokens")
    for name in positive:
        value = getattr(args, name)
        if value is not None and int(value) < 1:  # None: the field's own meaning (mini_batch_size: all)
            raise EngineError(f"{name} must be at least 1, got {value}")
    if args.batch_size % args.samples_per_prompt:
        raise EngineError(f"batch_size ({args.batch_size}) is not a multiple of samples_per_prompt "
                          f"({args.samples_per_prompt})")
    if args.mini_batch_size is not None and args.mini_batch_size > args.batch_size:
        raise EngineError(f"mini_batch_size ({args.mini_batch_size}) is larger than batch_size "
                          f"({args.batch_size})")
    if args.temperature <= 0:
        raise EngineError(f"temperature must be positive, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1], got {args.top_p}")
    if args.reward_norm not in ("running", "none"):
        raise EngineError(f"reward_norm must be running or none, got {args.reward_norm!r}")


RESUME_KEYS = ("policy", "ref_policy", "seed", "batch_size", "samples_per_prompt", "mini_batch_size", "prompts",
               "lora_r", "lora_target_modules")
"""Settings a resumable checkpoint must share with the run it continues (checkpoints.resumable_state)."""


@dataclass
class Setup:
    """What PPO's loop works with, built once by setup(): the settings, the models, the optimizer and the
    state that a resumable checkpoint carries (score moments, the step, the last metrics)."""

    args: PPOArgs
    ranks: Ranks
    autocast_dtype: torch.dtype | None
    formatted: list[str]  # the prompts as the policy sees them
    instructions: list[Prompt]  # the prompts as the reward sources see them
    recorded_args: PPOArgs  # args as a checkpoint's JSON records them (prompts by count and hash)
    data_version: str
    checkpoint: Path  # `<out>.resume/`
    policy: nn.Module
    tokenizer: Any
    ref_policy: nn.Module
    value_head: ValueHead
    reward: CombinedReward
    params: list[nn.Parameter]  # everything the update trains, for the gradient clip
    optimizer: torch.optim.Optimizer
    reuse_rollout_logprobs: bool
    score_stats: RunningMoments = field(default_factory=RunningMoments)
    start_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    trained_policy: nn.Module | None = None  # the policy and value head as Accelerate wraps them for the update
    trained_head: nn.Module | None = None


@dataclass
class Batch(Rollouts):
    """One step's rollouts, filled in phase by phase: sampled (rollout), scored (score), with the critic's
    values and the advantages (advantages). Rows are this process's share of the global batch."""

    norm_scores: torch.Tensor | None = None  # (B,) baselined and normalised
    old_logprobs: torch.Tensor | None = None  # (B, Tr)
    old_values: torch.Tensor | None = None  # (B, Tr)
    ref_hidden: torch.Tensor | None = None  # (B, Tr, H) the critic's input
    kl_per_token: torch.Tensor | None = None  # (B, Tr)
    advantages: torch.Tensor | None = None  # (B, Tr)
    returns: torch.Tensor | None = None  # (B, Tr)


def setup(args: PPOArgs, on_progress: ProgressFn, reward_fn: RewardFn | None) -> Setup:
    """Check everything before the first step, load the models, build the optimizer and, when a resumable
    checkpoint may continue this run, take its weights, optimizer, score moments and RNG state."""
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
    saved = weights_source(source)  # None under a sharded checkpoint: its shards are set after prepare
    policy, tokenizer, ref_policy = load_policy_and_reference(args, device, compute_dtype, saved)
    formatted = [render_prompt(tokenizer, ins, inp, args.system_prompt) for ins, inp in prompts]
    check_context(args, tokenizer, policy, formatted)
    reward = CombinedReward(args.reward_models, weights, device, reward_fn, args.system_prompt, args,
                            gather=lambda values: ranks.gather(values.to(device)).cpu())

    hidden_size = ref_policy.get_output_embeddings().in_features
    value_head = (ValueHead.from_pretrained(saved / VALUE_HEAD_DIR) if saved else ValueHead(hidden_size)).to(device)
    trained = [p for p in policy.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    # Adam eps 1e-5 ([N+ §"Adam epsilon"], from Ziegler et al.'s lm-human-preferences).
    optimizer = adam_class(args, device, decoupled=False)(
        [
            {"params": trained},
            {"params": list(value_head.parameters()), "lr": args.value_lr or args.lr},
        ],
        lr=args.lr,
        eps=1e-5,
    )
    run = Setup(
        args=args, ranks=ranks, autocast_dtype=autocast_dtype, formatted=formatted,
        instructions=[p[0] for p in prompts], recorded_args=recorded_args, data_version=data_version,
        checkpoint=checkpoint, policy=policy, tokenizer=tokenizer, ref_policy=ref_policy, value_head=value_head,
        reward=reward, params=trained + list(value_head.parameters()), optimizer=optimizer,
        # The sampler's log-probs are those of the rollout policy (same arithmetic, 1e-6 apart in fp32),
        # so in fp32 we take them as the "old" log-probs instead of a second forward pass; under bf16/fp16
        # autocast the sampler's and the trainer's kernels differ more, and we recompute them, as [N+ §"re-
        # compute logprobs"] advises.
        reuse_rollout_logprobs=autocast_dtype is None,
    )
    if state is not None:
        if "optimizer" in state:  # else in the checkpoint's shards, set after prepare
            optimizer.load_state_dict(state["optimizer"])
        run.score_stats.load_state_dict(state["score_stats"])
        reward.load_state_dict(state.get("reward_stats") or {})
        set_rng_state(state["rng"])
        run.start_step = int(state["step"])
        run.metrics = dict(state.get("metrics") or {})
        ranks.report(
            on_progress,
            {
                "stage": STAGE,
                "step": run.start_step,
                "total": args.steps,
                "metrics": run.metrics,
                "log": f"resuming from {source} at step {run.start_step}",
            }
        )

    # Accelerate's wrappers (DDP, FSDP, DeepSpeed) for the update; sampling and scoring use the models themselves.
    run.trained_policy, run.trained_head, run.optimizer = ranks.prepare(policy, value_head, optimizer)
    if state is not None:
        ranks.load_resumable(source, model=policy, optimizer=run.optimizer, modules={VALUE_HEAD_DIR: value_head})
    run.params = [p for group in run.optimizer.param_groups for p in group["params"]]  # FSDP's shards
    return run


def rollout(run: Setup, step: int) -> Batch:
    """1. Rollouts: samples_per_prompt responses per prompt (adjacent), sampled with the KV cache, in
    chunks seeded by their place in the global batch: the same samples under any number of processes."""
    return sample_groups(run, step, Batch)


def score(run: Setup, batch: Batch) -> None:
    """2. Scores on decoded text, by each reward source with its own tokenizer; baselined and normalised."""
    args, ranks = run.args, run.ranks
    started = time.perf_counter()
    penalised_scores(run, batch)  # (B,) less the missing-EOS penalty
    group = args.samples_per_prompt
    baselined = leave_one_out(batch.scores, group) if group > 1 else batch.scores  # (B,)
    # Reward normalisation: Ziegler et al. 2019 scale the reward to mean 0, std 1; we keep running
    # moments over all scores seen (or per batch), so the KL coefficient means the same through training.
    if args.reward_norm == "running":
        run.score_stats.update(ranks.gather(baselined).cpu())
        batch.norm_scores = (baselined - run.score_stats.mean) / (run.score_stats.std + 1e-8)
    else:
        batch.norm_scores = baselined
    batch.seconds["reward"] = time.perf_counter() - started


@torch.no_grad()
def advantages(run: Setup, batch: Batch) -> None:
    """3. Log-probs of the rollout under the rollout policy and the reference; values V(s_t) of the critic.
    4. Per-token rewards (KL penalty plus the score at the last token) and their GAE advantages."""
    args, mask = run.args, batch.mask
    started = time.perf_counter()
    old_logprobs, old_values, ref_logprobs, ref_hidden = [], [], [], []
    for start in range(0, len(batch.rows), args.generation_batch_size):
        sl = slice(start, start + args.generation_batch_size)
        chunk = (batch.query_ids[sl], batch.query_mask[sl], batch.response_ids[sl], batch.response_mask[sl])
        if not run.reuse_rollout_logprobs:
            old_logprobs.append(forward_response(run.policy, *chunk, args.temperature, run.autocast_dtype)[0])
        with adapters_off(run.ref_policy):
            rlp, _, hidden = forward_response(
                run.ref_policy, *chunk, args.temperature, run.autocast_dtype, want_hidden=True
            )
        ref_logprobs.append(rlp)
        ref_hidden.append(hidden)
        old_values.append(run.value_head(hidden))  # (b, Tr)
    if old_logprobs:
        batch.old_logprobs = torch.cat(old_logprobs) * mask  # (B, Tr)
    else:
        batch.old_logprobs = batch.rollout.logprobs[:, : mask.shape[1]].to(run.ranks.device).float() * mask
    batch.old_values = torch.cat(old_values) * mask  # (B, Tr)
    ref_logprobs = torch.cat(ref_logprobs) * mask  # (B, Tr)
    batch.ref_hidden = torch.cat(ref_hidden)  # (B, Tr, H): the critic's input

    # 4. Per-token rewards: the KL penalty at each token plus the score at the last one.
    beta = args.kl_coef
    batch.kl_per_token = (batch.old_logprobs - ref_logprobs) * mask  # (B, Tr) k1 estimate of KL(pi || ref)
    rewards = per_token_rewards(batch.kl_per_token, batch.norm_scores, batch.response_mask, beta)  # (B, Tr)

    adv, batch.returns = compute_gae(rewards, batch.old_values, mask, args.gamma, args.lam)  # (B, Tr)
    # Advantage whitening over the batch ([N+ §"advantage whitening"]; TRL PPOv2).
    if args.whiten_advantages:
        adv = masked_whiten(adv, mask) if run.ranks.world == 1 else run.ranks.whiten(adv, mask)
    batch.advantages = adv
    batch.seconds["forward"] = time.perf_counter() - started


def update(run: Setup, batch: Batch, step: int) -> dict[str, float]:
    """5. Several epochs of clipped PPO over shuffled minibatches; returns the mean of each loss statistic
    over the minibatches, and the policy's entropy on its own samples."""
    args, ranks, device, rows = run.args, run.ranks, run.ranks.device, batch.rows
    started = time.perf_counter()
    stats: dict[str, list[float]] = {
        k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl")
    }
    entropy_sum, entropy_tokens = 0.0, 0.0
    order_gen = _step_generator(args.seed, step, 2, torch.device("cpu"))
    minibatch = args.mini_batch_size or args.batch_size
    run.policy.train(args.gradient_checkpointing)
    for epoch in range(args.ppo_epochs):
        order = torch.randperm(args.batch_size, generator=order_gen).to(device)  # global rows, as with one process
        for mb, empty in local_minibatches(order, rows, minibatch):
            q_ids, q_mask, r_ids, r_mask = trim_padding(
                batch.query_ids[mb], batch.query_mask[mb], batch.response_ids[mb], batch.response_mask[mb]
            )
            tr = r_ids.shape[1]
            mb_mask = r_mask.float() * (not empty)  # (b, tr)
            mb_old_logprobs, mb_old_values = batch.old_logprobs[mb, :tr], batch.old_values[mb, :tr]
            mb_adv, mb_returns = batch.advantages[mb, :tr], batch.returns[mb, :tr]

            new_logprobs, logits, _ = forward_response(
                run.trained_policy,
                q_ids,
                q_mask,
                r_ids,
                r_mask,
                args.temperature,
                run.autocast_dtype,
                # checkpointed blocks drop the shared cache; DDP allows one forward per backward
                share_prefix=not args.gradient_checkpointing and ranks.world == 1,
            )
            new_values = run.trained_head(batch.ref_hidden[mb, :tr])  # (b, tr)
            if epoch == 0:  # the policy's entropy on its own samples, read off the first pass
                with torch.no_grad():
                    entropy_sum += (entropy_from_logits(logits) * mb_mask).sum().item()
                    entropy_tokens += mb_mask.sum().item()
            # Clipped value loss (OpenAI baselines ppo2; [N+ §"value clipping"]).
            values_clipped = mb_old_values + torch.clamp(
                new_values - mb_old_values, -args.cliprange_value, args.cliprange_value
            )
            vf_losses1 = (new_values - mb_returns) ** 2
            vf_losses2 = (values_clipped - mb_returns) ** 2
            vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mb_mask)
            # Clipped surrogate objective (Schulman et al. 2017, eq. 7).
            log_ratio = (new_logprobs - mb_old_logprobs) * mb_mask
            ratio = torch.exp(log_ratio)
            pg_losses1 = -mb_adv * ratio
            pg_losses2 = -mb_adv * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
            pg_loss = masked_mean(torch.max(pg_losses1, pg_losses2), mb_mask)
            loss = pg_loss + args.vf_coef * vf_loss
            # Several processes: token means over the global minibatch once DDP averages the gradients.
            share = mb_mask.sum() * ranks.world / ranks.sum(mb_mask.sum()) if ranks.world > 1 else 1.0

            ranks.backward(loss * share)
            ranks.clip_grad_norm_(run.params, args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)  # freed now, not held through the next forward

            with torch.no_grad():
                for name, value in (
                    ("pg_loss", pg_loss),
                    ("vf_loss", vf_loss),
                    ("clipfrac", masked_mean((pg_losses2 > pg_losses1).float(), mb_mask)),
                    ("vf_clipfrac", masked_mean((vf_losses2 > vf_losses1).float(), mb_mask)),
                    # Schulman's k2 estimate of KL(old || new) over the update (TRL PPOv2 approxkl).
                    ("approx_kl", 0.5 * masked_mean(log_ratio**2, mb_mask)),
                ):
                    stats[name].append(value.item() if ranks.world == 1 else ranks.mean(value * share))

    run.policy.eval()
    batch.seconds["train"] = time.perf_counter() - started
    means = {name: sum(values) / len(values) for name, values in stats.items()}
    means["entropy"] = float(ranks.sum(entropy_sum)) / max(float(ranks.sum(entropy_tokens)), 1.0)
    return means


def log(run: Setup, batch: Batch, losses: dict[str, float], elapsed: float) -> dict[str, Any]:
    """The step's metrics, over the global batch: scores, KL, the update's statistics and the phases' times."""
    args, ranks, mask, beta = run.args, run.ranks, batch.mask, run.args.kl_coef
    with torch.no_grad():
        flat_returns = ranks.gather(batch.returns[mask.bool()])
        flat_values = ranks.gather(batch.old_values[mask.bool()])
        var_returns = flat_returns.var(unbiased=False)
        explained_variance = (
            (1 - (flat_returns - flat_values).var(unbiased=False) / var_returns).item()
            if var_returns > 0
            else float("nan")
        )
    seconds = batch.seconds
    metrics = {
        "ppo/reward": ranks.gather(batch.raw_scores).mean().item(),
        "ppo/score": ranks.gather(batch.scores).mean().item(),
        "ppo/rlhf_reward": ranks.gather(batch.scores - beta * batch.kl_per_token.sum(1)).mean().item(),
        "ppo/kl": ranks.gather(batch.kl_per_token.sum(1)).mean().item(),  # nats per response
        "ppo/kl_coef": beta,
        "ppo/entropy": losses["entropy"],
        "ppo/clipfrac": losses["clipfrac"],
        "ppo/value_clipfrac": losses["vf_clipfrac"],
        "ppo/approx_kl": losses["approx_kl"],
        "ppo/value_loss": losses["vf_loss"],
        "ppo/policy_loss": losses["pg_loss"],
        "ppo/explained_variance": explained_variance,
        "ppo/response_length": ranks.gather(mask.sum(1)).mean().item(),
        "ppo/eos_rate": ranks.gather(batch.ended.float()).mean().item(),
        "ppo/samples_per_second": args.batch_size / elapsed,
        "ppo/generate_seconds": seconds["generate"],
        "ppo/reward_seconds": seconds["reward"],
        "ppo/forward_seconds": seconds["forward"],
        "ppo/train_seconds": elapsed - (seconds["generate"] + seconds["reward"] + seconds["forward"]),
        "ppo/step_seconds": elapsed,
    }
    if len(batch.score_parts) > 1:
        metrics.update({f"ppo/reward/{name}": ranks.mean(value) for name, value in batch.score_parts.items()})
    return metrics


def save_resume(run: Setup, step: int) -> None:
    """Write the resumable checkpoint at `<out>.resume/`: policy, value head, optimizer, score moments, RNG (every
    process: under FSDP each writes its shards)."""
    run.ranks.save_resumable(
        run.checkpoint,
        model=run.policy,
        tokenizer=run.tokenizer,
        optimizer=run.optimizer,
        modules={VALUE_HEAD_DIR: run.value_head},
        stage=STAGE,
        args=run.recorded_args,
        step=step,
        metrics=run.metrics,
        data_version=run.data_version,
        trainer_state={
            "score_stats": run.score_stats.state_dict(),
            "reward_stats": run.reward.state_dict(),
            "rng": rng_state(),
            "step": step,
            "metrics": run.metrics,
        },
    )


def report(run: Setup, step: int, on_progress: ProgressFn) -> None:
    """Tell on_progress about the step; save the resumable checkpoint every save_every steps, and before an
    exception from on_progress (unless StopWithoutSaving: the run was taken away)."""
    report_step(run, step, on_progress, STAGE, save_resume)


def main(
    args: PPOArgs, on_progress: ProgressFn = no_progress, reward_fn: RewardFn | None = None
) -> dict[str, Any]:
    """Run PPO; return the final metrics. Saves the policy at args.out and, while running, a resumable
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
    head = run.ranks.saveable(run.value_head)
    if run.ranks.main:
        save_checkpoint(
            args.out,
            stage=STAGE,
            args=run.recorded_args,
            step=args.steps,
            metrics=run.metrics,
            data_version=run.data_version,
            pretrained={"": trained, VALUE_HEAD_DIR: head},
        )
        shutil.rmtree(run.checkpoint, ignore_errors=True)  # finished: a later run starts afresh
    run.ranks.wait()
    return {**run.metrics, "ppo/rendered_prompt": run.formatted[0]}


def cli(argv: list[str] | None = None) -> int:
    return run_cli(PPOArgs, main, argv, stage="ppo", required=("policy", "prompts", "out"),
                   flag_names={"reward_models": "reward-model", "reward_weights": "reward-weight",
                               "reward_names": "reward-name", "reward_roles": "reward-role",
                               "stop_strings": "stop-string"},
                   description="PPO of a causal LM against reward models (paths or rule:NAME) with a KL penalty.")


if __name__ == "__main__":
    raise SystemExit(cli())
