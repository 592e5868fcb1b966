"""Campaigns in Chinese, Japanese and Korean: the reading-speed flag counts characters of scripts
written without spaces, slugs and search accept them, and texts go through import, labeling over HTTP,
export and re-import, and the demo policy's tokenizer, unchanged."""

from __future__ import annotations

import io
import json
from datetime import datetime

import pytest
from django.core.management import call_command

from annotate.actions import PairInput, add_pairs, claim_next_pair, submit_judgment
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
    from django.test import Client

    from annotate.models import Campaign, Prompt
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
