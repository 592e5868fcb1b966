"""Constitutional AI's supervised stage: the policy answers, an AI labeler's model critiques and revises each answer
by a principle, the revisions enter the queue as AI-proposed pairs people confirm or overturn, and a round can
fine-tune on the accepted ones before its reward stage.

The local model is a tiny random Llama chat model (demo/tiny_models.build_policy): its words mean nothing, but it
writes something (greedy, a random Qwen2 writes only newlines), which is all the path needs to show.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command
from django.test import Client

from annotate.actions import claim_next_pair, create_ai_labeler, propose_revision, submit_judgment
from annotate.models import AILabeler, AIRevision, Judgment, Pair, Prompt, Response
from annotate.sources import ACCEPT_AI, ACCEPT_PEOPLE
from demo.tiny_models import build_policy
from tests.conftest import make_campaign, make_user
from tests.services import free_port, serve_chat_models
from tests.test_round_worker import round_over, wait_for, weights
from tests.worker import Worker
from training import runner
from training.actions import launch_round, round_chain
from training.cai import cai_revise, sft_examples
from training.config import build_config
from training.engine.checkpoints import read_checkpoint_meta
from training.engine.revise import CRITIQUE_REQUEST, REVISION_REQUEST, EndpointWriter
from training.models import Job, Round
from training.starting_policy import ensure_policy

pytestmark = pytest.mark.django_db

PRINCIPLE = "Which response is kinder?"  # short: the tiny model has 512 positions for the whole conversation


@pytest.fixture(scope="module")
def writer_model(request, tmp_path_factory):
    """A tiny random Llama chat model, built once and kept in pytest's cache folder."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("cai-writer-v1") if cache is not None else tmp_path_factory.mktemp("writer")
    if not (folder / "llama" / "model.safetensors").exists():
        shutil.rmtree(folder / "llama.tmp", ignore_errors=True)
        build_policy("llama", folder / "llama.tmp")
        (folder / "llama.tmp").rename(folder / "llama")
    return str(folder / "llama")


def local_labeler(campaign, model="unused"):
    return create_ai_labeler(campaign, name="reviser", model=model, kind=AILabeler.LOCAL, principles=[PRINCIPLE])


class Scripted:
    """A model whose critique is fixed and whose revision is `revise(original)`: the failure modes a real model
    shows now and then (an empty answer, the answer unchanged), on demand."""

    model = "scripted"

    def __init__(self, revise):
        self.revise = revise

    def write(self, messages):
        if messages[-1]["content"].startswith("Please rewrite"):
            return self.revise(messages[-4]["content"])  # the assistant's answer, before the critique request
        return "It is curt."


def test_it_critiques_and_revises_with_a_local_model_into_ai_proposed_pairs(writer_model):
    campaign = make_campaign(slug="cai", n_pairs=4)
    local_labeler(campaign, writer_model)
    out = io.StringIO()

    call_command("cai_revise", "cai", "--labeler", "reviser", "--count", "3", stdout=out)

    proposals = list(AIRevision.objects.select_related("pair__response_a", "pair__response_b", "pair__prompt"))
    assert f"proposed {len(proposals)} revised answers" in out.getvalue()
    assert len(proposals) == 3, out.getvalue()
    assert sorted(p.proposed_choice for p in proposals) == [Judgment.A, Judgment.A, Judgment.B]  # half, odd one A
    for proposal in proposals:
        pair = proposal.pair
        original, revision = proposal.original(), proposal.revised()
        assert {original, revision} == {pair.response_a, pair.response_b}
        assert pair.is_open and pair.judgments_count == 0  # waiting for people in the queue
        assert original.source == Response.POLICY and revision.source == Response.REVISION
        assert revision.text.strip() and revision.text != original.text
        assert revision.checkpoint == f"AI revision: reviser ({writer_model})"
        assert proposal.model == writer_model
        assert proposal.principle == PRINCIPLE and proposal.policy == original.checkpoint
        # What was asked and answered: the answer, the critique request, the critique kept for the revision.
        assert proposal.critique_prompt[-2] == {"role": "assistant", "content": original.text}
        assert proposal.critique_prompt[-1]["content"] == CRITIQUE_REQUEST.format(principle=PRINCIPLE)
        assert proposal.revision_prompt[-2] == {"role": "assistant", "content": proposal.critique}
        assert proposal.revision_prompt[-1]["content"] == REVISION_REQUEST.format(principle=PRINCIPLE)
        assert proposal.revision_answer.strip() == revision.text
        assert proposal.critique_prompt[0] == {"role": "user", "content": pair.prompt.text}


def test_an_empty_or_unchanged_revision_makes_no_pair():
    campaign = make_campaign(slug="cai", n_pairs=4)
    labeler = local_labeler(campaign)
    pairs_before = Pair.objects.count()

    empty = cai_revise(labeler, count=2, writer=Scripted(lambda original: "  "))
    same = cai_revise(labeler, count=2, writer=Scripted(lambda original: f"{original}\n"), seed=1)

    assert (empty.proposed, empty.unchanged, same.proposed, same.unchanged) == (0, 2, 0, 2)
    assert Pair.objects.count() == pairs_before and not AIRevision.objects.exists()
    assert not Response.objects.filter(source=Response.REVISION).exists()


def test_a_revision_shows_to_labelers_escaped_as_any_model_output(labeler):
    campaign = make_campaign(slug="cai", n_pairs=1, members=[labeler])
    Pair.objects.update(is_open=False)

    cai_revise(local_labeler(campaign), count=1, writer=Scripted(lambda original: '<script>alert("r")</script>'))

    client = Client()
    client.force_login(labeler)
    body = client.get(campaign.label_url()).content.decode()
    assert "<script>alert" not in body and "&lt;script&gt;alert(&quot;r&quot;)&lt;/script&gt;" in body


def test_it_refuses_an_unknown_labeler_by_name():
    make_campaign(slug="cai", n_pairs=1)
    with pytest.raises(CommandError, match="cai has no AI labeler 'nobody'"):
        call_command("cai_revise", "cai", "--labeler", "nobody")


@pytest.fixture(scope="module")
def server():
    with serve_chat_models() as url:
        yield url


def test_it_revises_through_a_real_openai_compatible_server_and_stops_on_one_down(writer_model, server):
    campaign = make_campaign(slug="cai", n_pairs=2)
    labeler = create_ai_labeler(campaign, name="served", kind=AILabeler.ENDPOINT, base_url=server, model=writer_model,
                                principles=[PRINCIPLE])
    # Short replies: the tiny model has 512 positions for the critique and the revision request after it.
    result = cai_revise(labeler, count=2, writer=EndpointWriter(server, writer_model, max_new_tokens=48))

    proposals = list(AIRevision.objects.select_related("pair__response_a", "pair__response_b"))
    assert result.proposed == len(proposals) == 2
    assert all(p.critique and p.revision_answer.strip() == p.revised().text for p in proposals)
    create_ai_labeler(campaign, name="down", kind=AILabeler.ENDPOINT, base_url=f"http://127.0.0.1:{free_port()}/v1",
                      model=writer_model, principles=[PRINCIPLE], max_retries=0)
    with pytest.raises(CommandError, match="AI labeler down stopped: the endpoint .* failed: APIConnectionError"):
        call_command("cai_revise", "cai", "--labeler", "down", "--count", "1", stdout=io.StringIO())
    assert AIRevision.objects.count() == 2


def proposed(campaign, labeler, sides):
    """A proposal per side of `sides` on the campaign's prompts in turn: "revised i" as that response against
    "original i"."""
    prompts = list(Prompt.objects.filter(campaign=campaign).order_by("id"))[:len(sides)]
    return [propose_revision(labeler, prompt=prompt, original=f"original {i}", revision=f"revised {i}",
                             policy="policy", revision_side=side,
                             provenance=dict(principle=PRINCIPLE, critique_prompt=[], critique="", revision_prompt=[],
                                             revision_answer=f"revised {i}"))
            for i, (prompt, side) in enumerate(zip(prompts, sides))]


def judge(campaign, person, proposal, prefers):
    """`person` judges the proposal's pair, preferring the revision ("r") or the original ("o"), wherever it is."""
    assignment = claim_next_pair(campaign, person).assignment
    assert assignment.pair_id == proposal.pair_id
    side = proposal.proposed_choice if prefers == "r" else {"a": "b", "b": "a"}[proposal.proposed_choice]
    shown = side if assignment.a_on_left else {"a": "b", "b": "a"}[side]
    submit_judgment(assignment_id=assignment.pk, labeler=person, choice=shown, strength=2)


def test_it_puts_the_revision_on_side_a_of_half_a_runs_pairs_the_same_again_under_its_seed():
    campaign = make_campaign(slug="cai", n_pairs=8)
    labeler = local_labeler(campaign)
    scripted = Scripted(lambda original: f"{original} Kindly.")

    def revision_first(seed):
        """Which prompts' revision a run under `seed` stores as response A; its pairs are taken away after."""
        result = cai_revise(labeler, count=8, writer=scripted, seed=seed)
        proposals = list(AIRevision.objects.select_related("pair__response_a", "pair__response_b"))
        assert result.proposed == len(proposals) == 8
        assert all(p.revised().source == Response.REVISION and p.original().source == Response.POLICY
                   for p in proposals)
        Pair.objects.filter(ai_revision__isnull=False).delete()
        return {p.pair.prompt_id for p in proposals if p.pair.response_a.source == Response.REVISION}

    firsts = [revision_first(0), revision_first(1), revision_first(0)]

    assert [len(first) for first in firsts] == [4, 4, 4]
    assert firsts[0] == firsts[2] != firsts[1]


@pytest.mark.parametrize("sides", ["abba", "baab"])
def test_people_overturning_a_proposal_keep_it_out_of_the_accepted_set_whichever_side_it_is_on(sides):
    people = [make_user(f"person-{i}") for i in range(3)]
    campaign = make_campaign(slug="cai", n_pairs=4, overlap=3, members=people)
    Pair.objects.update(is_open=False)  # the imported pairs are out of the way
    labeler = local_labeler(campaign)
    confirmed, overturned, split, unjudged = proposed(campaign, labeler, sides)
    assert [p.pair.response_a.text.split()[0] for p in (confirmed, overturned)] == [
        {"a": "revised", "b": "original"}[side] for side in sides[:2]]
    assert proposed(campaign, labeler, "b") == [None]  # the same pair again is not proposed twice
    # Judged in this order, each by the people in turn: the two for the revision, the two against, one each.
    for priority, (proposal, prefers) in enumerate(((confirmed, "rro"), (overturned, "oor"), (split, "ro"))):
        Pair.objects.filter(pk=proposal.pair_id).update(priority=10 - priority)
        for person, choice in zip(people, prefers):
            judge(campaign, person, proposal, choice)



    assert list(AIRevision.accepted(campaign, ACCEPT_PEOPLE)) == [confirmed]
    assert list(AIRevision.accepted(campaign, ACCEPT_AI)) == [confirmed, split, unjudged]
    assert sft_examples(campaign, ACCEPT_PEOPLE) == [{"instruction": confirmed.pair.prompt.text,
                                                      "output": "revised 0"}]


def test_a_round_with_cai_revisions_fine_tunes_on_the_accepted_ones_before_its_reward(
        settings, tmp_path, monkeypatch, reviewer):
    assert round_chain(build_config("tiny", {"cai_revisions": True}))[:3] == (Job.EXPORT, Job.SFT, Job.REWARD)
    assert round_chain(build_config("tiny", {"cai_revisions": True, "algorithm": "dpo"}))[:3] == (
        Job.EXPORT, Job.SFT, Job.DPO)
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 1, "EXPORTS_DIR": str(tmp_path)}
    person = make_user("pat-person")
    campaign = make_campaign(slug="cai", n_pairs=2, members=[person, reviewer])
    Pair.objects.update(is_open=False)
    confirmed, overturned = proposed(campaign, local_labeler(campaign), "ab")
    judge(campaign, person, confirmed, "r")
    judge(campaign, person, overturned, "o")
    round_ = launch_round(campaign, None, build_config("tiny", {"cai_revisions": True}))
    export, sft = round_.jobs.get(kind=Job.EXPORT), round_.jobs.get(kind=Job.SFT)

    assert runner.execute(export.pk, "task-1") and runner.execute(sft.pk, "task-2")

    sft.refresh_from_db()
    assert sft.status == Job.SUCCEEDED and sft.result["revisions"] == 1, sft.error
    learned = [json.loads(line) for line in (Path(sft.checkpoint_path).parent / "revisions.jsonl").open()]
    assert learned == [{"instruction": confirmed.pair.prompt.text, "output": "revised 0"}]
    assert sft.result["sft/loss"] > 0 and (Path(sft.checkpoint_path) / "pairloop.json").exists()
    assert runner.start_policy(round_) == sft.checkpoint_path != round_.parent_policy
    client = Client()
    client.force_login(reviewer)
    page = client.get(round_.get_absolute_url()).content.decode()
    assert f'id="job-{sft.pk}-revisions">Learned from <strong>1</strong> AI revision accepted by people' in page


@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_dpo_round_on_a_real_worker_learns_the_accepted_revision_first_and_trains_from_it(settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 1}
    person = make_user("pat-person")
    campaign = make_campaign(slug="cai-loop", n_pairs=2, members=[person])
    Pair.objects.update(is_open=False)
    confirmed, overturned = proposed(campaign, local_labeler(campaign), "ab")
    judge(campaign, person, confirmed, "r")
    judge(campaign, person, overturned, "o")
    with Worker(purge=True) as worker:
        call_command("launch_round", "cai-loop", "--preset", "tiny", "--set", "algorithm=dpo",
                     "--set", "cai_revisions=true", stdout=io.StringIO())
        round_ = Round.objects.get(campaign=campaign)
        jobs = wait_for(lambda: round_over(round_), 600, worker, "the round to finish")

    assert [job.kind for job in jobs] == ["export", "sft", "dpo", "sample", "enqueue", "evaluate"]
    sft, dpo = jobs[1], jobs[2]
    assert sft.result["revisions"] == 1 and sft.step == sft.total_steps > 0
    assert f"Loading the starting policy {sft.checkpoint_path}" in dpo.log
    assert read_checkpoint_meta(dpo.checkpoint_path)["args"]["policy"] == sft.checkpoint_path
    parent = weights(ensure_policy(round_.parent_policy, "tiny"))
    assert any(not torch.equal(parent[name], tensor) for name, tensor in weights(sft.checkpoint_path).items())
