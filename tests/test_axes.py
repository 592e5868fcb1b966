"""Several questions (axes) per pair: one submit answers them all, on the page and through the API; undo
takes them all back; exports, quality and ratings read one axis at a time."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from annotate.actions import PairInput, add_pairs, claim_next_pair, save_axis, submit_judgment
from annotate.exporting import export_pairs
from annotate.models import Assignment, Axis, AxisChoice, Judgment, Pair
from annotate.quality import quality_report
from tests.conftest import make_campaign, make_user
from tests.test_api import api_for
from tests.test_labeling_http import client_for, current_assignment, press_undo, undo_id
from tests.test_rounds import chains  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db

FLIP = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}


def two_axes(labeler, n_pairs=4, **options):
    """A campaign asking "helpful" (with strength) then "harmless" (no tie) on every pair."""
    campaign = make_campaign(slug="axes", n_pairs=n_pairs, members=[labeler], axis_key="helpful",
                             question="Which answer helps more?", **options)
    save_axis(Axis(campaign=campaign, key="harmless", question="Which answer is less harmful?", position=1,
                   allow_tie=False))
    return campaign


def pair_terms(assignment, shown: str) -> str:
    """A choice in shown terms (left is A) in the pair's terms."""
    return shown if assignment.a_on_left else FLIP[shown]


def test_the_page_asks_every_axis_and_one_submit_stores_them_as_one_judgment(labeler):
    campaign = two_axes(labeler)
    client = client_for(labeler)
    page = client.get(campaign.label_url())
    text = page.content.decode()
    assert text.index("Which answer helps more?") < text.index("Which answer is less harmful?")
    assert 'data-axis="harmless" data-choices="a,b,both_bad"' in text  # no tie on this axis
    first = current_assignment(page)
    judged = client.post(f"{campaign.label_url()}{first.pk}/judge/",
                         {"choice-helpful": "a", "strength-helpful": "3", "choice-harmless": "b", "ms": "4100"},
                         HTTP_HX_REQUEST="true")
    assert current_assignment(judged).pk != first.pk  # the next pair, in the same answer
    judgment = Judgment.objects.get()
    assert (judgment.choice, judgment.strength, judgment.milliseconds) == (pair_terms(first, "a"), 3, 4100)
    assert judgment.choices_by_axis(campaign) == {"helpful": pair_terms(first, "a"),
                                                  "harmless": pair_terms(first, "b")}
    pair = Pair.objects.get(pk=first.pair_id)
    assert pair.judgments_count == 1 and not pair.is_open  # one judgment event for the queue


def test_a_submit_missing_an_axis_or_offering_what_it_does_not_is_refused_and_stores_nothing(labeler):
    campaign = two_axes(labeler)
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    url = f"{campaign.label_url()}{first.pk}/judge/"
    missing = client.post(url, {"choice-helpful": "tie"}, HTTP_HX_REQUEST="true")
    assert "give a choice on every axis: missing harmless" in missing.content.decode()
    no_tie = client.post(url, {"choice-helpful": "tie", "choice-harmless": "tie"}, HTTP_HX_REQUEST="true")
    assert "does not offer &#x27;tie&#x27; on harmless" in no_tie.content.decode()
    no_strength = client.post(url, {"choice-helpful": "b", "choice-harmless": "a"}, HTTP_HX_REQUEST="true")
    assert "say how much better on helpful" in no_strength.content.decode()
    assert not Judgment.objects.exists() and not AxisChoice.objects.exists()
    assert current_assignment(no_strength).pk == first.pk  # still this pair


def test_labeling_every_axis_costs_the_queries_of_one_axis_plus_one_insert(labeler):
    one = make_campaign(slug="one", n_pairs=2, members=[labeler], ask_strength=False)
    several = two_axes(labeler, ask_strength=False)
    client = client_for(labeler)

    def submit(campaign, body):
        assignment = current_assignment(client.get(campaign.label_url()))
        with CaptureQueriesContext(connection) as queries:
            client.post(f"{campaign.label_url()}{assignment.pk}/judge/", body, HTTP_HX_REQUEST="true")
        return [query["sql"] for query in queries.captured_queries]

    single = submit(one, {"choice": "tie"})
    both = submit(several, {"choice-helpful": "tie", "choice-harmless": "both_bad"})
    assert len(both) == len(single) + 1  # their choices in one INSERT, whatever the number of axes
    reading_axes = [sql for sql in both if re.search(rf'FROM "?{Axis._meta.db_table}"? ', sql)]
    assert len(reading_axes) == 1 and "annotate_campaign" in reading_axes[0]  # read with the campaign itself


def test_undo_takes_back_every_axis_and_the_pair_comes_back(labeler):
    campaign = two_axes(labeler)
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    judged = client.post(f"{campaign.label_url()}{first.pk}/judge/",
                         {"choice-helpful": "tie", "choice-harmless": "a"}, HTTP_HX_REQUEST="true")
    undone = press_undo(client, campaign, undo_id(judged))
    assert current_assignment(undone).pair_id == first.pair_id
    assert not Judgment.objects.exists() and not AxisChoice.objects.exists()
    assert Pair.objects.get(pk=first.pair_id).judgments_count == 0


def test_the_api_takes_a_choice_per_axis_in_one_request(labeler):
    campaign = two_axes(labeler)
    api = api_for(labeler)
    claim = api.post(f"/campaigns/{campaign.slug}/claim").json()
    assert [(axis["key"], axis["choices"], axis["ask_strength"]) for axis in claim["axes"]] == [
        ("helpful", ["a", "b", "tie", "both_bad"], True), ("harmless", ["a", "b", "both_bad"], False)]
    path = f"/campaigns/{campaign.slug}/assignments/{claim['assignment']['id']}/judgment"
    only_one = api.post(path, {"choice": "tie"})
    assert only_one.status_code == 400 and "helpful, harmless" in only_one.json()["detail"]
    unknown = api.post(path, {"choices": {"helpful": "tie", "harmless": "a", "honest": "a"}})
    assert unknown.status_code == 400 and "no axis 'honest'" in unknown.json()["detail"]
    assert not Judgment.objects.exists()
    response = api.post(path, {"choices": {"helpful": "a", "harmless": "both_bad"}, "strengths": {"helpful": 2}})
    assert response.status_code == 201
    assignment = Assignment.objects.get(pk=claim["assignment"]["id"])
    assert response.json()["choices"] == {"helpful": pair_terms(assignment, "a"), "harmless": "both_bad"}
    assert Judgment.objects.get().strength == 2


def test_a_campaign_of_one_axis_is_labeled_as_before_and_names_its_question(labeler, campaign):
    client = client_for(labeler)
    page = client.get(campaign.label_url()).content.decode()
    assert "Which response is better?" in page and 'class="axis"' not in page
    api = api_for(labeler)
    claim = api.post(f"/campaigns/{campaign.slug}/claim").json()
    assert [axis["key"] for axis in claim["axes"]] == ["overall"]


# --- exports per axis -----------------------------------------------------------------------------

def judge_axes(campaign, labeler, helpful: str, harmless: str, strength=None, source=Judgment.HUMAN):
    """Claim the next pair and answer both axes in shown terms; returns (left text, right text)."""
    assignment = claim_next_pair(campaign, labeler).assignment
    submit_judgment(assignment_id=assignment.pk, labeler=labeler, choices={"helpful": helpful, "harmless": harmless},
                    strengths={"helpful": strength}, source=source)
    left, right = assignment.shown()
    return left.text, right.text


@pytest.fixture
def judged_axes(labeler):
    """Four pairs whose axes disagree; returns (campaign, helpful's (chosen, rejected), harmless's)."""
    campaign = two_axes(labeler)
    helpful, harmless = [], []
    for shown_helpful, shown_harmless, strength in [("a", "b", 4), ("b", "a", 1), ("a", "both_bad", 2),
                                                   ("tie", "a", None)]:
        left, right = judge_axes(campaign, labeler, shown_helpful, shown_harmless, strength)
        for shown, rows in ((shown_helpful, helpful), (shown_harmless, harmless)):
            if shown in ("a", "b"):
                rows.append((left, right) if shown == "a" else (right, left))
    return campaign, sorted(helpful), sorted(harmless)


def chosen_rejected(path):
    return sorted((row["chosen"], row["rejected"]) for row in map(json.loads, path.read_text().splitlines()))


def test_export_pairs_writes_one_axis_the_first_by_default(judged_axes, tmp_path, capsys):
    campaign, helpful, harmless = judged_axes
    call_command("export_pairs", campaign.slug, str(tmp_path / "default.jsonl"))
    call_command("export_pairs", campaign.slug, str(tmp_path / "harmless.jsonl"), "--axis", "harmless")
    assert chosen_rejected(tmp_path / "default.jsonl") == helpful
    assert chosen_rejected(tmp_path / "harmless.jsonl") == harmless and harmless != helpful
    margins = [json.loads(line)["margin"] for line in (tmp_path / "harmless.jsonl").read_text().splitlines()]
    assert margins == [0.0, 0.0, 0.0]  # harmless asks no strength: helpful's never leaks into it
    with pytest.raises(CommandError, match="no axis 'honest': its axes are helpful, harmless"):
        call_command("export_pairs", campaign.slug, str(tmp_path / "x.jsonl"), "--axis", "honest")
    assert not (tmp_path / "x.jsonl").exists()


def test_the_raw_export_holds_every_axis(judged_axes, tmp_path):
    campaign, _, _ = judged_axes
    export_pairs(campaign, tmp_path / "raw.parquet", format="parquet", raw=True)
    rows = pq.read_table(tmp_path / "raw.parquet").to_pylist()
    assert len(rows) == 4
    for row in rows:
        judgment = Judgment.objects.get(pk=row["judgment_id"])
        assert [axis["axis"] for axis in row["axes"]] == ["helpful", "harmless"]
        assert {axis["axis"]: axis["choice"] for axis in row["axes"]} == judgment.choices_by_axis(campaign)
        assert row["axes"][0]["strength"] == row["strength"]


def test_the_page_and_the_api_download_one_axis_as_the_command_writes_it(judged_axes, reviewer, tmp_path):
    campaign, _, harmless = judged_axes
    client = client_for(reviewer)
    detail = client.get(campaign.get_absolute_url()).content.decode()
    assert "?format=jsonl&axis=harmless" in detail
    page = client.get(f"/campaigns/{campaign.slug}/export/", {"format": "jsonl", "axis": "harmless"})
    (tmp_path / "page.jsonl").write_bytes(b"".join(page.streaming_content))
    assert chosen_rejected(tmp_path / "page.jsonl") == harmless
    api = api_for(reviewer)
    answer = api.get(f"/campaigns/{campaign.slug}/export", format="jsonl", axis="harmless")
    (tmp_path / "api.jsonl").write_bytes(b"".join(answer.streaming_content))
    assert (tmp_path / "api.jsonl").read_bytes() == (tmp_path / "page.jsonl").read_bytes()
    refused = api.get(f"/campaigns/{campaign.slug}/export", format="jsonl", axis="honest")
    assert refused.status_code == 400 and "its axes are helpful, harmless" in refused.json()["detail"]


@pytest.mark.slow
def test_trl_reward_trainer_reads_one_axis_export(judged_axes, tmp_path):
    """TRL's RewardTrainer takes a step on the harmless axis's export (a datasets directory) as is."""
    import datasets
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from training.engine.common import default_reward_backbone

    campaign, _, harmless = judged_axes
    export_pairs(campaign, tmp_path / "harmless", format="hf", axis="harmless")
    dataset = datasets.load_from_disk(str(tmp_path / "harmless"))
    assert sorted(zip(dataset["chosen"], dataset["rejected"])) == harmless
    tokenizer = AutoTokenizer.from_pretrained(default_reward_backbone())
    tokenizer.eos_token = tokenizer.sep_token  # TRL appends EOS; BERT's tokenizer names none
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    before = [p.detach().clone() for p in model.parameters()]
    config = RewardConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=len(dataset),
                          learning_rate=1e-2, max_length=64, use_cpu=True, report_to="none", save_strategy="no",
                          disable_tqdm=True, activation_checkpointing=False)
    RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- quality per axis -----------------------------------------------------------------------------

def test_quality_is_reported_per_axis_with_its_own_agreement_bias_and_flags(labeler, reviewer, capsys):
    other = make_user("olga-labeler")
    campaign = two_axes(labeler, n_pairs=20, overlap=2)
    campaign.members.add(other)
    for _ in range(20):
        # Both agree the two are bad on helpful; on harmless one always picks the left answer, the other a tie.
        judge_axes(campaign, labeler, "both_bad", "a")
        judge_axes(campaign, other, "both_bad", "both_bad")
    report = quality_report(campaign, fresh=True)
    assert report["axis"] == "helpful" and report["agreement"]["percent"] == 1.0
    assert report["position_bias"]["n"] == 0 and not any(row["flags"] for row in report["labelers"])
    [harmless] = report["further_axes"]
    assert harmless["axis"] == "harmless" and harmless["judgments"] == 40
    assert harmless["agreement"]["percent"] == 0.0
    assert harmless["position_bias"]["left_rate"] == 1.0
    biased = {name for name, flags in harmless["flags"].items() if any("position bias" in f for f in flags)}
    assert biased == {labeler.username}
    page = client_for(reviewer).get(f"/campaigns/{campaign.slug}/quality/").content.decode()
    assert 'id="axis-harmless"' in page and "lena-labeler: position bias" in page
    call_command("quality_report", campaign.slug)
    assert "FLAG lena-labeler on harmless: position bias" in capsys.readouterr().out


def test_an_admin_adds_an_axis_and_cannot_delete_one_that_has_choices(admin_user, labeler):
    campaign = make_campaign(slug="grow", n_pairs=2, members=[labeler])
    admin = client_for(admin_user)
    taken = admin.post("/admin/annotate/axis/add/", {"campaign": campaign.pk, "position": 1, "key": "overall",
                                                     "question": "Again?", "allow_tie": "on"})
    assert "the campaign&#x27;s first axis already" in taken.content.decode() and not Axis.objects.exists()
    added = admin.post("/admin/annotate/axis/add/", {"campaign": campaign.pk, "position": 1, "key": "harmless",
                                                     "question": "Which is less harmful?", "allow_tie": "on"})
    assert added.status_code == 302
    axis = Axis.objects.get(campaign=campaign)
    assert [a.key for a in campaign.axes()] == ["overall", "harmless"]
    judge_axes_of(campaign, labeler, {"overall": "tie", "harmless": "a"})
    page = admin.post(f"/admin/annotate/axis/{axis.pk}/delete/", {"post": "yes"})
    assert "cannot delete" in page.content.decode().lower()
    assert Axis.objects.filter(pk=axis.pk).exists() and AxisChoice.objects.count() == 1


def judge_axes_of(campaign, labeler, choices):
    assignment = claim_next_pair(campaign, labeler).assignment
    submit_judgment(assignment_id=assignment.pk, labeler=labeler, choices=choices, strengths={"overall": 2})


# --- simulated labelers per axis ------------------------------------------------------------------

def test_simulated_labelers_judge_each_axis_by_its_own_rule(capsys):
    from demo import demo_tasks
    from tests.test_simulate import demo_campaign

    campaign = demo_campaign(n=16)
    save_axis(Axis(campaign=campaign, key="curt", question="Which answer is shorter and right?", position=1))
    call_command("simulate_labelers", campaign.slug, "--judge", "rule:correct_sentence", "--noise", "0",
                 "--count", "16", "--axis-judge", "curt=rule:correct_curt")
    assert "Judge of curt: rule:correct_curt" in capsys.readouterr().out
    differ = 0
    for judgment in Judgment.objects.select_related("pair__prompt", "pair__response_a", "pair__response_b"):
        pair, choices = judgment.pair, judgment.choices_by_axis(campaign)
        for key, rule in (("overall", "correct_sentence"), ("curt", "correct_curt")):
            score_a, score_b = (demo_tasks.RULE_JUDGES[rule](pair.prompt.text, r.text)
                                for r in (pair.response_a, pair.response_b))
            assert choices[key] == ("a" if score_a > score_b else "b" if score_b > score_a else "tie")
        differ += choices["overall"] != choices["curt"]
    assert Judgment.objects.count() == 16 and differ > 0
    with pytest.raises(CommandError, match="no axis 'kind' in campaign demo-sim: its axes are overall, curt"):
        call_command("simulate_labelers", campaign.slug, "--axis-judge", "kind=rule:correct")


# --- ratings per axis -----------------------------------------------------------------------------

def test_rounds_are_rated_on_each_axis_apart(chains, reviewer, settings):
    from annotate.models import Response
    from api.actions import create_token
    from tests.test_rounds import MIN, judged_campaign, launch, succeed

    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": MIN}
    campaign = judged_campaign()
    harmless = save_axis(Axis(campaign=campaign, key="harmless", question="Less harmful?", position=1))
    first = launch(campaign)
    for job in first.jobs.order_by("order"):
        succeed(job, policy_checkpoint="/models/round-1")
    first.refresh_from_db()
    add_pairs(campaign, [PairInput(f"ax {i}?", f"new {i}", f"old {i}") for i in range(20)], round=first,
              source=Response.POLICY, checkpoints=("/models/round-1", first.config["base_policy"]), notify=False)
    human = make_user("hugo")
    for pair in Pair.objects.filter(round=first):
        # Round 1's answer helps more every time, and the SFT policy's is less harmful every time.
        judgment = Judgment.objects.create(pair=pair, labeler=human, choice="a", source=Judgment.HUMAN)
        AxisChoice.objects.create(judgment=judgment, axis=harmless, choice="b")
    page = client_for(reviewer).get(f"/rounds/{first.pk}/").content.decode()

    def order(table_id):
        table = page.split(f'id="{table_id}"')[1].split("</table>")[0]
        return [row.split("</td>")[0] for row in table.split("<tr><td>")[1:]]

    assert order("policy-ratings") == ["Round 1", "SFT policy"]
    assert order("policy-ratings-harmless") == ["SFT policy", "Round 1"]
    api = Client(headers={"Authorization": f"Bearer {create_token(reviewer, 'r', ['review'])[1]}"})
    answer = api.get(f"/api/v1/rounds/{first.pk}/ratings", {"axis": "harmless"}).json()
    players = {player["policy"]: player["rating"] for player in answer["players"]}
    assert answer["axis"] == "harmless" and players["Round 1"] < players["SFT policy"] == 1000
    assert api.get(f"/api/v1/rounds/{first.pk}/ratings", {"axis": "kind"}).status_code == 404


def test_a_gold_item_has_a_known_answer_per_axis_and_quality_scores_each(labeler):
    from django.core.exceptions import ValidationError

    campaign = two_axes(labeler, n_pairs=3, gold_rate=1.0)
    gold = Pair.objects.filter(campaign=campaign).order_by("id").first()
    gold.gold_choice, gold.gold_choices = "a", {"honest": "a"}
    with pytest.raises(ValidationError, match="no further axis 'honest': they are harmless"):
        gold.full_clean()
    gold.gold_choices = {"harmless": "b"}
    gold.full_clean()
    gold.save()
    assignment = claim_next_pair(campaign, labeler).assignment
    assert assignment.pair_id == gold.pk
    shown_a = "a" if assignment.a_on_left else "b"  # response_a as the labeler sees it
    submit_judgment(assignment_id=assignment.pk, labeler=labeler, choices={"helpful": shown_a, "harmless": shown_a},
                    strengths={"helpful": 2})
    report = quality_report(campaign, fresh=True)
    [mine] = report["labelers"]
    assert (mine["gold_accuracy"], mine["gold_n"]) == (1.0, 1)  # response_a on helpful, as the gold says
    assert report["further_axes"][0]["gold"] == {labeler.username: {"accuracy": 0.0, "n": 1}}  # not on harmless
