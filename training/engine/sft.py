"""Supervised fine-tuning: teach a causal LM to answer instructions from demonstrations.

The first stage of RLHF (Ouyang et al. 2022, step 1). Each example is (instruction, input,
output), or a conversation (`messages`, TRL's conversational format). The loss is the token-level
cross-entropy of the replies only: every other position gets label -100 (as in Alpaca's train.py,
Taori et al. 2023). A model with a chat template sees the example through it, and learns each
assistant turn with its end-of-turn marker; a base model sees the seed's instruction template
(common.render_prompt), with the tokenizer's EOS token appended so it learns to stop.

    python -m training.engine.sft --model PATH --train data.jsonl [--eval held.jsonl] --out DIR

The last line of output is one JSON object of final metrics (sft/loss, sft/eval_loss, ...).
"""

from __future__ import annotations

import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.engine.checkpoints import report_and_save, resumable_state, save_checkpoint, weights_source
from training.engine.cli import run_cli
from training.engine.common import (
    ADAPTER_DIR,
    EngineError,
    MemoryArgs,
    ProgressFn,
    adam_class,
    apply_lora,
    can_share_prefix,
    chat_segments,
    chat_turns,
    enable_memory_switches,
    ensure_pad_token,
    has_chat_template,
    load_causal_lm,
    no_progress,
    pick_device,
    pick_dtype,
    prefix_forward,
    render_prompt,
    rng_state,
    set_rng_state,
    set_seed,
    shared_prefix_length,
)
from training.engine.ranks import Ranks

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (PyTorch cross_entropy default)


@dataclass
class SFTArgs(MemoryArgs):
    model: str = ""
    """Causal LM to fine-tune: a Hugging Face name or a save_pretrained directory."""
    train: str = ""
    """JSONL file, one {"instruction", "input" (optional), "output"} or {"messages": [chat turns]} per line."""
    eval: str | None = None
    """Optional JSONL file of the same shape: its response-token loss is reported as sft/eval_loss."""
    out: str = "var/checkpoints/sft"
    """Directory for the fine-tuned checkpoint (save_pretrained + pairloop.json), written atomically."""
    epochs: float = 3.0
    """Passes over the training data (Alpaca: 3)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 lets `epochs` decide (HF Trainer's max_steps)."""
    lr: float = 2e-5
    """Peak AdamW learning rate (Alpaca: 2e-5 for a pretrained 7B model; small models from scratch want ~1e-3)."""
    batch_size: int = 16
    """Examples per optimizer step (Alpaca used 128 over 4 GPUs; 16 suits a CPU)."""
    max_length: int = 512
    """Longest prompt+response in tokens (Alpaca's model_max_length: 512); longer is an error unless truncate."""
    truncate: bool = False
    """Cut examples longer than max_length (or the model's positions) instead of refusing them."""
    system_prompt: str = ""
    """System turn put before each example that has none (as at sampling time); none by default."""
    warmup_ratio: float = 0.03
    """Fraction of steps with linear warmup before the cosine decay (Alpaca: 0.03, cosine)."""
    weight_decay: float = 0.0
    """AdamW weight decay (Alpaca: 0)."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay (PyTorch default 0.999; nanoGPT uses 0.99 for small models from scratch)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (HF Trainer's max_grad_norm default: 1.0)."""
    group_by_length: bool = True
    """Batch examples of similar length to waste less compute on padding (HF Trainer's group_by_length)."""
    share_prefix: bool = True
    """Run the prompt preamble every row shares once per batch (exact; off by itself when dropout is on)."""
    seed: int = 42
    """Seed for data order and initialisation noise (HF Trainer's default: 42)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16."""
    log_every: int = 10
    """Emit a progress event with the mean loss every this many steps (every step still reports progress)."""
    save_every: int = 0
    """Write the resumable trainer state to `out` every N steps; 0: only when stopped (HF Trainer: save_steps)."""
    resume: bool = False
    """Continue from the trainer state saved in `out` (after a cancel or a kill) instead of starting over."""
    data_version: str | None = None
    """Label of the training data recorded in the checkpoint (e.g. an export's version)."""


class ModelAndTokenizer:
    """Saves a model and its tokenizer into one save_pretrained directory (for save_checkpoint)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------
# Data


def read_examples(path: str | Path, what: str = "training data") -> list[dict[str, Any]]:
    """JSONL rows {"instruction", "input"?, "output"} or {"messages": [{role, content}]}; any problem names
    the file and line."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise EngineError(f"{what} file {str(path)!r} does not exist")
    if path.is_dir():
        raise EngineError(f"{what} path {str(path)!r} is a directory; give a JSONL file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EngineError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise EngineError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if "messages" in row:
                rows.append({"messages": _checked_turns(row["messages"], f"{path}:{lineno}"), "line": lineno})
                continue
            for key in ("instruction", "output"):
                if key not in row:
                    raise EngineError(f"{path}:{lineno}: missing {key!r} (each line needs instruction and output)")
            for key in ("instruction", "input", "output"):
                if key in row and not isinstance(row[key], str):
                    raise EngineError(f"{path}:{lineno}: {key!r} must be text, got {type(row[key]).__name__}")
            if not row["output"].strip():
                raise EngineError(f"{path}:{lineno}: 'output' is empty")
            rows.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"],
                         "line": lineno})
    if not rows:
        raise EngineError(f"{what} file {str(path)!r} has no examples")
    return rows


def _checked_turns(turns: Any, where: str) -> list[dict[str, str]]:
    """A conversation's turns, each {"role": system | user | assistant, "content": text}, one assistant at least."""
    if not isinstance(turns, list) or not turns:
        raise EngineError(f"{where}: 'messages' must be a non-empty list of chat turns")
    for number, turn in enumerate(turns, start=1):
        if (not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant")
                or not isinstance(turn.get("content"), str)):
            raise EngineError(f"{where}: 'messages' turn {number} must be {{\"role\": system, user or assistant, "
                              f"\"content\": text}}")
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        raise EngineError(f"{where}: 'messages' has no non-empty assistant turn to learn from")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def model_max_positions(model) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def example_turns(example: dict[str, Any], system_prompt: str = "") -> list[dict[str, str]]:
    """An example as a conversation: its messages, or its instruction (and input) as a user turn and its
    output as the assistant's; `system_prompt` first when it has no system turn."""
    if "messages" in example:
        turns = [dict(t) for t in example["messages"]]
        if system_prompt and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": system_prompt})
        return turns
    return chat_turns(example["instruction"], example.get("input", ""), system_prompt) + [
        {"role": "assistant", "content": example["output"]}]


def encode_chat(tokenizer, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation in the tokenizer's chat template: the assistant replies (their
    end-of-turn marker included) keep their ids as labels, every other token is -100. Each piece is
    tokenized on its own, as sampling sees a rendered prompt and then the tokens it generates."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_segments(tokenizer, turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_examples(tokenizer, examples: list[dict[str, Any]], *, max_length: int, model_positions: int | None,
                    truncate: bool, source: str = "example", system_prompt: str = ""
                    ) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example: only reply tokens carry labels, every other position -100.

    With a chat template: common.chat_segments' pieces (encode_chat). Without: the instruction template
    (common.render_prompt) and the response + EOS, tokenized separately, as sample.py sees them.
    """
    limit = min(max_length, model_positions) if model_positions else max_length
    if has_chat_template(tokenizer):
        encoded = []
        for i, example in enumerate(examples):
            try:
                ids, labels = encode_chat(tokenizer, example_turns(example, system_prompt))
            except EngineError as exc:
                where = f"{source} line {example['line']}" if "line" in example else f"{source} {i}"
                raise EngineError(f"{where}: {exc}") from None
            if len(ids) > limit:
                if not truncate:
                    where = f"{source} line {example['line']}" if "line" in example else f"{source} {i}"
                    raise EngineError(f"{where} is {len(ids)} tokens long, but the limit is {limit}; "
                                      "shorten it or ask for truncation (--truncate)")
                ids, labels = ids[:limit], labels[:limit]  # a conversation keeps its start
                if all(label == IGNORE_INDEX for label in labels):
                    raise EngineError(f"{source} {i + 1}: its first reply starts after {limit} tokens, so "
                                      "truncation leaves nothing to learn; raise max_length or shorten it")
            encoded.append((ids, labels))
        return encoded
    if tokenizer.eos_token_id is None:
        raise EngineError("the tokenizer has no eos token: the response needs one appended so the model learns to stop")
    if any("messages" in e for e in examples):
        raise EngineError("conversations (messages) need a model with a chat template; this tokenizer has none")
    prompts = [render_prompt(tokenizer, e["instruction"], e.get("input", ""), system_prompt) for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer([e["output"] for e in examples], add_special_tokens=False)["input_ids"]
    encoded = []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        r = list(r) + [tokenizer.eos_token_id]
        if len(p) + len(r) > limit:
            if not truncate:
                where = f"{source} line {examples[i]['line']}" if "line" in examples[i] else f"{source} {i}"
                bound = (f"the model allows {model_positions} positions" if model_positions and limit == model_positions
                         else f"max_length is {max_length}")
                raise EngineError(f"{where} is {len(p) + len(r)} tokens long, but {bound}; "
                                  "shorten it or ask for truncation (--truncate)")
            # Keep the whole prompt when it fits (cutting the response's tail); else its last tokens
            # and the first half-window of the response.
            keep_r = limit - len(p) if len(p) < limit else min(len(r), max(1, limit // 2))
            r = r[:keep_r]
            p = p[len(p) - (limit - len(r)):]
        encoded.append((list(p) + r, [IGNORE_INDEX] * len(p) + r))
    return encoded


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (B, T)."""
    longest = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch) so a resumed run sees the same order.

    With group_by_length, a shuffled order is cut into mega-batches of 50 batches, each sorted by
    length, then the batches are shuffled (HF Trainer's LengthGroupedSampler).
    """
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if group_by_length:
        mega = 50 * batch_size
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


MIN_SHARED_PREFIX = 4  # below this many shared tokens, the plain forward


def response_loss(model, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                  share_prefix: bool = False) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over response tokens of the batch, and how many there were.

    With `share_prefix`, the tokens every row starts with (the Alpaca template's preamble, about
    40% of a demo example) go through the model once (common.prefix_forward): the same logits and
    gradients as the full forward, for less compute.
    """
    shared = 0
    if share_prefix and input_ids.shape[0] > 1:
        first_label = int((labels != IGNORE_INDEX).long().argmax(1).min())  # earliest response position
        shared = shared_prefix_length(input_ids, mask, stop=first_label)
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    logits = prefix_forward(model, input_ids, mask, shared).logits  # (B, T - P, V) for positions P..T-1
    pred = logits[:, :-1, :].float()  # position t predicts token t+1
    target = labels[:, shared + 1:]  # (B, T-P-1)
    n_tokens = int((target != IGNORE_INDEX).sum())
    loss = F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss, n_tokens


@torch.no_grad()
def eval_loss(model, encoded, pad_id: int, batch_size: int, device, ranks: Ranks | None = None) -> float:
    """Token-weighted mean response loss over `encoded` (each process scores its share)."""
    ranks = ranks or Ranks(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch, real in ranks.local_batches(encoded, batch_size):
        loss, n = response_loss(model, *collate(batch, pad_id, device))
        total += float(loss) * n * real
        count += n * real
    model.train(was_training)
    if ranks.world > 1:
        total, count = float(ranks.sum(total)), int(ranks.sum(count))
    return total / max(count, 1)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup then cosine decay to zero (Alpaca's schedule: cosine, warmup_ratio 0.03)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class SFTRun:
    """What the SFT loop works with, built once by _setup(): settings, the model and its wrapped trainer,
    the optimizer, the encoded examples and the schedule's length."""

    args: SFTArgs
    ranks: Ranks
    device: Any  # the model's
    model: Any
    trainer: Any  # the model as Accelerate wraps it for the update
    optimizer: Any
    encoded: list[tuple[list[int], list[int]]]
    encoded_eval: list[tuple[list[int], list[int]]] | None
    pad_id: int
    total: int  # optimizer steps of the whole run
    warmup: int
    share_prefix: bool
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    recent: list[float] = field(default_factory=list)  # the last log_every losses
    tokens_seen: int = 0
    train_seconds: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.encoded) / self.args.batch_size)

    def trainer_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights and the optimizer's state (save's trainer_state)."""
        return {"step": self.step, "metrics": self.metrics, "recent": self.recent, "rng": rng_state()}


def _setup(model, tokenizer, examples, args: SFTArgs, eval_examples, resume_state, ranks: Ranks | None,
           shards_from: str | Path | None) -> SFTRun:
    """Tokenize and check all data, build the optimizer, take the resumed state; the eval loss at the start."""
    if not examples:
        raise EngineError("no training examples")
    if args.batch_size < 1:
        raise EngineError(f"batch_size must be at least 1, got {args.batch_size}")
    ranks = ranks or Ranks(next(model.parameters()).device)
    device = ranks.device  # not the weights': a process that built the model empty holds them on meta until prepare
    ensure_pad_token(tokenizer, model)
    positions = model_max_positions(model)
    encoded = encode_examples(tokenizer, examples, max_length=args.max_length, model_positions=positions,
                              truncate=args.truncate, source=args.train or "example", system_prompt=args.system_prompt)
    encoded_eval = (encode_examples(tokenizer, eval_examples, max_length=args.max_length, model_positions=positions,
                                    truncate=args.truncate, source=args.eval or "eval example",
                                    system_prompt=args.system_prompt)
                    if eval_examples else None)
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.epochs * steps_per_epoch))

    # AdamW without decay on biases and LayerNorm weights (as in nanoGPT and HF Trainer).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = adam_class(args, device)([{"params": decay, "weight_decay": args.weight_decay},
                                          {"params": no_decay, "weight_decay": 0.0}],
                                         lr=args.lr, betas=(0.9, args.adam_beta2))
    run = SFTRun(args=args, ranks=ranks, device=device, model=model, trainer=model, optimizer=optimizer, encoded=encoded,
                 encoded_eval=encoded_eval, pad_id=tokenizer.pad_token_id, total=total,
                 warmup=max(1, int(args.warmup_ratio * total)),
                 # The prefix forward runs the model twice before one backward, which DDP's wrapper does not allow.
                 share_prefix=args.share_prefix and can_share_prefix(model) and ranks.world == 1)
    if resume_state is not None:
        if "optimizer" in resume_state:  # else in the checkpoint's shards, set after prepare
            optimizer.load_state_dict(resume_state["optimizer"])
        run.step = int(resume_state["step"])
        run.metrics = dict(resume_state.get("metrics", {}))
        run.recent = list(resume_state.get("recent", []))  # sft/loss averages the last log_every losses
        set_rng_state(resume_state["rng"])

    run.trainer, run.optimizer = ranks.prepare(model, optimizer)  # the model itself with one process
    if resume_state is not None:
        ranks.load_resumable(shards_from, model=model, optimizer=run.optimizer)
    if encoded_eval is not None and "sft/eval_loss_start" not in run.metrics:
        run.metrics["sft/eval_loss_start"] = eval_loss(model, encoded_eval, run.pad_id, args.batch_size, device, ranks)
    return run


def _train_step(run: SFTRun, batch: list[int]) -> None:
    """One optimizer step of the response-only loss at the schedule's learning rate; updates the metrics."""
    args, ranks, device = run.args, run.ranks, run.device
    started = time.perf_counter()
    mine = ranks.shard(batch)
    input_ids, mask, labels = collate([run.encoded[i] for i in mine or batch[:1]], run.pad_id, device)  # (B, T)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, run.total, run.warmup, args.lr)
    loss, n_local = response_loss(run.trainer, input_ids, mask, labels, run.share_prefix)
    n_seen = int(mask.sum())
    if ranks.world > 1:  # the mean over the global batch's tokens once DDP averages the gradients;
        n_local, n_seen = n_local * bool(mine), n_seen * bool(mine)  # a process with no row adds 0
        loss = loss * (n_local * ranks.world / max(float(ranks.sum(n_local)), 1.0))
    ranks.backward(loss)
    grad_norm = ranks.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)  # freed now, not held through the next forward
    run.step += 1
    run.train_seconds += time.perf_counter() - started
    run.tokens_seen += int(ranks.sum(n_seen))
    loss_value = float(ranks.sum(loss.detach())) / ranks.world
    if not math.isfinite(loss_value):
        raise EngineError(f"the loss became {loss_value} at step {run.step}; lower the learning rate")
    run.metrics.setdefault("sft/first_loss", loss_value)
    run.recent = (run.recent + [loss_value])[-max(1, args.log_every):]
    run.metrics.update({"sft/loss": sum(run.recent) / len(run.recent), "sft/lr": run.optimizer.param_groups[0]["lr"],
                        "sft/grad_norm": float(grad_norm), "sft/epoch": run.step / run.steps_per_epoch,
                        "sft/tokens_per_s": run.tokens_seen / max(run.train_seconds, 1e-9)})


def _report(run: SFTRun, on_progress: ProgressFn, save: typing.Callable | None) -> None:
    """Tell on_progress about the step (the full metrics every log_every steps); save every save_every steps,
    and before an exception from on_progress (unless StopWithoutSaving: the run was taken away)."""
    step, total = run.step, run.total
    event = {"stage": "sft", "step": step, "total": total, "metrics": dict(run.metrics)}
    if step % max(1, run.args.log_every) and step != total:
        event["metrics"] = {"sft/loss": run.recent[-1]}
    saves = save is not None and step < total
    report_and_save(run.ranks, on_progress, event,
                    (lambda: save(step, run.metrics, run.trainer_state(), run.optimizer)) if saves else None,
                    due=bool(saves and run.args.save_every and step % run.args.save_every == 0))


def train_sft(model, tokenizer, examples: list[dict[str, Any]], args: SFTArgs, on_progress: ProgressFn = no_progress,
              *, eval_examples: list[dict[str, Any]] | None = None, save: typing.Callable | None = None,
              resume_state: dict[str, Any] | None = None, ranks: Ranks | None = None,
              shards_from: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune `model` in place on `examples`; returns the final metrics.

    All data is tokenized and checked before the first step. `save(step, metrics, trainer_state, optimizer)`,
    when given, is called before an exception from `on_progress` propagates (a cancel), so the
    run can be resumed with `resume_state` (the saved trainer_state) and, from a sharded run's
    checkpoint, its shards at `shards_from` (Ranks.load_resumable).
    """
    run = _setup(model, tokenizer, examples, args, eval_examples, resume_state, ranks, shards_from)
    model.train()
    lengths = [len(ids) for ids, _ in run.encoded]
    epoch = run.step // run.steps_per_epoch
    while run.step < run.total:
        batches = epoch_batches(lengths, args.batch_size, args.seed, epoch, args.group_by_length)
        for batch in batches[run.step - epoch * run.steps_per_epoch:]:
            if run.step >= run.total:
                break
            _train_step(run, batch)
            _report(run, on_progress, save)
        epoch += 1

    if run.encoded_eval is not None:
        run.metrics["sft/eval_loss"] = eval_loss(model, run.encoded_eval, run.pad_id, args.batch_size, run.device,
                                                 run.ranks)
    run.metrics.update({"sft/steps": run.step, "sft/examples": len(run.encoded), "sft/train_seconds": run.train_seconds})
    model.eval()
    return run.metrics


def main(args: SFTArgs, on_progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Load the model and data, check everything, fine-tune, save; returns the final metrics."""
    if not args.model:
        raise EngineError("no model given (--model NAME_OR_PATH)")
    if not args.train:
        raise EngineError("no training data given (--train FILE.jsonl)")
    examples = read_examples(args.train, "training data")
    eval_examples = read_examples(args.eval, "eval data") if args.eval else None
    ranks = Ranks(pick_device(args.device), fsdp=args.fsdp)
    device = ranks.device
    dtype = pick_dtype(device, args.dtype)
    adam_class(args, device)  # refuses adam_8bit where it cannot run, before loading anything

    resume_state, source, adapter = None, args.model, None
    if args.resume:
        state = resumable_state(args.out, stage="sft", args=args, keys=(), data_version=None)
        if state is not None and weights_source(args.out) is None:  # shards, set after prepare
            resume_state = state
        elif state is not None:  # a LoRA run's checkpoint holds the adapter: the base comes from args.model
            resume_state, source, adapter = state, args.model if args.lora_r else args.out, Path(args.out) / ADAPTER_DIR
    set_seed(args.seed)
    model, tokenizer = load_causal_lm(source, device, dtype, start=args.model,
                                      empty=ranks.loads_empty(resumed=resume_state is not None))
    model = apply_lora(enable_memory_switches(model, args), args, "CAUSAL_LM", adapter if args.lora_r else None)
    tokenizer.padding_side = "right"

    def save(step, metrics, trainer_state=None, optimizer=None):
        if trainer_state is not None:  # resumable: every process writes its shards under FSDP
            return ranks.save_resumable(args.out, model=model, tokenizer=tokenizer, optimizer=optimizer, stage="sft",
                                        args=args, step=step, metrics=metrics, data_version=args.data_version,
                                        trainer_state=trainer_state)
        trained = ranks.trained_model(model, tokenizer)  # gathered to rank 0 under FSDP
        if ranks.main:
            save_checkpoint(args.out, stage="sft", args=args, step=step, metrics=metrics, pretrained={"": trained},
                            data_version=args.data_version)
        ranks.wait()

    metrics = train_sft(model, tokenizer, examples, args, on_progress, eval_examples=eval_examples, save=save,
                        resume_state=resume_state, ranks=ranks, shards_from=args.out)
    save(metrics["sft/steps"], metrics)
    metrics["sft/checkpoint"] = str(args.out)
    return metrics


# ----------------------------------------------------------------------------------------------
# CLI


def cli(argv: list[str] | None = None) -> int:
    return run_cli(SFTArgs, main, argv, stage="sft", required=("model", "train"),
                   description="Supervised fine-tuning on (instruction, input, output) JSONL, loss on the response only.")


if __name__ == "__main__":
    raise SystemExit(cli())
