"""A round's evaluation: which policies answer the campaign's evaluation set, which judges compare them, and
the table of their records (training/winrates.py) that the round page, the API and the benchmark read.

The evaluate job (training/runner.py run_evaluate) has the new policy, the SFT policy and the previous round's
policy answer every evaluation prompt once, with the same seed each; each judge scores every answer, and every
two policies are compared per prompt in both orders. The job's result keeps, per prompt, each policy's answer
beside each comparison's outcome, so the pairs can be shown to people later without sampling again.
Comparisons are keyed by judge and axis ("" for the campaign's one question), so a per-axis breakdown adds rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from django.db.models.functions import Length

from annotate.models import EvalSet, Exclusion, Judgment, Pair
from demo import demo_tasks
from training import review, winrates
from training.models import Job, Round

NEW, PREVIOUS, SFT = "new", "previous", "sft"  # the policies' roles in an evaluation
WHOLE = ""  # the axis of a comparison made on the campaign's one question
PEOPLE = "people"  # the judge of a blind human evaluation: the labelers


@dataclass(frozen=True)
class Policy:
    role: str
    label: str
    checkpoint: str


def policies(round_: Round) -> list[Policy]:
    """The round's new policy, the previous round's (when it is not the SFT policy) and the SFT policy."""
    found = [Policy(NEW, f"Round {round_.number}", round_.policy_checkpoint)]
    earlier = (Round.objects.filter(campaign=round_.campaign, number__lt=round_.number).exclude(policy_checkpoint="")
               .order_by("-number").first())
    base = round_.config.get("base_policy", "")
    if earlier is not None and earlier.policy_checkpoint != base:
        found.append(Policy(PREVIOUS, f"Round {earlier.number}", earlier.policy_checkpoint))
    if base:
        found.append(Policy(SFT, "SFT policy", base))
    return found


@dataclass
class Judge:
    """A judge that scores each (prompt, answer) on its own; a higher score is a better answer."""

    name: str
    score: Callable[[list[str], list, list[str]], list[float]]  # (prompt texts, prompts as text or turns, answers)


def rule_judge(name: str) -> Judge:
    """One of the demo's rule judges (demo_tasks.RULE_JUDGES), reading each prompt as text (chat turns flattened)."""
    judge = demo_tasks.RULE_JUDGES[name]

    def score(texts: list[str], prompts: list, answers: list[str]) -> list[float]:
        return [float(judge(text, answer)) for text, answer in zip(texts, answers, strict=True)]

    return Judge(f"rule:{name}", score)


def rule_judges_for(texts: list[str], names: list[str]) -> list[Judge]:
    """The rule judges named, when the evaluation prompts are demo tasks (a rule judge scores others 0)."""
    if not any(demo_tasks.parse_task(text) is not None for text in texts):
        return []
    return [rule_judge(name) for name in names]


def compare(answers: dict[str, list[str]], scores: dict[str, dict[str, list[float]]], roles: list[str],
            seed: int = 0) -> list[dict]:
    """Every two policies (in `roles` order, the earlier one first) under every judge: per prompt the first's
    outcome, asked in both orders, and their record. `scores[judge][role]` is one score per prompt."""
    rows = []
    for judge, by_role in scores.items():
        for a, b in itertools.combinations(roles, 2):
            outcomes = [winrates.both_orders(winrates.outcome(sa, sb), winrates.outcome(sb, sa))
                        for sa, sb in zip(by_role[a], by_role[b], strict=True)]
            record = winrates.record(outcomes, [len(x) for x in answers[a]], [len(x) for x in answers[b]], seed=seed)
            rows.append({"a": a, "b": b, "judge": judge, "axis": WHOLE, "outcomes": outcomes, **record.as_dict()})
    return rows


def latest(round_: Round) -> Job | None:
    """The round's evaluate job that succeeded last (an evaluation run again on demand replaces the earlier)."""
    return round_.jobs.filter(kind=Job.EVALUATE, status=Job.SUCCEEDED).order_by("-order").first()


def table(result: dict) -> list[dict]:
    """An evaluation's comparisons as rows for the page and the API: labels for roles, no per-prompt outcomes."""
    labels = {p["role"]: p["label"] for p in result.get("policies", [])}
    return [{**{k: v for k, v in row.items() if k != "outcomes"}, "a_label": labels.get(row["a"], row["a"]),
             "b_label": labels.get(row["b"], row["b"])} for row in result.get("comparisons", [])]


def across_rounds(round_: Round) -> list[dict]:
    """Each round of the campaign up to this one that has an evaluation: its number, evaluation set version and
    table (the chart across rounds)."""
    rows = []
    for other in Round.objects.filter(campaign=round_.campaign, number__lte=round_.number).order_by("number"):
        job = latest(other)
        if job is not None and job.result.get("comparisons"):
            rows.append({"round": other.number, "eval_set": job.result["eval_set"], "table": table(job.result)})
    return rows


def round_evaluation(round_: Round) -> dict | None:
    """What the round page and the API show of the round's evaluation; None before one succeeded."""
    job = latest(round_)
    if job is None:
        return None
    result = job.result
    return {"job": job.pk, "eval_set": result.get("eval_set"), "policies": result.get("policies", []),
            "judges": result.get("judges", []), "table": table(result), "across_rounds": across_rounds(round_),
            "note": result.get("note", ""), "resamples": winrates.BOOTSTRAP_RESAMPLES,
            "human": human_evaluation(round_)}


def eval_set_rows(eval_set: EvalSet) -> list[tuple[int, str, list | None, str]]:
    """The set's prompts as (id, text, chat turns or None, reference), in file order."""
    return list(eval_set.prompts.order_by("position").values_list("id", "text", "turns", "reference"))


def human_evaluation(round_: Round) -> dict | None:
    """The round's blind human evaluation (training/actions.py send_evaluation_to_labelers): the new policy's
    record against each other policy from the judgments on its evaluation pairs (a tie or both bad is half a
    win; the interval resamples judgments), and the Bradley-Terry ratings of the rounds' policies from every
    blind judgment up to this round; None before any judgment."""
    job = latest(round_)
    if job is None:
        return None
    policies_ = job.result.get("policies", [])
    role_of = {p["checkpoint"]: p["role"] for p in policies_}
    labels = {p["role"]: p["label"] for p in policies_}
    judgments = (Judgment.objects.filter(pair__round=round_, pair__purpose=Pair.EVALUATION)
                 .exclude(Exclusion.excluded_judgments(round_.campaign))
                 .annotate(length_a=Length("pair__response_a__text"), length_b=Length("pair__response_b__text"))
                 .values_list("choice", "pair__response_a__checkpoint", "pair__response_b__checkpoint", "length_a",
                              "length_b"))
    found: dict[str, tuple[list[float], list[int], list[int]]] = {}
    for choice, checkpoint_a, checkpoint_b, length_a, length_b in judgments.iterator():
        role_a, role_b = role_of.get(checkpoint_a), role_of.get(checkpoint_b)
        if NEW not in (role_a, role_b) or None in (role_a, role_b) or role_a == role_b:
            continue
        outcome = review.RATING_OUTCOME[choice]
        if role_a == NEW:
            other, new_outcome, new_length, other_length = role_b, outcome, length_a, length_b
        else:  # the new policy's answer is response B of about half its pairs (Round.new_policy_first)
            other, new_outcome, new_length, other_length = role_a, 1.0 - outcome, length_b, length_a
        outcomes, lengths_new, lengths_other = found.setdefault(other, ([], [], []))
        outcomes.append(new_outcome)
        lengths_new.append(new_length)
        lengths_other.append(other_length)
    if not found:
        return None
    rows = [{"a": NEW, "b": other, "a_label": labels[NEW], "b_label": labels[other], "judge": PEOPLE, "axis": WHOLE,
             **winrates.record(outcomes, lengths_a, lengths_b, seed=round_.config.get("seed", 0)).as_dict()}
            for other, (outcomes, lengths_a, lengths_b) in sorted(found.items())]
    return {"table": rows, "ratings": review.policy_ratings(round_, purpose=Pair.EVALUATION),
            "resamples": winrates.BOOTSTRAP_RESAMPLES}
