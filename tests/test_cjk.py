"""Campaigns in Chinese, Japanese and Korean: the reading-speed flag counts characters of scripts
written without spaces, slugs and search accept them, and texts go through import, labeling over HTTP,
export and re-import, and the demo policy's tokenizer, unchanged."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from django.core.management import call_command
from django.test import Client
from django.utils.html import escape

from annotate.actions import PairInput, add_pairs, claim_next_pair, submit_judgment
from annotate.models import Assignment, Campaign, Pair, Prompt
from tests.conftest import make_campaign, make_user

pytestmark = pytest.mark.django_db

# The three test prompts of the book this project implements, then Japanese and Korean ones.
PROMPTS = ["请用简单的语言解释量子力学", "写一个关于友谊的短故事", "如何学习编程？给出具体建议",
           "量子力学を簡単な言葉で説明してください", "友情についての短い物語を書いてください",
           "프로그래밍을 어떻게 배우면 좋을까요? 구체적인 조언을 주세요", "우정에 관한 짧은 이야기를 써 주세요"]
ANSWER = ("量子力学研究非常小的东西，比如原子和光子。它们的行为和我们日常看到的物体不一样：一个粒子可以同时处在"
          "几种状态，直到我们去测量它。")


def test_it_flags_a_labeler_who_judges_chinese_answers_faster_than_reading_them():
    # Each answer is about 60 characters: both take about 12 s to read at the bound (10 characters a second).
    people = {name: make_user(name) for name in ("speedy", "steady")}
    campaign = make_campaign(slug="zh-speed", members=people.values(), overlap=2, allow_tie=False,
                             allow_both_bad=False, ask_strength=False)
    add_pairs(campaign, [PairInput(f"{PROMPTS[i % 3]}（{i}）", f"{ANSWER}第{i}个回答。", f"第{i}个回答：{ANSWER}")
                         for i in range(25)], notify=False)
    seconds = {"speedy": 3, "steady": 15}
    for name, user in people.items():
        while (claim := claim_next_pair(campaign, user)).assignment is not None:
            left = "a" if claim.assignment.a_on_left else "b"  # always response A, wherever it was shown
            submit_judgment(assignment_id=claim.assignment.pk, labeler=user, choice=left,
                            milliseconds=seconds[name] * 1000)
    out = io.StringIO()
    call_command("quality_report", campaign.slug, "--json", stdout=out)
    labelers = {row["username"]: row for row in json.loads(out.getvalue())["labelers"]}
    speedy, steady = labelers["speedy"], labelers["steady"]
    assert speedy["judgments"] == steady["judgments"] == 25
    assert speedy["too_fast_rate"] == 1.0
    assert any(flag.startswith("too fast: 100% of 25 judgments") for flag in speedy["flags"])
    assert steady["too_fast_rate"] == 0.0 and steady["flags"] == []


def test_campaigns_take_slugs_in_any_script_through_the_api_the_admin_and_the_pages(admin_user, labeler):
    from tests.test_api import api_for

    api = api_for(admin_user)
    created = api.post("/campaigns", {"slug": "中文-测试", "name": "中文测试"})
    assert created.status_code == 201 and created.json()["slug"] == "中文-测试"
    assert api.get("/campaigns/中文-测试").json()["name"] == "中文测试"
    assert api.post("/campaigns", {"slug": "中文 测试!", "name": "x"}).status_code == 422

    admin = Client()
    admin.force_login(admin_user)
    form = admin.get("/admin/annotate/campaign/add/").context["adminform"].form
    data = {}
    for name, field in form.fields.items():  # the add form as it comes, defaults filled in
        value = form.get_initial_for_field(field, name)
        if isinstance(value, datetime):  # the admin's split date and time inputs
            data[f"{name}_0"], data[f"{name}_1"] = value.date().isoformat(), value.time().strftime("%H:%M:%S")
        elif value is not None and value is not False:
            data[name] = value
    data.update(slug="日本語-ラベル", name="日本語のラベル", members=[labeler.pk])
    response = admin.post("/admin/annotate/campaign/add/", data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    campaign = Campaign.objects.get(slug="日本語-ラベル")
    add_pairs(campaign, [PairInput(PROMPTS[3], "答え一", "答え二")], notify=False)

    assert "日本語のラベル" in admin.get("/admin/annotate/campaign/", {"q": "日本語"}).content.decode()
    prompt = Prompt.objects.get(campaign=campaign)
    found = admin.get("/admin/annotate/prompt/", {"q": "簡単な言葉"}).content.decode()
    assert f"/admin/annotate/prompt/{prompt.pk}/change/" in found
    assert admin.get(campaign.get_absolute_url()).status_code == 200

    client = Client()
    client.force_login(labeler)
    page = client.get(campaign.label_url())
    assert page.status_code == 200 and PROMPTS[3] in page.content.decode()


# Each answer in its prompt's language, with full-width punctuation, a character outside the Basic
# Multilingual Plane (𠮷, two UTF-16 units in a browser) and Korean in decomposed jamo (NFD), which
# any normalisation on the way would change.
def rows() -> list[dict]:
    hangul_nfd = unicodedata.normalize("NFD", "한국어")
    answers = [("量子力学描述很小的粒子，它们可以同时处在几种状态。", "量子力学就是物理。"),
               ("小明和小红是好朋友。有一天，他们一起去爬山……", "友谊很重要。"),
               ("每天写一点代码：先学Python，再做小项目。", "多看书。"),
               ("量子力学は、とても小さな粒子のふるまいを説明する学問です。", "物理です。"),
               ("昔々、𠮷田さんと友だちが山へ行きました。", "友情は大切です。"),
               (f"매일 조금씩 코드를 작성하세요. {hangul_nfd} 자료도 좋아요.", "책을 읽으세요."),
               ("두 친구가 함께 바다에 갔습니다.", "우정은 소중합니다.")]
    return [{"prompt": prompt, "response_a": a, "response_b": b} for prompt, (a, b) in zip(PROMPTS, answers)]


def write(path: Path, fmt: str, table: list[dict]) -> Path:
    """The rows as an import file of one format."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(table), path)
    else:
        Dataset.from_list(table).save_to_disk(str(path))
    return path


def stored(campaign) -> list[tuple[str, str, str]]:
    return [(pair.prompt.text, pair.response_a.text, pair.response_b.text)
            for pair in Pair.objects.filter(campaign=campaign).select_related("prompt", "response_a",
                                                                              "response_b").order_by("id")]


def utf8(triples) -> list[tuple[bytes, ...]]:
    return [tuple(text.encode("utf-8") for text in triple) for triple in triples]


def label_every_pair_over_http(campaign, user) -> int:
    """Judge every pair on the page, always for response_a, as the page's form posts it."""
    client = Client()
    client.force_login(user)
    page, judged = client.get(campaign.label_url()), 0
    while match := re.search(rb'data-assignment="(\d+)"', page.content):
        assignment = Assignment.objects.get(pk=int(match.group(1)))
        left, right = assignment.shown()
        html = page.content.decode()
        assert escape(left.text) in html and escape(right.text) in html
        choice = "a" if assignment.a_on_left else "b"
        page = client.post(f"{campaign.label_url()}{assignment.pk}/judge/", {"choice": choice, "ms": "30000"},
                           HTTP_HX_REQUEST="true")
        assert page.status_code == 200
        judged += 1
    return judged


@pytest.mark.parametrize("fmt, name", [("jsonl", "pairs.jsonl"), ("json", "pairs.json"), ("csv", "pairs.csv"),
                                       ("parquet", "pairs.parquet"), ("hf", "pairs")])
def test_cjk_pairs_import_label_export_and_import_again_byte_for_byte(fmt, name, tmp_path, labeler):
    table = rows()
    expected = utf8((row["prompt"], row["response_a"], row["response_b"]) for row in table)
    campaign = make_campaign(slug=f"中日韩-{fmt}", members=[labeler], overlap=1, ask_strength=False)
    call_command("import_pairs", campaign.slug, str(write(tmp_path / name, fmt, table)), stdout=io.StringIO())
    assert utf8(stored(campaign)) == expected

    assert label_every_pair_over_http(campaign, labeler) == len(table)
    out = tmp_path / "export.jsonl"
    call_command("export_pairs", campaign.slug, str(out), stdout=io.StringIO())
    exported = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert utf8((row["prompt"], row["chosen"], row["rejected"]) for row in exported) == expected

    again = make_campaign(slug=f"再-{fmt}")
    call_command("import_pairs", again.slug, str(out), stdout=io.StringIO())
    assert utf8(stored(again)) == expected
    again_out = tmp_path / "again.jsonl"
    call_command("export_pairs", again.slug, str(again_out), stdout=io.StringIO())
    strip = [{**row, "pair_id": 0, "labeler": ""} for row in exported]
    assert [{**json.loads(line), "pair_id": 0} for line in again_out.read_text(encoding="utf-8").splitlines()] == strip


def every_text() -> list[str]:
    return [unicodedata.normalize("NFC", text) for row in rows() for text in row.values()]


def test_the_demo_policy_tokenizes_and_decodes_cjk_text_unchanged_and_samples_from_it():
    import torch

    from demo.policy import DEFAULT_TINY_DIR, ensure_demo_policy
    from training.engine.common import load_causal_lm, render_prompt
    from training.engine.sample import generate

    model, tokenizer = load_causal_lm(str(ensure_demo_policy(Path(__file__).resolve().parents[1] / DEFAULT_TINY_DIR,
                                                             preset="tiny")), torch.device("cpu"))
    for text in every_text():
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids  # byte-level BPE: every character is its UTF-8 bytes
        # GPT-2's byte-level pre-tokenizer puts a space before any text it encodes (add_prefix_space).
        assert tokenizer.decode(ids, skip_special_tokens=True) == " " + text
    rollout = generate(model, tokenizer, [render_prompt(tokenizer, prompt) for prompt in PROMPTS], max_new_tokens=8,
                       generator=torch.Generator().manual_seed(0))
    assert len(rollout.texts) == len(PROMPTS) and all(isinstance(text, str) for text in rollout.texts)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_a_chat_models_template_carries_cjk_turns_through_its_tokenizer_unchanged(family):
    from demo.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(family)
    for row in rows():
        turns = [{"role": "user", "content": unicodedata.normalize("NFC", row["prompt"])},
                 {"role": "assistant", "content": unicodedata.normalize("NFC", row["response_a"])}]
        rendered = tokenizer.apply_chat_template(turns, tokenize=False)
        assert all(turn["content"] in rendered for turn in turns)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == rendered
