"""The quality report of a campaign judged through the real queue by simulated labelers of known
behaviour: `manage.py quality_report --json`, the quality page for each persona, and excluding a
flagged labeler from it."""

from __future__ import annotations

import io
import json
import random

import pytest
from django.core.management import call_command
from django.test import Client

from annotate import agreement
from annotate.actions import PairInput, add_pairs, claim_next_pair, submit_judgment
from annotate.models import Exclusion, Judgment, Pair
from tests.conftest import PASSWORD, make_campaign, make_user

pytestmark = pytest.mark.django_db

PAIRS, GOLD = 100, 12


def truth_on_left(assignment) -> bool:
    left, _ = assignment.shown()
    return left.text.startswith("good")


def behaviours(rng: random.Random):
    """name -> (choose(assignment) -> "a"/"b" in shown terms, milliseconds)."""
    def right(assignment, accuracy):
        correct = "a" if truth_on_left(assignment) else "b"
        return correct if rng.random() < accuracy else ("b" if correct == "a" else "a")

    return {
        "lefty": (lambda a: "a", 9000),  # always picks the left side
        "rando": (lambda a: rng.choice("ab"), 9000),  # answers at random
        "goldie": (lambda a: right(a, 0.95), 12000),  # agrees with the truth 95% of the time
        "carol": (lambda a: right(a, 1.0), 20000),  # careful
        "cora": (lambda a: right(a, 0.98), 18000),  # careful
    }


@pytest.fixture
def judged_campaign():
    random.seed(15)  # the queue's shown order and gold draws
    rng = random.Random(15)
    people = {name: make_user(name) for name in ("lefty", "rando", "goldie", "carol", "cora")}
    campaign = make_campaign(slug="trust", members=people.values(), overlap=5, allow_tie=False,
                             allow_both_bad=False, ask_strength=False, gold_rate=0.3)
    # The better response is response_a on even questions and response_b on odd ones.
    add_pairs(campaign, [PairInput(f"Question {i}?", *((f"good answer {i}", f"poor answer {i}") if i % 2 == 0
                                                       else (f"poor answer {i}", f"good answer {i}")))
                         for i in range(PAIRS + GOLD)], notify=False)
    gold = Pair.objects.filter(campaign=campaign).order_by("id")[:GOLD]
    for pair in gold:  # test setup: mark the first pairs as gold items with their known answer
        known = "a" if pair.response_a.text.startswith("good") else "b"
        Pair.objects.filter(pk=pair.pk).update(gold_choice=known)
    plans = behaviours(rng)
    idle: set[str] = set()
    while len(idle) < len(people):
        for name, user in people.items():
            if name in idle:
                continue
            claim = claim_next_pair(campaign, user)
            if claim.assignment is None:
                idle.add(name)
                continue
            choose, ms = plans[name]
            submit_judgment(assignment_id=claim.assignment.pk, labeler=user, choice=choose(claim.assignment),
                            milliseconds=ms)
    return campaign, people


def report_json(campaign) -> dict:
    out = io.StringIO()
    call_command("quality_report", campaign.slug, "--json", stdout=out)
    return json.loads(out.getvalue())


def test_it_flags_the_left_picker_and_the_random_labeler_and_neither_careful_one(judged_campaign):
    campaign, people = judged_campaign
    report = report_json(campaign)
    assert report["judgments"] == Judgment.objects.filter(pair__campaign=campaign).count() >= 5 * PAIRS
    assert set(report["agreement"]) >= {"percent", "krippendorff_alpha", "items"}
    assert report["agreement"]["items"] >= PAIRS
    assert 0.0 < report["agreement"]["krippendorff_alpha"] < 0.9
    assert set(report["position_bias"]) >= {"left_rate", "p_value", "n"}
    labelers = {row["username"]: row for row in report["labelers"]}
    assert set(labelers) == set(people)
    for row in labelers.values():
        assert set(row) >= {"username", "judgments", "gold_accuracy", "gold_n", "left_rate", "left_p_value",
                            "agreement_with_majority", "median_seconds", "too_fast_rate", "excluded", "flags"}
    lefty, rando = labelers["lefty"], labelers["rando"]
    assert lefty["left_rate"] == 1.0 and lefty["left_p_value"] < 1e-9
    assert any(flag.startswith("position bias") for flag in lefty["flags"])
    assert any(flag.startswith("low agreement with the majority") for flag in rando["flags"])
    # Both answer gold items at about chance (50%), under the 70% bar, from 12 gold items each.
    for row in (lefty, rando):
        assert row["gold_n"] == GOLD and row["gold_accuracy"] < agreement.GOLD_ACCURACY_MIN
        assert f"low gold accuracy: {row['gold_accuracy']:.0%} of {GOLD} gold items (under 70%)" in row["flags"]
    goldie = labelers["goldie"]
    assert goldie["gold_accuracy"] >= agreement.GOLD_ACCURACY_MIN and goldie["flags"] == []
    assert labelers["carol"]["flags"] == [] and labelers["cora"]["flags"] == []
    assert labelers["carol"]["gold_n"] >= 10 and labelers["carol"]["gold_accuracy"] == 1.0
    assert labelers["carol"]["median_seconds"] == 20.0 and labelers["carol"]["excluded"] == 0
    # Every two labelers judged the same pairs: a kappa for each of the ten pairs of them.
    assert len(report["kappas"]) == 10

    out = io.StringIO()
    call_command("quality_report", campaign.slug, stdout=out)
    text = out.getvalue()
    assert "Krippendorff's alpha" in text and "FLAG position bias" in text


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_the_quality_page_shows_reviewers_the_flags_and_lets_admins_exclude(judged_campaign, reviewer,
                                                                            admin_user):
    campaign, people = judged_campaign
    url = f"/campaigns/{campaign.slug}/quality/"
    assert client_for(people["carol"]).get(url).status_code == 404  # labelers do not see it
    page = client_for(reviewer).get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "position bias: the left side won 100%" in html and "low agreement with the majority" in html
    assert "low gold accuracy" in html
    rows = {row["username"]: row for row in report_json(campaign)["labelers"]}
    lefty_p = rows["lefty"]["left_p_value"]
    assert f"(p = {lefty_p:.2g})" in html  # a tiny p-value in two significant digits, not a rounded 0
    assert "Include again" not in html and 'id="exclude-form"' not in html  # reviewers only read
    refused = client_for(reviewer).post(url, {"action": "exclude", "labeler": "lefty", "reason": "x"})
    assert refused.status_code == 404
    detail = client_for(reviewer).get(f"/campaigns/{campaign.slug}/")
    assert url in detail.content.decode()

    admin = client_for(admin_user)
    refused = admin.post(url, {"action": "exclude", "labeler": "nobody", "reason": "flagged"})
    assert refused.status_code == 400
    assert "labeler: no labeler &#x27;nobody&#x27; judged in this campaign" in refused.content.decode()
    assert not Exclusion.objects.exists()

    done = admin.post(url, {"action": "exclude", "labeler": "lefty", "reason": "always picks the left side"})
    assert done.status_code == 302
    lefty_count = Judgment.objects.filter(labeler=people["lefty"]).count()
    rows = {row["username"]: row for row in report_json(campaign)["labelers"]}
    assert rows["lefty"]["excluded"] == lefty_count and rows["carol"]["excluded"] == 0
    html = admin.get(url).content.decode()
    assert "lefty&#x27;s judgments: always picks the left side" in html
    detail = admin.get(f"/campaigns/{campaign.slug}/").content.decode()
    assert f"{lefty_count} judgments excluded by an admin" in detail

    exclusion = Exclusion.objects.get()
    assert admin.post(url, {"action": "include", "exclusion": exclusion.pk}).status_code == 302
    assert report_json(campaign)["labelers"][0]["excluded"] == 0
    assert "Nothing is excluded" in admin.get(url).content.decode()


def test_the_page_shows_cached_statistics_and_queues_one_refresh_when_stale(
        reviewer, monkeypatch, django_capture_on_commit_callbacks):
    from annotate import quality, tasks

    people = [make_user("pat"), make_user("quin")]
    campaign = make_campaign(slug="cached", n_pairs=4, members=people, overlap=2, ask_strength=False)
    url = f"/campaigns/{campaign.slug}/quality/"
    client = client_for(reviewer)
    assert "No judgments by labelers yet" in client.get(url).content.decode()  # the first view computes

    for person in people:  # new judgments arrive after the statistics were computed
        claim = claim_next_pair(campaign, person)
        submit_judgment(assignment_id=claim.assignment.pk, labeler=person, choice="a")
    queued = []
    assert quality.REFRESH_TASK == tasks.refresh_quality_report.name  # what is sent is what refreshes
    monkeypatch.setattr(quality, "send_refresh", lambda campaign_id: queued.append(campaign_id))
    with django_capture_on_commit_callbacks(execute=True):
        assert "No judgments by labelers yet" in client.get(url).content.decode()  # fresh enough: cached
    assert queued == []

    monkeypatch.setattr(quality, "FRESH_SECONDS", -1)  # now stale: shown as is, and one refresh queued
    with django_capture_on_commit_callbacks(execute=True):
        assert "No judgments by labelers yet" in client.get(url).content.decode()
        assert "No judgments by labelers yet" in client.get(url).content.decode()
    assert queued == [campaign.pk]

    tasks.refresh_quality_report(campaign.pk)  # what the worker runs
    monkeypatch.setattr(quality, "FRESH_SECONDS", 60)
    html = client.get(url).content.decode()
    assert "pat" in html and "quin" in html and "No judgments by labelers yet" not in html
