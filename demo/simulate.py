"""Simulated labelers: a rule or a reward model stands in for a person, as AlpacaFarm's simulated
annotators did (Dubois et al. 2023), so the whole loop can be tested and benchmarked without people.

Each bot is a user account ("sim-correct_sentence-1") that goes through the same doors as a person:
annotate.actions.claim_next_pair, then submit_judgment with source=simulated, so human statistics
can leave them out. With probability `noise` a bot flips its A/B preference (AlpacaFarm's label
noise); equal scores are a tie where the campaign offers one. On a campaign with several axes each axis
is judged by its own judge (`axis_judges`, by axis key; the first axis's is `judge`, and an axis given
none is judged by it too), all sent in one submit as a person's are.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.contrib.auth.models import User

from annotate.actions import claim_next_pair, submit_judgment
from annotate.models import Campaign, Judgment
from demo import demo_tasks
from demo.demo_tasks import DEFAULT_RULE_JUDGE

RULE, RM = "rule:", "rm:"
TIE_EPSILON = 1e-6
DEFAULT_JUDGE = RULE + DEFAULT_RULE_JUDGE  # rule:correct_sentence
DEFAULT_NOISE = 0.25  # a quarter of the A/B choices flipped


class SimulationError(ValueError):
    """A bad --judge (unknown rule, missing reward model) or noise value."""


@dataclass
class Judge:
    name: str
    """'rule:NAME' or 'rm:PATH'."""
    score: Callable[[list[str], list[str]], list[float]]
    """Scores (prompts, responses) -> one float per response; higher is better."""
    description: str
    """What the judge prefers, in a sentence (printed by the command)."""
    strength_steps: tuple[float, float, float]
    """Score gaps at which the strength becomes 2, 3 and 4 (1 below the first)."""
    slug: str


def make_judge(spec: str, device: str = "auto") -> Judge:
    if spec.startswith(RULE):
        name = spec[len(RULE):]
        if name not in demo_tasks.RULE_JUDGES:
            known = ", ".join(sorted(demo_tasks.RULE_JUDGES))
            raise SimulationError(f"unknown rule judge {name!r}: known rules are {known}")
        rule = demo_tasks.RULE_JUDGES[name]
        # Rule scores lie in [0, 1]: a wrong answer against a right one differs by about 0.5.
        return Judge(spec, lambda prompts, responses: [rule(p, r) for p, r in zip(prompts, responses)],
                     demo_tasks.judge_description(name), (0.1, 0.25, 0.5), name)
    if spec.startswith(RM):
        from training.engine.reward import RewardScorer  # torch: loaded by a reward-model judge only

        path = spec[len(RM):]
        if not (Path(path) / "config.json").exists():
            raise SimulationError(f"reward model {path!r} is not a save_pretrained directory "
                                  "(no config.json)")
        scorer = RewardScorer(path, device=device)
        # Bradley-Terry gaps: 0.5 / 1.5 / 3 nats are P(better) of about 0.62 / 0.82 / 0.95.
        return Judge(spec, lambda prompts, responses: scorer.score(prompts, responses).tolist(),
                     f"Prefers what the reward model at {path} scores higher.", (0.5, 1.5, 3.0), "rm")
    raise SimulationError(f"--judge must be rule:NAME or rm:PATH, got {spec!r}")


def bot_accounts(judge: Judge, labelers: int) -> list[User]:
    bots = []
    for index in range(1, labelers + 1):
        user, created = User.objects.get_or_create(username=f"sim-{judge.slug}-{index}"[:150])
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        bots.append(user)
    return bots


@dataclass
class SimulationResult:
    judgments: int = 0
    flipped: int = 0
    by_choice: dict[str, int] = field(default_factory=dict)
    stopped: str = ""  # why it stopped before `count`: "empty" (no pair left for any bot)


def strength_for(gap: float, steps: tuple[float, float, float]) -> int:
    return 1 + sum(gap >= step for step in steps)


def _decide(judge: Judge, axis, prompt: str, left: str, right: str, noise: float, rng: random.Random,
            result: SimulationResult) -> tuple[str, int | None]:
    """One judge's (choice in shown terms, strength) on one axis, with AlpacaFarm's label noise."""
    score_left, score_right = judge.score([prompt, prompt], [left, right])
    gap = abs(score_left - score_right)
    if gap <= TIE_EPSILON and Judgment.TIE in axis.choices_offered():
        return "tie", None
    choice = "a" if score_left > score_right or (gap <= TIE_EPSILON and rng.random() < 0.5) else "b"
    if rng.random() < noise:
        choice = "b" if choice == "a" else "a"
        result.flipped += 1
    return choice, strength_for(gap, judge.strength_steps) if axis.ask_strength else None


def simulate_labelers(campaign: Campaign, judge: Judge, *, noise: float = DEFAULT_NOISE, count: int = 100,
                      labelers: int = 1, seed: int = 0, axis_judges: dict[str, Judge] | None = None,
                      on_judgment: Callable[[int], None] | None = None) -> SimulationResult:
    """Record up to `count` judgments by `labelers` bots taking turns, until the queue has none for them."""
    if not 0.0 <= noise <= 1.0:
        raise SimulationError(f"noise is a probability: 0 to 1, got {noise}")
    axes = campaign.axes()
    unknown = sorted(set(axis_judges or {}) - {axis.key for axis in axes})
    if unknown:
        raise SimulationError(f"no axis {', '.join(map(repr, unknown))} in campaign {campaign.slug}: its axes are "
                              + ", ".join(axis.key for axis in axes))
    judges = [(axis, (axis_judges or {}).get(axis.key, judge)) for axis in axes]
    rng = random.Random(seed)
    bots = bot_accounts(judge, labelers)
    result = SimulationResult()
    idle: set[int] = set()
    turn = 0
    while result.judgments < count and len(idle) < len(bots):
        bot = bots[turn % len(bots)]
        turn += 1
        if bot.pk in idle:
            continue
        claim = claim_next_pair(campaign, bot)
        if claim.assignment is None:
            idle.add(bot.pk)
            continue
        assignment = claim.assignment
        left, right = assignment.shown()
        prompt = assignment.pair.prompt.text
        decided = {axis.key: _decide(axis_judge, axis, prompt, left.text, right.text, noise, rng, result)
                   for axis, axis_judge in judges}
        choice, strength = decided[axes[0].key]
        rationale = f"simulated by {judge.name}" if campaign.ask_rationale else ""
        several = ({"choices": {key: c for key, (c, _) in decided.items()},
                    "strengths": {key: s for key, (_, s) in decided.items()}} if len(axes) > 1 else {})
        _, created = submit_judgment(assignment_id=assignment.pk, labeler=bot, choice=choice,
                                     strength=strength, rationale=rationale, source=Judgment.SIMULATED,
                                     **several)
        if created:
            result.judgments += 1
            result.by_choice[choice] = result.by_choice.get(choice, 0) + 1
            if on_judgment is not None:
                on_judgment(result.judgments)
    if result.judgments < count:
        result.stopped = "empty"
    return result
