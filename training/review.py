"""What a round's review shows: one table that the sample job scores and the round page shows.

For each sampled prompt, its responses column by column: those the campaign started with, each
earlier round's new policy's, this round's, and the policy it was paired against. The sample job
scores every response in it that is not empty with the round's reward model (and, on a campaign with several
axes, with each axis's); the page shows the first few of each cell with those scores. An empty answer (the policy ended its turn at once) is
shown as such, counted, never scored and never paired.

Beside the table, the round page and the API read the rounds' win rates and the policies'
Bradley-Terry ratings from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from django.db.models import Q

from annotate.models import Axis, Judgment, Pair, Response, content_hash, on_axis
from training.models import Job, Round
from training.ratings import bradley_terry

REVIEW_PROMPTS = 20  # prompts the round page shows
SHOWN_PER_CELL = 3  # responses the round page shows per prompt and column
RATING_BOOTSTRAP = 200  # resamples for the ratings' 95% intervals


def is_empty(response: str) -> bool:
    """An empty answer: nothing but white space (the policy ended its turn at once)."""
    return not response.strip()


def count_empty(samples: list[dict], side: str) -> int:
    """Empty answers on one side ("new" or "other") of a sample job's samples."""
    return sum(is_empty(r) for sample in samples for r in sample.get(side) or [])


@dataclass
class ReviewTable:
    columns: list[str]
    rows: list[tuple[str, list[list[str]]]]  # (prompt text, each column's responses in order)

    def scored(self) -> list[tuple[str, str]]:
        """Every (prompt, response) of the table that gets a reward-model score: the non-empty ones, once each."""
        return sorted({(prompt, r) for prompt, cells in self.rows for cell in cells for r in cell if not is_empty(r)})


def review_table(round_: Round, samples: list[dict], opponent: str) -> ReviewTable:
    """The review of these samples of the round (a sample job's result["samples"]), beside what the campaign
    started with and earlier rounds wrote for the same prompts; `opponent` names the paired policy ("" none)."""
    texts = {s["prompt"] for s in samples}
    earlier: dict[int, dict[str, list[str]]] = {}
    for number, result in (Job.objects.filter(round__campaign=round_.campaign, round__number__lt=round_.number,
                                              kind=Job.SAMPLE, status=Job.SUCCEEDED)
                           .order_by("round__number").values_list("round__number", "result")):
        earlier[number] = {s["prompt"]: s["new"] for s in (result or {}).get("samples", []) if s["prompt"] in texts}
    initial: dict[str, list[str]] = {}
    for prompt, text in (Response.objects.filter(prompt_id__in=[s["prompt_id"] for s in samples],
                                                 source__in=[Response.SEED, Response.IMPORT])
                         .order_by("id").values_list("prompt__text", "text")):
        initial.setdefault(prompt, []).append(text)
    columns = ["Before any round"] + [f"Round {n}" for n in earlier] + [f"Round {round_.number} (this round)"]
    if opponent:
        columns.append(f"Paired against: {opponent}")
    rows = []
    for sample in samples:
        prompt = sample["prompt"]
        cells = [initial.get(prompt, [])] + [by_prompt.get(prompt, []) for by_prompt in earlier.values()]
        cells.append(list(sample["new"]))
        if opponent:
            cells.append(list(sample.get("other") or []))
        rows.append((prompt, cells))
    return ReviewTable(columns, rows)


def round_review(round_: Round) -> dict | None:
    """What the round's policy writes beside earlier rounds' for the same prompts, with this round's
    reward-model scores, and human (and, apart, simulated) win rates of each round's responses."""
    sample_job = round_.jobs.filter(kind=Job.SAMPLE, status=Job.SUCCEEDED).first()
    rates = _win_rates(round_)
    if sample_job is None and not rates:
        return None
    ratings = policy_ratings(round_)
    further = [found for axis in round_.campaign.axes()[1:] if (found := policy_ratings(round_, axis))]
    if sample_job is None:
        return {"rows": [], "columns": [], "rates": rates, "ratings": ratings, "axis_ratings": further,
                "summary": None}
    result = sample_job.result or {}
    scores = result.get("scores", {})
    opponent = result.get("opponent") or ""
    table = review_table(round_, result.get("samples", [])[:REVIEW_PROMPTS], opponent)

    stored = result.get("axis_scores") or {}
    axis_scores = {axis.key: stored[axis.key] for axis in round_.campaign.axes() if axis.key in stored}

    def cell(prompt: str, responses: list[str]) -> list[dict]:
        return [{"text": r, "empty": is_empty(r), "score": scores.get(content_hash(prompt, r)),
                 "axes": [(key, by_key[content_hash(prompt, r)]) for key, by_key in axis_scores.items()
                          if content_hash(prompt, r) in by_key]}
                for r in responses[:SHOWN_PER_CELL]]

    rows = [{"prompt": prompt, "cells": [cell(prompt, responses) for responses in cells]}
            for prompt, cells in table.rows]
    keys = ("sample/reward_new", "sample/reward_opponent", "sample/judge_new", "sample/judge_other",
            "sample/empty_new", "sample/empty_opponent")
    summary = {key.split("/", 1)[1]: result.get(key) for key in keys}
    return {"rows": rows, "columns": table.columns, "rates": rates, "ratings": ratings, "axis_ratings": further,
            "summary": summary,
            "opponent": opponent, "scored": result.get("scored", True), "axes": list(axis_scores)}


RATING_OUTCOME = {Judgment.A: 1.0, Judgment.B: 0.0, Judgment.TIE: 0.5, Judgment.BOTH_BAD: 0.5}


def _checkpoint_key(path: str) -> str:
    return os.path.normpath(os.path.abspath(path)) if path else ""


def policy_ratings(round_: Round, axis: Axis | None = None, purpose: str = Pair.TRAINING) -> dict | None:
    """Bradley-Terry ratings of the SFT policy and every round's policy up to this one, from the judgments
    on `axis` (default: the campaign's first) of pairs of `purpose` (training pairs, or the rounds' blind
    evaluations) whose two responses came from two of them; humans, else simulated labelers (said which)."""
    rounds = list(Round.objects.filter(campaign=round_.campaign, number__lte=round_.number).order_by("number"))
    names = {}
    base = rounds[0].config.get("base_policy", "") if rounds else ""
    if base:
        names[_checkpoint_key(base)] = "SFT policy"
    for other in rounds:
        if other.policy_checkpoint:
            names[_checkpoint_key(other.policy_checkpoint)] = f"Round {other.number}"
    if len(names) < 2:
        return None
    outcomes: dict[str, list[tuple[str, str, float]]] = {Judgment.HUMAN: [], Judgment.SIMULATED: []}
    axis = axis or round_.campaign.first_axis()
    judgments = (on_axis(Judgment.objects.filter(pair__campaign=round_.campaign, pair__purpose=purpose,
                                                 source__in=list(outcomes)), axis)
                 .filter(Q(pair__round__isnull=True) | Q(pair__round__number__lte=round_.number))
                 .values_list("source", "axis_choice", "pair__response_a__checkpoint",
                              "pair__response_b__checkpoint"))
    for source, choice, checkpoint_a, checkpoint_b in judgments.iterator():
        a, b = names.get(_checkpoint_key(checkpoint_a)), names.get(_checkpoint_key(checkpoint_b))
        if a and b and a != b and choice in RATING_OUTCOME:
            outcomes[source].append((a, b, RATING_OUTCOME[choice]))
    source = Judgment.HUMAN if outcomes[Judgment.HUMAN] else Judgment.SIMULATED
    if not outcomes[source]:
        return None
    anchor = "SFT policy" if base else None
    return {"axis": axis.key, "source": source, "judgments": len(outcomes[source]),
            "players": bradley_terry(outcomes[source], anchor=anchor, bootstrap=RATING_BOOTSTRAP)}


def _win_rates(round_: Round) -> list[dict]:
    """Per round up to this one (pairing against another policy): its responses' record, humans and
    simulated labelers apart (simulated never count in the human figures)."""
    rows = []
    rounds = Round.objects.filter(campaign=round_.campaign, number__lte=round_.number).order_by("number")
    for other in rounds:
        if other.config.get("pairing") == "self":
            continue
        rates = other.win_rates()
        human, simulated = rates.get(Judgment.HUMAN), rates.get(Judgment.SIMULATED)
        if human is None and simulated is None:
            continue
        sft = other.config.get("pairing") == "sft" or other.number == 1
        against = "SFT policy" if sft else "previous round"
        rows.append({"round": other, "against": against, "human": human, "simulated": simulated})
    return rows
