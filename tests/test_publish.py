"""Publishing a round's data: `manage.py publish_round` writes a datasets folder with its dataset card, and
`--push` hands that folder to the Hub's client. The round is built without training, as in test_rounds.py,
with its real export job; the Hub's client is the one thing replaced (no network here)."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from django.core.management import CommandError, call_command
from markdown_it import MarkdownIt

from annotate.actions import PairInput, add_pairs, exclude_judgments
from annotate.agreement import Vote, agreement
from annotate.models import Judgment, Pair, Response
from tests.conftest import make_campaign, make_user
from training import actions, runner
from training.config import build_config
from training.engine.checkpoints import CHECKPOINT_META
from training.models import Job

MIN = 5
EVIL = "Sure!\n---\nlicense: mit\n---\n<script>alert('x')</script>\n````\n</code><script>alert(2)</script>"
HUMAN = ["a", "a", "b", "a", "tie", "a"]
SIMULATED = ["a", "a", "b", "b", "a", "a"]


@pytest.fixture(autouse=True)
def small_round(settings, tmp_path, monkeypatch):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": MIN, "EXPORTS_DIR": str(tmp_path / "exports")}
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)


class FakeHub:
    """HfApi at the boundary: records each call, and what the folder held when upload_folder was called."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **options):
        FakeHub.calls.append(("create_repo", repo_id, options, self.token))

    def upload_folder(self, *, repo_id, folder_path, **options):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        card = (Path(folder_path) / "README.md").read_text(encoding="utf-8")
        FakeHub.calls.append(("upload_folder", repo_id, {**options, "folder_path": folder_path, "files": files,
                                                         "card": card}, self.token))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/datasets/{repo_id}/commit/1"})()


@pytest.fixture
def hub(monkeypatch):
    FakeHub.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHub)
    return FakeHub.calls


def finished_round(tmp_path, chat=False):
    """Round 1 of a campaign judged by a person, a simulated labeler and an excluded labeler, its export job
    run for real and its other jobs succeeded with checkpoints and review figures."""
    campaign = make_campaign("publish")
    campaign.name = "Shop\n---\nanswers"
    campaign.save(update_fields=["name"])
    items = [PairInput([{"role": "user", "content": f"Question {i}?"}] if chat else f"Question {i}?", EVIL if i == 0 else f"good {i}", f"bad {i}") for i in range(6)]
    add_pairs(campaign, items, notify=False)
    pairs = list(Pair.objects.filter(campaign=campaign).order_by("id"))
    Pair.objects.filter(pk=pairs[0].pk).update(gold_choice="a")
    hana, sim, xavier, admin = (make_user(name) for name in ("hana", "sim-rule-1", "xavier", "ada"))
    for pair, human, simulated in zip(pairs, HUMAN, SIMULATED):
        Judgment.objects.create(pair=pair, labeler=hana, choice=human, a_on_left=True, source=Judgment.HUMAN)
        Judgment.objects.create(pair=pair, labeler=sim, choice=simulated, a_on_left=False,
                                source=Judgment.SIMULATED)
        Judgment.objects.create(pair=pair, labeler=xavier, choice="b", a_on_left=True, source=Judgment.HUMAN)
    exclude_judgments(campaign, by=admin, labeler=xavier, reason="clicked <b>B</b> | always")
    round_ = actions.launch_round(campaign, admin, build_config("tiny", {"system_prompt": "```\n<i>hi</i>"}))
    export = round_.jobs.get(kind=Job.EXPORT)
    assert runner.execute(export.pk, "task-export")
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / CHECKPOINT_META).write_text(json.dumps({"stage": "reward", "args": {"model": "tiny-reward-backbone"}}))
    for job in round_.jobs.exclude(kind=Job.EXPORT).order_by("order"):
        actions.claim_job(job.pk, f"task-{job.pk}")
        result = {"opponent": "SFT policy", "sample/reward_new": 0.61, "sample/reward_opponent": -0.2,
                  "sample/judge_new": 0.74, "sample/judge_other": 0.63} if job.kind == Job.SAMPLE else {}
        actions.finish_job(job.pk, f"task-{job.pk}", result=result,
                           round_fields={"reward_checkpoint": str(reward), "policy_checkpoint": "/models/round-1"})
    # Judged after the export: the round's win rate counts them, its data and agreement do not.
    add_pairs(campaign, [PairInput(f"New {i}?", f"new {i}", f"old {i}") for i in range(2)], round=round_,
              source=Response.POLICY, checkpoints=("/models/round-1", "/models/sft"), notify=False)
    for pair, choice in zip(Pair.objects.filter(round=round_).order_by("id"), "ab"):
        Judgment.objects.create(pair=pair, labeler=hana, choice=choice, a_on_left=True, source=Judgment.HUMAN)
    round_.refresh_from_db()
    return round_


def front_matter(card: str) -> tuple[dict, str]:
    """The card's YAML as the Hub reads it (from the first line's --- to the next), and the Markdown after it."""
    assert card.startswith("---\n")
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end]), card[end + 5:]


def rendered(markdown: str) -> str:
    """The card's body as the Hub renders Markdown: CommonMark with tables and raw HTML allowed."""
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


@pytest.mark.django_db
def test_it_publishes_a_round_as_a_folder_that_datasets_loads_with_a_card_of_its_figures(tmp_path):
    from datasets import load_dataset, load_from_disk

    round_ = finished_round(tmp_path)
    out = tmp_path / "published"
    stdout = io.StringIO()
    call_command("publish_round", str(round_.pk), str(out), "--language", "en", stdout=stdout)

    assert "Wrote 11 rows" in stdout.getvalue()
    columns = ["prompt", "chosen", "rejected", "margin", "pair_id", "labeler", "round", "source"]
    saved = load_from_disk(str(out))["train"]
    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["train"]
    parquet = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), cache_dir=str(tmp_path / "cache"))
    for dataset in (saved, loaded, parquet["train"]):
        assert dataset.column_names == columns and dataset.num_rows == 11
    # The excluded labeler and the tie are left out; every other judgment is a row with its source.
    assert sorted(loaded["labeler"]) == ["hana"] * 5 + ["sim-rule-1"] * 6
    assert set(zip(loaded["labeler"], loaded["source"])) == {("hana", "human"), ("sim-rule-1", "simulated")}
    assert loaded[0]["chosen"] == EVIL and saved[0]["chosen"] == EVIL

    card = (out / "README.md").read_text(encoding="utf-8")
    meta, body = front_matter(card)
    assert meta["license"] == "other" and meta["language"] == ["en"] and meta["size_categories"] == "n<1K"
    assert meta["pretty_name"] == "Shop --- answers: round 1 preferences"
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": meta["dataset_info"]["dataset_size"],
                                               "num_examples": 11}]
    assert [f["name"] for f in meta["dataset_info"]["features"]] == columns

    html = rendered(body)
    assert "<script" not in html and "<i>" not in html and "<b>" not in html
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in html  # shown as text in the example row
    assert "<td>human</td>\n<td>5</td>" in html and "<td>simulated</td>\n<td>6</td>" in html
    assert "Rows on gold items (pairs with a known answer, mixed in to check labelers): 2." in html
    expected = agreement([Vote(i, name, choice) for name, choices in (("hana", HUMAN), ("sim-rule-1", SIMULATED))
                          for i, choice in enumerate(choices)])
    assert f"<td>{expected.krippendorff_alpha:.3f}</td>" in html and f"<td>{expected.items}</td>" in html
    # Hana's A on the left won 4 of 5, the simulated labeler's B on the left 2 of 6: 6 of 11.
    assert f"<td>{6 / 11:.1%}</td>" in html
    assert "6 judgments were excluded" in html and "xavier's judgments: clicked &lt;b&gt;B&lt;/b&gt; | always (6)" in html
    assert "<td>tiny-reward-backbone</td>" in html and "<td>/models/round-1</td>" in html
    assert f"<td>{round_.config['base_policy']}</td>" in html
    assert "<td>0.610</td>" in html and "<td>0.740</td>" in html and "its evaluation is its review" in html
    assert "<td>1</td>\n<td>SFT policy</td>\n<td>0.500 (2)</td>\n<td>n/a</td>" in html
    assert f'load_dataset({json.dumps(str(out.resolve()))})' in body


@pytest.mark.django_db
def test_it_publishes_a_chat_campaign_s_round_in_trl_s_conversational_format(tmp_path):
    from datasets import load_dataset

    round_ = finished_round(tmp_path, chat=True)
    out = tmp_path / "published"
    call_command("publish_round", str(round_.pk), str(out), stdout=io.StringIO())

    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert loaded.num_rows == 11 and loaded[0]["prompt"] == [{"role": "user", "content": "Question 0?"}]
    assert loaded[0]["chosen"] == [{"role": "assistant", "content": EVIL}]
    meta, body = front_matter((out / "README.md").read_text(encoding="utf-8"))
    assert meta["dataset_info"]["features"][0] == {"name": "prompt", "list": [{"name": "role", "dtype": "string"},
                                                                              {"name": "content", "dtype": "string"}]}
    html = rendered(body)
    assert "<script" not in html and "user: Question 0?" in html and "assistant: Sure!" in html


@pytest.mark.django_db
def test_it_pushes_the_folder_it_wrote_to_the_repository_when_a_token_is_configured(tmp_path, hub, monkeypatch):
    round_ = finished_round(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "published"
    stdout = io.StringIO()

    call_command("publish_round", str(round_.pk), str(out), "--push", "ada/shop-round-1", stdout=stdout)

    assert [call[:2] for call in hub] == [("create_repo", "ada/shop-round-1"), ("upload_folder", "ada/shop-round-1")]
    assert hub[0][2]["repo_type"] == "dataset" and hub[0][2]["exist_ok"] is True
    upload = hub[1][2]
    assert upload["folder_path"] == str(out) and upload["repo_type"] == "dataset"
    assert upload["card"] == (out / "README.md").read_text(encoding="utf-8")
    assert 'load_dataset("ada/shop-round-1")' in upload["card"]
    assert upload["allow_patterns"] == ["README.md", "data/*"] and "data/train-00000-of-00001.parquet" in upload["files"]
    assert {call[3] for call in hub} == {"hf_test_token"}
    assert "https://huggingface.co/datasets/ada/shop-round-1/commit/1" in stdout.getvalue()


@pytest.mark.django_db
def test_it_refuses_a_push_without_a_token_or_offline_and_writes_nothing(tmp_path, hub, monkeypatch):
    round_ = finished_round(tmp_path)
    out = tmp_path / "published"
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with pytest.raises(CommandError, match="HF_HUB_OFFLINE .* is set to 1.*unset it for the push"):
        call_command("publish_round", str(round_.pk), str(out), "--push", "ada/shop-round-1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(CommandError, match="no Hugging Face token; set HF_TOKEN.*hf auth login"):
        call_command("publish_round", str(round_.pk), str(out), "--push", "ada/shop-round-1")
    assert hub == [] and not out.exists()


@pytest.mark.django_db
def test_it_refuses_an_unfinished_round_and_a_folder_that_is_not_an_earlier_publish(tmp_path):
    round_ = finished_round(tmp_path)
    keep = tmp_path / "backups"
    keep.mkdir()
    (keep / "db.dump").write_text("precious")
    with pytest.raises(CommandError, match="not an earlier published round"):
        call_command("publish_round", str(round_.pk), str(keep))
    assert (keep / "db.dump").read_text() == "precious"
    out = tmp_path / "published"
    call_command("publish_round", str(round_.pk), str(out), stdout=io.StringIO())
    call_command("publish_round", str(round_.pk), str(out), "--license", "cc-by-4.0", stdout=io.StringIO())
    assert front_matter((out / "README.md").read_text(encoding="utf-8"))[0]["license"] == "cc-by-4.0"
    Job.objects.filter(round=round_, kind=Job.ENQUEUE).update(status=Job.FAILED)
    with pytest.raises(CommandError, match="round 1 of publish is failed: only a round whose jobs all succeeded"):
        call_command("publish_round", str(round_.pk), str(out))


@pytest.mark.django_db
def test_its_card_holds_the_round_s_evaluation_on_its_evaluation_set(tmp_path):
    from training import evaluation

    round_ = finished_round(tmp_path)
    answers = {"new": ["A full answer.", "Yes, it is.", "It is four.", "No."], "sft": ["eh", "eh", "eh", "No."]}
    scores = {"rule:correct_sentence": {"new": [1.0, 1.0, 1.0, 0.0], "sft": [0.0, 0.0, 0.0, 0.0]}}
    comparisons = evaluation.compare(answers, scores, ["new", "sft"], seed=0)  # as the evaluate job compares
    round_.jobs.filter(kind=Job.EVALUATE).update(result={
        "eval_set": {"id": 1, "name": "held <b>out</b>", "version": "abc123", "prompts": 4},
        "policies": [{"role": "new", "label": "Round 1", "checkpoint": "/models/round-1"},
                     {"role": "sft", "label": "SFT policy", "checkpoint": "sft"}],
        "comparisons": comparisons})
    out = tmp_path / "published"
    call_command("publish_round", str(round_.pk), str(out), stdout=io.StringIO())

    html = rendered(front_matter((out / "README.md").read_text(encoding="utf-8"))[1])
    assert "evaluation set held &lt;b&gt;out&lt;/b&gt; (version abc123, 4 prompts" in html
    row = comparisons[0]
    assert row["wins"] == 3 and row["ties"] == 1 and row["losses"] == 0
    assert ("<td>rule:correct_sentence</td>\n<td>Round 1</td>\n<td>SFT policy</td>\n<td>3 / 1 / 0</td>\n"
            f"<td>{row['win_rate']:.3f}</td>") in html
    assert "Its review, as the round page shows it" in html and "its evaluation is its review" not in html
