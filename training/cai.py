"""Constitutional AI's supervised stage (Bai et al. 2022, sec. 3): the campaign's current policy answers some of
its prompts, an AI labeler's model critiques each answer by a principle sampled from its constitution and revises
it (training/engine/revise.py), and each revision goes into the queue as a pair proposed by the AI, revision
preferred, for people to confirm or overturn (annotate.actions.propose_revision); the revision is response A of
about half a run's pairs (REVISION_BATCH), so the stored order says nothing of which response is the AI's. A
round with `cai_revisions` on fine-tunes on the accepted ones before its reward stage (sft_examples,
training.runner.run_sft).

The two requests are derived from the labeler's comparison principles by a fixed template (revise.CRITIQUE_REQUEST,
REVISION_REQUEST) rather than written per principle: one constitution then serves the AI labeler's judgments and
its revisions, and the admin's principle forms stay as they are.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from annotate.actions import propose_revision
from annotate.models import AILabeler, AIRevision, Campaign, Judgment, Prompt, Response, storable
from training.ai_labeling import AILabelingError
from training.engine.judge import JudgeError
from training.engine.revise import EndpointWriter, LocalWriter, Writer, critique_and_revise
from training.models import half_first
from training.starting_policy import ensure_policy, parent_policy

# The policy answers as the sample job's new pairs do by default (RoundConfig's sample settings, demo preset).
ANSWER_MAX_NEW_TOKENS = 64
ANSWER_TEMPERATURE = 0.7
# The batch name under which a run's seed draws which prompts' revisions are response A (training.models.half_first).
REVISION_BATCH = Response.REVISION


def writer_for(labeler: AILabeler) -> Writer:
    """The labeler's model, ready to write: its endpoint (key read from the named variable), or its local path."""
    if labeler.kind == AILabeler.LOCAL:
        try:
            return LocalWriter(labeler.model)
        except Exception as exc:  # EngineError or OSError: a path that holds no model
            raise AILabelingError(f"cannot load the local model {labeler.model!r}: {exc}") from exc
    key = os.environ.get(labeler.api_key_env, "") if labeler.api_key_env else ""
    if labeler.api_key_env and not key:
        raise AILabelingError(f"the environment variable {labeler.api_key_env} holding the key is not set")
    return EndpointWriter(labeler.base_url, labeler.model, key, timeout=labeler.timeout_seconds,
                          max_retries=labeler.max_retries, error=JudgeError)


def current_policy(campaign: Campaign) -> str:
    """The policy whose answers are revised: the newest round's, else the campaign's SFT policy (built if it is the
    demo policy)."""
    preset = settings.PAIRLOOP["DEMO_POLICY_PRESET"]
    return ensure_policy(parent_policy(campaign, preset), preset)


def conversation(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat turns (a text prompt is one user turn)."""
    return [dict(turn) for turn in prompt.turns] if prompt.turns else [{"role": "user", "content": prompt.text}]


class StorableWriter:
    """A writer whose answers come back as the database stores them (annotate.models.storable)."""

    def __init__(self, writer: Writer):
        self.writer, self.model = writer, writer.model

    def write(self, messages: list[dict[str, str]]) -> str:
        return storable(self.writer.write(messages))


@dataclass
class RevisionResult:
    proposed: int = 0
    """Pairs added to the queue, revision against original."""
    unchanged: int = 0
    """Revisions that were empty or the original again: no pair."""
    duplicates: int = 0
    """Pairs the campaign held already."""


def cai_revise(labeler: AILabeler, *, count: int = 16, writer: Writer | None = None, seed: int = 0,
               priority: int = 0, on_answer: Callable[[RevisionResult], None] | None = None) -> RevisionResult:
    """Have the campaign's current policy answer `count` of its training prompts (drawn with `seed`), the labeler's
    model critique and revise each answer by a sampled principle, and each revision proposed as a pair, as response
    A for half the prompts (drawn with `seed` too: the same run again gives the same sides). Raises AILabelingError
    when the model cannot be asked; the pairs proposed before stay."""
    from training.engine.sample import sample_responses  # torch: kept out of the web process's imports

    campaign = labeler.campaign
    principles = list(labeler.principles.values_list("text", flat=True))
    if not principles:
        raise AILabelingError(f"the AI labeler {labeler.name} has no principles")
    prompts = list(Prompt.training(campaign).order_by("id"))
    rng = random.Random(seed)
    prompts = sorted(rng.sample(prompts, min(count, len(prompts))), key=lambda p: p.pk)
    result = RevisionResult()
    if not prompts:
        return result
    writer = writer or writer_for(labeler)
    policy = current_policy(campaign)
    answers = sample_responses(policy, [conversation(p) for p in prompts], num_per_prompt=1,
                               max_new_tokens=ANSWER_MAX_NEW_TOKENS, temperature=ANSWER_TEMPERATURE, seed=seed,
                               system_prompt=campaign.system_prompt, device=settings.PAIRLOOP["DEVICE"])
    writer = StorableWriter(writer)
    sides = [Judgment.A if first else Judgment.B for first in half_first(seed, REVISION_BATCH, len(prompts))]
    for prompt, answer, side in zip(prompts, [storable(texts[0]) for texts in answers], sides, strict=True):
        principle = rng.choice(principles)
        try:
            revised = critique_and_revise(writer, conversation(prompt), answer, principle)
        except JudgeError as exc:
            raise AILabelingError(str(exc)) from exc
        if not revised.improves_on(answer):
            result.unchanged += 1
        elif propose_revision(labeler, prompt=prompt, original=answer, revision=revised.revision.strip(),
                              policy=policy, revision_side=side, priority=priority, provenance=dict(
                                  principle=principle, critique_prompt=revised.critique_messages,
                                  critique=revised.critique, revision_prompt=revised.revision_messages,
                                  revision_answer=revised.revision)) is None:
            result.duplicates += 1
        else:
            result.proposed += 1
        if on_answer is not None:
            on_answer(result)
    return result


def sft_examples(campaign: Campaign, rule: str) -> list[dict]:
    """The supervised examples of the campaign's accepted revisions under `rule` (annotate.sources.CAI_ACCEPTS), in
    the SFT stage's format, as the policy saw the prompt: {"instruction", "output"} for a text prompt (a base model
    needs it; so is one user turn), {"messages": turns, then the revision as the assistant's} for a chat prompt."""
    rows = AIRevision.accepted(campaign, rule).select_related("pair__prompt", "pair__response_a", "pair__response_b")
    examples = []
    for row in rows.order_by("id"):
        prompt, revision = row.pair.prompt, row.revised().text
        if prompt.shows_as_conversation():
            examples.append({"messages": [*conversation(prompt), {"role": "assistant", "content": revision}]})
        else:
            examples.append({"instruction": prompt.text, "output": revision})
    return examples
