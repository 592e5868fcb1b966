"""What the on-policy stages (PPO, GRPO) share: placing the run, loading the policy and its frozen
reference, sampling a step's groups of responses, scoring them with the missing-EOS penalty, and RLOO's
leave-one-out baseline. Each stage's own phases (advantages, update) stay in its module.

Plain Python over torch and transformers; this package never imports Django.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.engine.checkpoints import report_and_save
from training.engine.common import (
    ADAPTER_DIR,
    EngineError,
    ProgressFn,
    Prompt,
    adam_class,
    apply_lora,
    base_dtype,
    enable_memory_switches,
    encode_prompts,
    load_causal_lm,
    pick_device,
    pick_dtype,
    stop_token_ids,
    trim_padding,
)
from training.engine.common import context_length as _context_length
from training.engine.common import step_generator as _step_generator
from training.engine.data import prompt_indices as _prompt_indices
from training.engine.ranks import Ranks


@dataclass
class Rollouts:
    """One step's sampled responses, samples_per_prompt adjacent rows per prompt; a stage's batch extends it with
    what its later phases fill in. Rows are this process's share of the global batch."""

    rows: list[int]
    instructions: list[Prompt]
    rollout: Any  # sample.Rollout
    query_ids: torch.Tensor  # (B, Tq)
    query_mask: torch.Tensor  # (B, Tq)
    response_ids: torch.Tensor  # (B, Tr)
    response_mask: torch.Tensor  # (B, Tr)
    mask: torch.Tensor  # (B, Tr) float, 1 for real tokens incl. EOS
    ended: torch.Tensor  # (B,) bool
    raw_scores: torch.Tensor | None = None  # (B,) the reward sources' combined score
    score_parts: dict[str, Any] = field(default_factory=dict)
    scores: torch.Tensor | None = None  # (B,) less the missing-EOS penalty
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase


def leave_one_out(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Each score minus the mean of the other scores of its group (adjacent runs of `group`): RLOO's
    baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"). (B,) -> (B,)."""
    grouped = scores.view(-1, group)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    return (grouped - baseline).view(-1)


def place(args) -> tuple[Ranks, torch.dtype, torch.dtype | None]:
    """The processes, the compute dtype and the autocast dtype (None: plain fp32), checked before loading."""
    ranks = Ranks(pick_device(args.device), fsdp=args.fsdp)
    ranks.check_divides("batch_size", args.batch_size)
    if (args.batch_size // ranks.world) % args.samples_per_prompt:
        raise EngineError(f"with {ranks.world} processes, batch_size / {ranks.world} must be a multiple of "
                          f"samples_per_prompt ({args.samples_per_prompt})")
    device = ranks.device
    compute_dtype = pick_dtype(device, args.dtype)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    adam_class(args, device)  # refuses adam_8bit where it cannot run, before loading anything
    if autocast_dtype is not None and device.type == "cpu":
        autocast_dtype = None  # fp32 on CPU
    return ranks, compute_dtype, autocast_dtype


def load_policy_and_reference(args, device: torch.device, compute_dtype: torch.dtype, source: Path | None):
    """The policy (from `source` when resuming), its tokenizer and the frozen reference."""
    # Trained weights stay fp32 (autocast on CUDA); the reference, and a LoRA policy's frozen base on CUDA, may live
    # in the compute dtype. A LoRA run resumes its adapter on the base it started from.
    resuming = source is not None
    policy, tokenizer = load_causal_lm(str(source) if resuming and not args.lora_r else args.policy, device,
                                       base_dtype(args, device, compute_dtype), start=args.policy)
    policy = apply_lora(enable_memory_switches(policy, args), args, "CAUSAL_LM",
                        source / ADAPTER_DIR if resuming and args.lora_r else None)
    ref_source = args.ref_policy or args.policy
    if args.lora_r and not args.ref_policy:
        ref_policy = policy  # the same base with its adapters switched off (adapters_off): no second copy
    elif resuming or args.ref_policy:
        ref_policy, ref_tokenizer = load_causal_lm(ref_source, device, compute_dtype)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise EngineError(
                f"reference policy {ref_source!r} has another tokenizer than the policy: "
                "the per-token KL needs the same vocabulary"
            )
    else:
        ref_policy = copy.deepcopy(policy).to(compute_dtype)
    if not stop_token_ids(tokenizer, policy):
        raise EngineError(
            f"the policy ({args.policy!r}) names no eos token, in its tokenizer or its generation config: "
            "responses could never end"
        )
    # Dropout off in every model ([N+ §"disable dropout"]; Ziegler et al. 2019): eval() everywhere,
    # gradients still flow. Otherwise the logprobs of the rollout and of the update disagree at ratio 1.
    policy.eval()
    ref_policy.eval()
    if ref_policy is not policy:
        ref_policy.requires_grad_(False)
    if args.gradient_checkpointing:  # transformers checkpoints in train mode only: dropout goes off another way
        for module in policy.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return policy, tokenizer, ref_policy


def check_context(args, tokenizer, policy, formatted: list[str]) -> None:
    """Every prompt plus max_new_tokens fits the policy's context."""
    context = _context_length(policy)
    if context is None:
        return
    for number, ids in enumerate(encode_prompts(tokenizer, formatted), 1):
        length = len(ids)
        if length + args.max_new_tokens > context:
            raise EngineError(
                f"prompt {number} is {length} tokens; with max_new_tokens={args.max_new_tokens} "
                "it exceeds the "
                f"policy's context of {context} tokens: shorten it or lower max_new_tokens"
            )


def sample_groups(run, step: int, batch_class: type[Rollouts] = Rollouts) -> Rollouts:
    """samples_per_prompt responses per prompt (adjacent), sampled with the KV cache, in chunks seeded by their
    place in the global batch: the same samples under any number of processes. `run` is a stage's Setup."""
    from training.engine.sample import Rollout, generate

    args, device, group = run.args, run.ranks.device, run.args.samples_per_prompt
    started = time.perf_counter()
    batch_idx = [
        i for i in _prompt_indices(len(run.formatted), args.batch_size // group, step, args.seed) for _ in range(group)
    ]
    rows = run.ranks.shard(range(len(batch_idx)))  # this process's rows of the global batch
    with (
        torch.no_grad(),
        run.ranks.unsharded(run.policy),  # under FSDP one all-gather per rollout batch, none per token
        torch.autocast(
            device_type=device.type,
            dtype=run.autocast_dtype or torch.float32,
            enabled=run.autocast_dtype is not None,
        ),
    ):
        chunks = [rows[c : c + args.generation_batch_size] for c in range(0, len(rows), args.generation_batch_size)]
        sampled = Rollout.concat([
            generate(
                run.policy,
                run.tokenizer,
                [run.formatted[batch_idx[i]] for i in chunk],
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                batch_size=args.generation_batch_size,
                generator=_step_generator(args.seed, step, 1 + 1009 * chunk[0], device),
                stop_strings=args.stop_strings,
            )
            for chunk in chunks
        ], run.tokenizer.pad_token_id)
    query_ids, query_mask, response_ids, response_mask = trim_padding(
        sampled.query_ids.to(device),
        sampled.query_mask.to(device),
        sampled.response_ids.to(device),
        sampled.response_mask.to(device),
    )
    return batch_class(
        rows=rows, instructions=[run.instructions[batch_idx[i]] for i in rows], rollout=sampled,
        query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
        mask=response_mask.float(), ended=sampled.ended.to(device).bool(),
        seconds={"generate": time.perf_counter() - started},
    )


def penalised_scores(run, batch: Rollouts) -> None:
    """The reward sources' scores on decoded text (each with its own tokenizer), less the missing-EOS penalty."""
    raw_scores, batch.score_parts = run.reward(batch.instructions, list(batch.rollout.texts))  # (B,)
    batch.raw_scores = raw_scores.to(run.ranks.device)
    # Missing-EOS penalty (TRL PPOv2 missing_eos_penalty; [N+ §"EOS trick"]): a response cut off
    # at max_new_tokens (no end-of-turn token, no stop string: sample.generate's rule) is worse than any finished one.
    batch.scores = batch.raw_scores - run.args.missing_eos_penalty * (~batch.ended).float()  # (B,)


def local_minibatches(order: torch.Tensor, rows: list[int], minibatch: int):
    """This process's rows (indices into its batch) of each global minibatch of `order`, with whether it has
    none: then one row that adds nothing, since DDP needs a backward on every process. Yields (mb, empty)."""
    for start in range(0, len(order), minibatch):
        mb = order[start : start + minibatch]
        mb = mb[(mb >= rows[0]) & (mb <= rows[-1])] - rows[0]
        empty = mb.numel() == 0
        yield (mb if not empty else torch.zeros(1, dtype=torch.long, device=order.device)), empty


def report_step(run, step: int, on_progress: ProgressFn, stage: str, save_resume) -> None:
    """Tell on_progress about the step; `save_resume(run, step)` every save_every steps, and before an exception
    from on_progress (unless StopWithoutSaving: the run was taken away). `run` is a stage's Setup."""
    args, done = run.args, step + 1
    shown = {"log": f"The first prompt as the policy sees it:\n{run.formatted[0]}"} if step == run.start_step else {}
    report_and_save(run.ranks, on_progress, {"stage": stage, "step": done, "total": args.steps,
                                             "metrics": run.metrics, **shown},
                    lambda: save_resume(run, done),
                    due=bool(args.save_every and done % args.save_every == 0 and done < args.steps))
