"""The project's own default policy: a small GPT-2 fine-tuned on the demo tasks, built offline.

No machine here reaches a model hub, so the first round of a newcomer's campaign trains a policy
the project builds itself, in minutes, on a laptop CPU:

1. SFT data from demo_tasks.make_sft_examples: five task families answered in a mixture of styles;
2. a byte-level BPE tokenizer trained on it with `tokenizers` (GPT-2's scheme, Radford et al.
   2019, with a prefix space so a response's first word is the same token as in the prompt;
   digits split one by one as in Llama, Touvron et al. 2023), eos = pad = <|endoftext|>. The
   demo corpus has about 1.1k distinct pieces, so the 4k vocabulary saturates there;
3. a GPT-2 built from a config (demo preset: 4 layers, 192 wide, 6 heads, 2.1M parameters),
   dropout off (nanoGPT's default for short runs), trained from scratch with sft.train_sft: loss
   on the response tokens only, the shared prompt preamble computed once per batch;
4. saved with save_pretrained + pairloop.json (checkpoints.save_checkpoint), with held-out metrics
   (correctness per family, style mix, judge score, sampling tokens/s).

Measured on this 2-core machine with light load: the demo preset builds in about 4.5 minutes
(3,000 steps at about 10k tokens/s) and answers 64% of held-out prompts correctly at temperature
0.7; the tiny preset (tests) builds in about 15 seconds.

    python -m demo.policy --out var/models/demo-policy [--preset demo|tiny] [--force]

Seeded and reproducible: the same preset and seed give the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import fcntl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from demo import demo_tasks
from training.engine.checkpoints import read_checkpoint_meta, save_checkpoint
from training.engine.common import (
    EngineError,
    ProgressFn,
    TqdmProgress,
    format_prompt,
    no_progress,
    print_final_metrics,
    set_seed,
)
from training.engine.sample import generate
from training.engine.sft import ModelAndTokenizer, SFTArgs, train_sft

EOS = "<|endoftext|>"
RECIPE = 2  # bump when the recipe changes, so cached policies are rebuilt
DEFAULT_DIR = "var/models/demo-policy"
DEFAULT_TINY_DIR = "var/models/demo-policy-tiny"


@dataclass(frozen=True)
class DemoPreset:
    n_examples: int
    """SFT examples drawn from the demo task families (train split)."""
    vocab_size: int
    """BPE vocabulary size (tokens); the demo corpus may saturate below it."""
    n_layer: int
    """Transformer blocks."""
    n_embd: int
    """Width of the residual stream."""
    n_head: int
    """Attention heads."""
    n_positions: int
    """Longest sequence the model accepts (prompt + response)."""
    epochs: float
    """Passes over the SFT examples."""
    lr: float
    """Peak AdamW learning rate (from scratch: nanoGPT's small models use 1e-3)."""
    batch_size: int
    """Examples per step."""
    warmup_ratio: float
    """Fraction of steps of linear warmup before cosine decay."""
    weight_decay: float
    """AdamW weight decay on matrices (nanoGPT: 0.1)."""
    n_eval: int
    """Held-out prompts sampled after training to measure correctness and style mix."""
    threads: int = 0
    """CPU threads for torch during the build; 0 keeps torch's choice. One thread is barely slower
    for a tiny model and does not collapse when other processes load the machine."""


PRESETS: dict[str, DemoPreset] = {
    "demo": DemoPreset(n_examples=48000, vocab_size=4096, n_layer=4, n_embd=192, n_head=6, n_positions=512,
                       epochs=1.0, lr=2e-3, batch_size=16, warmup_ratio=0.03, weight_decay=0.1, n_eval=250),
    "tiny": DemoPreset(n_examples=6400, vocab_size=512, n_layer=2, n_embd=64, n_head=2, n_positions=256,
                       epochs=1.0, lr=5e-3, batch_size=16, warmup_ratio=0.05, weight_decay=0.1, n_eval=40,
                       threads=1),
}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers (eos = pad = <|endoftext|>)."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space: a response tokenized on its own starts with "Ġword", the same token as the
    # word inside the prompt, so copying a word is one token-to-token step (GPT-2 would see "word").
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS,
                                   model_max_length=10**6)


def build_model(tokenizer, preset: DemoPreset):
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=preset.n_positions, n_embd=preset.n_embd,
                        n_layer=preset.n_layer, n_head=preset.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return GPT2LMHeadModel(config)


def evaluate_policy(model, tokenizer, n_prompts: int, seed: int = 0, temperature: float = 0.7,
                    max_new_tokens: int = 64) -> dict[str, float]:
    """Sample one response per held-out demo prompt; correctness per family, style mix, judge mean, tok/s."""
    instructions = demo_tasks.make_prompts(n_prompts, seed, "heldout")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    started = time.perf_counter()
    rollout = generate(model, tokenizer, [format_prompt(i) for i in instructions], max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=16, generator=generator)
    seconds = time.perf_counter() - started
    metrics = demo_tasks.evaluate(instructions, rollout.texts)
    metrics["demo/ended_fraction"] = float(rollout.ended.float().mean())
    metrics["sample/tokens_per_s"] = float(rollout.response_mask.sum()) / max(seconds, 1e-9)
    return metrics


def build_demo_policy(out_dir: str | Path, preset: str = "demo", seed: int = 0,
                      on_progress: ProgressFn = no_progress) -> Path:
    """Build the demo policy from nothing and save it to `out_dir`; returns the directory."""
    if preset not in PRESETS:
        raise EngineError(f"unknown demo preset {preset!r} (known: {', '.join(PRESETS)})")
    settings = PRESETS[preset]
    threads_before = torch.get_num_threads()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    try:
        return _build(Path(out_dir), preset, settings, seed, on_progress)
    finally:
        torch.set_num_threads(threads_before)


def _build(out_dir: Path, preset: str, settings: DemoPreset, seed: int, on_progress: ProgressFn) -> Path:
    started = time.perf_counter()
    set_seed(seed)
    examples = demo_tasks.make_sft_examples(settings.n_examples, seed)
    on_progress({"stage": "demo_policy", "step": 0, "total": 1, "metrics": {},
                 "log": f"training a {settings.vocab_size}-token BPE tokenizer on {len(examples)} examples"})
    # Prompts and responses apart, as SFT and sampling tokenize them.
    texts = [text for e in examples for text in (format_prompt(e["instruction"]), e["output"])]
    tokenizer = train_tokenizer(texts, settings.vocab_size)
    set_seed(seed)
    model = build_model(tokenizer, settings)
    n_params = sum(p.numel() for p in model.parameters())
    on_progress({"stage": "demo_policy", "step": 0, "total": 1, "metrics": {},
                 "log": f"GPT-2 with {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}"})
    sft_args = SFTArgs(model=f"GPT2Config(preset={preset})", train="demo_tasks.make_sft_examples", out=str(out_dir),
                       epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                       max_length=settings.n_positions, warmup_ratio=settings.warmup_ratio,
                       weight_decay=settings.weight_decay, seed=seed, log_every=20,
                       # Mixed batches: length-grouped ones hold one family each, and learnt slower here.
                       group_by_length=False)
    metrics = train_sft(model, tokenizer, examples, sft_args, on_progress)
    sft_seconds = metrics["sft/train_seconds"]
    metrics.update(evaluate_policy(model, tokenizer, settings.n_eval, seed=seed))
    metrics.update({"demo/params": n_params, "demo/vocab_size": len(tokenizer),
                    "demo/build_seconds": time.perf_counter() - started, "demo/sft_seconds": sft_seconds})
    args = {"preset": preset, "seed": seed, "recipe": RECIPE, **asdict(settings), "sft": asdict(sft_args)}
    save_checkpoint(out_dir, stage="demo_policy", args=args, step=int(metrics["sft/steps"]), metrics=metrics,
                    pretrained={"": ModelAndTokenizer(model, tokenizer)}, data_version=f"demo_tasks:{seed}")
    return Path(out_dir)


# How long a build takes on a 2-core CPU box (measured: the module docstring; slower while other work runs).
BUILD_TIME = {"demo": "about 7 minutes on 2 CPU cores", "tiny": "about 15 seconds"}


def is_built(out_dir: str | Path, preset: str = "demo", seed: int | None = None) -> bool:
    """Whether `out_dir` holds a finished demo policy of this preset (and seed, when given)."""
    meta = read_checkpoint_meta(out_dir)
    if not meta or meta.get("stage") != "demo_policy":
        return False
    args = meta.get("args") or {}
    settings = PRESETS.get(preset)
    return (settings is not None and args.get("preset") == preset and args.get("recipe") == RECIPE
            and all(args.get(k) == v for k, v in asdict(settings).items() if k != "threads")
            and (seed is None or args.get("seed") == seed))


def ensure_demo_policy(out_dir: str | Path = DEFAULT_DIR, preset: str = "demo", *, seed: int = 0,
                       force: bool = False, on_progress: ProgressFn = no_progress) -> Path:
    """The demo policy at `out_dir`, built once and cached; safe when several processes ask at once."""
    out_dir = Path(out_dir)
    if not force and is_built(out_dir, preset):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the second caller waits here, then finds it built
        try:
            if force or not is_built(out_dir, preset):
                on_progress({"stage": "demo_policy", "step": 0, "total": 1, "metrics": {},
                             "log": f"building the demo policy once (preset {preset}, "
                                    f"{BUILD_TIME.get(preset, 'minutes')}): a first round needs a policy "
                                    f"and no model hub is reached; cached in {out_dir}, later runs reuse it"})
                build_demo_policy(out_dir, preset, seed, on_progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out_dir


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Build (once) the demo SFT policy from the demo task families.")
    parser.add_argument("--out", default=DEFAULT_DIR, help=f"where to save it (default: {DEFAULT_DIR})")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="demo (minutes) or tiny (tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, tokenizer and weights (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching policy is cached")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: torch's choice; 1 is faster on a machine others load)")
    parsed = parser.parse_args(argv)
    if parsed.threads > 0:
        torch.set_num_threads(parsed.threads)
    progress = TqdmProgress(f"demo-policy ({parsed.preset})")
    try:
        path = ensure_demo_policy(parsed.out, parsed.preset, seed=parsed.seed, force=parsed.force, on_progress=progress)
    finally:
        progress.close()
    meta = read_checkpoint_meta(path) or {}
    metrics = {**meta.get("metrics", {}), "demo/path": str(path)}
    print_final_metrics(metrics)
    return metrics


if __name__ == "__main__":
    try:
        cli()
    except EngineError as exc:
        raise SystemExit(f"error: {exc}") from None
