"""AI labelers at work: claim a pair from the campaign's queue as a person would, ask the labeler's model
each principle in both orders (training/engine/judge.py), and store the verdicts with the judgment they make.

A principle is sampled per judgment (the CAI paper's way), or every principle is asked and the agreed
verdicts vote (the labeler's principle_mode). A verdict whose two orders disagree makes the judgment a tie
or a skip (its on_disagreement); an answer that names neither response skips the pair. Both calls of a
pair come back before anything is stored: a model that cannot be asked fails the run with the reason, its
lease given back, nothing half-stored.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connections
from django.db.models.functions import Now
from django.utils import timezone

from annotate.actions import claim_next_pair, record_ai_judgment, release_assignment
from annotate.models import AILabeler, AILabelingRun, AIVerdict, Judgment
from pairloop.heartbeat import Heartbeat
from training.engine.judge import Asker, EndpointAsker, JudgeError, LocalAsker, ask_both_orders

log = logging.getLogger(__name__)

# The chosen response's probability (both orders averaged) at which the strength becomes 2, 3 and 4; 1 below
# the first and wherever no log-probabilities came back.
STRENGTH_STEPS = (0.6, 0.75, 0.9)


class AILabelingError(RuntimeError):
    """An AI labeler that cannot judge: its model is unreachable or failed; the message says why."""


def asker_for(labeler: AILabeler) -> Asker:
    """The labeler's model, ready to ask: its endpoint (key read from the named variable), or its local path."""
    if labeler.kind == AILabeler.LOCAL:
        try:
            return LocalAsker(labeler.model, per_minute=labeler.requests_per_minute)
        except Exception as exc:  # EngineError or OSError: a path that holds no model
            raise AILabelingError(f"cannot load the local model {labeler.model!r}: {exc}") from exc
    key = ""
    if labeler.api_key_env:
        key = os.environ.get(labeler.api_key_env, "")
        if not key:
            raise AILabelingError(f"the environment variable {labeler.api_key_env} holding the key is not set")
    return EndpointAsker(labeler.base_url, labeler.model, key, timeout=labeler.timeout_seconds,
                         max_retries=labeler.max_retries, per_minute=labeler.requests_per_minute)


def strength_for(prob_chosen: float | None) -> int:
    if prob_chosen is None:
        return 1
    return 1 + sum(prob_chosen >= step for step in STRENGTH_STEPS)


@dataclass
class AILabelingResult:
    judgments: int = 0
    skipped: int = 0
    disagreed: int = 0
    malformed: int = 0
    by_choice: dict[str, int] = field(default_factory=dict)
    stopped: str = ""  # why it stopped before `count`: "empty" (no pair left for it)


def conversation_of(pair) -> str:
    prompt = pair.prompt
    if prompt.turns:
        return "\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in prompt.turns)
    return f"Human: {prompt.text}"


def _combine(verdicts, labeler: AILabeler, offered) -> tuple[str | None, float | None]:
    """The judgment in pair terms ("a", "b", "tie") or None for a skip, and P(chosen) where known."""
    agreed = [v for v in verdicts if v.agreed]
    votes = {side: sum(v.choice_first == side for v in agreed) for side in ("a", "b")}
    if votes["a"] == votes["b"]:
        if any(v.malformed for v in verdicts) or labeler.on_disagreement == AILabeler.SKIP:
            return None, None
        return (Judgment.TIE, None) if Judgment.TIE in offered else (None, None)
    side = "a" if votes["a"] > votes["b"] else "b"
    probs = [p for v in agreed if v.choice_first == side for p in (v.prob_a_first, v.prob_a_swapped)
             if p is not None]
    if not probs:
        return side, None
    prob_a = sum(probs) / len(probs)
    return side, prob_a if side == "a" else 1.0 - prob_a


def principles_by_axis(labeler: AILabeler) -> dict[str, list]:
    """The labeler's principles per axis key of its campaign, in the campaign's axis order; a principle with
    no axis answers the first."""
    campaign = labeler.campaign
    found: dict[str, list] = {}
    for principle in labeler.principles.all():
        found.setdefault(principle.axis or campaign.axis_key, []).append(principle)
    return {axis.key: found[axis.key] for axis in campaign.axes() if axis.key in found}


def _shown(side: str | None, a_on_left: bool) -> str | None:
    """A choice in pair terms as the labeler saw it (submit_judgment's terms): "a" is the left response."""
    if side in ("a", "b") and not a_on_left:
        return "b" if side == "a" else "a"
    return side


def judge_one(labeler: AILabeler, asker: Asker, assignment, rng: random.Random) -> tuple[str | None, list]:
    """Ask the principles about one assignment, each axis of the campaign by its own principles; stores the
    verdicts and the judgment (a skip on any axis skips the pair). Returns (first axis's choice, verdicts)."""
    campaign = labeler.campaign
    by_axis = principles_by_axis(labeler)
    if labeler.principle_mode == AILabeler.SAMPLE:
        by_axis = {key: [rng.choice(principles)] for key, principles in by_axis.items()}
    pair = assignment.pair
    asked, sides, strengths = [], {}, {}
    for axis in campaign.axes():
        on_axis = []
        for principle in by_axis[axis.key]:
            verdict, prompt_first, prompt_swapped = ask_both_orders(
                asker, conversation_of(pair), principle.text, pair.response_a.text, pair.response_b.text,
                a_first=assignment.a_on_left)
            on_axis.append(verdict)
            asked.append((principle, axis.key, verdict, prompt_first, prompt_swapped))
        side, prob_chosen = _combine(on_axis, labeler, axis.choices_offered())
        sides[axis.key] = side
        strengths[axis.key] = strength_for(prob_chosen) if side in ("a", "b") and axis.ask_strength else None
    first = campaign.axis_key
    skipped = any(side is None for side in sides.values())
    rows = [dict(principle=principle.text, axis=axis_key, prompt_first=prompt_first,
                 prompt_swapped=prompt_swapped, a_first=verdict.a_first, answer_first=verdict.first.text,
                 answer_swapped=verdict.swapped.text, choice_first=verdict.choice_first,
                 choice_swapped=verdict.choice_swapped, prob_a_first=verdict.prob_a_first,
                 prob_a_swapped=verdict.prob_a_swapped,
                 outcome=(AIVerdict.MALFORMED if verdict.malformed else
                          AIVerdict.AGREED if verdict.agreed else AIVerdict.DISAGREED))
            for principle, axis_key, verdict, prompt_first, prompt_swapped in asked]
    shown = {key: _shown(side, assignment.a_on_left) for key, side in sides.items()}
    several = len(sides) > 1
    record_ai_judgment(labeler, assignment_id=assignment.pk, verdicts=rows,
                       choice=None if skipped else shown[first], strength=strengths[first],
                       choices=shown if several and not skipped else None,
                       strengths=strengths if several and not skipped else None)
    return (None if skipped else sides[first]), [verdict for _, _, verdict, _, _ in asked]


def ai_label(labeler: AILabeler, *, count: int = 100, asker: Asker | None = None, seed: int = 0,
             on_judgment: Callable[[AILabelingResult], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> AILabelingResult:
    """Let the AI labeler take up to `count` pairs from its campaign's queue (judged or skipped), until none
    is left for it or `should_stop()` says so. Raises AILabelingError when its model cannot be asked."""
    problem = AILabeler.axes_problem(labeler.campaign, labeler.principles.values_list("axis", flat=True))
    if problem:
        raise AILabelingError(problem)
    asker = asker or asker_for(labeler)
    rng = random.Random(seed)
    result = AILabelingResult()
    while result.judgments + result.skipped < count:
        if should_stop is not None and should_stop():
            result.stopped = "stopped"
            return result
        claim = claim_next_pair(labeler.campaign, labeler.account)
        if claim.assignment is None:
            result.stopped = claim.reason
            return result
        try:
            side, verdicts = judge_one(labeler, asker, claim.assignment, rng)
        except JudgeError as exc:
            release_assignment(assignment_id=claim.assignment.pk, labeler=labeler.account)
            raise AILabelingError(str(exc)) from exc
        result.disagreed += sum(not v.agreed and not v.malformed for v in verdicts)
        result.malformed += sum(v.malformed for v in verdicts)
        if side is None:
            result.skipped += 1
        else:
            result.judgments += 1
            result.by_choice[side] = result.by_choice.get(side, 0) + 1
        if on_judgment is not None:
            on_judgment(result)
    return result


# Why a run took fewer pairs than it was asked for, as the campaign page says it (Claim.reason's words).
ENDED_EARLY = {"empty": "the queue had no pair left for it", "cap": "it reached the campaign's daily cap",
               "busy": "every pair left was leased to others"}
PROGRESS_FIELDS = ["judged", "skipped", "disagreed", "malformed"]


class _RunTaken(Exception):
    """The run is no longer running on this worker: the stale-run check failed it, or a second stop ended it."""


def run_ai_labeling(run_id: int) -> AILabelingRun | None:
    """The task's body: take a queued run (a conditional update, so a message delivered twice runs once) and
    let its labeler judge, writing the counts and a heartbeat to the row after each pair, and a heartbeat from
    a thread between (a pair may take several slow calls). Stops before the next pair once the admin asked;
    fails with the reason when its model cannot be asked (that pair left unstored). A run failed by the
    stale-run check meanwhile (fail_stale_ai_labeling_runs) stops at its next pair and is never written again."""
    if not AILabelingRun.objects.filter(pk=run_id, status=AILabelingRun.QUEUED).update(
            status=AILabelingRun.RUNNING, started_at=timezone.now(), heartbeat_at=Now()):
        return AILabelingRun.objects.filter(pk=run_id).first()  # gone, stopped while queued, or taken
    run = AILabelingRun.objects.select_related("labeler__campaign", "labeler__account").get(pk=run_id)
    running = AILabelingRun.objects.filter(pk=run.pk, status=AILabelingRun.RUNNING)

    def on_judgment(result: AILabelingResult) -> None:
        run.judged, run.skipped = result.judgments, result.skipped
        run.disagreed, run.malformed = result.disagreed, result.malformed
        if not running.update(heartbeat_at=Now(), **{name: getattr(run, name) for name in PROGRESS_FIELDS}):
            raise _RunTaken()

    def should_stop() -> bool:
        return AILabelingRun.objects.filter(pk=run.pk, stop_requested=True).exists()

    heartbeat = Heartbeat(f"heartbeat-ai-labeling-{run.pk}", settings.PAIRLOOP["HEARTBEAT_STALE_SECONDS"] / 3,
                          lambda: bool(running.update(heartbeat_at=Now())), on_exit=connections.close_all)
    heartbeat.start()
    try:
        result = ai_label(run.labeler, count=run.count, on_judgment=on_judgment, should_stop=should_stop)
    except _RunTaken:
        log.warning("AI labeling run %s was ended elsewhere while it ran; stopped", run.pk)
        return AILabelingRun.objects.get(pk=run.pk)
    except AILabelingError as exc:
        run.status, run.error = AILabelingRun.FAILED, str(exc)
    except Exception as exc:  # noqa: BLE001 - the row is the record: the page shows why it stopped
        log.exception("AI labeling run %s stopped", run.pk)
        run.status, run.error = AILabelingRun.FAILED, f"the run stopped: {type(exc).__name__}: {exc}"
    else:
        run.judged, run.skipped = result.judgments, result.skipped
        run.disagreed, run.malformed = result.disagreed, result.malformed
        run.status = AILabelingRun.STOPPED if result.stopped == "stopped" else AILabelingRun.SUCCEEDED
        run.note = ENDED_EARLY.get(result.stopped, "")
    finally:
        heartbeat.stop()
    run.finished_at = timezone.now()
    running.update(**{name: getattr(run, name) for name in [*PROGRESS_FIELDS, "status", "error", "note",
                                                            "finished_at"]})
    run.refresh_from_db()
    return run
