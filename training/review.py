"""What a round's review shows: one table that the sample job scores and the round page shows.

For each sampled prompt, its responses column by column: those the campaign started with, each
earlier round's new policy's, this round's, and the policy it was paired against. The sample job
scores every response in it that is not empty with the round's reward model; the page shows the
first few of each cell with those scores. An empty answer (the policy ended its turn at once) is
shown as such, counted, never scored and never paired.
"""

from __future__ import annotations

from dataclasses import dataclass

from annotate.models import Response
from training.models import Job, Round

REVIEW_PROMPTS = 20  # prompts the round page shows
SHOWN_PER_CELL = 3  # responses the round page shows per prompt and column


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
