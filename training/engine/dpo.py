"""Direct Preference Optimization: a causal LM trained on preference pairs, with no reward model and no sampling.

Rafailov et al. 2023 ("Direct Preference Optimization: Your Language Model is Secretly a Reward Model") show
that the optimum of the KL-regularised reward objective makes r(x, y) = beta * log pi(y|x) / pi_ref(y|x) a
reward, so the Bradley-Terry likelihood of the labelled pairs can be maximised over the policy directly.
For a prompt x with a chosen response y_c and a rejected one y_r, preference_loss takes the paper's steps:

    1. log-probs    pi_c, pi_r = sum over response tokens of log pi(y_t | x, y_<t)   (prompt tokens masked out)
    2. log-ratios   h = (pi_c - ref_c) - (pi_r - ref_r)                              (Rafailov et al. 2023, eq. 7)
    3. loss         sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                        (eq. 7; eps > 0 is conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences")
                    ipo: (h_avg - 1 / (2 beta))^2 with per-token averaged log-probs
                        (Azar et al. 2023, eq. 17, averaged per token as TRL's DPOTrainer does it)
    4. the mean over pairs, each weighted (1 + strength_weight * margin) * older_rounds_weight ** k: margin the
       labelers' strength (0..1), k how many rounds before the newest pair's round the pair was made
       (data.round_weights), so that iterative DPO (rounds of DPO on the newest policy's judged samples, Xu et
       al. 2023, "Some things are more cringe than others") can lean on the newest policy's pairs

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's OnlineDPOTrainer),
when reward_models are given: every online_every steps the policy as it now is samples online_samples responses to
each of online_prompts prompts, the reward sources score them, and the best and the worst of each prompt make a
fresh pair (none where their scores tie). Each step then trains the same loss on its batch of labelled pairs and
the current online pairs together, so the round's reward model, trained on people's labels, steers a policy that
keeps sampling; an online pair weighs 1 (no labeller strength, the newest round). Fresh pairs every few steps
rather than once from the starting policy: OAIF's point is that pairs from the policy being trained beat pairs from
an earlier one, and a policy that moves away from its start makes stale pairs off-policy. Their reference log-probs come from a frozen reference held while training
(ref_policy, else the starting policy loaded again; under LoRA the base, adapters off). Sampling draws from a
generator seeded by (seed, refresh), and a resumable checkpoint carries the current online pairs, so a resumed
run continues exactly.

The reference is frozen, so its log-probs are computed once, in one pass before the first step: by ref_policy
when given, else by the starting policy itself (under LoRA its base, adapters off); offline, no second copy of
the model is held while training. A resumable checkpoint carries them, so a resumed run needs no reference at all.

Inputs are the reward model's pairs (data.read_pairs: the export's prompt, chosen, rejected, margin, round). A model
with a chat template sees the prompt's turns through it and learns the reply's assistant turn (end-of-turn
marker included); a base model sees the instruction template (common.render_prompt) and the reply + eos.
Chosen and rejected go through the model as one (2B, T) batch, prompts left-padded and replies right-padded,
with the prompt template's shared header run once (common.forward_response) and logits kept for the replies
only; speed against TRL's DPOTrainer: benchmarks/README.md#dpo-vs-trl.

    python -m training.engine.dpo --policy PATH --train pairs.jsonl --out runs/dpo [--loss-type ipo]
        [--reward-models rule:correct --prompts prompts.jsonl]
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.engine.checkpoints import (
    report_and_save,
    resumable_state,
    resume_dir,
    resume_source,
    save_checkpoint,
    weights_source,
)
from training.engine.cli import run_cli
from training.engine.common import (
    ADAPTER_DIR,
    EngineError,
    MemoryArgs,
    ProgressFn,
    Prompt,
    adam_class,
    adapters_off,
    apply_lora,
    base_dtype,
    can_share_prefix,
    chat_segments,
    chat_turns,
    context_length,
    enable_memory_switches,
    encode_prompts,
    forward_response,
    has_chat_template,
    load_causal_lm,
    no_progress,
    pick_device,
    pick_dtype,
    render_prompt,
    rng_state,
    set_rng_state,
    set_seed,
    step_generator,
)
from training.engine.data import (
    data_version,
    prompt_indices,
    read_pairs,
    read_prompts,
    split_pairs,
    weigh_by_round,
)
from training.engine.ranks import Ranks
from training.engine.reward import CombinedReward, batch_order, make_adamw
from training.engine.sample import SampleArgs, generate
from training.engine.timing import LoopTimer

STAGE = "dpo"
LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class DPOArgs(MemoryArgs):
    """Settings of one DPO run; defaults from Rafailov et al. 2023 (appendix B) and TRL's DPOConfig, as each says."""

    policy: str = ""
    """Causal LM to train (save_pretrained directory or hub name in the local cache): the SFT or last round's policy."""
    ref_policy: str | None = None
    """Frozen reference; None: the starting policy (Rafailov et al. 2023, sec. 4), under LoRA its base, adapters off."""
    train: str = ""
    """Exported pairs to train on: JSONL, Parquet or a save_to_disk directory (prompt, chosen, rejected[, margin])."""
    eval: str | None = None
    """Held-out pairs; None: hold out eval_fraction of the training prompts (as the reward model does)."""
    eval_fraction: float = 0.1
    """Share of pairs held out (split by prompt) when no eval file is given (a common 90/10 split)."""
    out: str = "var/models/dpo-policy"
    """Directory of the final policy; the resumable checkpoint goes to `<out>.resume/`."""
    loss_type: str = "sigmoid"
    """sigmoid (Rafailov et al. 2023, eq. 7) or ipo (Azar et al. 2023, eq. 17); TRL's DPOConfig default sigmoid."""
    beta: float = 0.1
    """KL strength beta (for ipo the regulariser tau); 0.1 as Rafailov et al. 2023 (appendix B) and TRL."""
    label_smoothing: float = 0.0
    """eps, the assumed share of flipped labels, in [0, 0.5) (conservative DPO, Mitchell 2023); 0: plain DPO."""
    strength_weight: float = 0.0
    """A pair weighs 1 + strength_weight x margin in the loss (margin: the labelers' strength); 0: all alike."""
    older_rounds_weight: float = 1.0
    """w in [0, 1]: a pair made k rounds before the newest pair's round weighs w ** k (imports count as round 0);
    1, all pairs alike (a single DPO run); 0, the newest round's pairs only, the others left out."""
    epochs: int = 1
    """Passes over the training pairs; 1 as the DPO authors' trainer (eric-mitchell/direct-preference-optimization)."""
    lr: float = 1e-6
    """Peak learning rate; 1e-6 as Rafailov et al. 2023 (appendix B) and TRL's DPOConfig."""
    batch_size: int = 64
    """Pairs per optimizer step; 64 as Rafailov et al. 2023 (appendix B)."""
    eval_batch_size: int = 32
    """Pairs per forward pass for the reference log-probs and the evaluation (no gradients)."""
    max_length: int = 512
    """Longest prompt + response in tokens; 512 as the DPO authors' trainer; longer pairs lose prompt tokens first."""
    system_prompt: str = ""
    """System turn before each prompt that has none (chat models; else before the instruction template)."""
    weight_decay: float = 0.0
    """AdamW weight decay; transformers' TrainingArguments default, as TRL."""
    warmup_ratio: float = 0.1
    """Share of steps with linear warm-up before the linear decay to zero; 10% as Zephyr (Tunstall et al. 2023)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; transformers' TrainingArguments default, as TRL."""
    group_by_length: bool = True
    """Batch pairs of similar length to cut padding (transformers' LengthGroupedSampler idea), batch order shuffled."""
    shuffle: bool = True
    """Shuffle the pairs each epoch (seeded); False keeps file order (used to compare trainers on one order)."""
    disable_dropout: bool = True
    """Set dropout to 0, as TRL's DPOConfig does by default (disable_dropout=True)."""
    seed: int = 42
    """Seed for the split and the data order; transformers' default."""
    eval_every: int = 50
    """Evaluate the implicit reward on the held-out pairs every N steps (and at the end); 0: only at the end."""
    log_every: int = 10
    """Average training metrics over N steps before reporting them; TRL's logging_steps default."""
    save_every: int = 200
    """Write the resumable checkpoint every N steps (and whenever on_progress raises); 0: only then."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """Compute dtype: auto (fp32 on CPU, bf16 autocast on CUDA), fp32, bf16, fp16; trained weights stay fp32."""
    resume: bool = True
    """Continue from <out>.resume/ when it exists (same data and settings), else start fresh."""
    resume_from: str = ""
    """Resumable checkpoint to continue from when <out>.resume/ has none (an earlier attempt's)."""
    reward_models: list[str] = field(default_factory=list)
    """Online DPO's reward sources (reward-model checkpoint or rule:NAME), summed, that label fresh pairs of the
    policy's own samples; empty: offline DPO on the given pairs only."""
    prompts: str | list[Prompt] = ""
    """Prompts the online pairs are sampled on: a list (text or chat turns), a JSONL file or a text file of lines."""
    online_prompts: int = 8
    """Prompts sampled per refresh, each making at most one online pair; one DPO batch's worth in TRL's
    OnlineDPOTrainer, 8 here so that the labelled pairs (batch_size) stay the larger share."""
    online_samples: int = 2
    """Responses sampled per prompt; the best and the worst make the pair (2: Guo et al. 2024 and TRL)."""
    online_every: int = 1
    """Sample fresh online pairs every N steps; 1, every step, as OAIF and TRL's OnlineDPOTrainer."""
    max_new_tokens: int = SampleArgs.max_new_tokens
    """Longest online response in tokens; the sampler's default."""
    temperature: float = SampleArgs.temperature
    """Sampling temperature of the online responses; the sampler's default."""
    stop_strings: list[str] = field(default_factory=list)
    """Texts that end an online response besides the end-of-turn tokens; none by default."""


# Settings that must match for a resumed run to continue the same training.
RESUME_KEYS = ("policy", "ref_policy", "loss_type", "beta", "label_smoothing", "strength_weight",
               "older_rounds_weight", "epochs", "lr",
               "batch_size", "max_length", "system_prompt", "weight_decay", "warmup_ratio", "max_grad_norm",
               "group_by_length", "shuffle", "disable_dropout", "seed", "eval_fraction", "lora_r",
               "lora_target_modules", "reward_models", "online_prompts", "online_samples", "online_every",
               "max_new_tokens", "temperature", "stop_strings")


# ---------------------------------------------------------------------------------------------
# The loss


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, tokens_chosen: torch.Tensor, tokens_rejected: torch.Tensor, *,
                    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's loss (or IPO's) over a batch of pairs, from summed response log-probs; every argument is (B,).

    Returns the loss and its terms (detached): the implicit rewards of chosen and rejected, and the margin."""
    # 2. log-ratios against the frozen reference (Rafailov et al. 2023, eq. 7)
    chosen_logratio = policy_chosen - ref_chosen  # (B,)
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,)
    # 3. the per-pair loss
    if loss_type == "sigmoid":
        eps = label_smoothing
        per_pair = (-(1 - eps) * F.logsigmoid(beta * h)  # Rafailov et al. 2023, eq. 7
                    - eps * F.logsigmoid(-beta * h))  # conservative DPO (Mitchell 2023)
    elif loss_type == "ipo":
        # Azar et al. 2023, eq. 17 (tau = beta), log-ratios averaged per response token, as TRL computes it.
        h_avg = chosen_logratio / tokens_chosen.clamp(min=1) - rejected_logratio / tokens_rejected.clamp(min=1)
        per_pair = (h_avg - 1 / (2 * beta)) ** 2  # (B,)
    else:
        raise EngineError(f"unknown loss_type {loss_type!r}: use {' or '.join(LOSS_TYPES)}")
    # 4. the (weighted) mean over pairs
    if weight is None:
        loss = per_pair.mean()
    else:
        loss = (weight * per_pair).sum() / weight.sum().clamp(min=1e-8)
    # The implicit rewards r = beta * log pi / pi_ref (Rafailov et al. 2023, sec. 5), TRL's rewards/* metrics.
    rewards_chosen, rewards_rejected = beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
    return loss, {"rewards_chosen": rewards_chosen, "rewards_rejected": rewards_rejected,
                  "margin": rewards_chosen - rewards_rejected}


# ---------------------------------------------------------------------------------------------
# Encoding: (prompt, response) -> prompt ids and response ids


def fit_length(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """prompt + response cut to max_length: the prompt loses tokens from its start (its end is the question), down
    to max_length // 2 of them, then the response loses its end."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 2))
    return prompt[len(prompt) - keep_prompt:], response[:max_length - keep_prompt]


class ResponseEncoder:
    """Prompt and reply token ids as the policy sees them: the chat template's turns and the reply's assistant turn
    (end-of-turn marker included), or the instruction template and the reply + eos for a base model."""

    def __init__(self, tokenizer, max_length: int, system_prompt: str = ""):
        self.tokenizer, self.max_length, self.system_prompt = tokenizer, max_length, system_prompt
        self.chat = has_chat_template(tokenizer)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return encode_prompts(self.tokenizer, [render_prompt(self.tokenizer, prompt, "", self.system_prompt)])[0]

    def response_ids(self, prompt: Prompt, response: str) -> list[int]:
        if self.chat:
            turns = chat_turns(prompt, system_prompt=self.system_prompt)
            reply = chat_segments(self.tokenizer, turns + [{"role": "assistant", "content": response}])[-1][0]
            return self.tokenizer(reply, add_special_tokens=False)["input_ids"]
        return self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def encode(self, ds) -> tuple[list[dict[str, Any]], int]:
        """Encoded pairs {"prompt", "chosen", "rejected" (ids), "margin", "round_weight", "length"}; and how many
        were cut."""
        prompts = ds["prompt_turns"] if self.chat else ds["prompt"]
        by_round = ds["round_weight"] if "round_weight" in ds.column_names else [1.0] * len(ds)
        pairs, cut = [], 0
        for prompt, chosen, rejected, margin, round_weight in zip(prompts, ds["chosen"], ds["rejected"],
                                                                   ds["margin"], by_round):
            pair, was_cut = self.encode_pair(prompt, chosen, rejected, margin, round_weight)
            pairs.append(pair)
            cut += was_cut
        return pairs, cut

    def encode_pair(self, prompt: Prompt, chosen: str, rejected: str, margin: float = 0.0,
                    round_weight: float = 1.0) -> tuple[dict[str, Any], bool]:
        """One encoded pair (as `encode`'s) and whether max_length cut it."""
        whole = self.prompt_ids(prompt), self.response_ids(prompt, chosen), self.response_ids(prompt, rejected)
        (p_c, c), (p_r, r) = fit_length(whole[0], whole[1], self.max_length), fit_length(whole[0], whole[2],
                                                                                      self.max_length)
        p = p_c if len(p_c) <= len(p_r) else p_r  # one prompt for both: the shorter cut
        pair = {"prompt": p, "chosen": c, "rejected": r, "margin": float(margin), "round_weight": float(round_weight),
                "length": len(p) + max(len(c), len(r))}
        return pair, (len(p), len(c), len(r)) != tuple(len(ids) for ids in whole)


def _padded(rows: list[list[int]], pad_id: int, left: bool, device: torch.device):
    """(N, T) ids and mask of `rows`, padded on the left (prompts) or the right (responses)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def sequence_logps(model, pairs: list[dict[str, Any]], pad_id: int, device: torch.device,
                   autocast_dtype: torch.dtype | None, share_prefix: bool = True):
    """1. Summed response log-probs of chosen and rejected, and their token counts, each (B,): one (2B, T)
    forward pass, prompts left-padded, responses right-padded, logits for the responses only."""
    queries, qmask = _padded([p["prompt"] for p in pairs] * 2, pad_id, True, device)  # (2B, Tp)
    responses, rmask = _padded([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id, False,
                               device)  # (2B, Tr)
    logprobs, _, _ = forward_response(model, queries, qmask, responses, rmask, 1.0, autocast_dtype,
                                      share_prefix=share_prefix)  # (2B, Tr)
    logps = (logprobs * rmask).sum(-1)  # (2B,) the prompt's tokens add nothing
    tokens = rmask.sum(-1).to(logps.dtype)  # (2B,)
    chosen, rejected = logps.chunk(2)
    tokens_chosen, tokens_rejected = tokens.chunk(2)
    return chosen, rejected, tokens_chosen, tokens_rejected


@torch.inference_mode()
def pairs_logps(model, pairs: list[dict[str, Any]], batch_size: int, pad_id: int, autocast_dtype, ranks: Ranks
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (N,) of chosen and rejected for all pairs, each process scoring its share."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i]["length"])  # less padding
    mine = ranks.shard(order)
    chosen, rejected = [torch.zeros(0, device=ranks.device)], [torch.zeros(0, device=ranks.device)]
    with ranks.unsharded(model):  # under FSDP one gather, then forwards without collectives, however many
        for start in range(0, len(mine), batch_size):
            c, r, _, _ = sequence_logps(model, [pairs[i] for i in mine[start:start + batch_size]], pad_id,
                                        ranks.device, autocast_dtype, can_share_prefix(model))
            chosen.append(c.float())
            rejected.append(r.float())
    model.train(was_training)
    by_order_c, by_order_r = ranks.gather(torch.cat(chosen)).cpu(), ranks.gather(torch.cat(rejected)).cpu()
    out_c, out_r = torch.empty(len(pairs)), torch.empty(len(pairs))
    out_c[order], out_r[order] = by_order_c, by_order_r
    return out_c, out_r


# ---------------------------------------------------------------------------------------------
# Setup


@dataclass
class OnlineSource:
    """What online DPO samples and labels its fresh pairs with: the prompts, the reward sources and the frozen
    reference (None under LoRA: the policy's base, adapters off)."""

    prompts: list[Prompt]
    judge: CombinedReward
    reference: Any


def _new_window() -> dict[str, Any]:
    """The sums of the steps since the last logged metrics."""
    return {"loss": 0.0, "rewards_chosen": 0.0, "rewards_rejected": 0.0, "correct": 0.0, "grad_norm": 0.0,
            "pairs": 0, "steps": 0, "seconds": 0.0, "tokens": 0, "online_pairs": 0, "online_margin": 0.0,
            "online_score_gap": 0.0}


@dataclass
class DPORun:
    """What DPO's loop works with, built once by setup(): settings, model, optimizer, the encoded pairs with their
    reference log-probs, and the counts that a resumable checkpoint carries."""

    args: DPOArgs
    ranks: Ranks
    autocast_dtype: torch.dtype | None
    model: Any
    tokenizer: Any
    trainer: Any  # the model as Accelerate wraps it for the update
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    train_pairs: list[dict[str, Any]]
    eval_pairs: list[dict[str, Any]]
    truncated: int
    version: str
    state_dir: Path
    timer: LoopTimer
    recorded_args: DPOArgs | None = None  # args as a checkpoint's JSON records them (online prompts by count and hash)
    online: OnlineSource | None = None  # online DPO's prompts, reward sources and reference; None: offline DPO
    online_pairs: list[dict[str, Any]] = field(default_factory=list)  # the current online pairs, ref log-probs in
    step: int = 0
    tokens_seen: int = 0
    window: dict[str, Any] = field(default_factory=_new_window)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_pairs) / self.args.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.args.epochs

    def batches(self, epoch: int) -> list[list[int]]:
        return batch_order([p["length"] for p in self.train_pairs], self.args.batch_size, self.args.seed, epoch,
                           self.args.shuffle, self.args.group_by_length)


def _check_args(args: DPOArgs) -> None:
    if not args.policy:
        raise EngineError("no policy given: pass --policy PATH")
    if not args.train:
        raise EngineError("no training pairs given: pass --train PATH")
    if args.loss_type not in LOSS_TYPES:
        raise EngineError(f"unknown loss_type {args.loss_type!r}: use {' or '.join(LOSS_TYPES)}")
    for name in ("epochs", "batch_size", "eval_batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise EngineError(f"{name} must be at least 1, got {getattr(args, name)}")
    for name in ("beta", "lr"):
        if not getattr(args, name) > 0:
            raise EngineError(f"{name} must be positive, got {getattr(args, name)}")
    if not 0 <= args.label_smoothing < 0.5:
        raise EngineError(f"label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type != "sigmoid":
        raise EngineError("label_smoothing (conservative DPO) applies to the sigmoid loss only")
    if args.strength_weight < 0:
        raise EngineError(f"strength_weight must be 0 or more, got {args.strength_weight}")
    if not 0 <= args.older_rounds_weight <= 1:
        raise EngineError(f"older_rounds_weight must be between 0 and 1, got {args.older_rounds_weight}")
    for name in ("eval_every", "log_every", "save_every"):
        if getattr(args, name) < 0:
            raise EngineError(f"{name} must be 0 or more, got {getattr(args, name)}")
    if args.reward_models:
        for name, least in (("online_prompts", 1), ("online_samples", 2), ("online_every", 1),
                            ("max_new_tokens", 1)):
            if getattr(args, name) < least:
                raise EngineError(f"{name} must be at least {least}, got {getattr(args, name)}")
        if not args.temperature > 0:
            raise EngineError(f"temperature must be positive (online pairs need two different samples), "
                              f"got {args.temperature}")


def _prepare_data(args: DPOArgs):
    """The training and held-out pairs (split by prompt unless an eval file is given) and the data version."""
    train_ds = weigh_by_round(read_pairs(args.train)[0], args.older_rounds_weight, args.train)
    version = data_version(args.train)
    if args.eval:
        eval_ds = weigh_by_round(read_pairs(args.eval)[0], args.older_rounds_weight, args.eval)
        version = f"{version}+{data_version(args.eval)}"
    else:
        train_ds, eval_ds = split_pairs(train_ds, args.eval_fraction, args.seed)
    if len(train_ds) == 0:
        raise EngineError("no training pairs left after holding out the eval pairs")
    return train_ds, eval_ds, version


def _load_model(args: DPOArgs, device: torch.device, compute_dtype: torch.dtype, source: Path | None):
    """The policy (from `source` when resuming: a LoRA run takes its adapter onto the base) and its tokenizer."""
    model_source = str(source) if source and not args.lora_r else args.policy
    model, tokenizer = load_causal_lm(model_source, device, base_dtype(args, device, compute_dtype), start=args.policy)
    model = apply_lora(enable_memory_switches(model, args), args, "CAUSAL_LM",
                       source / ADAPTER_DIR if source and args.lora_r else None)
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    limit = context_length(model)
    if limit is not None and args.max_length > limit:
        raise EngineError(f"max_length {args.max_length} is longer than the policy allows ({limit} tokens); "
                          f"pass --max-length {limit} or less")
    return model, tokenizer


def reference_logps(run: DPORun) -> None:
    """Phase 0: the frozen reference's log-probs of every pair, in one pass: ref_policy when given, else the
    starting policy itself (under LoRA its base, adapters off). Stored in each pair as ref_chosen, ref_rejected."""
    args, ranks = run.args, run.ranks
    pad_id = run.tokenizer.pad_token_id
    if args.ref_policy:
        reference = (run.online.reference if run.online is not None and run.online.reference is not None
                     else load_reference(args.ref_policy, run.tokenizer, ranks.device, pick_dtype(ranks.device,
                                                                                                args.dtype)))
        context = nullcontext()
    else:
        reference, context = run.model, adapters_off(run.model)
    with context:
        for pairs in (run.train_pairs, run.eval_pairs):
            if pairs:
                chosen, rejected = pairs_logps(reference, pairs, args.eval_batch_size, pad_id, run.autocast_dtype,
                                               ranks)
                for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
                    pair["ref_chosen"], pair["ref_rejected"] = c, r
    del reference


def load_reference(path: str, tokenizer, device: torch.device, dtype: torch.dtype):
    """A frozen reference policy, refused when its vocabulary is not the policy's."""
    reference, ref_tokenizer = load_causal_lm(path, device, dtype)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise EngineError(f"reference policy {path!r} has another tokenizer than the policy: "
                          "the log-ratios need the same vocabulary")
    reference.requires_grad_(False)
    return reference.eval()


def _online_prompts(args: DPOArgs) -> tuple[list[Prompt], DPOArgs, str]:
    """Online DPO's prompts, the args as a checkpoint records them (a list of prompts by count and hash) and the
    prompts' hash for the data version; ([], args, "") for offline DPO."""
    if not args.reward_models:
        return [], args, ""
    prompts = [prompt for prompt, _ in read_prompts(args.prompts)]
    if not prompts:
        raise EngineError("online DPO (reward_models given) needs prompts to sample: pass --prompts FILE")
    digest = hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()[:16]
    recorded = args if isinstance(args.prompts, str) else replace(args, prompts=f"<{len(prompts)} prompts, "
                                                                                f"sha256 {digest}>")
    return prompts, recorded, digest


def _online_source(args: DPOArgs, prompts: list[Prompt], model, tokenizer, device: torch.device,
                   compute_dtype: torch.dtype) -> OnlineSource | None:
    """Online DPO's reward sources and frozen reference (ref_policy, else under LoRA none: the base, adapters off,
    else the starting policy loaded again); None for offline DPO."""
    if not args.reward_models:
        return None
    judge = CombinedReward(args.reward_models, [1.0] * len(args.reward_models), device,
                           system_prompt=args.system_prompt)
    base_is_reference = args.lora_r and not args.ref_policy  # the starting policy is the LoRA model's base
    reference = None if base_is_reference else load_reference(args.ref_policy or args.policy, tokenizer, device,
                                                               compute_dtype)
    return OnlineSource(prompts=prompts, judge=judge, reference=reference)


def _take_reference(run: DPORun, state: dict[str, Any]) -> None:
    """The reference log-probs a resumable checkpoint carries (the reference itself may have moved on)."""
    for name, pairs in (("train", run.train_pairs), ("eval", run.eval_pairs)):
        saved = state["reference"][name]  # (N, 2)
        for pair, (c, r) in zip(pairs, saved.tolist()):
            pair["ref_chosen"], pair["ref_rejected"] = c, r


def _reference_state(run: DPORun) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([[p["ref_chosen"], p["ref_rejected"]] for p in pairs], dtype=torch.float64)
            for name, pairs in (("train", run.train_pairs), ("eval", run.eval_pairs))}


def setup(args: DPOArgs, on_progress: ProgressFn, timer: LoopTimer) -> DPORun:
    """Check the settings and data, load the policy, encode the pairs, build the optimizer and schedule, and take
    the reference log-probs: from a resumable checkpoint that may continue this run, else in one pass."""
    from transformers import get_linear_schedule_with_warmup

    _check_args(args)
    train_ds, eval_ds, version = _prepare_data(args)
    online_prompts, recorded, prompts_digest = _online_prompts(args)
    if prompts_digest:
        version = f"{version}+prompts {prompts_digest}"
    ranks = Ranks(pick_device(args.device), fsdp=args.fsdp)
    ranks.check_divides("batch_size", args.batch_size)
    if args.reward_models and ranks.world > 1:
        raise EngineError("online DPO (reward_models given) samples on one process: run it without accelerate "
                          "launch, or leave reward_models empty")
    device = ranks.device
    compute_dtype = pick_dtype(device, args.dtype)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 and device.type != "cpu" else None
    # fp16 needs loss scaling against underflowing gradients (Micikevicius et al. 2018); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    adam_class(args, device)  # refuses adam_8bit where it cannot run, before loading anything

    source = resume_source(args.out, args.resume, args.resume_from)
    state = resumable_state(source, stage=STAGE, args=recorded, keys=RESUME_KEYS, data_version=version)

    set_seed(args.seed)
    model, tokenizer = _load_model(args, device, compute_dtype, weights_source(source) if state else None)
    encoder = ResponseEncoder(tokenizer, args.max_length, args.system_prompt)
    train_pairs, cut = encoder.encode(train_ds)
    eval_pairs, eval_cut = encoder.encode(eval_ds) if len(eval_ds) else ([], 0)

    total_steps = math.ceil(len(train_pairs) / args.batch_size) * args.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (adam_class(args, device)(params, lr=args.lr, weight_decay=args.weight_decay) if args.adam_8bit
                 else make_adamw(params, args.lr, args.weight_decay, device))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    run = DPORun(args=args, ranks=ranks, autocast_dtype=autocast_dtype, model=model, tokenizer=tokenizer,
                 trainer=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, params=params,
                 train_pairs=train_pairs, eval_pairs=eval_pairs, truncated=cut + eval_cut, version=version,
                 state_dir=resume_dir(args.out), timer=timer, recorded_args=recorded,
                 online=_online_source(args, online_prompts, model, tokenizer, device, compute_dtype))
    if state:
        _take_reference(run, state)
        run.online_pairs = state.get("online_pairs", [])
        if "optimizer" in state:  # else in the checkpoint's shards, set after prepare
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        run.step, run.tokens_seen = state["step"], state["tokens_seen"]
        run.window, run.metrics = state["window"], state["metrics"]
        timer.load_state_dict(state)
        set_rng_state(state["rng"])
        ranks.report(on_progress, {"stage": STAGE, "step": run.step, "total": total_steps, "metrics": run.metrics,
                                   "log": f"resumed from {source} at step {run.step}"})
    else:
        reference_logps(run)
    run.trainer, run.optimizer = ranks.prepare(model, run.optimizer)  # the model itself with one process
    if state:
        ranks.load_resumable(source, model=model, optimizer=run.optimizer)
    run.params = [p for group in run.optimizer.param_groups for p in group["params"]]  # FSDP's shards
    return run


# ---------------------------------------------------------------------------------------------
# The loop's phases


def _pair_terms(run: DPORun, model, pairs: list[dict[str, Any]], share_prefix: bool):
    """Steps 1-4 for a batch of pairs: the loss (weighted mean over these pairs) and its terms."""
    args, device = run.args, run.ranks.device
    policy_c, policy_r, tokens_c, tokens_r = sequence_logps(model, pairs, run.tokenizer.pad_token_id, device,
                                                            run.autocast_dtype, share_prefix)
    ref_c = torch.tensor([p["ref_chosen"] for p in pairs], device=device)  # (B,)
    ref_r = torch.tensor([p["ref_rejected"] for p in pairs], device=device)  # (B,)
    weight = pair_weights(args, pairs, device)
    return preference_loss(policy_c.float(), policy_r.float(), ref_c, ref_r, tokens_c, tokens_r, beta=args.beta,
                           loss_type=args.loss_type, label_smoothing=args.label_smoothing, weight=weight)


def pair_weights(args: DPOArgs, pairs: list[dict[str, Any]], device: torch.device) -> torch.Tensor | None:
    """4. Each pair's weight, (1 + strength_weight * margin) * its round_weight; None when every pair weighs the
    same."""
    if not args.strength_weight and args.older_rounds_weight == 1:
        return None
    return torch.tensor([(1 + args.strength_weight * p["margin"]) * p.get("round_weight", 1.0) for p in pairs],
                        device=device)  # (B,)


def refresh_online_pairs(run: DPORun) -> None:
    """Online DPO, every online_every steps: online_samples responses to each of the refresh's online_prompts
    prompts from the policy as it now is, scored by the reward sources; the best against the worst of each prompt
    (none where they tie) are the current online pairs, with their frozen reference's log-probs."""
    args, online = run.args, run.online
    if online is None or run.step % args.online_every:
        return
    refresh, k = run.step // args.online_every, args.online_samples
    prompts = [online.prompts[i] for i in prompt_indices(len(online.prompts), args.online_prompts, refresh,
                                                         args.seed)]
    rendered = [render_prompt(run.tokenizer, prompt, "", args.system_prompt) for prompt in prompts for _ in range(k)]
    rollout = generate(run.model, run.tokenizer, rendered, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, batch_size=args.eval_batch_size,
                       generator=step_generator(args.seed, refresh, 3, run.ranks.device),
                       stop_strings=args.stop_strings)
    scores, _ = online.judge([prompt for prompt in prompts for _ in range(k)], rollout.texts)
    scores = scores.view(len(prompts), k)  # (P, k)
    encoder, pairs = ResponseEncoder(run.tokenizer, args.max_length, args.system_prompt), []
    for i, prompt in enumerate(prompts):
        texts, best, worst = rollout.texts[i * k:(i + 1) * k], int(scores[i].argmax()), int(scores[i].argmin())
        if scores[i, best] == scores[i, worst] or texts[best] == texts[worst]:
            continue  # the reward prefers neither: no pair
        pair, _ = encoder.encode_pair(prompt, texts[best], texts[worst])
        pairs.append({**pair, "score_gap": float(scores[i, best] - scores[i, worst])})
    if pairs:
        reference = run.model if online.reference is None else online.reference
        with adapters_off(reference):
            chosen, rejected = pairs_logps(reference, pairs, args.eval_batch_size, run.tokenizer.pad_token_id,
                                           run.autocast_dtype, run.ranks)
        for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
            pair["ref_chosen"], pair["ref_rejected"] = c, r
    run.online_pairs = pairs


def train_step(run: DPORun, indices: list[int]) -> None:
    """One optimizer step of the DPO loss on a batch of pairs; adds to the window's sums."""
    args, ranks = run.args, run.ranks
    mine = ranks.shard(indices)  # a process with no pair of a short last batch adds 0 (scaled below)
    pairs = [run.train_pairs[i] for i in mine or indices[:1]]
    labelled = len(pairs)  # the labelled pairs come first, then the current online pairs (one process only)
    pairs = pairs + run.online_pairs
    share = can_share_prefix(run.model) and ranks.world == 1  # DDP wants one forward per step
    loss, terms = _pair_terms(run, run.trainer, pairs, share)
    online = {name: values[labelled:] for name, values in terms.items()}
    terms = {name: values[:labelled] for name, values in terms.items()}
    if ranks.world > 1:  # the global batch's weighted mean once DDP averages the gradients
        everyone = pair_weights(args, [run.train_pairs[i] for i in indices], ranks.device)
        mine_weight = pair_weights(args, pairs, ranks.device)
        share_of_weight = ((mine_weight.sum() / everyone.sum()) if everyone is not None
                           else torch.tensor(len(mine) / len(indices)))
        loss = loss * share_of_weight * ranks.world * (1 if mine else 0)
    ranks.backward(run.scaler.scale(loss))
    run.scaler.unscale_(run.optimizer)
    grad_norm = ranks.clip_grad_norm_(run.params, args.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    window, count = run.window, len(mine)
    # Metrics stay on the device until a log step (no per-step host sync on CUDA).
    window["loss"] += ranks.sum(loss.detach()) / ranks.world
    for name in ("rewards_chosen", "rewards_rejected"):
        window[name] += ranks.sum(terms[name].sum() if count else 0.0)
    window["correct"] += ranks.sum((terms["margin"] > 0).sum() if count else 0)
    window["grad_norm"] += grad_norm.detach()
    window["pairs"] += len(indices)
    window["steps"] += 1
    if run.online_pairs:
        window["online_pairs"] += len(run.online_pairs)
        window["online_margin"] += online["margin"].sum()
        window["online_score_gap"] += sum(p["score_gap"] for p in run.online_pairs)
    tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"])
                 for p in [*(run.train_pairs[i] for i in indices), *run.online_pairs])
    window["tokens"] += tokens
    run.tokens_seen += tokens


@torch.inference_mode()
def evaluate(run: DPORun) -> dict[str, float]:
    """Held-out preference accuracy of the implicit reward (r_c > r_r), its mean margin, and the loss."""
    args, pairs = run.args, run.eval_pairs
    policy_c, policy_r = pairs_logps(run.model, pairs, args.eval_batch_size, run.tokenizer.pad_token_id,
                                     run.autocast_dtype, run.ranks)
    ref_c = torch.tensor([p["ref_chosen"] for p in pairs])
    ref_r = torch.tensor([p["ref_rejected"] for p in pairs])
    tokens_c = torch.tensor([float(len(p["chosen"])) for p in pairs])
    tokens_r = torch.tensor([float(len(p["rejected"])) for p in pairs])
    loss, terms = preference_loss(policy_c, policy_r, ref_c, ref_r, tokens_c, tokens_r, beta=args.beta,
                                  loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                                  weight=pair_weights(args, pairs, torch.device("cpu")))
    return {"dpo/eval_accuracy": (terms["margin"] > 0).float().mean().item(),
            "dpo/eval_margin": terms["margin"].mean().item(), "dpo/eval_loss": loss.item()}


def log(run: DPORun) -> None:
    """At a log step (and the last), the window's means into the metrics; at an eval step, the held-out ones."""
    args, step, last = run.args, run.step, run.step == run.total_steps
    window = run.window
    if window["steps"] and (last or (args.log_every and step % args.log_every == 0)):
        pairs, steps = window["pairs"], window["steps"]
        chosen, rejected = float(window["rewards_chosen"]) / pairs, float(window["rewards_rejected"]) / pairs
        run.metrics.update({
            "dpo/loss": float(window["loss"]) / steps,
            "dpo/rewards_chosen": chosen,
            "dpo/rewards_rejected": rejected,
            "dpo/margin": chosen - rejected,
            "dpo/accuracy": float(window["correct"]) / pairs,
            "dpo/grad_norm": float(window["grad_norm"]) / steps,
            "dpo/lr": run.scheduler.get_last_lr()[0],
            "dpo/tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
        })
        if run.online is not None:
            run.metrics["dpo/online_pairs"] = window["online_pairs"] / steps  # fresh pairs trained on per step
        if window["online_pairs"]:  # the implicit reward's margin and the reward sources' gap, online pairs only
            run.metrics["dpo/online_margin"] = float(window["online_margin"]) / window["online_pairs"]
            run.metrics["dpo/online_score_gap"] = window["online_score_gap"] / window["online_pairs"]
        run.window = _new_window()
    if run.eval_pairs and (last or (args.eval_every and step % args.eval_every == 0)):
        with run.timer.paused():
            run.metrics.update(evaluate(run))


def save_resume(run: DPORun) -> None:
    """Write the resumable checkpoint at `<out>.resume/`: the policy, optimizer, schedule, reference log-probs,
    counts and RNG (every process: under FSDP each writes its shards)."""
    run.ranks.save_resumable(run.state_dir, model=run.model, tokenizer=run.tokenizer, optimizer=run.optimizer,
                             stage=STAGE, args=run.recorded_args, step=run.step, metrics=run.metrics,
                             data_version=run.version,
                             trainer_state={"scheduler": run.scheduler.state_dict(),
                                            "scaler": run.scaler.state_dict(), "reference": _reference_state(run),
                                            "online_pairs": run.online_pairs,
                                            "rng": rng_state(), "step": run.step, **run.timer.state_dict(),
                                            "tokens_seen": run.tokens_seen, "window": run.window,
                                            "metrics": run.metrics})


def report(run: DPORun, on_progress: ProgressFn) -> None:
    """Tell on_progress about the step; save the resumable checkpoint every save_every steps, and before an
    exception from on_progress (unless StopWithoutSaving: the run was taken away)."""
    step, total = run.step, run.total_steps

    def save() -> None:
        with run.timer.paused():
            save_resume(run)

    report_and_save(run.ranks, on_progress, {"stage": STAGE, "step": step, "total": total,
                                             "metrics": dict(run.metrics)},
                    save, due=bool(run.args.save_every and step % run.args.save_every == 0 and step != total))


def main(args: DPOArgs, on_progress: ProgressFn = no_progress, timer: LoopTimer | None = None) -> dict[str, Any]:
    """Train a policy with DPO (or IPO); returns the final metrics. Saves the policy at args.out (merged under
    LoRA) and, while running, a resumable checkpoint at `<out>.resume/`. `timer` measures the loop (a fresh
    LoopTimer by default); a benchmark may pass its own to read it."""
    run = setup(args, on_progress, timer or LoopTimer())
    run.model.train()
    run.timer.start()
    start_epoch, start_batch = divmod(run.step, run.steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        for indices in run.batches(epoch)[start_batch if epoch == start_epoch else 0:]:
            with run.timer.step(run.ranks.device) as lap:
                refresh_online_pairs(run)
                train_step(run, indices)
            run.window["seconds"] += lap.seconds
            log(run)
            report(run, on_progress)
    run.timer.stop()

    final = dict(run.metrics)
    final.update({
        "dpo/tokens_per_second": run.tokens_seen / max(run.timer.train_seconds, 1e-9),
        "dpo/train_seconds": run.timer.train_seconds,
        "dpo/loop_seconds": run.timer.loop_seconds,
        "dpo/steps": run.step,
        "dpo/train_pairs": len(run.train_pairs),
        "dpo/eval_pairs": len(run.eval_pairs),
        "dpo/truncated_pairs": run.truncated,
        "dpo/train_tokens": run.tokens_seen,
        # the first pair's prompt exactly as the policy saw it (template, system turn, any cut), for the round page
        "dpo/rendered_prompt": run.tokenizer.decode(run.train_pairs[0]["prompt"]) if run.train_pairs else "",
    })
    trained = run.ranks.trained_model(run.model, run.tokenizer)  # every process gathers its shards under FSDP
    if run.ranks.main:
        save_checkpoint(args.out, stage=STAGE, args=run.recorded_args, step=run.step, metrics=final,
                        data_version=run.version, pretrained={"": trained})
        shutil.rmtree(run.state_dir, ignore_errors=True)  # finished: a later run starts afresh
    run.ranks.wait()
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_cli(DPOArgs, main, argv, stage=STAGE, required=("policy", "train", "out"),
                   description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli())
