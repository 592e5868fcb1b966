"""A Bradley-Terry reward model trained on human preference pairs.

For a prompt x with a chosen response y_c and a rejected one y_r, a sequence-classification model
with one output gives rewards r(x, y). The Bradley-Terry model (Bradley & Terry 1952) says
P(y_c > y_r) = sigmoid(r_c - r_r); we minimise its negative log-likelihood, as InstructGPT does
(Ouyang et al. 2022, eq. 1), optionally minus a margin from the labelers' strength (Llama 2,
Touvron et al. 2023, sec. 3.2.2) and plus a centering term that keeps rewards near zero
(Eisenstein et al. 2023, "Helping or Herding?", eq. 2; TRL's center_rewards_coefficient):

    loss = -log sigmoid(r_c - r_r - margin) + coef * (r_c + r_r)^2

Inputs: an encoder (BERT-like: the default all-MiniLM-L6-v2, which has no eos token) sees
(prompt, response) as a text pair: [CLS] prompt [SEP] response [SEP], scored at [CLS]. A decoder
with a chat template sees the whole conversation in it (the prompt's turns, then the response as the
assistant's turn); one without sees prompt + response (+ eos when the tokenizer has one); both are
scored at the last token. Long pairs are truncated, not dropped: the prompt loses tokens from its
start first, then the response from its end; truncated_weight weighs such pairs down in the loss
(0 leaves them out, as TRL's RewardTrainer does with pairs over its max_length).

Speed, measured against TRL's RewardTrainer in benchmarks/reward_vs_trl.py: chosen and rejected go
through the model as one (2B, T) batch padded only to the longest in the batch; batches are built
from pairs of similar length (as transformers' LengthGroupedSampler does, with batch order shuffled);
no gradient checkpointing; evaluation under torch.inference_mode, sorted by length.

PPO's and GRPO's reward sources live here too: reward-model checkpoints (RewardScorer), rule judges
("rule:NAME"), ready safety classifiers ("classifier:LABEL:PATH", SafetyClassifier) and a callable, summed with
weights or combined as quality and safety, weighted or gated, by CombinedReward.

    python -m training.engine.reward --train pairs.jsonl --out runs/rm [--eval held.jsonl] [--epochs 1]
"""

from __future__ import annotations

import math
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Encoding, Tokenizer
from transformers import get_linear_schedule_with_warmup
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from demo.demo_tasks import RULE_JUDGES

from .checkpoints import (
    read_checkpoint_meta,
    report_and_save,
    resumable_state,
    resume_dir,
    resume_source,
    save_checkpoint,
    weights_source,
)
from .cli import run_cli
from .common import (
    ADAPTER_DIR,
    EngineError,
    MemoryArgs,
    ProgressFn,
    Prompt,
    RunningMoments,
    adam_class,
    apply_chat_template,
    apply_lora,
    base_dtype,
    chat_turns,
    check_model_source,
    default_reward_backbone,
    enable_memory_switches,
    has_chat_template,
    load_classifier,
    load_reward_model,
    no_progress,
    pick_device,
    pick_dtype,
    prompt_text,
    rng_state,
    set_rng_state,
    set_seed,
)
from .data import data_version, read_pairs, split_pairs, weigh_by_round
from .ranks import Ranks
from .sources import (
    CLASSIFIER_PREFIX,
    COMBINATIONS,
    GATED,
    QUALITY,
    ROLES,
    RULE_PREFIX,
    SAFETY,
    SUM,
    RewardMixArgs,
)
from .timing import LoopTimer

STAGE = "reward"


@dataclass
class RewardArgs(MemoryArgs):
    train: str = ""
    """Exported pairs to train on: JSONL, Parquet or a save_to_disk directory (prompt, chosen, rejected[, margin])."""
    eval: str | None = None
    """Held-out pairs; None: hold out eval_fraction of the training prompts."""
    eval_fraction: float = 0.1
    """Share of pairs held out (split by prompt) when no eval file is given (a common 90/10 split)."""
    model: str = field(default_factory=default_reward_backbone)
    """Backbone name or path, loaded as a sequence classifier with one output (default: the packaged MiniLM)."""
    out: str = "runs/reward"
    """Where the final model goes (save_pretrained + pairloop.json); the resumable state goes to <out>.resume/."""
    epochs: int = 1
    """Passes over the training pairs; InstructGPT trains its RM for one epoch, it overfits after (Ouyang et al. 2022)."""
    lr: float = 5e-5
    """AdamW peak learning rate; BERT's fine-tuning rate (Devlin et al. 2019), measured: reward_vs_trl.py --cv."""
    batch_size: int = 8
    """Pairs per step (each pair is two sequences); TRL/transformers' per_device_train_batch_size default."""
    eval_batch_size: int = 32
    """Pairs per forward pass during evaluation (no gradients, so larger is fine)."""
    max_length: int = 512
    """Longest tokenized sequence (prompt + response + special tokens); the MiniLM's position limit."""
    token_types: bool = True
    """Encoders: mark the response with token type 1 (BERT's text pair); False: all type 0, one text with [SEP]s."""
    system_prompt: str = ""
    """System turn before each prompt that has none, for a backbone with a chat template (as the policy saw it)."""
    weight_decay: float = 0.0
    """AdamW weight decay; transformers' TrainingArguments default."""
    warmup_ratio: float = 0.1
    """Share of steps with linear warm-up before the linear decay to zero; BERT's 10% (Devlin et al. 2019)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; transformers' TrainingArguments default."""
    use_margin: bool = True
    """Subtract each pair's margin inside the sigmoid (Llama 2, Touvron et al. 2023, sec. 3.2.2)."""
    truncated_weight: float = 1.0
    """Loss weight of a training pair that had to be truncated to max_length; 0 leaves them out, as TRL does."""
    older_rounds_weight: float = 1.0
    """w in [0, 1]: a pair made k rounds before the newest pair's round weighs w ** k (data.round_weights; imports
    count as round 0); 1, all pairs alike (the file as it is); 0, the newest round's pairs only."""
    center_rewards_coef: float | None = None
    """Weight of the reward-centering term (r_c + r_r)^2; Eisenstein et al. 2023 / TRL suggest 0.01; None: off."""
    group_by_length: bool = True
    """Batch pairs of similar length to cut padding (transformers' LengthGroupedSampler idea), batch order shuffled."""
    shuffle: bool = True
    """Shuffle the pairs each epoch (seeded); False keeps file order (used to compare trainers on one order)."""
    disable_dropout: bool = True
    """Set dropout to 0 while training, as TRL's RewardConfig does by default (disable_dropout=True)."""
    seed: int = 42
    """Seed for the head's initialisation, the split and the data order; transformers' default."""
    eval_every: int = 50
    """Evaluate on the held-out pairs every N steps (and at the end); 0: only at the end."""
    log_every: int = 10
    """Average training metrics over N steps before reporting them; TRL's logging_steps default."""
    save_every: int = 200
    """Write the resumable checkpoint every N steps (and whenever on_progress raises); 0: only then."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """Compute dtype: auto (fp32 on CPU, bf16 autocast on CUDA), fp32, bf16, fp16; weights stay fp32."""
    resume: bool = True
    """Continue from <out>.resume/ when it exists (same data and settings), else start fresh."""
    resume_from: str = ""
    """Resumable checkpoint to continue from when <out>.resume/ has none (an earlier attempt's)."""


# Settings that must match for a resumed run to continue the same training.
RESUME_KEYS = ("model", "epochs", "lr", "batch_size", "max_length", "weight_decay", "warmup_ratio",
               "max_grad_norm", "use_margin", "truncated_weight", "older_rounds_weight", "center_rewards_coef", "group_by_length",
               "shuffle", "disable_dropout", "seed", "eval_fraction", "system_prompt", "token_types", "lora_r",
               "lora_target_modules")


# ---------------------------------------------------------------------------------------------
# Encoding: (prompt, response) -> token ids, truncating instead of dropping


def is_encoder(config) -> bool:
    """True for BERT-like models (read a text pair, score at [CLS]); False for decoders (score the last token)."""
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return True
    return False


class PairEncoder:
    """Turns (prompt, response) texts into model inputs of at most max_length tokens.

    Encoders get the tokenizer's pair template ([CLS] p [SEP] r [SEP] for BERT, with token type ids);
    decoders get the single-sequence template over p + r, then eos when the tokenizer has one (the
    MiniLM has none and needs none: its template ends in [SEP], and it is scored at [CLS]). When too
    long, the prompt loses tokens from its start (its end is the question being answered); if the
    response alone still does not fit, it is cut at its end, keeping max_length // 8 prompt tokens.
    """

    def __init__(self, tokenizer, config, max_length: int, system_prompt: str = "", token_types: bool = True):
        self.tokenizer = tokenizer
        self.encoder = is_encoder(config)
        self.chat = not self.encoder and has_chat_template(tokenizer)  # the template writes the special tokens
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.with_types = self.encoder and token_types and "token_type_ids" in tokenizer.model_input_names
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None:
            # A private copy without the fixed padding/truncation some tokenizer.json files carry.
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_padding()
            self._backend.no_truncation()
        self.eos_id = None if self.encoder or self.chat else tokenizer.eos_token_id
        if self.chat:
            self.n_special = 0
        else:
            self.n_special = len(self.encode([""], [""])[0][0][0]) if self._backend else (3 if self.encoder else 1)
        self.budget = max_length - self.n_special
        if self.budget < 2:
            raise EngineError(f"max_length {max_length} leaves no room for text beside {self.n_special} special tokens")

    def _keep(self, n_prompt: int, n_response: int) -> tuple[int, int]:
        """How many prompt tokens (from its end) and response tokens (from its start) fit."""
        budget = self.max_length - getattr(self, "n_special", 0)
        if n_prompt + n_response <= budget:
            return n_prompt, n_response
        min_prompt = min(n_prompt, max(1, self.max_length // 8))
        response_keep = min(n_response, budget - min_prompt)
        return budget - response_keep, response_keep

    def _chat_texts(self, prompt: Prompt, response: str) -> tuple[str, str]:
        """(the prompt's turns with the generation prompt, what the response's assistant turn adds to them)."""
        turns = chat_turns(prompt, system_prompt=self.system_prompt)
        before = apply_chat_template(self.tokenizer, turns, add_generation_prompt=True)
        through = apply_chat_template(self.tokenizer, turns + [{"role": "assistant", "content": response}],
                                      add_generation_prompt=False)
        if not through.startswith(before):
            raise EngineError("the reward model's chat template renders the reply in a way that changes the "
                              "prompt before it, so the two cannot be truncated apart")
        return before, through[len(before):]

    def encode(self, prompts: list[Prompt], responses: list[str]
               ) -> tuple[list[tuple[list[int], list[int] | None]], list[bool]]:
        """[(input_ids, token_type_ids or None)] per pair, and whether each one was truncated."""
        out, truncated = [], []
        if self.chat:
            rendered = [self._chat_texts(p, r) for p, r in zip(prompts, responses)]
            prompts, responses = [p for p, _ in rendered], [r for _, r in rendered]
        else:
            prompts = [p if isinstance(p, str) else prompt_text(p) for p in prompts]
        if self._backend is not None:
            prompt_encs = self._backend.encode_batch(list(prompts), add_special_tokens=False)
            response_encs = self._backend.encode_batch(list(responses), add_special_tokens=False)
            for p, r in zip(prompt_encs, response_encs):
                n_p, n_r = len(p.ids), len(r.ids)
                keep_p, keep_r = self._keep(n_p, n_r)
                truncated.append((keep_p, keep_r) != (n_p, n_r))
                if truncated[-1]:
                    p.truncate(keep_p, direction="left")
                    r.truncate(keep_r, direction="right")
                if self.chat:
                    out.append((p.ids + r.ids, None))
                    continue
                if self.encoder:
                    enc = self._backend.post_process(p, r)
                else:
                    enc = self._backend.post_process(Encoding.merge([p, r]))
                out.append(self._with_eos(list(enc.ids), list(enc.type_ids)))
            return out, truncated
        # Tokenizers without a Rust backend: the classic templates by hand.
        prompt_ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        response_ids = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        for p, r in zip(prompt_ids, response_ids):
            keep_p, keep_r = self._keep(len(p), len(r))
            truncated.append((keep_p, keep_r) != (len(p), len(r)))
            p, r = p[len(p) - keep_p:], r[:keep_r]
            if self.chat:
                out.append((p + r, None))
            elif self.encoder:
                cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
                types = [0] * (len(p) + 2) + [1] * (len(r) + 1)
                out.append(([cls, *p, sep, *r, sep], types if self.with_types else None))
            else:
                out.append(self._with_eos(p + r, []))
        return out, truncated

    def _with_eos(self, ids: list[int], types: list[int]) -> tuple[list[int], list[int] | None]:
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
            types.append(types[-1] if types else 0)
        return ids, (types if self.with_types else None)


def model_length_limit(model, tokenizer) -> int | None:
    """The longest sequence the model accepts (position embeddings), when it has such a limit."""
    limits = [getattr(model.config, "max_position_embeddings", None)]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limits.append(tokenizer.model_max_length)
    limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


# ---------------------------------------------------------------------------------------------
# Batching: dynamic padding, optional grouping by length, a data order that is a pure function
# of (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                shuffle: bool = True, group_by_length: bool = True) -> list[list[int]]:
    """The batches (lists of pair indices) of one epoch; the one short batch, if any, comes last.

    With group_by_length, a seeded permutation is cut into mega-batches of 50 batches, each sorted
    by length (transformers' LengthGroupedSampler, mega-batch multiplier 50), cut into batches, and
    the full batches are shuffled so long and short ones alternate through the epoch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = 50 * batch_size
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and shuffle:
        full = [b for b in batches if len(b) == batch_size]
        short = [b for b in batches if len(b) < batch_size]
        rng.shuffle(full)
        batches = full + short
    return batches


def collate(sequences: list[tuple[list[int], list[int] | None]], pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in this batch (dynamic padding). Returns (N, T) tensors."""
    width = max(len(ids) for ids, _ in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((n, width), dtype=torch.long)  # (N, T)
    with_types = sequences[0][1] is not None
    token_type_ids = torch.zeros((n, width), dtype=torch.long) if with_types else None
    for row, (ids, types) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        if with_types:
            token_type_ids[row, :len(types)] = torch.tensor(types)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_types:
        batch["token_type_ids"] = token_type_ids
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# The loss


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float | None = None, weight: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(r_c - r_r - margin), averaged over pairs (weighted when given), plus coef * mean((r_c + r_r)^2).

    r_chosen, r_rejected, margin, weight: (B,). Returns the loss and its terms (detached), one per name.
    """
    reward_gap = r_chosen - r_rejected  # (B,)
    if margin is None:
        margin = torch.zeros_like(reward_gap)
    nll = -F.logsigmoid(reward_gap - margin)  # (B,) Ouyang et al. 2022, eq. 1; Touvron et al. 2023
    if weight is None:
        bt_loss = nll.mean()
    else:
        bt_loss = (weight * nll).sum() / weight.sum().clamp_min(1e-8)  # a weighted mean over pairs
    if center_coef:
        center_loss = center_coef * ((r_chosen + r_rejected) ** 2).mean()  # Eisenstein et al. 2023, eq. 2
    else:
        center_loss = torch.zeros((), device=reward_gap.device)
    loss = bt_loss + center_loss
    terms = {"bt_loss": bt_loss.detach(), "center_loss": center_loss.detach(), "reward_gap": reward_gap.detach()}
    return loss, terms


def pair_rewards(model, pairs: list[dict[str, Any]], pad_id: int, device: torch.device,
                 autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected for a batch of encoded pairs, in one (2B, T) forward pass."""
    sequences = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    inputs = collate(sequences, pad_id, device)
    with autocast:
        rewards = model(**inputs).logits.squeeze(-1).float()  # (2B,)
    r_chosen, r_rejected = rewards.chunk(2)  # (B,), (B,)
    return r_chosen, r_rejected


@torch.inference_mode()
def evaluate(model, pairs: list[dict[str, Any]], batch_size: int, pad_id: int, device: torch.device,
             autocast=None, use_margin: bool = True, ranks: Ranks | None = None) -> dict[str, float]:
    """Held-out accuracy (r_c > r_r), mean rewards, mean reward gap and loss, over all pairs (each process
    scores its share)."""
    autocast = autocast or nullcontext()
    ranks = ranks or Ranks(device)
    was_training = model.training
    model.eval()
    everything = sorted(range(len(pairs)), key=lambda i: -pairs[i]["length"])  # less padding; order-free metrics
    chosen, rejected = [torch.zeros(0, device=device)], [torch.zeros(0, device=device)]
    for order, real in ranks.local_batches(everything, batch_size):
        r_c, r_r = pair_rewards(model, [pairs[i] for i in order], pad_id, device, autocast)
        if real:
            chosen.append(r_c)
            rejected.append(r_r)
    model.train(was_training)
    r_chosen, r_rejected = ranks.gather(torch.cat(chosen)), ranks.gather(torch.cat(rejected))  # (N,)
    margin = torch.tensor([pairs[i]["margin"] for i in everything], device=r_chosen.device)  # (N,)
    loss, _ = bradley_terry_loss(r_chosen, r_rejected, margin if use_margin else None)
    correct = (r_chosen > r_rejected).float()  # (N,)
    cut = torch.tensor([pairs[i].get("truncated", False) for i in everything], device=correct.device)  # (N,)
    apart = {}  # accuracy on the pairs that fit max_length and on those that had to be cut, when there are any
    if (~cut).any():
        apart["rm/accuracy_fit"] = correct[~cut].mean().item()
    if cut.any():
        apart["rm/accuracy_truncated"] = correct[cut].mean().item()
    return {
        **apart,
        "rm/accuracy": correct.mean().item(),
        "rm/chosen_reward": r_chosen.mean().item(),
        "rm/rejected_reward": r_rejected.mean().item(),
        "rm/margin": (r_chosen - r_rejected).mean().item(),
        "rm/eval_loss": loss.item(),
    }


# ---------------------------------------------------------------------------------------------
# Training


def make_adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with transformers' default betas and eps, fused into one kernel where torch has one (CPU and
    CUDA since torch 2.4; transformers' default optim too since torch 2.8). On this CPU the unfused
    per-tensor loop took 1.5 s per step for the MiniLM's 22.7M parameters, the fused kernel 0.22 s."""
    kwargs = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kwargs)


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def encode_pairs(encoder: PairEncoder, ds) -> tuple[list[dict[str, Any]], int]:
    """Encoded pairs: {"chosen": (ids, types), "rejected": (ids, types), "margin", "round_weight", "length",
    "truncated"}."""
    prompts = ds["prompt_turns"] if encoder.chat and "prompt_turns" in ds.column_names else ds["prompt"]
    chosen, cut_c = encoder.encode(prompts, ds["chosen"])
    rejected, cut_r = encoder.encode(prompts, ds["rejected"])
    by_round = ds["round_weight"] if "round_weight" in ds.column_names else [1.0] * len(ds)
    pairs = [{"chosen": c, "rejected": r, "margin": float(m), "round_weight": float(w),
              "length": max(len(c[0]), len(r[0])), "truncated": a or b}
             for c, r, m, w, a, b in zip(chosen, rejected, ds["margin"], by_round, cut_c, cut_r)]
    return pairs, sum(p["truncated"] for p in pairs)


def _prepare_data(args: RewardArgs):
    """Load and check the pairs before anything heavy happens; also how many pairs with an empty response
    were left out of the training and eval files."""
    if not args.train:
        raise EngineError("no training pairs given: pass --train PATH")
    train_ds, skipped = read_pairs(args.train)
    train_ds = weigh_by_round(train_ds, args.older_rounds_weight, args.train)
    version = data_version(args.train)
    skipped_eval: list[int] = []
    if args.eval:
        eval_ds, skipped_eval = read_pairs(args.eval)
        eval_ds = weigh_by_round(eval_ds, args.older_rounds_weight, args.eval)
        version = f"{version}+{data_version(args.eval)}"
    else:
        train_ds, eval_ds = split_pairs(train_ds, args.eval_fraction, args.seed)
    if len(train_ds) == 0:
        raise EngineError("no training pairs left after holding out the eval pairs")
    return train_ds, eval_ds, version, len(skipped) + len(skipped_eval)


def _check_args(args: RewardArgs) -> None:
    for name in ("epochs", "batch_size", "eval_batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise EngineError(f"{name} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise EngineError(f"lr must be positive, got {args.lr}")
    if not 0 <= args.truncated_weight <= 1:
        raise EngineError(f"truncated_weight must be between 0 and 1, got {args.truncated_weight}")
    if not 0 <= args.older_rounds_weight <= 1:
        raise EngineError(f"older_rounds_weight must be between 0 and 1, got {args.older_rounds_weight}")
    for name in ("eval_every", "log_every", "save_every"):
        if getattr(args, name) < 0:
            raise EngineError(f"{name} must be 0 or more, got {getattr(args, name)}")


def _new_window() -> dict[str, Any]:
    """The sums of the steps since the last logged metrics."""
    return {"loss": 0.0, "correct": 0, "pairs": 0, "seconds": 0.0, "steps": 0, "grad_norm": 0.0}


@dataclass
class RewardRun:
    """What the reward model's loop works with, built once by setup(): settings, model, optimizer, the
    encoded pairs, and the counts that a resumable checkpoint carries."""

    args: RewardArgs
    ranks: Ranks
    autocast: Any  # the autocast context of the forward passes (a nullcontext in fp32)
    scaler: torch.amp.GradScaler
    model: Any
    tokenizer: Any
    trainer: Any  # the model as Accelerate wraps it for the update
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    train_pairs: list[dict[str, Any]]
    eval_pairs: list[dict[str, Any]]
    truncated: int  # training and eval pairs cut to max_length
    skipped_empty: int
    version: str  # of the data, as the checkpoints record it
    state_dir: Path  # `<out>.resume/`
    timer: LoopTimer
    step: int = 0
    pairs_seen: int = 0
    tokens_seen: int = 0
    padded_seen: int = 0
    window: dict[str, Any] = field(default_factory=_new_window)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_pairs) / self.args.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.args.epochs

    def batches(self, epoch: int) -> list[list[int]]:
        lengths = [p["length"] for p in self.train_pairs]
        return batch_order(lengths, self.args.batch_size, self.args.seed, epoch, self.args.shuffle,
                           self.args.group_by_length)


def _load_model(args: RewardArgs, device: torch.device, compute_dtype: torch.dtype, source: Path | None):
    """The model (from `source` when resuming) and its tokenizer, checked against max_length."""
    # A LoRA run resumes its adapter (and trained score head) on the base it started from.
    model_source = str(source) if source and not args.lora_r else args.model
    model, tokenizer = load_reward_model(model_source, device, base_dtype(args, device, compute_dtype),
                                         start=args.model)
    model = apply_lora(enable_memory_switches(model, args), args, "SEQ_CLS",
                       source / ADAPTER_DIR if source and args.lora_r else None)
    limit = model_length_limit(model, tokenizer)
    if limit is not None and args.max_length > limit:
        raise EngineError(f"max_length {args.max_length} is longer than the model allows ({limit} tokens); "
                          f"pass --max-length {limit} or less")
    if args.disable_dropout:
        _disable_dropout(model)
    return model, tokenizer


def _encode(args: RewardArgs, model, tokenizer, train_ds, eval_ds):
    """The training and eval pairs as token ids, and how many of them were truncated."""
    encoder = PairEncoder(tokenizer, model.config, args.max_length, args.system_prompt, args.token_types)
    train_pairs, truncated = encode_pairs(encoder, train_ds)
    if args.truncated_weight == 0:
        train_pairs = [p for p in train_pairs if not p["truncated"]]
        if not train_pairs:
            raise EngineError(f"every training pair is longer than max_length {args.max_length} and "
                              "truncated_weight 0 leaves them all out")
    eval_pairs, eval_truncated = encode_pairs(encoder, eval_ds) if len(eval_ds) else ([], 0)
    return train_pairs, eval_pairs, truncated + eval_truncated


def setup(args: RewardArgs, on_progress: ProgressFn, timer: LoopTimer) -> RewardRun:
    """Check the settings and data, load the model, encode the pairs, build the optimizer and schedule and,
    when a resumable checkpoint may continue this run, take its state."""
    _check_args(args)
    train_ds, eval_ds, version, skipped_empty = _prepare_data(args)
    ranks = Ranks(pick_device(args.device), fsdp=args.fsdp)
    if skipped_empty and ranks.main:
        on_progress({"stage": STAGE, "log": f"left out {skipped_empty} pairs with an empty chosen or "
                                            "rejected response (rm/skipped_empty_pairs)"})
    device = ranks.device
    compute_dtype = pick_dtype(device, args.dtype)
    autocast = (torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32
                else nullcontext())
    # fp16 needs loss scaling against underflowing gradients (Micikevicius et al. 2018); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    adam_class(args, device)  # refuses adam_8bit where it cannot run, before loading anything

    source = resume_source(args.out, args.resume, args.resume_from)
    trainer_state = resumable_state(source, stage=STAGE, args=args, keys=RESUME_KEYS, data_version=version)

    set_seed(args.seed)
    model, tokenizer = _load_model(args, device, compute_dtype, weights_source(source) if trainer_state else None)
    train_pairs, eval_pairs, truncated = _encode(args, model, tokenizer, train_ds, eval_ds)

    total_steps = math.ceil(len(train_pairs) / args.batch_size) * args.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (adam_class(args, device)(params, lr=args.lr, weight_decay=args.weight_decay) if args.adam_8bit
                 else make_adamw(params, args.lr, args.weight_decay, device))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    run = RewardRun(args=args, ranks=ranks, autocast=autocast, scaler=scaler, model=model, tokenizer=tokenizer,
                    trainer=model, optimizer=optimizer, scheduler=scheduler, params=params,
                    train_pairs=train_pairs, eval_pairs=eval_pairs, truncated=truncated,
                    skipped_empty=skipped_empty, version=version, state_dir=resume_dir(args.out), timer=timer)
    if trainer_state:
        if "optimizer" in trainer_state:  # else in the checkpoint's shards, set after prepare
            optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        scaler.load_state_dict(trainer_state["scaler"])
        run.step, run.pairs_seen = trainer_state["step"], trainer_state["pairs_seen"]
        run.tokens_seen, run.padded_seen = trainer_state["tokens_seen"], trainer_state["padded_seen"]
        timer.load_state_dict(trainer_state)
        run.window, run.metrics = trainer_state["window"], trainer_state["metrics"]
        set_rng_state(trainer_state["rng"])
        ranks.report(on_progress, {"stage": STAGE, "step": run.step, "total": total_steps, "metrics": run.metrics,
                                   "log": f"resumed from {source} at step {run.step}"})
    ranks.check_divides("batch_size", args.batch_size)
    run.trainer, run.optimizer = ranks.prepare(model, run.optimizer)  # the model itself with one process
    if trainer_state:
        ranks.load_resumable(source, model=model, optimizer=run.optimizer)
    run.params = [p for group in run.optimizer.param_groups for p in group["params"]]  # FSDP's shards
    return run


def pair_weights(args: RewardArgs, pairs: list[dict[str, Any]], device: torch.device) -> torch.Tensor | None:
    """Each pair's loss weight: truncated_weight for a truncated pair, times its round_weight (older_rounds_weight
    ** k); None when every pair weighs the same."""
    if args.truncated_weight == 1 and args.older_rounds_weight == 1:
        return None
    return torch.tensor([(args.truncated_weight if p["truncated"] else 1.0) * p.get("round_weight", 1.0)
                         for p in pairs], device=device)  # (B,)


def train_step(run: RewardRun, indices: list[int]) -> None:
    """One optimizer step of the Bradley-Terry loss on a batch of pairs; adds to the window's sums."""
    args, ranks, device = run.args, run.ranks, run.ranks.device
    mine = ranks.shard(indices)  # a process with no pair of a short last batch adds 0 (scaled below)
    pairs = [run.train_pairs[i] for i in mine or indices[:1]]
    r_chosen, r_rejected = pair_rewards(run.trainer, pairs, run.tokenizer.pad_token_id, device,
                                        run.autocast)  # (B,), (B,)
    margin = torch.tensor([p["margin"] for p in pairs], device=device) if args.use_margin else None
    weight = pair_weights(args, pairs, device)
    loss, terms = bradley_terry_loss(r_chosen, r_rejected, margin, args.center_rewards_coef, weight)
    if ranks.world > 1:  # the mean over the global batch once DDP averages the gradients
        loss = loss * (len(mine) * ranks.world / len(indices))
    ranks.backward(run.scaler.scale(loss))
    run.scaler.unscale_(run.optimizer)
    grad_norm = ranks.clip_grad_norm_(run.params, args.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    # Metrics stay on the device until a log step (no per-step host sync on CUDA).
    window, pairs_all = run.window, run.train_pairs
    window["loss"] += ranks.sum(loss.detach()) / ranks.world
    window["correct"] += ranks.sum((terms["reward_gap"] > 0).sum() if mine else 0)
    window["grad_norm"] += grad_norm.detach()
    window["pairs"] += len(indices)
    window["steps"] += 1
    run.pairs_seen += len(indices)
    run.tokens_seen += sum(len(pairs_all[i]["chosen"][0]) + len(pairs_all[i]["rejected"][0]) for i in indices)
    run.padded_seen += int(ranks.sum(2 * len(mine) * max((pairs_all[i]["length"] for i in mine), default=0)))


def log(run: RewardRun) -> None:
    """At a log step (and the last), the window's means into the metrics; at an eval step, the held-out ones."""
    args, step, last = run.args, run.step, run.step == run.total_steps
    window = run.window
    if window["steps"] and (last or (args.log_every and step % args.log_every == 0)):
        run.metrics.update({
            "rm/loss": float(window["loss"]) / window["steps"],
            "rm/train_accuracy": float(window["correct"]) / window["pairs"],
            "rm/grad_norm": float(window["grad_norm"]) / window["steps"],
            "rm/lr": run.scheduler.get_last_lr()[0],
            "rm/pairs_per_second": window["pairs"] / max(window["seconds"], 1e-9),
        })
        run.window = _new_window()
    if run.eval_pairs and (last or (args.eval_every and step % args.eval_every == 0)):
        with run.timer.paused():
            run.metrics.update(evaluate(run.model, run.eval_pairs, args.eval_batch_size, run.tokenizer.pad_token_id,
                                        run.ranks.device, run.autocast, args.use_margin, run.ranks))


def save_resume(run: RewardRun) -> None:
    """Write the resumable checkpoint at `<out>.resume/`: the model, optimizer, schedule, counts and RNG (every
    process: under FSDP each writes its shards)."""
    args, step = run.args, run.step
    run.ranks.save_resumable(run.state_dir, model=run.model, tokenizer=run.tokenizer, optimizer=run.optimizer,
                             stage=STAGE, args=args, step=step, metrics=run.metrics, data_version=run.version,
                             trainer_state={"scheduler": run.scheduler.state_dict(),
                                            "scaler": run.scaler.state_dict(),
                                            "rng": rng_state(), "step": step, **run.timer.state_dict(),
                                            "pairs_seen": run.pairs_seen, "tokens_seen": run.tokens_seen,
                                            "padded_seen": run.padded_seen, "window": run.window,
                                            "metrics": run.metrics,
                                            "data_order": run.batches(step // run.steps_per_epoch)})


def report(run: RewardRun, on_progress: ProgressFn) -> None:
    """Tell on_progress about the step; save the resumable checkpoint every save_every steps, and before an
    exception from on_progress (unless StopWithoutSaving: the run was taken away)."""
    step, total = run.step, run.total_steps

    def save() -> None:
        with run.timer.paused():
            save_resume(run)

    report_and_save(run.ranks, on_progress, {"stage": STAGE, "step": step, "total": total,
                                             "metrics": dict(run.metrics)},
                    save, due=bool(run.args.save_every and step % run.args.save_every == 0 and step != total))


def main(args: RewardArgs, on_progress: ProgressFn = no_progress, timer: LoopTimer | None = None) -> dict[str, Any]:
    """Train a Bradley-Terry reward model; returns the final metrics (rm/accuracy on the held-out pairs).
    `timer` measures the loop (a fresh LoopTimer by default); a benchmark may pass its own to read it."""
    run = setup(args, on_progress, timer or LoopTimer())
    run.model.train()
    run.timer.start()
    start_epoch, start_batch = divmod(run.step, run.steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        for indices in run.batches(epoch)[start_batch if epoch == start_epoch else 0:]:
            with run.timer.step(run.ranks.device) as lap:
                train_step(run, indices)
            run.window["seconds"] += lap.seconds
            log(run)
            report(run, on_progress)
    run.timer.stop()

    final = dict(run.metrics)
    final.update({
        "rm/pairs_per_second": run.pairs_seen / max(run.timer.train_seconds, 1e-9),
        "rm/train_seconds": run.timer.train_seconds,
        "rm/loop_seconds": run.timer.loop_seconds,
        "rm/loop_cpu_seconds": run.timer.loop_cpu_seconds,
        "rm/steps": run.step,
        "rm/train_pairs": len(run.train_pairs),
        "rm/eval_pairs": len(run.eval_pairs),
        "rm/truncated_pairs": run.truncated,
        "rm/skipped_empty_pairs": run.skipped_empty,
        "rm/train_tokens": run.tokens_seen,
        "rm/padded_tokens": run.padded_seen,
    })
    trained = run.ranks.trained_model(run.model, run.tokenizer)  # every process gathers its shards under FSDP
    if run.ranks.main:
        save_checkpoint(args.out, stage=STAGE, args=args, step=run.step, metrics=final, data_version=run.version,
                        pretrained={"": trained})
        shutil.rmtree(run.state_dir, ignore_errors=True)
    run.ranks.wait()
    return final


# ---------------------------------------------------------------------------------------------
# Scoring text with a trained reward model (PPO, review pages)


class RewardScorer:
    """Scores (prompt, response) texts with a reward model and its own tokenizer.

    `path_or_model` is a checkpoint path (or hub name) or an already-loaded (model, tokenizer).
    """

    def __init__(self, path_or_model, device: str = "auto", batch_size: int = 32, max_length: int = 512,
                 dtype: str = "auto", system_prompt: str = ""):
        if isinstance(path_or_model, (tuple, list)):
            self.model, self.tokenizer = path_or_model
            self.device = next(self.model.parameters()).device
        else:
            self.device = pick_device(device)
            self.model, self.tokenizer = load_reward_model(str(path_or_model), self.device,
                                                           pick_dtype(self.device, dtype))
        limit = model_length_limit(self.model, self.tokenizer)
        self.max_length = min(max_length, limit) if limit else max_length
        self.batch_size = batch_size
        # Score in the format the model was trained in (checkpoints from before token_types had them on).
        meta = {} if isinstance(path_or_model, (tuple, list)) else (read_checkpoint_meta(path_or_model) or {})
        token_types = meta.get("args", {}).get("token_types", True)
        self.encoder = PairEncoder(self.tokenizer, self.model.config, self.max_length, system_prompt, token_types)
        self.model.eval()

    @torch.inference_mode()
    def score(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        """Rewards, (B,) float32 on the CPU, in the order given."""
        if len(prompts) != len(responses):
            raise EngineError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return torch.zeros(0)
        encoded, _ = self.encoder.encode(list(prompts), list(responses))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        scores = torch.empty(len(encoded))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            inputs = collate([encoded[i] for i in chunk], self.tokenizer.pad_token_id, self.device)
            rewards = self.model(**inputs).logits[:, 0].float().cpu()  # (b,)
            scores[chunk] = rewards
        return scores

    __call__ = score


# ---------------------------------------------------------------------------------------------
# Reward sources of PPO and GRPO: reward-model checkpoints, rule judges ("rule:NAME"), ready safety classifiers
# ("classifier:LABEL:PATH") and a callable, summed with weights, or mixed as quality and safety (RewardMixArgs)

GATED_SHARE = "gated"  # the score part that gives the share of responses the gate handed to safety
PROBABILITY_EPS = 1e-6  # a classifier's P(safe) is kept this far from 0 and 1 before its logit

RewardFn = Callable[[list[str], list[str]], Sequence[float]]  # (prompt texts, responses) -> scores


def _rule_judges() -> dict[str, Callable[[str, str], float]]:
    return RULE_JUDGES


def split_classifier(source: str) -> tuple[int, str]:
    """"classifier:LABEL:PATH" -> (LABEL, PATH): the label index that means safe and the model's path."""
    label, _, path = source[len(CLASSIFIER_PREFIX):].partition(":")
    if not label.isdigit() or not path:
        raise EngineError(f"reward source {source!r}: write a safety classifier as classifier:LABEL:PATH, LABEL the "
                          "index of its label that means safe")
    return int(label), path


def source_roles(reward_models: Sequence[str], roles: Sequence[str]) -> list[str]:
    """Each source's role: as given, else safety for a classifier and quality for the others."""
    return list(roles) or [SAFETY if s.startswith(CLASSIFIER_PREFIX) else QUALITY for s in reward_models]


def _check_mix(reward_models: Sequence[str], mix: RewardMixArgs, has_fn: bool) -> None:
    if mix.reward_names and len(mix.reward_names) != len(reward_models):
        raise EngineError(f"{len(mix.reward_names)} reward names for {len(reward_models)} reward models: "
                          "give one name per model")
    names = mix.reward_names or list(reward_models)
    if len(set(names)) != len(names) or GATED_SHARE in names:
        raise EngineError(f"reward names must differ from each other and from {GATED_SHARE!r}, got {names}")
    if mix.reward_roles and len(mix.reward_roles) != len(reward_models):
        raise EngineError(f"{len(mix.reward_roles)} reward roles for {len(reward_models)} reward models: "
                          "give one role per model")
    bad = [role for role in mix.reward_roles if role not in ROLES]
    if bad:
        raise EngineError(f"reward role {bad[0]!r} is not one of {', '.join(ROLES)}")
    if mix.reward_combination not in COMBINATIONS:
        raise EngineError(f"reward_combination must be one of {', '.join(COMBINATIONS)}, "
                          f"got {mix.reward_combination!r}")
    roles = source_roles(reward_models, mix.reward_roles)
    if SAFETY in roles and mix.reward_combination == SUM:
        raise EngineError("a safety reward source needs reward_combination weighted or gated")
    if mix.reward_combination != SUM and SAFETY in roles and QUALITY not in roles and not has_fn:
        raise EngineError(f"reward_combination {mix.reward_combination} needs a quality reward source besides "
                          "the safety one")
    if not 0 <= mix.safety_weight <= 1:
        raise EngineError(f"safety_weight must be between 0 and 1, got {mix.safety_weight}")
    if not 0 <= mix.safety_threshold <= 1:
        raise EngineError(f"safety_threshold is a probability, between 0 and 1, got {mix.safety_threshold}")


def check_reward_sources(
    reward_models: Sequence[str], reward_weights: Sequence[float], has_fn: bool, mix: RewardMixArgs | None = None
) -> list[float]:
    """Refuse unknown rule names, missing checkpoints, mismatched weights, names or roles and a safety source
    without a combination that uses it, before any step."""
    if not reward_models and not has_fn:
        raise EngineError("no reward: pass at least one --reward-model PATH or rule:NAME")
    weights = list(reward_weights) if reward_weights else [1.0] * len(reward_models)
    if len(weights) != len(reward_models):
        raise EngineError(
            f"{len(reward_weights)} reward weights for {len(reward_models)} reward models: "
            "give one weight per model"
        )
    for source in reward_models:
        if source.startswith(RULE_PREFIX):
            name = source[len(RULE_PREFIX) :]
            judges = _rule_judges()
            if name not in judges:
                raise EngineError(f"unknown rule judge {name!r}: known rules are {', '.join(sorted(judges))}")
        elif source.startswith(CLASSIFIER_PREFIX):
            check_model_source(split_classifier(source)[1])  # a path, or a name in the local cache
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise EngineError(f"reward model path {source!r} does not exist")
            if not (path / "config.json").exists():
                raise EngineError(
                    f"reward model path {source!r} has no config.json: not a save_pretrained directory"
                )
    _check_mix(reward_models, mix or RewardMixArgs(), has_fn)
    return [float(w) for w in weights]


class SafetyClassifier:
    """P(safe) of each response by a ready sequence-classification model (a safety or toxicity classifier): the
    softmax of its logits at `label`, or the sigmoid of a one-output model's. It reads the response alone."""

    def __init__(self, path: str, label: int, device: torch.device, batch_size: int = 32, max_length: int = 512):
        self.device, self.batch_size = device, batch_size
        self.model, self.tokenizer = load_classifier(path, device)
        labels = self.model.config.num_labels
        if not 0 <= label < max(labels, 1) or (labels == 1 and label != 0):
            raise EngineError(f"safety classifier {path!r} has {labels} labels ({self.model.config.id2label}): "
                              f"label {label} is not one of them")
        self.label, self.labels = label, labels
        limit = model_length_limit(self.model, self.tokenizer)
        self.max_length = min(max_length, limit) if limit else max_length
        self.model.eval()

    @torch.inference_mode()
    def score(self, instructions: list[Prompt], responses: list[str]) -> torch.Tensor:
        """P(safe), (B,) float32 on the CPU, in the order given."""
        probabilities = []
        for start in range(0, len(responses), self.batch_size):
            inputs = self.tokenizer(responses[start:start + self.batch_size], truncation=True,
                                    max_length=self.max_length, padding=True, return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits.float()  # (b, labels)
            if self.labels == 1:
                probabilities.append(torch.sigmoid(logits[:, 0]).cpu())
            else:
                probabilities.append(torch.softmax(logits, dim=-1)[:, self.label].cpu())
        return torch.cat(probabilities) if probabilities else torch.zeros(0)


@dataclass
class RewardSource:
    """One reward source of CombinedReward: its name, weight, role and scorer of (prompts, responses)."""

    name: str
    weight: float
    role: str
    score: Callable[[list[Prompt], list[str]], torch.Tensor]
    is_probability: bool = False  # scores are P(safe) (a classifier's), not a reward model's logit-scale reward

    def logit(self, values: torch.Tensor) -> torch.Tensor:
        """Scores on the logit scale that is whitened: a probability's logit (Llama 2's LOGIT), else as they are."""
        if not self.is_probability:
            return values
        return torch.logit(values.clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS))

    def probability(self, values: torch.Tensor) -> torch.Tensor:
        """P(safe) of each score: a classifier's own, else the sigmoid of a reward (Llama 2's safety score)."""
        return values if self.is_probability else torch.sigmoid(values)


def combine(quality: torch.Tensor, safety: torch.Tensor, safety_probability: torch.Tensor, mix: RewardMixArgs
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined score of whitened quality and safety scores, and which responses the gate handed to safety.

    weighted: (1 - w) * quality + w * safety (the seed material's safety alignment). gated: safety where P(safe) < threshold,
    else quality (Llama 2, eq. 3, less its IS_SAFETY(prompt) case: prompts here carry no such tag)."""
    if mix.reward_combination == GATED:
        gated = safety_probability < mix.safety_threshold
        return torch.where(gated, safety, quality), gated
    w = mix.safety_weight
    return (1 - w) * quality + w * safety, torch.zeros_like(quality, dtype=torch.bool)


class CombinedReward:
    """Reward sources, each scoring decoded (prompt, response) text (a reward model sees the prompt's chat turns in
    its own template, rule judges and reward_fn the prompt as text, a classifier the response), summed with their
    weights, or combined as quality and safety by RewardMixArgs.reward_combination.

    Normalisation: weighted and gated whiten each source by the running mean and std of all its scores so far
    (on the logit scale), as Llama 2 whitens its combined logit (sec. 3.2.3). Running moments rather than a reward
    model's own calibration: a Bradley-Terry reward is only defined up to a constant (Bradley & Terry 1952), so
    two reward models' raw scores share no scale; the quality sources are summed with their weights, so are the
    safety ones, and the gate reads the safety sources' mean P(safe) before whitening (Llama 2 gates on 0.15).
    One source alone is left as it is: there is nothing to combine it with."""

    def __init__(
        self,
        reward_models: Sequence[str],
        weights: Sequence[float],
        device: torch.device,
        reward_fn: RewardFn | None = None,
        system_prompt: str = "",
        mix: RewardMixArgs | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] = lambda values: values,
    ):
        self.mix, self.gather = mix or RewardMixArgs(), gather
        names = self.mix.reward_names or list(reward_models)
        roles = source_roles(reward_models, self.mix.reward_roles)
        self.parts: list[RewardSource] = []
        for source, name, weight, role in zip(reward_models, names, weights, roles, strict=True):
            if source.startswith(RULE_PREFIX):
                judge = _rule_judges()[source[len(RULE_PREFIX) :]]
                self.parts.append(RewardSource(name, weight, role, self._rule(judge)))
            elif source.startswith(CLASSIFIER_PREFIX):
                label, path = split_classifier(source)
                classifier = SafetyClassifier(path, label, device)
                self.parts.append(RewardSource(name, weight, role, classifier.score, is_probability=True))
            else:
                scorer = RewardScorer(source, device=str(device), system_prompt=system_prompt)
                self.parts.append(RewardSource(name, weight, role, self._scorer(scorer)))
        if reward_fn is not None:
            self.parts.append(RewardSource("reward_fn", 1.0, QUALITY, self._callable(reward_fn)))
        self.moments = {part.name: RunningMoments() for part in self.parts}

    @staticmethod
    def _rule(judge):
        def score(instructions, responses):
            return torch.tensor([float(judge(prompt_text(i), r)) for i, r in zip(instructions, responses, strict=True)])

        return score

    @staticmethod
    def _scorer(scorer):
        def score(instructions, responses):
            return scorer.score(instructions, responses).detach().float().cpu()

        return score

    @staticmethod
    def _callable(fn):
        def score(instructions, responses):
            values = list(fn([prompt_text(i) for i in instructions], responses))
            if len(values) != len(responses):
                raise EngineError(f"reward_fn returned {len(values)} scores for {len(responses)} responses")
            return torch.tensor([float(v) for v in values])

        return score

    def whiten(self, part: RewardSource, values: torch.Tensor) -> torch.Tensor:
        """A source's scores less the running mean of its scores so far, over their std (updated with the scores of
        every process first, so that all processes whiten alike)."""
        moments, logits = self.moments[part.name], part.logit(values)
        moments.update(self.gather(logits))
        return (logits - moments.mean) / (moments.std + 1e-8)

    def __call__(
        self, instructions: list[str], responses: list[str]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The combined score of each response, (B,), and the mean raw score of each source by name (with, when
        gated, the share of responses the gate handed to safety)."""
        scores = {part.name: part.score(instructions, responses) for part in self.parts}  # name -> (B,)
        parts = {name: values.mean().item() for name, values in scores.items()}
        if self.mix.reward_combination == SUM or len(self.parts) == 1:
            return sum(part.weight * scores[part.name] for part in self.parts), parts
        totals = {QUALITY: torch.zeros(len(responses)), SAFETY: torch.zeros(len(responses))}  # role -> (B,)
        safe, safety_parts = torch.zeros(len(responses)), [part for part in self.parts if part.role == SAFETY]
        for part in self.parts:
            totals[part.role] += part.weight * self.whiten(part, scores[part.name])
        if not safety_parts:
            return totals[QUALITY], parts
        for part in safety_parts:
            safe += part.probability(scores[part.name]) / len(safety_parts)
        total, gated = combine(totals[QUALITY], totals[SAFETY], safe, self.mix)
        if self.mix.reward_combination == GATED:
            parts[GATED_SHARE] = gated.float().mean().item()
        return total, parts

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The running moments of each source, for a resumable checkpoint."""
        return {name: moments.state_dict() for name, moments in self.moments.items()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        for name, moments in state.items():
            if name in self.moments:
                self.moments[name].load_state_dict(moments)


# ---------------------------------------------------------------------------------------------
# Command line


def cli(argv: list[str] | None = None) -> int:
    return run_cli(RewardArgs, main, argv, stage="reward", required=("train", "out"),
                   flag_names={"use_margin": "margin"}, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli())
