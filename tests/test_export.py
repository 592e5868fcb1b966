"""Exporting judgments: Bradley-Terry pairs in TRL's columns, raw judgments, files real tools read."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from annotate.actions import PairInput, add_pairs, claim_next_pair, submit_judgment
from annotate.exporting import (
    BT_CHAT_SCHEMA,
    BT_SCHEMA,
    RAW_CHAT_SCHEMA,
    RAW_SCHEMA,
    ExportError,
    bt_rows,
    export_pairs,
    raw_rows,
)
from annotate.importing import import_file
from annotate.models import Judgment, Prompt
from tests.conftest import make_campaign, make_user

pytestmark = pytest.mark.django_db


def judge(campaign, user, choice, strength=None, *, rationale="", milliseconds=1500, source=Judgment.HUMAN):
    """Claim the next pair and submit `choice` in the labeler's terms ("a" = the left response).

    Returns (left text, right text, prompt text) as the labeler saw them."""
    assignment = claim_next_pair(campaign, user).assignment
    submit_judgment(assignment_id=assignment.pk, labeler=user, choice=choice, strength=strength,
                    rationale=rationale, milliseconds=milliseconds, source=source)
    left, right = assignment.shown()
    return left.text, right.text, assignment.pair.prompt.text


@pytest.fixture
def judged(labeler):
    """A campaign with one judgment of each kind; returns (campaign, the expected Bradley-Terry rows)."""
    campaign = make_campaign("exp", n_pairs=5, members=[labeler], ask_strength=True, ask_rationale=True)
    bot = make_user("sim-bot")
    expected = []
    left, right, prompt = judge(campaign, labeler, "a", 4, rationale="left is exact")
    expected.append((prompt, left, right, 1.0, labeler.username))
    left, right, prompt = judge(campaign, labeler, "b", 1)
    expected.append((prompt, right, left, 0.0, labeler.username))
    judge(campaign, labeler, "tie")
    judge(campaign, labeler, "both_bad")
    left, right, prompt = judge(campaign, bot, "a", 2, source=Judgment.SIMULATED)
    expected.append((prompt, left, right, 1 / 3, "sim-bot"))
    add_pairs(campaign, [PairInput("Imported?", "good", "bad", preferred="a", margin=2 / 3)], notify=False)
    expected.append(("Imported?", "good", "bad", 2 / 3, ""))
    return campaign, expected


def as_tuples(rows):
    return sorted((r["prompt"], r["chosen"], r["rejected"], round(r["margin"], 6), r["labeler"])
                  for r in rows)


def rounded(expected):
    return sorted((p, c, r, round(m, 6), who) for p, c, r, m, who in expected)


def test_it_exports_a_and_b_choices_only_with_margin_from_strength(judged):
    campaign, expected = judged
    rows = list(bt_rows(campaign))
    assert as_tuples(rows) == rounded(expected)  # the tie and the both-bad are not there
    assert all(set(row) == set(BT_SCHEMA.names) for row in rows)

    without_simulated = list(bt_rows(campaign, include_simulated=False))
    assert as_tuples(without_simulated) == rounded([e for e in expected if e[4] != "sim-bot"])


def test_it_exports_the_round_that_made_each_pair_and_none_for_an_import(labeler):
    from training.models import Round

    campaign = make_campaign("rounds", n_pairs=0, members=[labeler])
    for number in (1, 2):
        made_by = Round.objects.create(campaign=campaign, number=number, parent_policy="sft")
        add_pairs(campaign, [PairInput(f"Round {number}?", f"yes {number}", f"no {number}", preferred="a")],
                  round=made_by, source="policy", notify=False)
    add_pairs(campaign, [PairInput("Imported?", "good", "bad", preferred="a")], notify=False)

    rows = list(bt_rows(campaign))
    assert sorted((row["prompt"], row["round"]) for row in rows) == [
        ("Imported?", None), ("Round 1?", 1), ("Round 2?", 2)]


def test_it_exports_every_judgment_raw_with_shown_order_and_timing(judged, labeler):
    campaign, _ = judged
    rows = list(raw_rows(campaign))
    assert len(rows) == 6 and all(list(row) == RAW_SCHEMA.names for row in rows)
    mine = [r for r in rows if r["labeler"] == labeler.username]
    assert sorted(r["choice"] for r in mine if r["choice"] in ("tie", "both_bad")) == ["both_bad", "tie"]
    for row in mine:
        assert row["milliseconds"] == 1500 and row["source"] == "human"
        assert row["left_response"] == ("a" if row["a_on_left"] else "b")
        if row["choice"] in ("tie", "both_bad"):
            assert row["strength"] is None and row["margin"] == 0.0
    assert [r["rationale"] for r in mine if r["rationale"]] == ["left is exact"]
    assert {r["strength"] for r in mine if r["choice"] in ("a", "b")} == {4, 1}
    [imported] = [r for r in rows if r["source"] == "import"]
    assert (imported["labeler"], imported["a_on_left"], imported["left_response"]) == ("", None, None)
    assert imported["choice"] == "a" and math.isclose(imported["margin"], 2 / 3)
    assert all(r["created_at"][:4].isdigit() and "T" in r["created_at"] for r in rows)


def load(path: Path, fmt: str, cache: Path):
    import datasets

    if fmt == "hf":
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=str(path), split="train",
                                 cache_dir=str(cache))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_its_files_load_with_datasets_as_is(judged, tmp_path, fmt):
    campaign, expected = judged
    out = tmp_path / f"pairs.{fmt}"

    result = export_pairs(campaign, out, format=fmt)

    assert result.rows == 4 and result.path == str(out)
    dataset = load(out, fmt, tmp_path / "cache")
    assert dataset.column_names == BT_SCHEMA.names
    assert dataset.features["margin"].dtype == "float64" and dataset.features["pair_id"].dtype == "int64"
    assert as_tuples(dataset.to_list()) == rounded(expected)
    assert dataset.to_list() == list(bt_rows(campaign))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [out.name]  # no temp left


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_its_raw_files_load_with_datasets_as_is(judged, tmp_path, fmt):
    campaign, _ = judged
    out = tmp_path / f"raw.{fmt}"
    assert export_pairs(campaign, out, format=fmt, raw=True).rows == 6
    dataset = load(out, fmt, tmp_path / "cache")
    assert dataset.column_names == RAW_SCHEMA.names
    assert sorted(dataset["choice"]) == sorted(r["choice"] for r in raw_rows(campaign))


def test_an_empty_export_keeps_its_schema(tmp_path):
    import datasets

    campaign = make_campaign("empty", n_pairs=3)
    assert export_pairs(campaign, tmp_path / "e.parquet", format="parquet").rows == 0
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == 0 and table.schema.names == BT_SCHEMA.names

    assert export_pairs(campaign, tmp_path / "e_hf", format="hf").rows == 0
    dataset = datasets.load_from_disk(str(tmp_path / "e_hf"))
    assert len(dataset) == 0 and dataset.column_names == BT_SCHEMA.names

    assert export_pairs(campaign, tmp_path / "e.jsonl").rows == 0
    assert (tmp_path / "e.jsonl").read_bytes() == b""


def test_it_replaces_an_earlier_export_whole(judged, tmp_path):
    import datasets

    campaign, _ = judged
    out = tmp_path / "round"
    export_pairs(make_campaign("other"), out, format="hf")  # an earlier, empty export at the same place
    export_pairs(campaign, out, format="hf")
    assert len(datasets.load_from_disk(str(out))) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["round"]


def test_it_replaces_earlier_jsonl_and_parquet_exports_without_being_told(judged, tmp_path):
    campaign, _ = judged
    for fmt, name in (("jsonl", "p.jsonl"), ("parquet", "p.parquet")):
        for raw in (True, False):  # an earlier raw export is ours too
            earlier = make_campaign(f"earlier-{fmt}-{raw}", n_pairs=1)
            export_pairs(earlier, tmp_path / name, format=fmt, raw=raw)
            export_pairs(campaign, tmp_path / name, format=fmt)
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 4
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4
    # A pairs file exported before the round column existed is an earlier export of ours as well.
    rows = [{key: value for key, value in row.items() if key != "round"} for row in bt_rows(campaign)]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    export_pairs(campaign, tmp_path / "old.jsonl", format="jsonl")
    assert "round" in json.loads((tmp_path / "old.jsonl").read_text().splitlines()[0])


def test_the_command_refuses_to_replace_a_directory_that_is_not_an_export(judged, tmp_path):
    campaign, _ = judged
    backups = tmp_path / "backups"
    (backups / "2024").mkdir(parents=True)
    (backups / "2024" / "db.dump").write_bytes(b"precious")
    for args in (["--format", "hf"], ["--format", "jsonl"], ["--format", "parquet", "--raw"]):
        with pytest.raises(CommandError) as refused:
            call_command("export_pairs", campaign.slug, str(backups), *args)
        assert "nothing was exported: refusing to replace the directory" in str(refused.value)
        assert "--force" in str(refused.value)
        assert (backups / "2024" / "db.dump").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups"]  # no temporary left beside it

    call_command("export_pairs", campaign.slug, str(backups), "--format", "hf", "--force")
    assert not (backups / "2024").exists() and len(datasets_load(backups)) == 4


def test_the_command_refuses_to_replace_a_file_that_is_not_an_export(judged, tmp_path):
    import pyarrow as pa

    campaign, _ = judged
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"todo": "call the bank"}\n')
    table = tmp_path / "sales.parquet"
    pq.write_table(pa.table({"month": ["may"], "sales": [3]}), table)
    earlier = tmp_path / "pairs.jsonl"
    export_pairs(campaign, earlier)
    cases = ((notes, ["--format", "jsonl"], "the file"), (table, ["--format", "parquet"], "the file"),
             (earlier, ["--format", "hf"], "the file"))
    for path, args, what in cases:
        before = path.read_bytes()
        with pytest.raises(CommandError, match=f"refusing to replace {what} {path}"):
            call_command("export_pairs", campaign.slug, str(path), *args)
        assert path.read_bytes() == before

    call_command("export_pairs", campaign.slug, str(notes), "--force")
    assert len(notes.read_text().splitlines()) == 4


def datasets_load(path: Path):
    import datasets

    return datasets.load_from_disk(str(path))


def test_an_export_imports_back_with_the_same_preferences(judged, tmp_path):
    campaign, _ = judged
    export_pairs(campaign, tmp_path / "pairs.parquet", format="parquet")
    copy = make_campaign("copy")

    result = import_file(copy, tmp_path / "pairs.parquet")

    assert (result.created, result.skipped) == (4, 0)
    back = [{**row, "labeler": ""} for row in bt_rows(copy)]
    assert as_tuples(back) == as_tuples({**row, "labeler": ""} for row in bt_rows(campaign))


def test_the_command_writes_each_format_and_says_how_many_rows(judged, tmp_path, capsys):
    campaign, _ = judged
    call_command("export_pairs", campaign.slug, str(tmp_path / "p.parquet"), "--format", "parquet")
    assert "Wrote 4 pairs" in capsys.readouterr().out
    call_command("export_pairs", campaign.slug, str(tmp_path / "p.jsonl"), "--no-simulated")
    assert "Wrote 3 pairs" in capsys.readouterr().out
    call_command("export_pairs", campaign.slug, str(tmp_path / "raw"), "--format", "hf", "--raw")
    assert "Wrote 6 judgments" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 4
    with pytest.raises(CommandError, match="no campaign with slug 'nope'"):
        call_command("export_pairs", "nope", str(tmp_path / "x.jsonl"))
    with pytest.raises(CommandError):
        call_command("export_pairs", campaign.slug, str(tmp_path / "x.csv"), "--format", "csv")


# --- chat prompts: TRL's conversational format ---------------------------------------------------

SYSTEM_AND_USER = [{"role": "system", "content": "Answer in one word."},
                   {"role": "user", "content": "Capital of France?"}]
ONE_USER_TURN = [{"role": "user", "content": "What is 2+2?"}]


def message(role, content):
    return [{"role": role, "content": content}]


# What TRL's conversational preference rows hold for each pair once response_a is preferred.
CHAT_EXPECTED = [
    (SYSTEM_AND_USER, message("assistant", "Paris"), message("assistant", "Lyon")),
    (ONE_USER_TURN, message("assistant", "4"), message("assistant", "5")),
    (message("user", "Largest planet?"), message("assistant", "Jupiter"), message("assistant", "Mars")),
]


@pytest.fixture
def chat_judged(labeler):
    """A campaign with a system + user chat prompt, a one-turn chat prompt and a text prompt, each judged
    once for response_a (and once a tie, which no pairs export holds)."""
    campaign = make_campaign("chat", members=[labeler, make_user("second")], ask_strength=False,
                             overlap=2)
    add_pairs(campaign, [PairInput(SYSTEM_AND_USER, "Paris", "Lyon"), PairInput(ONE_USER_TURN, "4", "5"),
                         PairInput("Largest planet?", "Jupiter", "Mars")], notify=False)
    for _ in range(3):
        assignment = claim_next_pair(campaign, labeler).assignment
        left, _ = assignment.shown()
        choice = "a" if left.pk == assignment.pair.response_a_id else "b"
        submit_judgment(assignment_id=assignment.pk, labeler=labeler, choice=choice, milliseconds=900)
    assignment = claim_next_pair(campaign, campaign.members.get(username="second")).assignment
    submit_judgment(assignment_id=assignment.pk, labeler=assignment.labeler, choice="tie", milliseconds=900)
    return campaign


def conversations(rows):
    return sorted(((r["prompt"], r["chosen"], r["rejected"]) for r in rows), key=json.dumps)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_a_campaign_with_chat_prompts_exports_trls_conversational_format(chat_judged, tmp_path, fmt):
    from trl.data_utils import is_conversational

    out = tmp_path / f"pairs.{fmt}"

    result = export_pairs(chat_judged, out, format=fmt)

    assert (result.rows, result.conversational) == (3, True)
    dataset = load(out, fmt, tmp_path / "cache")
    assert dataset.column_names == BT_CHAT_SCHEMA.names
    rows = dataset.to_list()
    # The chat prompts keep their turns (the system turn too); the text prompt is one user message, so
    # the file has one type per column; the responses are one assistant message each.
    assert conversations(rows) == sorted(CHAT_EXPECTED, key=json.dumps)
    assert all(is_conversational(row) for row in rows)
    assert [row["margin"] for row in rows] == [0.0] * 3
    assert {row["labeler"] for row in rows} == {"lena-labeler"}
    if fmt == "jsonl":
        first = json.loads(out.read_text().splitlines()[0])
        assert all(list(m) == ["role", "content"] for m in first["prompt"] + first["chosen"])


def test_the_text_form_can_be_asked_for_and_flattens_turns_as_labelers_saw_them(chat_judged, tmp_path,
                                                                                capsys):
    out = tmp_path / "text.jsonl"
    call_command("export_pairs", chat_judged.slug, str(out), "--trl-format", "standard")
    assert "Wrote 3 pairs to" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows) == sorted([
        ("**system:** Answer in one word.\n\n**user:** Capital of France?", "Paris", "Lyon"),
        ("What is 2+2?", "4", "5"),
        ("Largest planet?", "Jupiter", "Mars"),
    ])
    assert sorted(r["prompt"] for r in rows) == sorted(Prompt.objects.filter(campaign=chat_judged)
                                                       .values_list("text", flat=True))

    call_command("export_pairs", chat_judged.slug, str(out))  # the default, auto: conversational here
    assert "Wrote 3 pairs (conversational: prompts as messages) to" in capsys.readouterr().out
    assert conversations(json.loads(line) for line in out.read_text().splitlines()) == sorted(
        CHAT_EXPECTED, key=json.dumps)
    with pytest.raises(CommandError):
        call_command("export_pairs", chat_judged.slug, str(out), "--trl-format", "sharegpt")
    with pytest.raises(ExportError, match="unknown TRL format 'sharegpt'"):
        export_pairs(chat_judged, tmp_path / "never.jsonl", trl_format="sharegpt")
    assert not (tmp_path / "never.jsonl").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_text_campaign_exports_the_same_bytes_as_before_unless_asked(judged, tmp_path, fmt):
    campaign, expected = judged
    auto = export_pairs(campaign, tmp_path / f"auto.{fmt}", format=fmt)
    export_pairs(campaign, tmp_path / f"text.{fmt}", format=fmt, trl_format="standard")
    assert not auto.conversational
    assert (tmp_path / f"auto.{fmt}").read_bytes() == (tmp_path / f"text.{fmt}").read_bytes()

    result = export_pairs(campaign, tmp_path / f"chat.{fmt}", format=fmt, trl_format="conversational")

    assert result.conversational
    rows = load(tmp_path / f"chat.{fmt}", fmt, tmp_path / "cache").to_list()
    assert conversations(rows) == sorted(
        ((message("user", p), message("assistant", c), message("assistant", r))
         for p, c, r, _, _ in expected), key=json.dumps)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_a_raw_export_keeps_the_turns_of_chat_prompts(chat_judged, tmp_path, fmt):
    out = tmp_path / f"raw.{fmt}"
    assert export_pairs(chat_judged, out, format=fmt, raw=True).rows == 4
    dataset = load(out, fmt, tmp_path / "cache")
    assert dataset.column_names == RAW_CHAT_SCHEMA.names
    by_response = {row["response_a"]: row for row in dataset.to_list()}
    assert by_response["Paris"]["prompt"] == SYSTEM_AND_USER and by_response["Paris"]["response_b"] == "Lyon"
    assert by_response["Jupiter"]["prompt"] == message("user", "Largest planet?")
    assert sorted(row["choice"] for row in dataset.to_list()) == ["a", "a", "a", "tie"]

    export_pairs(chat_judged, out, format=fmt, raw=True, trl_format="standard")
    assert load(out, fmt, tmp_path / "cache2")["prompt"][0] in set(
        Prompt.objects.filter(campaign=chat_judged).values_list("text", flat=True))


def test_conversational_and_text_exports_replace_each_other(chat_judged, judged, tmp_path):
    text_campaign, _ = judged
    for fmt, name in (("jsonl", "p.jsonl"), ("parquet", "p.parquet"), ("hf", "p_hf")):
        for raw in (False, True):
            export_pairs(chat_judged, tmp_path / name, format=fmt, raw=raw)  # an earlier chat export
            export_pairs(text_campaign, tmp_path / name, format=fmt, raw=raw)
            export_pairs(chat_judged, tmp_path / name, format=fmt, raw=raw)
    last = pq.read_table(tmp_path / "p.parquet")
    assert last.schema.field("prompt").type == RAW_CHAT_SCHEMA.field("prompt").type
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "p.parquet", "p_hf"]


def test_a_conversational_export_imports_back_with_its_turns(chat_judged, tmp_path):
    export_pairs(chat_judged, tmp_path / "pairs.parquet", format="parquet")
    copy = make_campaign("copy")

    result = import_file(copy, tmp_path / "pairs.parquet")

    assert (result.created, result.skipped) == (3, 0)
    assert Prompt.objects.get(campaign=copy, text__contains="Capital").turns == SYSTEM_AND_USER
    assert conversations(bt_rows(copy, conversational=True)) == conversations(
        bt_rows(chat_judged, conversational=True))


# --- the download button -------------------------------------------------------------------------

def files_held_open_under(folder: Path) -> list[str]:
    """Files this process still holds open inside folder (deleted ones included)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


def download(client, campaign, **params):
    response = client.get(f"/campaigns/{campaign.slug}/export/", params)
    assert response.status_code == 200 and response.streaming
    body = b"".join(response.streaming_content)  # at its end the test client closes the response
    return response, body


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads open files from /proc")
def test_web_exports_leave_no_temporary_files_behind(judged, reviewer, tmp_path, monkeypatch):
    campaign, expected = judged
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    client = Client()
    client.force_login(reviewer)

    for _ in range(5):
        response, body = download(client, campaign, format="jsonl")
        assert response["Content-Disposition"] == 'attachment; filename="exp-pairs.jsonl"'
        assert as_tuples(json.loads(line) for line in body.decode().splitlines()) == rounded(expected)
        response, body = download(client, campaign, format="parquet", raw="1")
        assert response["Content-Disposition"] == 'attachment; filename="exp-judgments.parquet"'
        assert pq.read_table(io.BytesIO(body)).num_rows == 6

    assert list(scratch.iterdir()) == []
    assert files_held_open_under(scratch) == []  # closed, so their space is back


def test_a_web_export_streams_block_by_block_under_asgi(judged, reviewer):
    campaign, _ = judged
    client = Client()
    client.force_login(reviewer)
    _, whole = download(client, campaign, format="jsonl", raw="1")
    response = client.get(f"/campaigns/{campaign.slug}/export/", {"format": "jsonl", "raw": "1"})
    response.block_size = 256

    async def consume():
        return [chunk async for chunk in response]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Django warns when it must read a whole file into memory first
        chunks = asyncio.run(consume())
    assert list(response.streaming_content) == []  # read to its end: the test client closes it
    assert len(chunks) == -(-len(whole) // 256) and b"".join(chunks) == whole


def test_a_chat_campaigns_page_and_downloads_offer_both_formats(chat_judged, judged, reviewer, tmp_path):
    client = Client()
    client.force_login(reviewer)
    page = client.get(f"/campaigns/{chat_judged.slug}/").content.decode()
    assert 'id="export-conversational"' in page and "trl_format=standard" in page
    assert 'id="export-conversational"' not in client.get(f"/campaigns/{judged[0].slug}/").content.decode()

    for trl_format in ("auto", "standard", "conversational"):
        _, body = download(client, chat_judged, format="parquet", trl_format=trl_format)
        out = tmp_path / f"{trl_format}.parquet"
        export_pairs(chat_judged, out, format="parquet", trl_format=trl_format)
        assert body == out.read_bytes()
    _, body = download(client, chat_judged, format="jsonl")
    assert conversations(json.loads(line) for line in body.decode().splitlines()) == sorted(
        CHAT_EXPECTED, key=json.dumps)
    refused = client.get(f"/campaigns/{chat_judged.slug}/export/", {"trl_format": "sharegpt"})
    assert refused.status_code == 400 and b"trl_format" in refused.content


@pytest.mark.slow
def test_trl_reward_trainer_takes_a_step_on_the_export(labeler, tmp_path):
    """TRL 1.16's RewardTrainer reads the exported file as is, margin included, and updates the model."""
    import datasets
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from training.engine.common import default_reward_backbone

    campaign = make_campaign("trl", n_pairs=8, members=[labeler], ask_strength=True)
    for i in range(8):
        judge(campaign, labeler, "ab"[i % 2], 4 if i < 6 else 2)
    export_pairs(campaign, tmp_path / "pairs.jsonl")
    dataset = datasets.load_dataset("json", data_files=str(tmp_path / "pairs.jsonl"), split="train",
                                    cache_dir=str(tmp_path / "cache"))

    tokenizer = AutoTokenizer.from_pretrained(default_reward_backbone())  # the MiniLM's vocabulary, offline
    tokenizer.eos_token = tokenizer.sep_token  # TRL appends EOS; BERT's tokenizer names none
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    before = [p.detach().clone() for p in model.parameters()]
    config = RewardConfig(output_dir=str(tmp_path / "out"), max_steps=1,
                          per_device_train_batch_size=len(dataset), learning_rate=1e-2, max_length=64,
                          use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                          disable_tqdm=True, activation_checkpointing=False)
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)

    output = trainer.train()

    assert output.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # At initialisation both rewards are ~0, so TRL's loss -logsigmoid(r_c - r_r - margin) is about the mean
    # softplus(margin): it read our margins (without them the loss would be log 2).
    margins = dataset["margin"]
    expected = sum(math.log1p(math.exp(m)) for m in margins) / len(margins)
    assert sorted(margins) == [1 / 3] * 2 + [1.0] * 6
    assert abs(output.training_loss - expected) < 0.02 and abs(expected - math.log(2)) > 0.2


@pytest.fixture
def tiny_qwen2(tmp_path, monkeypatch):
    """Directories of a tiny random Qwen2 policy and reward model, with Qwen2.5's chat template; offline."""
    import huggingface_hub.constants

    from demo.tiny_models import build_policy, build_reward

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    return build_policy("qwen2", tmp_path / "policy"), build_reward("qwen2", tmp_path / "reward")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_trl_reward_and_dpo_trainers_take_a_step_on_the_conversational_export(chat_judged, tiny_qwen2,
                                                                              tmp_path, fmt):
    """TRL 1.16's RewardTrainer and DPOTrainer read the conversational export as is, render it with the
    model's chat template (the system turn included) and update the model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    policy_dir, reward_dir = tiny_qwen2
    export_pairs(chat_judged, tmp_path / f"pairs.{fmt}", format=fmt)
    dataset = load(tmp_path / f"pairs.{fmt}", fmt, tmp_path / "cache")
    system = dataset["prompt"].index(SYSTEM_AND_USER)
    one_step = dict(max_steps=1, per_device_train_batch_size=len(dataset), learning_rate=1e-2, max_length=64,
                    use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True)

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    before = [p.detach().clone() for p in reward_model.parameters()]
    config = RewardConfig(output_dir=str(tmp_path / "rm"), **one_step)
    rewards = RewardTrainer(model=reward_model, args=config, train_dataset=dataset, processing_class=tokenizer)
    assert tokenizer.decode(rewards.train_dataset[system]["chosen_ids"]) == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis<|im_end|>\n")
    assert rewards.train().global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, reward_model.parameters()))

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    dpo = DPOTrainer(model=str(policy_dir), args=DPOConfig(output_dir=str(tmp_path / "dpo"), **one_step),
                     train_dataset=dataset, processing_class=tokenizer)
    before = [p.detach().clone() for p in dpo.model.parameters()]
    prepared = dpo.train_dataset[system]
    assert tokenizer.decode(prepared["prompt_ids"]) == tokenizer.apply_chat_template(
        SYSTEM_AND_USER, tokenize=False, add_generation_prompt=True)
    assert (tokenizer.decode(prepared["chosen_ids"]), tokenizer.decode(prepared["rejected_ids"])) == (
        "Paris<|im_end|>\n", "Lyon<|im_end|>\n")
    output = dpo.train()
    assert output.global_step == 1 and abs(output.training_loss - math.log(2)) < 1e-3  # policy == reference
    assert any(not torch.equal(a, b) for a, b in zip(before, dpo.model.parameters()))


def test_the_raw_export_carries_each_axis_s_gold_answer_beside_its_choice(labeler, tmp_path):
    from annotate.models import Pair
    from tests.test_axes import judge_axes, two_axes

    campaign = two_axes(labeler, n_pairs=3, gold_rate=1.0)
    both, first_only, plain = Pair.objects.filter(campaign=campaign).order_by("id")
    Pair.objects.filter(pk=both.pk).update(gold_choice="a", gold_choices={"harmless": "b"})
    Pair.objects.filter(pk=first_only.pk).update(gold_choice="tie")
    for _ in range(3):
        judge_axes(campaign, labeler, "a", "b", strength=2)
    call_command("export_pairs", campaign.slug, str(tmp_path / "raw.jsonl"), "--raw")
    export_pairs(campaign, tmp_path / "raw.parquet", format="parquet", raw=True)
    expected = {both.pk: ("a", [("helpful", "a"), ("harmless", "b")]),
                first_only.pk: ("tie", [("helpful", "tie"), ("harmless", "")]),
                plain.pk: ("", [("helpful", ""), ("harmless", "")])}
    jsonl = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    for rows in (jsonl, pq.read_table(tmp_path / "raw.parquet").to_pylist()):
        assert {row["pair_id"]: (row["gold_choice"], [(axis["axis"], axis["gold"]) for axis in row["axes"]])
                for row in rows} == expected
