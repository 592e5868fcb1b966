"""How reward sources are written and combined: the names that the engine, the round settings and the runner
share. Imports nothing heavy (no torch): the web process reads the round settings' choices through it."""

from __future__ import annotations

from dataclasses import dataclass, field

RULE_PREFIX = "rule:"  # a rule judge of demo_tasks: rule:NAME
CLASSIFIER_PREFIX = "classifier:"  # a ready safety classifier: classifier:LABEL:PATH
SUM, WEIGHTED, GATED = "sum", "weighted", "gated"
COMBINATIONS = (SUM, WEIGHTED, GATED)
QUALITY, SAFETY = "quality", "safety"
ROLES = (QUALITY, SAFETY)


def classifier_source(path: str, label: int) -> str:
    """The reward source of a sequence-classification model at `path` whose label `label` means safe."""
    return f"{CLASSIFIER_PREFIX}{label}:{path}"


@dataclass
class RewardMixArgs:
    """How PPO and GRPO name their reward sources and combine them into one score (PPOArgs and GRPOArgs extend it)."""

    reward_names: list[str] = field(default_factory=list)
    """One short name per reward source, its metric <stage>/reward/<name>; empty: the source as given."""
    reward_roles: list[str] = field(default_factory=list)
    """quality or safety, one per reward source; empty: classifier sources are safety, the others quality."""
    reward_combination: str = SUM
    """sum: the weighted sum of the raw scores; weighted: (1 - safety_weight) * quality + safety_weight * safety
    (the seed material's safety alignment); gated: safety's instead of quality's score where P(safe) < safety_threshold (Llama 2,
    Touvron et al. 2023, sec. 3.2.3, eq. 3); both whiten each source first."""
    safety_weight: float = 0.3
    """Share of the safety score in the weighted combination (the seed material's 0.3)."""
    safety_threshold: float = 0.15
    """P(safe) under which the gated combination takes the safety score (Llama 2's 0.15: precision 0.89 and recall
    0.55 for unsafe responses, Touvron et al. 2023, sec. 3.2.3)."""
