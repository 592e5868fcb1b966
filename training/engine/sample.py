"""Batched sampling from a causal LM with a KV cache, returning text and per-token log-probabilities.

Prompts are left-padded so every row's next token sits in the last column; position ids count
only real tokens, so a prompt gives the same distribution alone or beside a longer one. Each step
feeds one token per row through the cached keys and values. The log-probability of each sampled
token is taken under the policy's logits divided by the temperature, the distribution PPO's
importance ratio needs (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
details on temperature and on sampling from the unfiltered policy).

    python -m training.engine.sample --model PATH --prompts prompts.jsonl --out samples.jsonl
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.engine.cli import run_cli
from training.engine.common import (
    EngineError,
    ProgressFn,
    Prompt,
    encode_prompts,
    ensure_pad_token,
    load_causal_lm,
    no_progress,
    pick_device,
    pick_dtype,
    prompt_text,
    render_prompt,
    stop_token_ids,
)


@dataclass
class Rollout:
    query_ids: torch.Tensor  # (B, Tq) long, left-padded prompts
    query_mask: torch.Tensor  # (B, Tq) long, 1 for real prompt tokens
    response_ids: torch.Tensor  # (B, Tr) long, right-padded with pad after the stop (the stop token kept)
    response_mask: torch.Tensor  # (B, Tr) long, 1 for real response tokens, the stop token included
    logprobs: torch.Tensor  # (B, Tr) float, log p(token) under logits / temperature; 0 where masked
    ended: torch.Tensor  # (B,) bool, True where the response stopped itself; False: cut by max_new_tokens
    texts: list[str]  # decoded responses, special tokens skipped, cut before a stop string, stripped

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def concat(cls, parts: list[Rollout], pad_id: int) -> Rollout:
        """The rows of several rollouts in order: queries left-padded, responses right-padded to one width."""
        if len(parts) == 1:
            return parts[0]
        width_q = max(p.query_ids.size(1) for p in parts)
        width_r = max(p.response_ids.size(1) for p in parts)

        def pad(t: torch.Tensor, width: int, value, left: bool = False) -> torch.Tensor:
            extra = width - t.size(1)
            return F.pad(t, (extra, 0) if left else (0, extra), value=value)

        return cls(torch.cat([pad(p.query_ids, width_q, pad_id, True) for p in parts]),
                   torch.cat([pad(p.query_mask, width_q, 0, True) for p in parts]),
                   torch.cat([pad(p.response_ids, width_r, pad_id) for p in parts]),
                   torch.cat([pad(p.response_mask, width_r, 0) for p in parts]),
                   torch.cat([pad(p.logprobs, width_r, 0.0) for p in parts]),
                   torch.cat([p.ended for p in parts]), [t for p in parts for t in p.texts])


@dataclass
class SampleArgs:
    model: str = ""
    """Causal LM to sample from: a Hugging Face name or a save_pretrained directory."""
    prompts: str = ""
    """File of prompts: JSONL with a "prompt" (text or chat turns) or "instruction" field, or text lines."""
    out: str = "var/samples.jsonl"
    """Output JSONL: one {"prompt", "responses"} object per prompt."""
    num_per_prompt: int = 2
    """Responses per prompt (2 makes one pair to compare; InstructGPT showed labelers 4 to 9)."""
    max_new_tokens: int = 64
    """Most tokens generated per response (the demo tasks' answers need fewer than 50)."""
    temperature: float = 0.7
    """Softmax temperature; 0 means greedy. 0.7 is a common middle ground (our choice): lower makes pairs alike."""
    top_p: float = 1.0
    """Nucleus sampling mass (Holtzman et al. 2020); 1.0 samples the full distribution, as PPO rollouts should."""
    system_prompt: str = ""
    """System turn put before each prompt (chat models; before the instruction template otherwise); none by default."""
    stop_strings: list[str] = field(default_factory=list)
    """Texts that end a response besides the model's end-of-turn tokens (cut from the text); none by default."""
    batch_size: int = 16
    """Sequences generated together."""
    seed: int = 0
    """Seed of the sampling generator: the same seed gives the same responses."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16."""


# ----------------------------------------------------------------------------------------------
# Sampling


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches top_p (nucleus)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of strictly more likely tokens
    remove_sorted = mass_before >= top_p  # the most likely token is always kept
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _sample(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(logits), by the Gumbel-max trick (Gumbel 1954; Maddison et al. 2014).

    Noise is drawn on the generator's device, so a CPU generator drives a CUDA model reproducibly.
    """
    noise_device = generator.device if generator is not None else logits.device
    uniform = torch.rand(logits.shape, generator=generator, device=noise_device).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_(1e-10, 1.0 - 1e-7)))
    return torch.argmax(logits + gumbel, dim=-1)


def _left_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


class StopStrings:
    """Finds rows whose newest tokens complete a stop string (decoding only a short tail per row)."""

    def __init__(self, tokenizer, strings: list[str]):
        self.tokenizer, self.strings = tokenizer, [s for s in strings if s]
        self.window = max((len(s) for s in self.strings), default=0) + 2  # tokens: at least a character each

    def __bool__(self) -> bool:
        return bool(self.strings)

    def hits(self, response_ids: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        """(len(rows),) bool: the row's text ending at `step` holds a stop string."""
        start = max(0, step + 1 - self.window)
        tails = self.tokenizer.batch_decode(response_ids[rows, start:step + 1].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in tail for s in self.strings) for tail in tails], device=rows.device)

    def cut(self, text: str) -> str:
        """The text before the first stop string in it."""
        cuts = [text.find(s) for s in self.strings if s in text]
        return text[:min(cuts)] if cuts else text


def _prefill(model, query_ids, query_mask, position_ids, source: torch.Tensor | None):
    """The prompts' forward pass: the cache and each row's last logits. With `source` (each row's index into the
    distinct prompts given), each distinct prompt runs once and its keys and values are copied to its rows (a
    GRPO group's G samples share one prompt); a cache that cannot be indexed by row gets every row's prompt."""
    # Only the last position's logits are needed to start sampling (logits_to_keep, where supported).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    if source is not None:
        out = model(input_ids=query_ids, attention_mask=query_mask, position_ids=position_ids, use_cache=True,
                    **keep)
        if hasattr(out.cache, "batch_select_indices"):
            out.cache.batch_select_indices(source)  # (P, heads, Tq, d) -> (B, heads, Tq, d)
            return out.cache, out.logits[source, -1, :].float()
        query_ids, query_mask, position_ids = query_ids[source], query_mask[source], position_ids[source]
    out = model(input_ids=query_ids, attention_mask=query_mask, position_ids=position_ids, use_cache=True, **keep)
    return out.cache, out.logits[:, -1, :].float()


@torch.no_grad()
def _generate_batch(model, query_ids, query_mask, *, stop_ids, pad_id, max_new_tokens, temperature, top_p, generator,
                    stop_strings: StopStrings | None = None, source: torch.Tensor | None = None):
    """Sample one batch with a KV cache. Returns response ids, mask, logprobs (B, Tr) and ended (B,).

    query_ids and query_mask (P, Tq) hold the distinct prompts when `source` (B,) says which one each row samples
    from, else (B, Tq) one per row. A row ends at any of `stop_ids` (kept as its last token) or once its text
    holds a stop string. Rows that ended leave the batch (their cache rows are dropped), so the remaining steps
    cost only what the unfinished rows need.
    """
    device = query_ids.device
    position_ids = (query_mask.cumsum(-1) - 1).clamp(min=0)  # (P, Tq): positions count real tokens only
    cache, logits = _prefill(model, query_ids, query_mask, position_ids, source)  # logits (b, V), b = rows left
    if source is not None:
        query_mask, position_ids = query_mask[source], position_ids[source]  # (B, Tq)
    batch = query_mask.size(0)
    compactable = hasattr(cache, "batch_select_indices")
    next_position = position_ids[:, -1:] + 1  # (b, 1)
    # Every step's attention mask is a slice of one (b, Tq + max_new_tokens) tensor: no copy per step.
    attention = torch.cat([query_mask, torch.ones((batch, max_new_tokens), dtype=query_mask.dtype, device=device)],
                          dim=-1)
    width = query_mask.size(1)
    rows = torch.arange(batch, device=device)  # (b,) original row of each active row
    alive = torch.ones(batch, dtype=torch.bool, device=device)  # used when rows cannot leave the cache
    response_ids = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)  # (S,)
    steps = 0
    for step in range(max_new_tokens):
        steps = step + 1
        scaled = logits / temperature if temperature > 0 and temperature != 1 else logits  # (b, V)
        logp_all = torch.log_softmax(scaled, dim=-1)
        if temperature > 0:
            token = _sample(_top_p_filter(scaled, top_p), generator)  # (b,)
        else:
            token = torch.argmax(scaled, dim=-1)
        token_logp = logp_all.gather(-1, token[:, None]).squeeze(-1)  # (b,)
        # A compactable cache drops the rows that ended, so every row left is alive: no masking needed.
        live_rows = rows if compactable else rows[alive]
        response_ids[live_rows, step] = token if compactable else token[alive]
        response_mask[live_rows, step] = 1
        logprobs[live_rows, step] = token_logp if compactable else token_logp[alive]
        finished = alive & torch.isin(token, stops)
        if stop_strings:
            finished[alive] |= stop_strings.hits(response_ids, live_rows, step)
        ended[rows[finished]] = True
        alive = alive & ~finished
        if not bool(alive.any()):
            break
        if compactable and bool(finished.any()):
            keep_idx = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep_idx)
            rows, token, attention, next_position = rows[keep_idx], token[keep_idx], attention[keep_idx], next_position[keep_idx]
            alive = alive[keep_idx]
        if not compactable:
            token = torch.where(alive, token, torch.full_like(token, pad_id))
        width += 1
        out = model(input_ids=token[:, None], attention_mask=attention[:, :width], position_ids=next_position,
                    cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1, :].float()
        next_position = next_position + 1
    return response_ids[:, :steps], response_mask[:, :steps], logprobs[:, :steps], ended


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.7,
             top_p: float = 1.0, batch_size: int = 16, generator: torch.Generator | None = None,
             stop_strings: list[str] = (), on_progress: ProgressFn = no_progress) -> Rollout:
    """Sample one response per prompt, already rendered (common.render_prompt). Tensors come back on the
    model's device. A response stops at any of common.stop_token_ids or a stop string.

    Prompts are processed longest first in batches of `batch_size` (less padding), and the rows
    are returned in the order given.
    """
    if not prompts:
        raise EngineError("no prompts to sample from")
    if max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise EngineError(f"top_p must be in (0, 1], got {top_p}")
    ensure_pad_token(tokenizer, model)
    stop_ids = stop_token_ids(tokenizer, model)
    if not stop_ids:
        raise EngineError("neither the tokenizer nor the model's generation config names an eos token, "
                          "so a response could never end")
    stop_texts = StopStrings(tokenizer, list(stop_strings))
    pad_id = tokenizer.pad_token_id
    device = _model_device(model)
    encoded = encode_prompts(tokenizer, prompts)
    for i, ids in enumerate(encoded):
        if not ids:
            raise EngineError(f"prompt {i} is empty")
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    longest = max(len(ids) for ids in encoded)
    if positions and longest + max_new_tokens > positions:
        raise EngineError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
                          f"{positions} positions; shorten the prompt or lower max_new_tokens")

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            distinct: dict[tuple[int, ...], int] = {}  # each distinct prompt of the batch: its index
            source = [distinct.setdefault(tuple(encoded[i]), len(distinct)) for i in rows]
            query_ids, query_mask = _left_pad([list(ids) for ids in distinct], pad_id)
            result = _generate_batch(model, query_ids.to(device), query_mask.to(device), stop_ids=stop_ids,
                                     pad_id=pad_id, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, generator=generator, stop_strings=stop_texts,
                                     source=torch.tensor(source, device=device) if len(distinct) < len(rows)
                                     else None)
            parts.append((rows, *result))
            on_progress({"stage": "sample", "step": min(start + batch_size, len(order)), "total": len(order),
                         "metrics": {}})
    finally:
        model.train(was_training)

    # Reassemble in the caller's order: queries left-padded to one width, responses right-padded.
    n = len(encoded)
    width_q = longest
    width_r = max(p[1].size(1) for p in parts)
    query_ids, query_mask = _left_pad(encoded, pad_id, width_q)
    response_ids = torch.full((n, width_r), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((n, width_r), dtype=torch.long, device=device)
    logprobs = torch.zeros((n, width_r), dtype=torch.float32, device=device)
    ended = torch.zeros(n, dtype=torch.bool, device=device)
    for rows, ids, mask, logp, done in parts:
        index = torch.tensor(rows, device=device)
        response_ids[index, : ids.size(1)] = ids
        response_mask[index, : ids.size(1)] = mask
        logprobs[index, : ids.size(1)] = logp
        ended[index] = done
    texts = [stop_texts.cut(tokenizer.decode(response_ids[i][response_mask[i].bool()].tolist(),
                                             skip_special_tokens=True)).strip()
             for i in range(n)]
    return Rollout(query_ids.to(device), query_mask.to(device), response_ids, response_mask, logprobs, ended, texts)


def sequence_logprobs(model, rollout: Rollout, temperature: float = 0.7) -> torch.Tensor:
    """Recompute log p(response token) under logits / temperature with one forward pass: (B, Tr).

    Matches Rollout.logprobs; PPO uses the same arithmetic for its ratios.
    """
    input_ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)  # (B, Tq+Tr)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits.float()
    t_q = rollout.query_ids.size(1)
    logits = logits[:, t_q - 1:-1, :]  # (B, Tr, V): the logits that predicted each response token
    if temperature > 0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    return logp * rollout.response_mask


def sample_responses(model_path: str, prompts: list[Prompt], *, num_per_prompt: int = 2, max_new_tokens: int = 64,
                     temperature: float = 0.7, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
                     system_prompt: str = "", stop_strings: list[str] = (), device: str = "auto",
                     dtype: str = "auto", on_progress: ProgressFn = no_progress) -> list[list[str]]:
    """`num_per_prompt` responses for each prompt (text or chat turns) from the model at `model_path`."""
    return sample_with_stats(model_path, prompts, num_per_prompt=num_per_prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                             system_prompt=system_prompt, stop_strings=stop_strings, device=device, dtype=dtype,
                             on_progress=on_progress)[0]


def sample_with_stats(model_path: str, prompts: list[Prompt], *, num_per_prompt: int = 2, max_new_tokens: int = 64,
                      temperature: float = 0.7, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
                      system_prompt: str = "", stop_strings: list[str] = (), device: str = "auto",
                      dtype: str = "auto", on_progress: ProgressFn = no_progress
                      ) -> tuple[list[list[str]], dict[str, Any], list[list[bool]]]:
    """`sample_responses`, with the metrics (the first prompt as the model saw it among them) and, per
    response, whether the length limit cut it (it never stopped by itself)."""
    if not prompts:
        raise EngineError("no prompts to sample from")
    if num_per_prompt < 1:
        raise EngineError(f"num_per_prompt must be at least 1, got {num_per_prompt}")
    torch_device = pick_device(device)
    model, tokenizer = load_causal_lm(model_path, torch_device, pick_dtype(torch_device, dtype))
    rendered = [render_prompt(tokenizer, prompt, system_prompt=system_prompt) for prompt in prompts]
    on_progress({"stage": "sample", "step": 0, "total": len(prompts) * num_per_prompt, "metrics": {},
                 "log": f"The first prompt as the model sees it:\n{rendered[0]}"})
    formatted = [text for text in rendered for _ in range(num_per_prompt)]
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    started = time.perf_counter()
    rollout = generate(model, tokenizer, formatted, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, batch_size=batch_size, generator=generator, stop_strings=stop_strings,
                       on_progress=on_progress)
    seconds = time.perf_counter() - started
    n_tokens = int(rollout.response_mask.sum())
    grouped = [rollout.texts[i * num_per_prompt:(i + 1) * num_per_prompt] for i in range(len(prompts))]
    cut = (~rollout.ended).tolist()
    truncated = [cut[i * num_per_prompt:(i + 1) * num_per_prompt] for i in range(len(prompts))]
    stats = {"sample/responses": len(rollout), "sample/tokens": n_tokens, "sample/seconds": seconds,
             "sample/tokens_per_s": n_tokens / max(seconds, 1e-9),
             "sample/mean_length": n_tokens / len(rollout),
             "sample/ended_fraction": float(rollout.ended.float().mean()),
             "sample/rendered_prompt": rendered[0]}
    return grouped, stats, truncated


# ----------------------------------------------------------------------------------------------
# Entry point and CLI


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from JSONL ({"prompt": text or chat turns} or {"instruction"}) or plain text, one per line."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise EngineError(f"prompts file {str(path)!r} does not exist")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EngineError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
            if isinstance(text, list) and text:  # chat turns
                try:
                    prompt_text(text)
                except EngineError as exc:
                    raise EngineError(f"{path}:{lineno}: \"prompt\": {exc}") from None
                prompts.append(text)
                continue
            if not isinstance(text, str) or not text.strip():
                raise EngineError(f"{path}:{lineno}: needs a non-empty \"prompt\" (text or chat turns) "
                                  "or \"instruction\" field")
            prompts.append(text)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise EngineError(f"prompts file {str(path)!r} has no prompts")
    return prompts


def main(args: SampleArgs, on_progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Sample responses for every prompt in the file and write them as JSONL; returns the metrics."""
    if not args.model:
        raise EngineError("no model given (--model NAME_OR_PATH)")
    instructions = read_prompts(args.prompts)
    responses, metrics, truncated = sample_with_stats(
        args.model, instructions, num_per_prompt=args.num_per_prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
        system_prompt=args.system_prompt, stop_strings=args.stop_strings, device=args.device, dtype=args.dtype,
        on_progress=on_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for prompt, texts, cut in zip(instructions, responses, truncated):
            handle.write(json.dumps({"prompt": prompt, "responses": texts, "truncated": cut}) + "\n")
    tmp.replace(out)
    metrics["sample/out"] = str(out)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    return run_cli(SampleArgs, main, argv, stage="sample", required=("model", "prompts"),
                   flag_names={"stop_strings": "stop-string"},
                   description="Sample responses from a causal LM for a file of instructions.")


if __name__ == "__main__":
    raise SystemExit(cli())
