"""A round's settings: one flat dataclass, two presets, and parsing from `KEY=VALUE` text.

The launch form, `manage.py launch_round --set KEY=VALUE` and the runner all read this one
definition: each field is declared once, with its default, its docstring (the help text) and a Setting
(range, choices, the engine field it feeds, its place on the form), so a new setting is one field here
plus its use in the engine. Defaults come from the engine (training/engine/*.py, where each is cited); the demo
preset fits the demo campaign on 2 CPU cores (benchmarks/README.md#closed-loop), the tiny preset a test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from annotate.limits import INT32_MAX, INT32_MIN
from annotate.sources import ACCEPT_PEOPLE, AI_SELECTIONS, CAI_ACCEPTS, HUMANS
from demo.demo_tasks import DEFAULT_RULE_JUDGE, RULE_JUDGES, judge_description
from training.engine.fields import field_docs
from training.engine.sources import GATED, WEIGHTED

PAIRING_PREVIOUS, PAIRING_SFT, PAIRING_SELF = "previous", "sft", "self"
REWARD_FROM_SFT = "sft"  # reward_model value: the campaign's SFT policy is the reward backbone
PPO, DPO, GRPO = "ppo", "dpo", "grpo"
ALGORITHMS = {
    PPO: "PPO: a reward model, then PPO against it (Ouyang et al. 2022)",
    DPO: "DPO: the policy straight from the pairs, no reward model (Rafailov et al. 2023)",
    GRPO: "GRPO: a reward model, then group-relative advantages, no critic (Shao et al. 2024)",
}
WITH_REWARD_MODEL = (PPO, GRPO)  # the round types whose policy stage optimises a reward model's (and safety's) scores
ONLINE_DPO = "dpo_online"  # a round type (Setting.algorithms): a DPO round with dpo_online, which trains a reward model
# A round type a switch turns on: its tag, the algorithm it belongs to and the bool setting that switches it.
SWITCHED_TYPES = {ONLINE_DPO: (DPO, "dpo_online")}
WITH_REWARD_JOB = (*WITH_REWARD_MODEL, ONLINE_DPO)  # the round types whose chain trains a reward model on the pairs
DPO_REFERENCES = {
    PAIRING_SFT: "the SFT policy (or the reference policy named above)",
    PAIRING_PREVIOUS: "the round's starting policy: the previous round's",
}
DPO_LOSSES = {"sigmoid": "sigmoid: DPO (Rafailov et al. 2023)", "ipo": "ipo: IPO (Azar et al. 2023)"}
GRPO_BASELINES = {"group": "the group's mean (Shao et al. 2024)",
                  "rloo": "the mean of the others in the group (RLOO, Ahmadian et al. 2024)"}
REWARD_COMBINATIONS = {
    WEIGHTED: "weighted: (1 - safety weight) x quality + safety weight x safety (the seed material's safety alignment)",
    GATED: "gated: the safety reward replaces quality where P(safe) is under the threshold (Llama 2)",
}
EVAL_RULE_JUDGES = {"": "none: the round's reward model alone",
                    **{name: f"{name}: {judge_description(name)}" for name in RULE_JUDGES}}
PAIRINGS = {
    PAIRING_PREVIOUS: "new policy vs the previous round's policy",
    PAIRING_SFT: "new policy vs the SFT (starting) policy",
    PAIRING_SELF: "two samples of the new policy",
}


SETTING = "pairloop.setting"  # the key of a RoundConfig field's metadata that holds its Setting
TEXTAREA = "textarea"  # Setting.widget of text of several lines


@dataclass(frozen=True)
class Setting:
    """What the launch form, validate() and the runner know of one round setting besides its default and help."""

    bounds: tuple[float, float] | None = None
    """Lowest and highest value, checked at launch, before hours of training meet a value the database or the
    engine refuses; None: no range."""
    low_excluded: bool = False
    """The lowest bound itself is refused (a learning rate of 0)."""
    choices: dict[str, str] | None = None
    """The values allowed, each with what it means (the form's choices); None: any value of its type."""
    engine: tuple[str, str, str] | None = None
    """(training.engine module, Args class, field) the runner hands the value to (RoundConfig.engine_args);
    the default is that field's unless why_differs says why not; None: the runner uses it itself, if at all."""
    why_differs: str = ""
    """Why the default differs from the engine field's (benchmarks/README.md#closed-loop-measured); empty: it does not."""
    section: str = ""
    """The launch form's section that shows it, sections in field order; empty: not on the form."""
    label: str = ""
    """Its label on the launch form."""
    widget: str = ""
    """TEXTAREA for text of several lines; empty: the input its type gives."""
    algorithms: tuple[str, ...] = ()
    """The round types (ALGORITHMS) it applies to; empty: every one."""

    def applies_to(self, types: tuple[str, ...]) -> bool:
        """Whether it applies to a round of these types (round_types)."""
        return not self.algorithms or any(kind in self.algorithms for kind in types)

    def __post_init__(self):
        if self.section and not self.label:
            raise ValueError(f"a round setting shown in the {self.section!r} section needs a label")


def round_types(algorithm: str, values: dict[str, Any]) -> tuple[str, ...]:
    """A round's types (Setting.algorithms): its algorithm, and each SWITCHED_TYPES one whose switch `values` turn
    on for that algorithm (ONLINE_DPO for a DPO round with dpo_online)."""
    return (algorithm, *(kind for kind, (base, switch) in SWITCHED_TYPES.items()
                         if base == algorithm and values.get(switch)))


def setting(default: Any, **about: Any) -> Any:
    """A RoundConfig field: its default, and a Setting made of `about` as its metadata."""
    return field(default=default, metadata={SETTING: Setting(**about)})


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
    # The runner adds the round number and 10,000 to it.
    seed: int = setting(0, bounds=(0, INT32_MAX - 100_000))
    """Seed of data order, sampling and the choice of prompts (the same prompts every round, for review)."""
    algorithm: str = setting(PPO, choices=ALGORITHMS, section="Round type", label="Algorithm")
    """How the round trains its policy from the pairs: ppo (the default), dpo or grpo."""
    reward_model: str = setting(REWARD_FROM_SFT, section="Models and prompting", label="Backbone",
                                algorithms=WITH_REWARD_JOB)
    """Reward backbone: "sft" (the campaign's SFT policy with a score head, as InstructGPT initialises its
    reward model from the supervised model, Ouyang et al. 2022), a name or path, or empty:
    PAIRLOOP_REWARD_MODEL, else the packaged MiniLM."""
    reference: str = setting("", section="Models and prompting", label="Reference policy")
    """Reference policy of the KL penalty (PPO, GRPO; DPO's "sft" reference): a name or path; empty: the campaign's
    starting (SFT) policy."""
    system_prompt: str = setting("", section="Models and prompting", label="System prompt", widget=TEXTAREA)
    """System turn the policy (and a chat reward model) sees before every prompt; empty: none."""
    stop_strings: str = setting("", section="Models and prompting", label="Stop strings", widget=TEXTAREA)
    """Texts that end a response besides the model's end-of-turn tokens, one per line; empty: none."""
    reward_epochs: int = setting(1, bounds=(1, 1000), engine=("reward", "RewardArgs", "epochs"),
                                 section="Reward model", label="Epochs",
        algorithms=WITH_REWARD_JOB)
    """Reward model epochs; InstructGPT trains one, it overfits after (Ouyang et al. 2022)."""
    reward_lr: float = setting(
        1e-4, bounds=(0.0, 1.0), low_excluded=True, engine=("reward", "RewardArgs", "lr"),
        why_differs="1e-4 and no warm-up: the demo's reward model is its GPT-2 policy, measured so by "
                    "closed_loop.py; the engine's 5e-5 with 10% warm-up is measured on the MiniLM (reward_vs_trl.py --cv)",
        section="Reward model", label="Learning rate",
        algorithms=WITH_REWARD_JOB)
    """Reward model AdamW peak learning rate (TRL RewardConfig's; the demo's rounds were measured with it)."""
    reward_warmup_ratio: float = setting(
        0.0, bounds=(0.0, 1.0), engine=("reward", "RewardArgs", "warmup_ratio"),
        why_differs="0, with reward_lr: what closed_loop.py measured the demo's rounds with",
        section="Reward model", label="Warm-up share",
        algorithms=WITH_REWARD_JOB)
    """Share of reward steps with linear warm-up before the linear decay (transformers' default: none)."""
    reward_older_rounds_weight: float = setting(
        1.0, bounds=(0.0, 1.0), engine=("reward", "RewardArgs", "older_rounds_weight"), section="Reward model",
        label="Weight per older round", algorithms=WITH_REWARD_JOB)
    """w: a pair made k rounds before the newest judged round's weighs w^k in the reward model's loss (imports
    count as round 0); 1, the engine's: every round's pairs alike; 0: the newest round's pairs only."""
    reward_batch_size: int = setting(8, bounds=(1, 65_536), engine=("reward", "RewardArgs", "batch_size"),
                                     section="Reward model", label="Batch size",
        algorithms=WITH_REWARD_JOB)
    """Preference pairs per reward step."""
    reward_max_length: int = setting(
        256, bounds=(16, 131_072), engine=("reward", "RewardArgs", "max_length"),
        why_differs="256, the length the reward benchmarks measure at; the engine's 512 is BERT's limit",
        section="Reward model", label="Max length",
        algorithms=WITH_REWARD_JOB)
    """Longest (prompt, response) in tokens for the reward model; the demo's are well under it."""
    reward_combination: str = setting(
        WEIGHTED, choices=REWARD_COMBINATIONS, engine=("sources", "RewardMixArgs", "reward_combination"),
        why_differs="weighted: a round names its sources' roles, and the book's formula is the plain mix; the "
                    "engine's sum is a bare command line's weighted sum of raw scores",
        section="Safety", label="Reward combination", algorithms=WITH_REWARD_MODEL)
    """How the policy stage mixes the reward model (quality) with a safety source (safety_classifier): weighted or
    gated, each whitened first (training/engine/reward.py); without a safety source the reward model alone."""
    safety_weight: float = setting(0.3, bounds=(0.0, 1.0), engine=("sources", "RewardMixArgs", "safety_weight"),
                                   section="Safety", label="Safety weight", algorithms=WITH_REWARD_MODEL)
    """Share of the safety reward in the weighted combination; the engine's 0.3, the seed material's."""
    safety_threshold: float = setting(0.15, bounds=(0.0, 1.0),
                                      engine=("sources", "RewardMixArgs", "safety_threshold"),
                                      section="Safety", label="Safety threshold", algorithms=WITH_REWARD_MODEL)
    """P(safe) under which the gated combination takes the safety reward; the engine's 0.15, Llama 2's."""
    safety_classifier: str = setting("", section="Safety", label="Safety classifier", algorithms=WITH_REWARD_MODEL)
    """A ready sequence-classification model (path or name) whose P(safe) of each response is a safety reward
    beside the round's reward model; empty: none."""
    safety_classifier_label: int = setting(0, bounds=(0, 65_535), section="Safety", label="Safe label",
                                           algorithms=WITH_REWARD_MODEL)
    """Index of the safety classifier's label that means safe (its config.json id2label); 0, the first label."""
    safety_axis: str = setting("", section="Safety", label="Safety axis", algorithms=WITH_REWARD_MODEL)
    """Key of the campaign's axis whose reward model is the safety reward, the others' quality (checked at launch
    against the campaign's axes); empty: none, every axis's reward model is quality."""
    ppo_steps: int = setting(30, bounds=(1, 1_000_000), engine=("ppo", "PPOArgs", "steps"),
                             section="PPO", label="Steps", algorithms=(PPO,))
    """PPO iterations (each: a rollout batch and its optimisation); 30, the engine's default."""
    ppo_batch_size: int = setting(64, bounds=(1, 65_536), engine=("ppo", "PPOArgs", "batch_size"),
                                  section="PPO", label="Batch size", algorithms=(PPO,))
    """Rollouts per PPO step (the engine's default, measured: benchmarks/README.md#policy-vs-trl)."""
    ppo_samples_per_prompt: int = setting(
        1, bounds=(1, 1024), engine=("ppo", "PPOArgs", "samples_per_prompt"),
        why_differs="1: over three closed-loop rounds 4 ended lower (closed_loop.py, row J)",
        section="PPO", label="Samples per prompt", algorithms=(PPO,))
    """Responses per prompt in a PPO batch; 2 or more baseline each score by the others' mean (RLOO's
    leave-one-out baseline, training/engine/ppo.py)."""
    ppo_mini_batch_size: int = setting(
        32, bounds=(1, 65_536), engine=("ppo", "PPOArgs", "mini_batch_size"),
        why_differs="32: over three closed-loop rounds one update per batch ended lower (row L)",
        section="PPO", label="Mini batch size", algorithms=(PPO,))
    """Rollouts per gradient step inside a PPO step (against 16 and 64: benchmarks/README.md#ppo-defaults)."""
    ppo_kl_coef: float = setting(
        0.15, bounds=(0.0, 100.0), engine=("ppo", "PPOArgs", "kl_coef"),
        why_differs="0.15: over three closed-loop rounds it kept more of the SFT policy's correctness",
        section="PPO", label="KL coefficient", algorithms=(PPO,))
    """beta of the per-token KL penalty to the SFT policy, in every round (TRL PPOv2: 0.05); 0.15 measured by
    benchmarks/closed_loop.py (benchmarks/README.md#closed-loop-measured)."""
    ppo_lr: float = setting(1e-4, bounds=(0.0, 1.0), low_excluded=True, engine=("ppo", "PPOArgs", "lr"),
                            section="PPO", label="Learning rate", algorithms=(PPO,))
    """PPO Adam learning rate (the engine's default for the demo policy)."""
    ppo_save_every: int = setting(10, bounds=(0, 1_000_000), engine=("ppo", "PPOArgs", "save_every"),
                                  algorithms=(PPO,))
    """Resumable PPO checkpoint every N steps (a killed worker resumes from the last one)."""
    dpo_loss_type: str = setting("sigmoid", choices=DPO_LOSSES, engine=("dpo", "DPOArgs", "loss_type"),
                                 section="DPO", label="Loss", algorithms=(DPO,))
    """DPO's loss: sigmoid (Rafailov et al. 2023, eq. 7) or ipo (Azar et al. 2023); the engine's default."""
    dpo_beta: float = setting(0.1, bounds=(0.0, 100.0), low_excluded=True, engine=("dpo", "DPOArgs", "beta"),
                              section="DPO", label="Beta", algorithms=(DPO,))
    """KL strength beta of the implicit reward (for ipo its tau); the engine's, from Rafailov et al. 2023."""
    dpo_label_smoothing: float = setting(0.0, bounds=(0.0, 0.49), engine=("dpo", "DPOArgs", "label_smoothing"),
                                         section="DPO", label="Label smoothing", algorithms=(DPO,))
    """Assumed share of flipped labels (conservative DPO, Mitchell 2023); 0, the engine's: plain DPO."""
    dpo_strength_weight: float = setting(0.0, bounds=(0.0, 100.0), engine=("dpo", "DPOArgs", "strength_weight"),
                                         section="DPO", label="Strength weight", algorithms=(DPO,))
    """A pair weighs 1 + this x the labelers' strength (margin 0..1); 0, the engine's: all pairs alike."""
    dpo_older_rounds_weight: float = setting(
        1.0, bounds=(0.0, 1.0), engine=("dpo", "DPOArgs", "older_rounds_weight"), section="DPO",
        label="Weight per older round", algorithms=(DPO,))
    """w: a pair made k rounds before the newest judged round's weighs w^k (imports count as round 0); 1, the
    engine's: every round's pairs alike; 0: the newest round's pairs only."""
    dpo_axis: str = setting("", section="DPO", label="Axis", algorithms=(DPO,))
    """Key of the campaign's axis whose pairs DPO learns from (checked at launch); empty: the campaign's first axis."""
    dpo_lr: float = setting(
        1e-4, bounds=(0.0, 1.0), low_excluded=True, engine=("dpo", "DPOArgs", "lr"),
        why_differs="1e-4: at the engine's 1e-6 three closed-loop DPO rounds left the tiny demo policy as it "
                    "was (benchmarks/README.md#closed-loop-round-types-3)",
        section="DPO", label="Learning rate", algorithms=(DPO,))
    """DPO's peak AdamW learning rate; 1e-4, measured by closed_loop.py (the engine's 1e-6, Rafailov et al. 2023,
    moved nothing: benchmarks/README.md#closed-loop-round-types-3)."""
    dpo_epochs: int = setting(1, bounds=(1, 1000), engine=("dpo", "DPOArgs", "epochs"),
                              section="DPO", label="Epochs", algorithms=(DPO,))
    """Passes over the exported pairs; the engine's, as the DPO authors' trainer."""
    dpo_batch_size: int = setting(64, bounds=(1, 65_536), engine=("dpo", "DPOArgs", "batch_size"),
                                  section="DPO", label="Batch size", algorithms=(DPO,))
    """Pairs per DPO step; the engine's, from Rafailov et al. 2023 (appendix B)."""
    dpo_max_length: int = setting(512, bounds=(16, 131_072), engine=("dpo", "DPOArgs", "max_length"),
                                  section="DPO", label="Max length", algorithms=(DPO,))
    """Longest prompt + response in tokens for DPO; the engine's, as the DPO authors' trainer."""
    dpo_reference: str = setting(PAIRING_SFT, choices=DPO_REFERENCES, section="DPO", label="Reference",
                                 algorithms=(DPO,))
    """DPO's frozen reference: sft (the reference policy setting, else the campaign's SFT policy, as the KL
    penalty of PPO in every round) or previous (the round's starting policy, Rafailov et al. 2023, sec. 4)."""
    dpo_online: bool = setting(False, section="DPO", label="Online pairs", algorithms=(DPO,))
    """Online DPO (Guo et al. 2024): the round also trains a reward model on the pairs, and DPO adds fresh pairs of
    its policy's own samples that the reward model labels; off, the engine's offline DPO on the pairs alone."""
    dpo_online_prompts: int = setting(8, bounds=(1, 65_536), engine=("dpo", "DPOArgs", "online_prompts"),
                                      section="DPO", label="Online prompts per refresh", algorithms=(DPO,))
    """Prompts sampled per refresh with dpo_online, each at most one online pair; the engine's."""
    dpo_online_samples: int = setting(2, bounds=(2, 64), engine=("dpo", "DPOArgs", "online_samples"),
                                      section="DPO", label="Online samples per prompt", algorithms=(DPO,))
    """Responses per prompt with dpo_online; the reward model's best and worst make the pair; the engine's."""
    dpo_online_every: int = setting(1, bounds=(1, 1_000_000), engine=("dpo", "DPOArgs", "online_every"),
                                    section="DPO", label="Fresh online pairs every N steps", algorithms=(DPO,))
    """Steps between samplings of fresh online pairs with dpo_online; the engine's 1, every step (OAIF, TRL)."""
    grpo_steps: int = setting(30, bounds=(1, 1_000_000), engine=("grpo", "GRPOArgs", "steps"),
                              section="GRPO", label="Steps", algorithms=(GRPO,))
    """GRPO iterations (each: groups of samples and their optimisation); the engine's, PPO's 30."""
    grpo_batch_size: int = setting(64, bounds=(2, 65_536), engine=("grpo", "GRPOArgs", "batch_size"),
                                   section="GRPO", label="Batch size", algorithms=(GRPO,))
    """Responses per GRPO step, a multiple of the group size; the engine's."""
    grpo_samples_per_prompt: int = setting(8, bounds=(2, 1024), engine=("grpo", "GRPOArgs", "samples_per_prompt"),
                                           section="GRPO", label="Group size", algorithms=(GRPO,))
    """Responses per prompt compared with each other (G); the engine's, TRL GRPOConfig's num_generations."""
    grpo_beta: float = setting(0.04, bounds=(0.0, 100.0), engine=("grpo", "GRPOArgs", "beta"),
                               section="GRPO", label="KL coefficient", algorithms=(GRPO,))
    """beta of the k3 KL term to the reference in the loss; the engine's, Shao et al. 2024 (sec. 4.2)."""
    grpo_lr: float = setting(1e-4, bounds=(0.0, 1.0), low_excluded=True, engine=("grpo", "GRPOArgs", "lr"),
                             section="GRPO", label="Learning rate", algorithms=(GRPO,))
    """GRPO's AdamW learning rate; the engine's, PPO's for the demo policy."""
    grpo_baseline: str = setting("group", choices=GRPO_BASELINES, engine=("grpo", "GRPOArgs", "baseline"),
                                 section="GRPO", label="Baseline", algorithms=(GRPO,))
    """What each score is measured against: its group's mean (Shao et al. 2024) or the others' (rloo)."""
    grpo_save_every: int = setting(10, bounds=(0, 1_000_000), engine=("grpo", "GRPOArgs", "save_every"),
                                   algorithms=(GRPO,))
    """Resumable GRPO checkpoint every N steps (a killed worker resumes from the last one)."""
    ppo_max_new_tokens: int = setting(48, bounds=(1, 32_768), engine=("ppo", "PPOArgs", "max_new_tokens"),
                                      section="Sampling", label="Max new tokens")
    """Longest response during PPO or GRPO, online DPO and in sampling (the runner hands it to each)."""
    sample_prompts: int = setting(128, bounds=(1, 100_000), section="Sampling", label="Prompts")
    """Prompts whose responses become new pairs (drawn with `seed`, so rounds share them); each round's pairs
    are what teach the next reward model the new policy's faults."""
    sample_per_prompt: int = setting(2, bounds=(1, 64), engine=("sample", "SampleArgs", "num_per_prompt"),
                                     section="Sampling", label="Responses per prompt")
    """Responses per prompt from each policy (the number of new pairs per prompt)."""
    sample_temperature: float = setting(0.7, bounds=(0.0, 100.0), low_excluded=True,
                                        engine=("sample", "SampleArgs", "temperature"),
                                        section="Sampling", label="Temperature")
    """Sampling temperature of the new pairs' responses (and of online DPO's)."""
    top_p: float = setting(1.0, bounds=(0.0, 1.0), low_excluded=True, engine=("sample", "SampleArgs", "top_p"),
                           section="Sampling", label="Top-p")
    """Nucleus sampling of the new pairs' responses; 1 samples the whole distribution (PPO always does)."""
    pairing: str = setting(PAIRING_PREVIOUS, choices=PAIRINGS, section="New pairs", label="Pairing")
    """What the new policy's responses are compared with: previous, sft or self."""
    priority: int = setting(10, bounds=(INT32_MIN, INT32_MAX), section="New pairs", label="Priority")
    """Queue priority of the new pairs (higher is served first)."""
    eval_rule_judge: str = setting(DEFAULT_RULE_JUDGE, choices=EVAL_RULE_JUDGES, section="Evaluation",
                                   label="Rule judge")
    """Rule judge that compares the policies' answers to a demo evaluation set, beside the round's reward model;
    its default is the demo's simulated labelers' (demo_tasks.DEFAULT_RULE_JUDGE)."""
    judgments: str = setting(HUMANS, choices=AI_SELECTIONS, section="Round type", label="Judgments")
    """Which judgments train the round: humans (AI labelers' left out), humans_and_ai, or ai_where_no_human."""
    cai_revisions: bool = setting(False, section="Round type", label="SFT on accepted AI revisions first")
    """Fine-tune the round's starting policy on the campaign's accepted AI revisions (Constitutional AI's supervised
    stage, training/cai.py) in an SFT job before the reward stage; the rest of the round starts from it. Off."""
    cai_accept: str = setting(ACCEPT_PEOPLE, choices=CAI_ACCEPTS, section="Round type",
                              label="Revisions accepted by")
    """Which AI-proposed revisions cai_revisions learns from: people (the people's majority preferred the revision,
    the default) or ai (every proposal the people have not overturned)."""
    lora_r: int = setting(0, bounds=(0, 4096), engine=("common", "MemoryArgs", "lora_r"),
                          section="Memory", label="LoRA rank")
    """LoRA rank of the reward model and PPO (common.MemoryArgs); 0 trains every weight, as the demo does."""
    gradient_checkpointing: bool = setting(False, engine=("common", "MemoryArgs", "gradient_checkpointing"),
                                           section="Memory", label="Gradient checkpointing")
    """Recompute activations in the backward pass of the reward model and PPO (common.MemoryArgs)."""
    fsdp: bool = setting(False, engine=("common", "MemoryArgs", "fsdp"), section="Memory",
                         label="Shard over the training processes (FSDP2)")
    """Shard the weights and optimizer state of every training job over PAIRLOOP_TRAINING_PROCESSES instead of DDP
    (common.MemoryArgs)."""

    def validate(self) -> None:
        """Raise ConfigError naming every bad value and its setting."""
        problems: dict[str, str] = {}
        if self.preset not in PRESETS:
            problems["preset"] = f"preset must be one of {', '.join(PRESETS)}"
        for name, about in SETTINGS.items():
            if about.choices is not None and getattr(self, name) not in about.choices:
                problems[name] = f"{name} must be one of {', '.join(about.choices)}"
        for name, about in SETTINGS.items():
            if about.bounds is None:
                continue
            (low, high), value = about.bounds, getattr(self, name)
            if not math.isfinite(value) or (value <= low if about.low_excluded else value < low) or value > high:
                lowest = f"above {_number(low)}" if about.low_excluded else f"at least {_number(low)}"
                problems[name] = f"{name} must be {lowest} and at most {_number(high)}, got {value!r}"
        if problems:
            raise ConfigError(problems)
        if self.ppo_batch_size % self.ppo_mini_batch_size:
            problems["ppo_mini_batch_size"] = "ppo_batch_size must be a multiple of ppo_mini_batch_size"
        if self.ppo_batch_size % self.ppo_samples_per_prompt:
            problems["ppo_samples_per_prompt"] = "ppo_batch_size must be a multiple of ppo_samples_per_prompt"
        if self.dpo_loss_type == "ipo" and self.dpo_label_smoothing:
            problems["dpo_label_smoothing"] = "dpo_label_smoothing (conservative DPO) applies to the sigmoid loss only"
        if self.grpo_batch_size % self.grpo_samples_per_prompt:
            problems["grpo_samples_per_prompt"] = "grpo_batch_size must be a multiple of grpo_samples_per_prompt"
        if self.pairing == PAIRING_SELF and self.sample_per_prompt < 2:
            problems["sample_per_prompt"] = "pairing 'self' needs sample_per_prompt of 2 or more"
        if problems:
            raise ConfigError(problems)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def round_types(self) -> tuple[str, ...]:
        """This round's types (Setting.algorithms): its algorithm, with ONLINE_DPO for online DPO."""
        return round_types(self.algorithm, vars(self))

    def trains_reward_model(self) -> bool:
        """Whether the round's chain has a reward job: PPO and GRPO always, DPO with dpo_online."""
        return any(kind in WITH_REWARD_JOB for kind in self.round_types())

    def stop_list(self) -> list[str]:
        """The stop strings, one per line of `stop_strings` (blank lines left out)."""
        return [line for line in self.stop_strings.splitlines() if line.strip()]

    def engine_args(self, args_class: type) -> dict[str, Any]:
        """{engine field: this round's value} of each setting whose Setting.engine names `args_class` or a class
        it extends (MemoryArgs), to pass as keyword arguments; `args_class` is looked at, never imported here."""
        classes = {klass.__name__ for klass in args_class.__mro__}
        return {about.engine[2]: getattr(self, name) for name, about in SETTINGS.items()
                if about.engine is not None and about.engine[1] in classes}


PRESETS: dict[str, RoundConfig] = {
    "demo": RoundConfig(),
    # A test's round: seconds per job on a tiny model.
    "tiny": RoundConfig(preset="tiny", reward_batch_size=8, reward_max_length=64, ppo_steps=3,
                        ppo_batch_size=8, ppo_mini_batch_size=4, ppo_max_new_tokens=16, ppo_save_every=1,
                        sample_prompts=6, sample_per_prompt=2, dpo_batch_size=8, dpo_max_length=64,
                        grpo_steps=3, grpo_batch_size=8, grpo_samples_per_prompt=4, grpo_save_every=1),
}

FIELDS = {f.name: f for f in fields(RoundConfig)}
SETTINGS: dict[str, Setting] = {f.name: f.metadata.get(SETTING, Setting()) for f in fields(RoundConfig)}


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


def refuse_unused(config: RoundConfig, names) -> None:
    """Raise ConfigError naming each of `names` that a round of `config`'s types does not use (Setting.algorithms),
    so a value given for another round type is refused rather than ignored."""
    types = config.round_types()
    problems = {name: f"{name} does not apply to a {' '.join(types)} round (it is for "
                      f"{', '.join(SETTINGS[name].algorithms)})"
                for name in names if name in SETTINGS and not SETTINGS[name].applies_to(types)}
    if problems:
        raise ConfigError(problems)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['ppo_steps=4', 'pairing=sft'] -> {'ppo_steps': '4', 'pairing': 'sft'}; ppo.steps works too."""
    values = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip().replace(".", "_").replace("-", "_")] = value
    return values
