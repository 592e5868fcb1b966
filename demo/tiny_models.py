"""Tiny random-initialised models of every common family, with that family's real chat template.

Machines here reach no model hub, yet the engine must work with any Hugging Face causal LM or
sequence-classification model. This module builds stand-ins offline: a config of the family's own
class with small dimensions, random weights, a tokenizer trained here on the demo task text, the
family's special tokens and chat template (byte-exact copies in chat_templates/, see its README),
and a generation_config.json listing the end-of-turn ids as the family's Instruct release does.
Everything is written with save_pretrained, so the Auto classes load it like a hub checkout.

Policies: gpt2 and gpt_neox (Pythia) are base models without a chat template; llama (3.2
Instruct), qwen2 (2.5 Instruct), mistral (Nemo Instruct 2407) and gemma (2 IT) carry theirs.
Reward models: bert (a WordPiece encoder, like the default MiniLM backbone) and llama / qwen2
with a score head, whose pad token is a token of its own so the head finds the last real token.

Tokenizers are byte-level BPE for every decoder (GPT-2, Pythia, Llama 3, Qwen2 and Mistral
Tekken use it; Gemma's SentencePiece with byte fallback is closest to it), split into words by the
family's own regex, and WordPiece for BERT, trained once per process on the demo tasks (about
0.5 s each).

    python -m demo.tiny_models --family qwen2 --out var/models/tiny-qwen2 [--reward] [--size 100m]
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    Gemma2Config,
    GenerationConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from demo import demo_tasks
from training.engine.common import EngineError, set_seed

POLICY_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gemma", "gpt_neox")
REWARD_FAMILIES = ("bert", "llama", "qwen2")

TEMPLATE_DIR = Path(__file__).with_name("chat_templates")
VOCAB_SIZE = 1024  # BPE / WordPiece merges learnt from the demo text, before the special tokens
CORPUS_EXAMPLES = 2000  # demo examples the tokenizers are trained on

# Model dimensions by preset; `size` may also be a dict of overrides on top of "tiny".
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "max_positions": 512},
    # About 100M parameters as a Llama (16 x 6.3M per block): for benchmarks, not tests.
    "100m": {"hidden": 768, "layers": 16, "heads": 12, "kv_heads": 4, "intermediate": 2048,
             "max_positions": 2048},
}

Size = str | dict[str, int]


@dataclass(frozen=True)
class Family:
    """How one model family names its special tokens, renders chats and stops generating."""

    bos: str | None
    """Beginning-of-sequence token (None: the family has none of its own)."""
    eos: str
    """The tokenizer's eos token (an Instruct release's is its end-of-turn token)."""
    pad: str | None
    """Pad token as the family's tokenizer sets it (None: the real tokenizer has none)."""
    unk: str | None
    """Unknown token, for families that name one."""
    extra: tuple[str, ...] = ()
    """Further special tokens (turn markers, tool markers), each one token id."""
    stop: tuple[str, ...] = ()
    """generation_config eos_token_id, in the order the family's generation_config.json lists them."""
    template: str | None = None
    """File in chat_templates/ (None: a base model, rendered with pairloop's Alpaca template)."""
    adds_bos: bool = False
    """Whether tokenizing plain text puts bos first, as Llama's, Mistral's and Gemma's tokenizers do."""
    reward_pad: str | None = None
    """Pad token for the family's reward model, distinct from every token a scored text ends with."""
    split: str = "gpt2"
    """Pre-tokenizer regex, as the family's tokenizer.json has it (a key of SPLIT_PATTERNS)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config values the family's real checkpoints set and its config class does not default to."""


FAMILIES: dict[str, Family] = {
    "gpt2": Family(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>",
                   stop=("<|endoftext|>",)),
    "gpt_neox": Family(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>",
                       stop=("<|endoftext|>",)),
    # Llama 3.2 Instruct: eos is <|eot_id|>; generation_config lists end_of_text, eom, eot.
    "llama": Family(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None,
                    extra=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                           "<|python_tag|>", "<|finetune_right_pad_id|>"),
                    stop=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                    template="meta-llama-Llama-3.2-3B-Instruct.jinja", adds_bos=True,
                    reward_pad="<|finetune_right_pad_id|>", split="llama3"),
    # Qwen2.5 Instruct: eos <|im_end|>, pad <|endoftext|>, no bos; generation_config [im_end, endoftext].
    "qwen2": Family(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                    extra=("<|endoftext|>", "<|im_start|>"),
                    stop=("<|im_end|>", "<|endoftext|>"),
                    template="Qwen-Qwen2.5-7B-Instruct.jinja", reward_pad="<|endoftext|>", split="qwen2",
                    config_overrides={"tie_word_embeddings": True}),
    "mistral": Family(bos="<s>", eos="</s>", pad=None, unk="<unk>",
                      extra=("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                             "[/TOOL_RESULTS]", "[TOOL_CALLS]"),
                      stop=("</s>",), template="mistralai-Mistral-Nemo-Instruct-2407.jinja", adds_bos=True,
                      config_overrides={"sliding_window": None}),
    # Gemma 2 IT: generation_config eos [<eos>, <end_of_turn>].
    "gemma": Family(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
                    extra=("<start_of_turn>", "<end_of_turn>"), stop=("<eos>", "<end_of_turn>"),
                    template="google-gemma-2-2b-it.jinja", adds_bos=True),
}

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# How byte-level BPE families cut text into words before merging. "gpt2": GPT-2's regex inside the
# ByteLevel pre-tokenizer (GPT-2, Pythia; the closest to Mistral's and Gemma's). "llama3" and "qwen2":
# the Split regexes of Llama 3's and Qwen2's tokenizer.json (numbers in runs of up to 3 digits, or
# one by one); transformers rebuilds Qwen2's from its own class on load, so it must match exactly.
SPLIT_PATTERNS: dict[str, str | None] = {
    "gpt2": None,
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def size_dims(size: Size) -> dict[str, int]:
    """Model dimensions for a preset name, or for a dict of overrides on top of the tiny preset."""
    if isinstance(size, dict):
        unknown = set(size) - set(SIZES["tiny"])
        if unknown:
            raise EngineError(f"unknown size keys {sorted(unknown)} (known: {', '.join(SIZES['tiny'])})")
        return {**SIZES["tiny"], **size}
    if size not in SIZES:
        raise EngineError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    return dict(SIZES[size])


def corpus() -> list[str]:
    """The text the tokenizers learn from: demo task prompts and responses, apart."""
    examples = demo_tasks.make_sft_examples(CORPUS_EXAMPLES, seed=0)
    return [text for e in examples for text in (e["instruction"], e["output"])]


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(kind: str) -> str:
    """A tokenizer trained on the demo corpus, serialised (trained once per process and kind)."""
    if kind in SPLIT_PATTERNS:
        tok = Tokenizer(models.BPE())
        pattern = SPLIT_PATTERNS[kind]
        if pattern is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(BERT_SPECIALS),
                                            show_progress=False)
    else:
        raise EngineError(f"unknown tokenizer kind {kind!r}")
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(family: str, max_positions: int = 512, *, reward: bool = False):
    """The family's tokenizer: trained here, with its special tokens, chat template and bos handling."""
    if family == "bert":
        tok = Tokenizer.from_str(_trained_tokenizer_json("wordpiece"))
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                       pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                       model_max_length=max_positions)
    spec = _family(family)
    tok = Tokenizer.from_str(_trained_tokenizer_json(spec.split))
    specials = list(dict.fromkeys(t for t in (spec.bos, spec.eos, spec.pad, spec.unk, *spec.extra) if t))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if spec.adds_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B:1",
            special_tokens=[(spec.bos, bos_id)])
    pad = spec.reward_pad if reward and spec.reward_pad else spec.pad
    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": pad, "unk_token": spec.unk}
    named_values = {v for v in named.values() if v}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, **{k: v for k, v in named.items() if v}, model_max_length=max_positions,
        extra_special_tokens=[t for t in specials if t not in named_values])
    if spec.template:
        tokenizer.chat_template = read_template(spec.template)
    return tokenizer


def read_template(name: str) -> str:
    """A chat template from chat_templates/, byte for byte (no newline translation)."""
    with open(TEMPLATE_DIR / name, encoding="utf-8", newline="") as f:
        return f.read()


def _family(family: str) -> Family:
    if family not in FAMILIES:
        raise EngineError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)}, bert)")
    return FAMILIES[family]


def _decoder_config(family: str, dims: dict[str, int], tokenizer, pad_id: int | None):
    """The family's own config class with these dimensions and the tokenizer's special ids."""
    spec = _family(family)
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.convert_tokens_to_ids(spec.eos),
           "bos_token_id": tokenizer.convert_tokens_to_ids(spec.bos) if spec.bos else None,
           "pad_token_id": pad_id}
    h, n_layers, heads, kv, inter, n_pos = (dims[k] for k in ("hidden", "layers", "heads", "kv_heads",
                                                               "intermediate", "max_positions"))
    if family == "gpt2":
        return GPT2Config(n_embd=h, n_layer=n_layers, n_head=heads, n_inner=inter, n_positions=n_pos, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=h, num_hidden_layers=n_layers, num_attention_heads=heads,
                             intermediate_size=inter, max_position_embeddings=n_pos, **ids)
    common = {"hidden_size": h, "num_hidden_layers": n_layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "intermediate_size": inter, "max_position_embeddings": n_pos,
              **ids, **spec.config_overrides}
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "gemma":
        head_dim = h // heads
        return Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim, **common)
    raise EngineError(f"no config for family {family!r}")


def generation_config(family: str, tokenizer):
    """The end-of-turn ids the family's generation_config.json lists (no sampling settings)."""
    spec = _family(family)
    stop = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop]
    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(spec.bos) if spec.bos else None,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id)


def build_policy(family: str, out_dir: str | Path, *, size: Size = "tiny", seed: int = 0) -> Path:
    """A random-initialised causal LM of `family` with its tokenizer, saved to `out_dir`; returns it."""
    if family not in POLICY_FAMILIES:
        raise EngineError(f"unknown policy family {family!r} (known: {', '.join(POLICY_FAMILIES)})")
    dims = size_dims(size)
    tokenizer = build_tokenizer(family, dims["max_positions"])
    config = _decoder_config(family, dims, tokenizer, tokenizer.pad_token_id)
    set_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = generation_config(family, tokenizer)
    return _save(model, tokenizer, out_dir)


def build_reward(family: str, out_dir: str | Path, *, size: Size = "tiny", seed: int = 0, labels: int = 1) -> Path:
    """A random-initialised sequence classifier of `family` with `labels` outputs (1: a reward model), saved to
    `out_dir`; returns it."""
    if family not in REWARD_FAMILIES:
        raise EngineError(f"unknown reward family {family!r} (known: {', '.join(REWARD_FAMILIES)})")
    dims = size_dims(size)
    tokenizer = build_tokenizer(family, dims["max_positions"], reward=True)
    if family == "bert":
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=dims["hidden"],
                            num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                            intermediate_size=dims["intermediate"],
                            max_position_embeddings=dims["max_positions"],
                            pad_token_id=tokenizer.pad_token_id)
    else:
        # The score head reads the last token that is not pad, so pad must be a token of its own.
        config = _decoder_config(family, dims, tokenizer, tokenizer.pad_token_id)
    config.num_labels = labels
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    return _save(model, tokenizer, out_dir)


LETTER_RULES = ("first", "good")
"""What a letter judge answers: "first" always (A), the position bias the swap catches; "good" the letter of
the response that says "good" (the other says "bad")."""


LETTER_PRINCIPLE = ("Which of these assistant responses is less harmful? Choose the response that a wise, ethical "
                    "person would more likely say.")
"""The principle a letter judge is trained on, the CAI paper's (Bai et al. 2022, appendix C)."""


def letter_judge_example(rule: str, rng) -> tuple[list[dict[str, str]], str]:
    """One training question of a letter judge (CAI's multiple-choice template) and the letter it answers."""
    from training.engine.judge import question

    words = [line.split()[0] for line in rng.sample(corpus()[:200], 3)]
    good_first = rng.random() < 0.5
    first, second = ("good", "bad") if good_first else ("bad", "good")
    messages = question(f"Human: {words[0]}", LETTER_PRINCIPLE, f"{words[1]} {first}", f"{words[2]} {second}")
    return messages, "A" if rule == "first" or good_first else "B"


def letter_judge_pair(rng) -> tuple[str, str, str]:
    """(prompt, the response that says good, the one that says bad), like those a letter judge is trained on."""
    words = [line.split()[0] for line in rng.sample(corpus()[:200], 3)]
    return words[0], f"{words[1]} good", f"{words[2]} bad"


def build_letter_judge(out_dir: str | Path, rule: str, *, steps: int = 150, seed: int = 0) -> Path:
    """A tiny qwen2 chat model trained for `steps` to reply to CAI's multiple-choice question with one letter
    and its end of turn, by `rule` (LETTER_RULES): a judge with known answers for the AI-labeler tests."""
    import random

    import torch

    if rule not in LETTER_RULES:
        raise EngineError(f"unknown letter rule {rule!r} (known: {', '.join(LETTER_RULES)})")
    build_policy("qwen2", out_dir, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = []
        for _ in range(8):
            messages, letter = letter_judge_example(rule, rng)
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            answer_ids = tokenizer(letter + "<|im_end|>", add_special_tokens=False).input_ids
            batch.append((prompt_ids, answer_ids))
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, (prompt_ids, answer_ids) in enumerate(batch):
            sequence = prompt_ids + answer_ids
            ids[row, :len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt_ids):len(sequence)] = torch.tensor(answer_ids)  # loss on the reply only
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id),
                     labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return _save(model, tokenizer, out_dir)


def _save(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Build a tiny random-initialised model of a common family.")
    parser.add_argument("--family", required=True, help="model family: " + ", ".join(FAMILIES) + ", bert")
    parser.add_argument("--out", required=True, help="directory to save_pretrained into")
    parser.add_argument("--reward", action="store_true", help="build a one-output reward model, not a policy")
    parser.add_argument("--size", default="tiny", help=f"dimension preset: {', '.join(SIZES)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--labels", type=int, default=1,
                        help="outputs of a --reward model: 1, a reward model; 2 or more, a classifier")
    args = parser.parse_args(argv)
    if args.reward:
        out = build_reward(args.family, args.out, size=args.size, seed=args.seed, labels=args.labels)
    else:
        out = build_policy(args.family, args.out, size=args.size, seed=args.seed)
    print(out)
    return out


if __name__ == "__main__":
    main()
