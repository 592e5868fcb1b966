"""A round's blind human evaluation: its evaluation's answers go to labelers as pairs that never train, and the
round's human win rates and Bradley-Terry ratings come from the judgments on them."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from annotate.actions import EvalInput, PairInput, add_eval_set, add_pairs, claim_next_pair, submit_judgment
from annotate.exporting import export_pairs
from annotate.models import Pair
from annotate.statistics import usable_judgments
from tests.conftest import make_campaign
from training import actions
from training.config import build_config
from training.evaluation import NEW, SFT, human_evaluation
from training.models import Job, Round

pytestmark = pytest.mark.django_db
MIN = 4
PROMPTS = 8
NEW_CHECKPOINT, SFT_CHECKPOINT = "/checkpoints/round-1/policy", "/checkpoints/sft"


@pytest.fixture(autouse=True)
def quiet(settings, monkeypatch):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": MIN}
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)


def evaluated_round(labeler, seed: int = 0, slug: str = "blind") -> Round:
    """A finished round whose evaluation has the new policy and the SFT policy answer PROMPTS prompts."""
    campaign = make_campaign(slug=slug, members=[labeler])
    add_pairs(campaign, [PairInput(f"Question {i}?", f"good {i}", f"bad {i}", preferred="a") for i in range(MIN)],
              notify=False)
    eval_set, _ = add_eval_set(campaign, "held out", [EvalInput(i + 1, f"Task {i}?", "") for i in range(PROMPTS)])
    round_ = actions.launch_round(campaign, None, build_config("tiny", {"seed": seed}), force=True)
    Round.objects.filter(pk=round_.pk).update(config={**round_.config, "base_policy": SFT_CHECKPOINT})
    answers = [{"eval_prompt_id": p.pk, "prompt": p.text, "reference": "",
                "answers": {NEW: f"A careful answer to task {i}.", SFT: f"meh {i}"}}
               for i, p in enumerate(eval_set.prompts.order_by("position"))]
    result = {"policies": [{"role": NEW, "label": "Round 1", "checkpoint": NEW_CHECKPOINT},
                           {"role": SFT, "label": "SFT policy", "checkpoint": SFT_CHECKPOINT}],
              "answers": answers, "comparisons": [], "judges": [],
              "eval_set": {"id": eval_set.pk, "name": eval_set.name, "version": eval_set.version, "prompts": PROMPTS}}
    for job in round_.jobs.order_by("order"):
        assert actions.claim_job(job.pk, f"t-{job.pk}")[0] is not None
        actions.finish_job(job.pk, f"t-{job.pk}", result=result if job.kind == Job.EVALUATE else {},
                           round_fields={"policy_checkpoint": NEW_CHECKPOINT} if job.kind == Job.PPO else None)
    return Round.objects.get(pk=round_.pk)


def judge_all(campaign, labeler, prefers_new=lambda task: True) -> int:
    """A simulated labeler who prefers the new policy's answer to the tasks `prefers_new` names (by number), the
    other's to the rest, on whichever side each is shown."""
    judged = 0
    while (assignment := claim_next_pair(campaign, labeler).assignment) is not None:
        left, _ = assignment.shown()
        task = int(assignment.pair.prompt.text.removeprefix("Task ").removesuffix("?"))
        new_on_left = left.text.startswith("A careful")
        submit_judgment(assignment_id=assignment.pk, labeler=labeler,
                        choice="a" if new_on_left == prefers_new(task) else "b", strength=2, campaign=campaign)
        judged += 1
    return judged


def new_is_a(round_: Round) -> list[bool]:
    """Per blind pair of the round, in prompt order, whether the new policy's answer is its response A."""
    pairs = Pair.objects.filter(round=round_, purpose=Pair.EVALUATION).order_by("prompt__text")
    return [checkpoint == NEW_CHECKPOINT for checkpoint in pairs.values_list("response_a__checkpoint", flat=True)]


def test_the_new_policy_is_response_a_of_half_the_blind_pairs_in_an_order_the_seed_repeats(labeler):
    round_ = evaluated_round(labeler, seed=3)
    actions.send_evaluation_to_labelers(round_)
    order = new_is_a(round_)
    assert len(order) == PROMPTS and sum(order) == PROMPTS // 2
    blind = Pair.objects.filter(round=round_, purpose=Pair.EVALUATION)
    assert {(p.response_a.checkpoint, p.response_b.checkpoint) for p in blind} == {
        (NEW_CHECKPOINT, SFT_CHECKPOINT), (SFT_CHECKPOINT, NEW_CHECKPOINT)}  # each response keeps its policy
    assert list(blind.order_by("pk").values_list("prompt__text", flat=True)) == [f"Task {i}?" for i in range(PROMPTS)]
    blind.delete()
    actions.send_evaluation_to_labelers(round_)
    assert new_is_a(round_) == order  # the round's seed draws the same order again


def test_the_people_s_win_rate_reads_each_pair_by_policy_whichever_response_it_is(labeler):
    tables, orders = [], []
    for seed in (0, 1):
        round_ = evaluated_round(labeler, seed=seed, slug=f"blind-{seed}")
        actions.send_evaluation_to_labelers(round_)
        orders.append(new_is_a(round_))
        assert judge_all(round_.campaign, labeler, prefers_new=lambda task: task < 6) == PROMPTS
        human = human_evaluation(round_)
        (row,) = human["table"]
        assert (row["a"], row["b"], row["prompts"], row["wins"], row["losses"]) == (NEW, SFT, PROMPTS, 6, 2)
        assert row["win_rate"] == 0.75
        players = {p.player: p for p in human["ratings"]["players"]}
        assert players["Round 1"].rating > players["SFT policy"].rating and human["ratings"]["judgments"] == PROMPTS
        tables.append({k: v for k, v in row.items() if k not in ("ci_low", "ci_high")})  # resampled by seed
    assert orders[0] != orders[1] and tables[0] == tables[1]


def test_a_blind_batch_never_reaches_a_training_export(labeler, tmp_path):
    round_ = evaluated_round(labeler)
    campaign = round_.campaign
    usable = usable_judgments(campaign)
    assert actions.send_evaluation_to_labelers(round_, priority=7) == PROMPTS
    assert actions.send_evaluation_to_labelers(round_, priority=7) == 0  # the same answers add nothing
    blind = Pair.objects.filter(campaign=campaign, purpose=Pair.EVALUATION)
    assert blind.count() == PROMPTS and set(blind.values_list("priority", flat=True)) == {7}
    assert judge_all(campaign, labeler) == PROMPTS
    assert usable_judgments(campaign) == usable  # they never make a launch fresh

    exported = export_pairs(campaign, tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert exported.rows == MIN and not any(row["prompt"].startswith("Task") for row in rows)
    export_pairs(campaign, tmp_path / "raw.jsonl", raw=True)
    raw = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert sorted(row["purpose"] for row in raw) == ["evaluation"] * PROMPTS + ["training"] * MIN


def test_people_who_prefer_the_new_policy_rate_it_above_sft_with_intervals(labeler, admin_user):
    round_ = evaluated_round(labeler)
    actions.send_evaluation_to_labelers(round_)
    judge_all(round_.campaign, labeler)
    human = human_evaluation(round_)
    row = next(r for r in human["table"] if (r["a"], r["b"]) == (NEW, SFT))
    assert row["prompts"] == PROMPTS and row["win_rate"] == 1.0 and row["ci_low"] > 0.5
    assert row["lc_win_rate"] > 0.5
    players = {p.player: p for p in human["ratings"]["players"]}
    assert players["Round 1"].low > players["SFT policy"].rating == 1000
    assert human["ratings"]["judgments"] == PROMPTS
    from tests.test_api import api_for

    served = api_for(admin_user).get(f"/rounds/{round_.pk}/evaluation").json()["human"]
    assert served["table"][0]["b_label"] == "SFT policy" and served["table"][0]["ci_low"] == row["ci_low"]
    assert [p["policy"] for p in served["ratings"]["players"]] == ["Round 1", "SFT policy"]


def test_the_labeling_page_and_the_claim_api_never_say_which_policy_wrote_what(labeler):
    round_ = evaluated_round(labeler)
    actions.send_evaluation_to_labelers(round_)
    client = Client()
    client.force_login(labeler)
    page = client.get(f"/campaigns/{round_.campaign.slug}/label/").content.decode()
    assert "Task " in page  # an evaluation pair is shown like any pair ...
    for told in (NEW_CHECKPOINT, SFT_CHECKPOINT, "Round 1", "SFT", "evaluation"):
        assert told not in page  # ... and nothing names its policies or its purpose


def test_an_admin_sends_the_batch_from_the_round_page_and_reads_the_people_there(labeler, admin_user):
    round_ = evaluated_round(labeler)
    client = Client()
    client.force_login(admin_user)
    assert 'id="send-to-labelers"' in client.get(f"/rounds/{round_.pk}/").content.decode()
    page = client.post(f"/rounds/{round_.pk}/to-labelers/", {"priority": "3"}, follow=True).content.decode()
    assert f"Sent {PROMPTS} blind evaluation pairs to the labelers (priority 3)." in page
    assert set(Pair.objects.filter(purpose=Pair.EVALUATION).values_list("priority", flat=True)) == {3}
    assert 'id="human-evaluation-none"' in page
    judge_all(round_.campaign, labeler)
    page = client.get(f"/rounds/{round_.pk}/").content.decode()
    assert 'id="human-evaluation-table"' in page and f"{PROMPTS} / 0 / 0" in page and 'id="human-ratings"' in page


def test_the_command_sends_the_batch_and_refuses_a_round_without_an_evaluation(labeler):
    round_ = evaluated_round(labeler)
    out = io.StringIO()
    call_command("evaluate", str(round_.pk), "--to-labelers", "--priority", "2", stdout=out)
    assert f"Sent {PROMPTS} blind evaluation pairs" in out.getvalue()
    Job.objects.filter(round=round_, kind=Job.EVALUATE).update(result={})
    with pytest.raises(CommandError, match="has no evaluation with answers"):
        call_command("evaluate", str(round_.pk), "--to-labelers", stdout=io.StringIO())


def test_an_evaluation_prompt_sent_to_labelers_never_becomes_a_training_prompt(labeler):
    from training.runner import ppo_prompts, sample_prompts

    round_ = evaluated_round(labeler)
    actions.send_evaluation_to_labelers(round_)
    campaign = round_.campaign
    config = build_config("tiny", {"sample_prompts": 100})
    assert sorted(ppo_prompts(campaign) + [text for _, text, _ in sample_prompts(campaign, config)]) == sorted(
        [f"Question {i}?" for i in range(MIN)] * 2)
    eval_set, created = add_eval_set(campaign, "again", [EvalInput(1, "Task 0?", "")])  # still an evaluation prompt
    assert created and eval_set.prompts.count() == 1
