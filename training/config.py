"""A round's settings: one flat dataclass, two presets, and parsing from `KEY=VALUE` text.

The launch form, `manage.py launch_round --set KEY=VALUE` and the runner all read this one
definition. Defaults come from the engine (training/engine/*.py, where each is cited); the demo
preset fits the demo campaign on 2 CPU cores (benchmarks/README.md#closed-loop), the tiny preset a test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from training.engine.fields import field_docs

PAIRING_PREVIOUS, PAIRING_SFT, PAIRING_SELF = "previous", "sft", "self"
REWARD_FROM_SFT = "sft"  # reward_model value: the campaign's SFT policy is the reward backbone
PAIRINGS = {
    PAIRING_PREVIOUS: "new policy vs the previous round's policy",
    PAIRING_SFT: "new policy vs the SFT (starting) policy",
    PAIRING_SELF: "two samples of the new policy",
}

INT32_MAX = 2**31 - 1  # PostgreSQL's integer: Pair.priority, Job.step, seeds stored on rows
# Range of every numeric setting: (lowest, highest, lowest excluded). Checked at launch, so a value the
# database or the engine would refuse after hours of training is refused before anything runs.
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "seed": (0, INT32_MAX - 100_000, False),  # the runner adds the round number and 10,000 to it
    "reward_epochs": (1, 1000, False),
    "reward_lr": (0.0, 1.0, True),
    "reward_warmup_ratio": (0.0, 1.0, False),
    "reward_batch_size": (1, 65_536, False),
    "reward_max_length": (16, 131_072, False),
    "ppo_steps": (1, 1_000_000, False),
    "ppo_batch_size": (1, 65_536, False),
    "ppo_samples_per_prompt": (1, 1024, False),
    "ppo_mini_batch_size": (1, 65_536, False),
    "ppo_kl_coef": (0.0, 100.0, False),
    "ppo_lr": (0.0, 1.0, True),
    "ppo_max_new_tokens": (1, 32_768, False),
    "ppo_save_every": (0, 1_000_000, False),
    "sample_prompts": (1, 100_000, False),
    "sample_per_prompt": (1, 64, False),
    "sample_temperature": (0.0, 100.0, True),
    "top_p": (0.0, 1.0, True),
    "priority": (-INT32_MAX - 1, INT32_MAX, False),
    "lora_r": (0, 4096, False),
}


# Where a round's defaults come from: the engine's Args field each equals (tests/test_rounds.py checks it)...
ENGINE_DEFAULTS: dict[str, tuple[str, str, str]] = {
    "reward_epochs": ("reward", "RewardArgs", "epochs"),
    "reward_lr": ("reward", "RewardArgs", "lr"),
    "reward_warmup_ratio": ("reward", "RewardArgs", "warmup_ratio"),
    "reward_batch_size": ("reward", "RewardArgs", "batch_size"),
    "reward_max_length": ("reward", "RewardArgs", "max_length"),
    "ppo_steps": ("ppo", "PPOArgs", "steps"),
    "ppo_batch_size": ("ppo", "PPOArgs", "batch_size"),
    "ppo_samples_per_prompt": ("ppo", "PPOArgs", "samples_per_prompt"),
    "ppo_mini_batch_size": ("ppo", "PPOArgs", "mini_batch_size"),
    "ppo_kl_coef": ("ppo", "PPOArgs", "kl_coef"),
    "ppo_lr": ("ppo", "PPOArgs", "lr"),
    "ppo_max_new_tokens": ("ppo", "PPOArgs", "max_new_tokens"),
    "ppo_save_every": ("ppo", "PPOArgs", "save_every"),
    "sample_per_prompt": ("sample", "SampleArgs", "num_per_prompt"),
    "sample_temperature": ("sample", "SampleArgs", "temperature"),
    "top_p": ("sample", "SampleArgs", "top_p"),
    "lora_r": ("common", "MemoryArgs", "lora_r"),
    "gradient_checkpointing": ("common", "MemoryArgs", "gradient_checkpointing"),
}
# ...except these, where a round differs from the engine, and why (benchmarks/README.md#closed-loop-measured).
OVERRIDES: dict[str, str] = {
    "reward_lr": "1e-4 and no warm-up: the demo's reward model is its GPT-2 policy, measured so by closed_loop.py; "
                 "the engine's 5e-5 with 10% warm-up is measured on the MiniLM (reward_vs_trl.py --cv)",
    "reward_warmup_ratio": "0, with reward_lr: what closed_loop.py measured the demo's rounds with",
    "reward_max_length": "256, the length the reward benchmarks measure at; the engine's 512 is BERT's limit",
    "ppo_samples_per_prompt": "1: over three closed-loop rounds 4 ended lower (closed_loop.py, row J)",
    "ppo_mini_batch_size": "32: over three closed-loop rounds one update per batch ended lower (row L)",
    "ppo_kl_coef": "0.15: over three closed-loop rounds it kept more of the SFT policy's correctness",
}


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class ConfigError(ValueError):
    """Bad round settings; `problems` maps each bad setting's name to what is wrong with it."""

    def __init__(self, problems: dict[str, str]):
        super().__init__("; ".join(problems.values()))
        self.problems = problems


@dataclass(frozen=True)
class RoundConfig:
    preset: str = "demo"
    """Which preset the other values started from (demo or tiny)."""
    seed: int = 0
    """Seed of data order, sampling and the choice of prompts (the same prompts every round, for review)."""
    reward_model: str = REWARD_FROM_SFT
    """Reward backbone: "sft" (the campaign's SFT policy with a score head, as InstructGPT initialises its
    reward model from the supervised model, Ouyang et al. 2022), a name or path, or empty:
    PAIRLOOP_REWARD_MODEL, else the packaged MiniLM."""
    reference: str = ""
    """Reference policy of PPO's KL penalty: a name or path; empty: the campaign's starting (SFT) policy."""
    system_prompt: str = ""
    """System turn the policy (and a chat reward model) sees before every prompt; empty: none."""
    stop_strings: str = ""
    """Texts that end a response besides the model's end-of-turn tokens, one per line; empty: none."""
    reward_epochs: int = 1
    """Reward model epochs; InstructGPT trains one, it overfits after (Ouyang et al. 2022)."""
    reward_lr: float = 1e-4
    """Reward model AdamW peak learning rate (TRL RewardConfig's; the demo's rounds were measured with it)."""
    reward_warmup_ratio: float = 0.0
    """Share of reward steps with linear warm-up before the linear decay (transformers' default: none)."""
    reward_batch_size: int = 8
    """Preference pairs per reward step."""
    reward_max_length: int = 256
    """Longest (prompt, response) in tokens for the reward model; the demo's are well under it."""
    ppo_steps: int = 30
    """PPO iterations (each: a rollout batch and its optimisation); 30, the engine's default."""
    ppo_batch_size: int = 64
    """Rollouts per PPO step (the engine's default, measured: benchmarks/README.md#policy-vs-trl)."""
    ppo_samples_per_prompt: int = 1
    """Responses per prompt in a PPO batch; 2 or more baseline each score by the others' mean (RLOO's
    leave-one-out baseline, training/engine/ppo.py)."""
    ppo_mini_batch_size: int = 32
    """Rollouts per gradient step inside a PPO step (against 16 and 64: benchmarks/README.md#ppo-defaults)."""
    ppo_kl_coef: float = 0.15
    """beta of the per-token KL penalty to the SFT policy, in every round (TRL PPOv2: 0.05); 0.15 measured by
    benchmarks/closed_loop.py (benchmarks/README.md#closed-loop-measured)."""
    ppo_lr: float = 1e-4
    """PPO Adam learning rate (the engine's default for the demo policy)."""
    ppo_max_new_tokens: int = 48
    """Longest response during PPO and sampling."""
    ppo_save_every: int = 10
    """Resumable PPO checkpoint every N steps (a killed worker resumes from the last one)."""
    sample_prompts: int = 128
    """Prompts whose responses become new pairs (drawn with `seed`, so rounds share them); each round's pairs
    are what teach the next reward model the new policy's faults."""
    sample_per_prompt: int = 2
    """Responses per prompt from each policy (the number of new pairs per prompt)."""
    sample_temperature: float = 0.7
    """Sampling temperature of the new pairs' responses."""
    top_p: float = 1.0
    """Nucleus sampling of the new pairs' responses; 1 samples the whole distribution (PPO always does)."""
    pairing: str = PAIRING_PREVIOUS
    """What the new policy's responses are compared with: previous, sft or self."""
    priority: int = 10
    """Queue priority of the new pairs (higher is served first)."""
    lora_r: int = 0
    """LoRA rank of the reward model and PPO (common.MemoryArgs); 0 trains every weight, as the demo does."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass of the reward model and PPO (common.MemoryArgs)."""

    def validate(self) -> None:
        """Raise ConfigError naming every bad value and its setting."""
        problems: dict[str, str] = {}
        if self.preset not in PRESETS:
            problems["preset"] = f"preset must be one of {', '.join(PRESETS)}"
        if self.pairing not in PAIRINGS:
            problems["pairing"] = f"pairing must be one of {', '.join(PAIRINGS)}"
        for name, (low, high, above) in BOUNDS.items():
            value = getattr(self, name)
            if not math.isfinite(value) or (value <= low if above else value < low) or value > high:
                lowest = f"above {_number(low)}" if above else f"at least {_number(low)}"
                problems[name] = f"{name} must be {lowest} and at most {_number(high)}, got {value!r}"
        if problems:
            raise ConfigError(problems)
        if self.ppo_batch_size % self.ppo_mini_batch_size:
            problems["ppo_mini_batch_size"] = "ppo_batch_size must be a multiple of ppo_mini_batch_size"
        if self.ppo_batch_size % self.ppo_samples_per_prompt:
            problems["ppo_samples_per_prompt"] = "ppo_batch_size must be a multiple of ppo_samples_per_prompt"
        if self.pairing == PAIRING_SELF and self.sample_per_prompt < 2:
            problems["sample_per_prompt"] = "pairing 'self' needs sample_per_prompt of 2 or more"
        if problems:
            raise ConfigError(problems)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stop_list(self) -> list[str]:
        """The stop strings, one per line of `stop_strings` (blank lines left out)."""
        return [line for line in self.stop_strings.splitlines() if line.strip()]


PRESETS: dict[str, RoundConfig] = {
    "demo": RoundConfig(),
    # A test's round: seconds per job on a tiny model.
    "tiny": RoundConfig(preset="tiny", reward_batch_size=8, reward_max_length=64, ppo_steps=3,
                        ppo_batch_size=8, ppo_mini_batch_size=4, ppo_max_new_tokens=16, ppo_save_every=1,
                        sample_prompts=6, sample_per_prompt=2),
}

FIELDS = {f.name: f for f in fields(RoundConfig)}


def field_help(name: str) -> str:
    """The docstring under a field (the text after it in this file), for forms and --help."""
    return _HELP.get(name, "")


_HELP = field_docs(RoundConfig)


def _convert(name: str, raw: Any) -> Any:
    kind = FIELDS[name].type
    if kind == "int":
        if isinstance(raw, bool):
            raise ConfigError({name: f"{name} must be an integer"})
        try:
            return int(str(raw).strip()) if not isinstance(raw, int) else raw
        except ValueError:
            raise ConfigError({name: f"{name}={raw!r} is not an integer"}) from None
    if kind == "bool":
        text = str(raw).strip().lower()
        if isinstance(raw, bool) or text in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return raw if isinstance(raw, bool) else text in ("true", "1", "yes", "on")
        raise ConfigError({name: f"{name}={raw!r} is not true or false"})
    if kind == "float":
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError({name: f"{name}={raw!r} is not a number"}) from None
        if not math.isfinite(value):
            raise ConfigError({name: f"{name}={raw!r} is not a finite number"})
        return value
    return str(raw).strip()


def build_config(preset: str = "demo", overrides: dict[str, Any] | None = None) -> RoundConfig:
    """A validated RoundConfig: the preset's values with `overrides` (text or typed) on top (a campaign's own
    settings, training.actions.campaign_settings, come first among them).

    Raises ValueError naming unknown keys and bad values.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use {' or '.join(PRESETS)}")
    overrides = dict(overrides or {})
    overrides.pop("preset", None)
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown round settings: {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    config = replace(PRESETS[preset], **{k: _convert(k, v) for k, v in overrides.items()})
    config.validate()
    return config


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['ppo_steps=4', 'pairing=sft'] -> {'ppo_steps': '4', 'pairing': 'sft'}; ppo.steps works too."""
    values = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip().replace(".", "_").replace("-", "_")] = value
    return values
