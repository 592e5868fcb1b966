"""AI labelers: a model asked a campaign's written principles about each pair in both orders, through the same
queue as people, against a real OpenAI-compatible server (`transformers serve`) and on the local-model path.

The judges are tiny chat models trained here for a few steps (demo/tiny_models.build_letter_judge) so that
their answers are known: "good" names the response that says good, "first" always answers (A).
"""

from __future__ import annotations

import io
import random
import re
import shutil
import time

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from annotate.actions import (
    PairInput,
    add_pairs,
    claim_next_pair,
    create_ai_labeler,
    record_ai_judgment,
    save_axis,
    submit_judgment,
)
from annotate.models import AILabeler, AILabelingRun, AIVerdict, Assignment, Axis, Campaign, Judgment, Pair
from api.actions import create_token
from demo.tiny_models import LETTER_PRINCIPLE, build_letter_judge, build_policy, letter_judge_pair
from tests.conftest import make_campaign, make_user
from tests.services import free_port, serve_chat_models
from tests.worker import Worker
from training import runner
from training.actions import launch_round
from training.ai_labeling import AILabelingError, ai_label, run_ai_labeling
from training.config import build_config
from training.engine.data import load_pairs
from training.engine.judge import Answer
from training.models import Job

pytestmark = pytest.mark.django_db

PRINCIPLE = LETTER_PRINCIPLE  # the CAI paper's, which the letter judges were trained on


@pytest.fixture(scope="module")
def judges(request, tmp_path_factory):
    """The judges, built once and kept in pytest's cache folder (a few minutes on two busy cores)."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("ai-judges-v2") if cache is not None else tmp_path_factory.mktemp("judges")
    built = {}
    for name, build in {"good": lambda out: build_letter_judge(out, "good", steps=120),
                        "first": lambda out: build_letter_judge(out, "first", steps=15),
                        "random": lambda out: build_policy("qwen2", out)}.items():
        if not (folder / name / "model.safetensors").exists():
            shutil.rmtree(folder / f"{name}.tmp", ignore_errors=True)
            build(folder / f"{name}.tmp")
            (folder / f"{name}.tmp").rename(folder / name)
        built[name] = str(folder / name)
    return built


@pytest.fixture(scope="module")
def server():
    with serve_chat_models() as url:
        yield url


def good_bad_campaign(n=6, **options):
    """Pairs whose better response says "good", on either side, like those the letter judges learnt from."""
    campaign = make_campaign(slug="ai", allow_tie=True, **options)
    rng = random.Random(7)
    items = []
    for i in range(n):
        prompt, good, bad = letter_judge_pair(rng)
        items.append(PairInput(prompt, *((good, bad) if i % 2 else (bad, good))))
    add_pairs(campaign, items, notify=False)
    return campaign


def labeler_of(campaign, model, **options):
    options.setdefault("kind", AILabeler.LOCAL)
    return create_ai_labeler(campaign, name=options.pop("name", "judge"), model=model, principles=[PRINCIPLE],
                             **options)


def says_good(judgment: Judgment) -> bool:
    chosen, _ = judgment.chosen_rejected()
    return chosen.text.endswith("good")


def test_it_judges_locally_keeping_both_orders_and_strength_from_log_probabilities(judges):
    campaign = good_bad_campaign()
    labeler = labeler_of(campaign, judges["good"])
    result = ai_label(labeler, count=6)
    # A tiny judge errs now and then; an error in one order is a disagreement, skipped, never a wrong judgment.
    assert result.judgments + result.skipped == 6 and result.judgments >= 4 and result.disagreed == result.skipped
    judgments = list(Judgment.objects.select_related("pair__response_a", "pair__response_b"))
    assert all(j.source == Judgment.AI and j.labeler.username == "ai-ai-judge" for j in judgments)
    assert all(says_good(j) for j in judgments)
    # Each went through the queue (a completed lease), and both orders are stored with what was sent.
    assert Assignment.objects.filter(labeler=labeler.account, completed_at__isnull=False).count() == result.judgments
    for verdict in AIVerdict.objects.select_related("judgment", "pair__response_a", "pair__response_b"):
        assert verdict.principle == PRINCIPLE and verdict.model == judges["good"]
        first_shown = verdict.pair.response_a.text if verdict.a_first else verdict.pair.response_b.text
        assert f"(A) {first_shown}" in verdict.prompt_first[0]["content"]
        assert f"(B) {first_shown}" in verdict.prompt_swapped[0]["content"]
        assert {verdict.answer_first, verdict.answer_swapped} <= {"A", "B"}
        if verdict.outcome == AIVerdict.DISAGREED:
            assert verdict.judgment is None and verdict.choice_first != verdict.choice_swapped
            continue
        assert verdict.outcome == AIVerdict.AGREED
        assert verdict.choice_first == verdict.choice_swapped == verdict.judgment.choice
        for prob_a in (verdict.prob_a_first, verdict.prob_a_swapped):
            assert (prob_a if verdict.judgment.choice == "a" else 1 - prob_a) > 0.5
    strengths = {j.strength for j in judgments}
    assert strengths <= {1, 2, 3, 4} and max(strengths) >= 3


@pytest.mark.parametrize("on_disagreement", [AILabeler.SKIP, AILabeler.TIE])
def test_it_catches_a_model_that_always_picks_the_first_answer_by_the_swap(judges, on_disagreement):
    campaign = good_bad_campaign(n=4)
    labeler = labeler_of(campaign, judges["first"], on_disagreement=on_disagreement)
    result = ai_label(labeler, count=4)
    assert result.disagreed == 4
    verdicts = list(AIVerdict.objects.all())
    assert len(verdicts) == 4 and all(v.outcome == AIVerdict.DISAGREED for v in verdicts)
    assert all(v.answer_first == v.answer_swapped == "A" for v in verdicts)
    if on_disagreement == AILabeler.SKIP:
        assert result.skipped == 4 and not Judgment.objects.exists()
        assert Assignment.objects.filter(labeler=labeler.account, skipped=True).count() == 4
    else:
        assert result.judgments == 4
        assert set(Judgment.objects.values_list("choice", flat=True)) == {Judgment.TIE}


def test_it_judges_through_a_real_openai_compatible_server_with_the_command(judges, server):
    campaign = good_bad_campaign(n=4)
    create_ai_labeler(campaign, name="served", kind=AILabeler.ENDPOINT, base_url=server, model=judges["good"],
                      principles=[PRINCIPLE])
    out = io.StringIO()
    call_command("ai_label", "ai", "--count", "3", stdout=out)
    assert "recorded 3 judgments" in out.getvalue()
    judgments = list(Judgment.objects.select_related("pair__response_a", "pair__response_b"))
    assert len(judgments) == 3 and all(says_good(j) and j.source == Judgment.AI for j in judgments)
    # transformers serve returns no log-probabilities: the strength is the lowest, the probabilities unknown.
    assert {j.strength for j in judgments} == {1}
    assert not AIVerdict.objects.filter(prob_a_first__isnull=False).exists()
    assert set(AIVerdict.objects.values_list("answer_first", flat=True)) <= {"A", "B"}


def test_it_skips_a_pair_whose_answer_names_neither_response(judges, server):
    campaign = good_bad_campaign(n=2)
    labeler = create_ai_labeler(campaign, name="babbler", kind=AILabeler.ENDPOINT, base_url=server,
                                model=judges["random"], principles=[PRINCIPLE])
    result = ai_label(labeler, count=2)
    assert result.malformed == 2 and result.skipped == 2 and not Judgment.objects.exists()
    assert all(v.outcome == AIVerdict.MALFORMED for v in AIVerdict.objects.all())


def test_it_fails_with_the_reason_and_stores_nothing_when_the_endpoint_is_down_or_slow(judges, server):
    campaign = good_bad_campaign(n=2)
    create_ai_labeler(campaign, name="down", kind=AILabeler.ENDPOINT, base_url=f"http://127.0.0.1:{free_port()}/v1",
                      model=judges["good"], principles=[PRINCIPLE], max_retries=0)
    with pytest.raises(CommandError, match="AI labeler down stopped: the endpoint .* failed: APIConnectionError"):
        call_command("ai_label", "ai", "--labeler", "down", "--count", "2", stdout=io.StringIO())
    slow = create_ai_labeler(campaign, name="slow", kind=AILabeler.ENDPOINT, base_url=server, model=judges["good"],
                             principles=[PRINCIPLE], max_retries=1, timeout_seconds=0.001)
    with pytest.raises(AILabelingError, match="APITimeoutError"):
        ai_label(slow, count=2)
    assert not Judgment.objects.exists() and not AIVerdict.objects.exists()
    # The leases went back: the pairs are open to anyone at once.
    assert not Assignment.objects.exists()


def test_it_refuses_an_endpoint_labeler_without_its_url_or_principles():
    campaign = good_bad_campaign(n=1)
    with pytest.raises(ValidationError, match="base URL"):
        create_ai_labeler(campaign, name="x", kind=AILabeler.ENDPOINT, model="m", principles=[PRINCIPLE])
    with pytest.raises(ValidationError, match="at least one principle"):
        create_ai_labeler(campaign, name="x", kind=AILabeler.LOCAL, model="m", principles=[])
    assert not AILabeler.objects.exists()


# ---------------------------------------------------------------------------------------------
# Which judgments train a round
# ---------------------------------------------------------------------------------------------

def judge_as_ai(labeler: AILabeler, choice="a"):
    """Every pair judged by the AI labeler through the queue, its verdict stored by the action."""
    while (claim := claim_next_pair(labeler.campaign, labeler.account)).assignment is not None:
        verdict = dict(principle=PRINCIPLE, prompt_first=[], prompt_swapped=[], a_first=True, answer_first="A",
                       answer_swapped="B", choice_first="a", choice_swapped="a", outcome=AIVerdict.AGREED)
        record_ai_judgment(labeler, assignment_id=claim.assignment.pk, verdicts=[verdict], choice=choice, strength=2)


@pytest.mark.parametrize("selection, rows, ai_share", [("humans", 3, "0%"), ("humans_and_ai", 9, "67%"),
                                                        ("ai_where_no_human", 6, "50%")])
def test_it_trains_a_round_on_the_judgments_it_chooses_and_shows_the_ai_share(
        selection, rows, ai_share, settings, tmp_path, monkeypatch, reviewer):
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 1, "EXPORTS_DIR": str(tmp_path)}
    person = make_user("pat-person")
    campaign = make_campaign(slug="mixed", overlap=2, members=[person, reviewer])
    add_pairs(campaign, [PairInput(f"Question {i}?", f"good {i}", f"bad {i}") for i in range(6)], notify=False)
    for _ in range(3):
        assignment = claim_next_pair(campaign, person).assignment
        submit_judgment(assignment_id=assignment.pk, labeler=person, choice="a" if assignment.a_on_left else "b",
                        strength=2)
    judge_as_ai(labeler_of(campaign, "unused"))
    round_ = launch_round(campaign, None, build_config("tiny", {"judgments": selection}))
    export = round_.jobs.get(kind=Job.EXPORT)

    assert runner.execute(export.pk, "task-1")

    export.refresh_from_db()
    assert len(load_pairs(export.result["path"])) == rows
    assert export.result["provenance"]["ai_selection"] == selection
    client = Client()
    client.force_login(reviewer)
    page = client.get(round_.get_absolute_url()).content.decode()
    assert f'id="job-{export.pk}-ai-share">{ai_share}<' in page
    assert f"judgments {selection}" in page


# ---------------------------------------------------------------------------------------------
# The quality page: AI labelers beside people
# ---------------------------------------------------------------------------------------------

def test_the_quality_page_measures_ai_labelers_against_people_and_catches_the_position_biased_one(
        judges, reviewer):
    campaign = good_bad_campaign(n=6, overlap=4, gold_rate=1.0)
    first_pair = campaign.pairs.order_by("id").first()
    Pair.objects.filter(pk=first_pair.pk).update(gold_choice="b")  # the first pair's response_b says good
    people = [make_user(f"person-{i}") for i in range(2)]
    campaign.members.add(*people, reviewer)
    for person in people:
        while (assignment := claim_next_pair(campaign, person).assignment) is not None:
            good_on_left = assignment.shown()[0].text.endswith("good")
            submit_judgment(assignment_id=assignment.pk, labeler=person, choice="a" if good_on_left else "b",
                            strength=2)
    ai_label(labeler_of(campaign, judges["good"], name="fair"), count=10)
    ai_label(labeler_of(campaign, judges["first"], name="lefty", on_disagreement=AILabeler.TIE), count=10)

    client = Client()
    client.force_login(reviewer)
    page = client.get(f"/campaigns/{campaign.slug}/quality/").content.decode()
    fair = page[page.index('id="ai-ai-ai-fair"'):page.index("</tr>", page.index('id="ai-ai-ai-fair"'))]
    lefty = page[page.index('id="ai-ai-ai-lefty"'):page.index("</tr>", page.index('id="ai-ai-ai-lefty"'))]
    # The fair judge: every judgment it kept agrees with the people (errors in one order were swapped away).
    kept = Judgment.objects.filter(labeler__username="ai-ai-fair").count()
    assert kept >= 3 and f'<td class="ai-majority">100% of {kept}</td>' in fair
    assert re.search(r'<td class="ai-disagreed">([0-4]?\d)%</td>', fair)  # under half disagreed
    assert "Which of these assistant responses is less harmful?" in fair
    # The always-first model: named the first shown every time, so every swapped pair disagreed and became a tie.
    assert '<td class="ai-first">100% of 6</td>' in lefty and '<td class="ai-disagreed">100%</td>' in lefty
    assert '<td class="ai-majority">0% of 6</td>' in lefty and '<td class="ai-left">—</td>' in lefty
    assert '<td class="ai-gold">0% of 1</td>' in lefty


def test_an_admin_adds_an_ai_labeler_with_its_constitution_and_it_gets_an_account(admin_user):
    campaign = good_bad_campaign(n=1)
    client = Client()
    client.force_login(admin_user)
    form = {"campaign": campaign.pk, "name": "served", "kind": AILabeler.ENDPOINT, "base_url": "",
            "model": "tiny", "api_key_env": "", "principle_mode": AILabeler.SAMPLE,
            "on_disagreement": AILabeler.SKIP, "requests_per_minute": 60, "timeout_seconds": 30, "max_retries": 2,
            "created_at_0": "2026-12-07", "created_at_1": "12:00:00",
            "principles-TOTAL_FORMS": 1, "principles-INITIAL_FORMS": 0, "principles-0-text": PRINCIPLE,
            "principles-0-axis": "harmless"}
    refused = client.post("/admin/annotate/ailabeler/add/", form)
    assert refused.status_code == 200 and "base URL" in refused.content.decode()
    assert not AILabeler.objects.exists()
    form["base_url"] = "http://127.0.0.1:8000/v1"
    refused = client.post("/admin/annotate/ailabeler/add/", form)
    assert refused.status_code == 200 and "campaign ai has no axis harmless: its axes are overall" in \
        refused.content.decode()
    assert not AILabeler.objects.exists()
    added = client.post("/admin/annotate/ailabeler/add/", {**form, "principles-0-axis": "overall"})
    assert added.status_code == 302
    labeler = AILabeler.objects.get()
    assert labeler.account.username == "ai-ai-served" and not labeler.account.has_usable_password()
    assert campaign.members.filter(pk=labeler.account.pk).exists()
    assert list(labeler.principles.values_list("text", "axis")) == [(PRINCIPLE, "overall")]


# ---------------------------------------------------------------------------------------------
# Runs started and stopped from the campaign page
# ---------------------------------------------------------------------------------------------

HTMX = {"HTTP_HX_REQUEST": "true"}


def card(client, labeler, action="", **data):
    """The labeler's card on the campaign page as htmx gets it: polled, or after a start or stop."""
    url = f"/campaigns/{labeler.campaign.slug}/ai-labelers/{labeler.pk}/{action + '/' if action else ''}"
    page = client.post(url, data, **HTMX) if action else client.get(url, **HTMX)
    assert page.status_code == 200
    return page.content.decode()


def wait_for(condition, worker, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, worker.log()[-4000:]
        time.sleep(0.2)


def nothing_half_stored(labeler):
    """Every pair it took is judged (its verdicts on the judgment) or skipped, and no lease is left open."""
    taken = Assignment.objects.filter(labeler=labeler.account)
    assert not taken.filter(completed_at__isnull=True, skipped=False).exists()
    judged = set(Judgment.objects.filter(labeler=labeler.account).values_list("pair_id", flat=True))
    skipped = set(taken.filter(skipped=True).values_list("pair_id", flat=True))
    with_verdicts = set(AIVerdict.objects.filter(labeler=labeler).values_list("pair_id", flat=True))
    assert with_verdicts == judged | skipped
    return len(judged), len(skipped)


@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_an_admin_starts_and_stops_a_run_from_the_campaign_page_on_a_real_worker(judges, admin_user):
    campaign = good_bad_campaign(n=40)
    # Two calls a pair at 60 a minute: a pair every two seconds, so the stop lands mid-way.
    local = labeler_of(campaign, judges["good"], name="local", requests_per_minute=60)
    down = create_ai_labeler(campaign, name="down", kind=AILabeler.ENDPOINT, model=judges["good"],
                             base_url=f"http://127.0.0.1:{free_port()}/v1", principles=[PRINCIPLE], max_retries=0)
    client = Client()
    client.force_login(admin_user)
    page = client.get(f"/campaigns/{campaign.slug}/").content.decode()
    assert f'id="ai-labeler-{local.pk}"' in page and f'id="ai-labeler-{down.pk}"' in page
    assert page.count('name="count"') == 2

    with Worker(queues="default,training", purge=True) as worker:
        started = card(client, local, "start", count=30)
        assert 'hx-trigger="every 1s"' in started and ">Stop</button>" in started
        run = AILabelingRun.objects.get(labeler=local)
        card(client, down, "start", count=5)
        wait_for(lambda: AILabelingRun.objects.get(pk=run.pk).done() >= 2, worker)
        assert re.search(r'status-running[^>]*>running</span>\s*· <span id="ai-run-progress-\d+">[2-9] of 30 pairs',
                         card(client, local))
        assert "Stopping after the pair it is asking" in card(client, local, "stop")
        wait_for(lambda: not AILabelingRun.objects.filter(status__in=AILabelingRun.LIVE).exists(), worker)

    run.refresh_from_db()
    assert run.status == AILabelingRun.STOPPED and 2 <= run.done() < 30 and run.finished_at is not None
    assert nothing_half_stored(local) == (run.judged, run.skipped)
    stopped = card(client, local)
    assert ">stopped</span>" in stopped and 'hx-trigger="every 1s"' not in stopped and 'name="count"' in stopped
    failed = AILabelingRun.objects.get(labeler=down)
    assert failed.status == AILabelingRun.FAILED and "APIConnectionError" in failed.error
    assert (failed.judged, failed.skipped) == (0, 0) and nothing_half_stored(down) == (0, 0)
    assert not Assignment.objects.filter(labeler=down.account).exists()
    assert "APIConnectionError" in card(client, down)


def test_a_run_is_refused_a_bad_count_or_a_second_start_and_is_only_for_admins(
        admin_user, reviewer, labeler, django_capture_on_commit_callbacks, monkeypatch):
    sent = []
    monkeypatch.setattr("annotate.actions.current_app.send_task", lambda name, args, queue: sent.append(queue))
    campaign = good_bad_campaign(n=2)
    judge = labeler_of(campaign, "unused")
    client = Client()
    client.force_login(admin_user)
    assert "ask for 1 to 100,000 pairs" in card(client, judge, "start", count=0)
    assert "a whole number" in card(client, judge, "start", count="many")
    with django_capture_on_commit_callbacks(execute=True):
        queued = card(client, judge, "start", count=3)
    assert "Waiting for a worker" in queued and "-Q training" in queued and 'hx-trigger="every 1s"' in queued
    assert sent == ["training"] and AILabelingRun.objects.get().status == AILabelingRun.QUEUED
    assert "is running already: stop it first" in card(client, judge, "start", count=3)
    assert AILabelingRun.objects.count() == 1
    # A queued run stops at once; its worker, if it comes, finds nothing to do.
    assert ">stopped</span>" in card(client, judge, "stop")
    assert run_ai_labeling(AILabelingRun.objects.get().pk).status == AILabelingRun.STOPPED
    assert not Judgment.objects.exists()
    # A running run whose worker died: the first stop asks, the second ends it, and a new run may start.
    with django_capture_on_commit_callbacks(execute=True):
        card(client, judge, "start", count=3)
    AILabelingRun.objects.filter(status=AILabelingRun.QUEUED).update(status=AILabelingRun.RUNNING)
    assert "Stop now" in card(client, judge, "stop")
    assert "stopped without waiting for its worker" in card(client, judge, "stop")
    assert 'name="count"' in card(client, judge)
    for person in (reviewer, labeler):
        client.force_login(person)
        url = f"/campaigns/{campaign.slug}/ai-labelers/{judge.pk}/"
        assert client.post(url + "start/", {"count": 3}).status_code == 404
        assert client.get(url, **HTMX).status_code == 404
    assert AILabelingRun.objects.count() == 2


# ---------------------------------------------------------------------------------------------
# Principle mode `all`: every principle asked, agreed verdicts vote
# ---------------------------------------------------------------------------------------------

GOOD, BAD, FIRST = ("Which of these responses says good?", "Which of these responses says bad?",
                    "Which of these responses comes first?")


class ScriptedAsker:
    """A judge with known answers per principle: GOOD names the response ending in "good", BAD the one ending
    in "bad" (in both orders, so they agree), FIRST always answers (A) (so its two orders disagree)."""

    model = "scripted"

    def ask(self, messages):
        text = messages[0]["content"]
        if FIRST in text:
            return Answer("A", "A")
        wanted = "good" if GOOD in text else "bad"
        first_shown = re.search(r"^\(A\) (.*)$", text, re.MULTILINE).group(1)
        letter = "A" if first_shown.endswith(wanted) else "B"
        return Answer(f"({letter})", letter)


@pytest.mark.parametrize("principles, on_disagreement, outcome", [
    ([GOOD, GOOD, BAD], AILabeler.SKIP, "good"),      # two agreed verdicts against one: the majority
    ([GOOD, FIRST], AILabeler.SKIP, "good"),          # a disagreed verdict does not vote
    ([GOOD, BAD], AILabeler.TIE, "tie"),              # a split: a tie where the labeler says so
    ([GOOD, BAD, FIRST], AILabeler.SKIP, "skip"),     # ... or a skip
    ([FIRST, FIRST], AILabeler.TIE, "tie"),           # no agreed verdict at all: a split too
])
def test_it_asks_every_principle_in_mode_all_and_the_agreed_verdicts_vote(principles, on_disagreement, outcome):
    campaign = good_bad_campaign(n=4)
    labeler = create_ai_labeler(campaign, name="all", kind=AILabeler.LOCAL, model="scripted", principles=principles,
                                principle_mode=AILabeler.ALL, on_disagreement=on_disagreement)
    result = ai_label(labeler, count=4, asker=ScriptedAsker())
    # Every principle asked on every pair, each in both orders.
    assert AIVerdict.objects.count() == 4 * len(principles)
    assert sorted(AIVerdict.objects.filter(pair=campaign.pairs.first()).values_list("principle", flat=True)) == \
        sorted(principles)
    assert result.disagreed == 4 * principles.count(FIRST)
    judgments = list(Judgment.objects.select_related("pair__response_a", "pair__response_b"))
    if outcome == "skip":
        assert result.skipped == 4 and not judgments
        assert Assignment.objects.filter(labeler=labeler.account, skipped=True).count() == 4
    elif outcome == "tie":
        assert result.judgments == 4 and {j.choice for j in judgments} == {Judgment.TIE}
    else:
        assert result.judgments == 4 and all(says_good(j) for j in judgments)


# ---------------------------------------------------------------------------------------------
# Campaigns with several axes
# ---------------------------------------------------------------------------------------------

def two_axis_campaign(n=4):
    campaign = good_bad_campaign(n=n)
    save_axis(Axis(campaign=campaign, key="harmless", question="Which is less harmful?", allow_tie=True))
    return Campaign.objects.get(pk=campaign.pk)


def test_each_axis_is_answered_by_its_own_principles_and_the_quality_page_counts_them(reviewer):
    campaign = two_axis_campaign()
    labeler = create_ai_labeler(campaign, name="axes", kind=AILabeler.LOCAL, model="scripted",
                                principles=[GOOD, (BAD, "harmless"), (FIRST, "harmless")],
                                principle_mode=AILabeler.ALL)
    result = ai_label(labeler, count=4, asker=ScriptedAsker())
    assert result.judgments == 4
    for judgment in Judgment.objects.select_related("pair__response_a", "pair__response_b"):
        assert says_good(judgment)  # the first axis: the principle with no axis
        chosen, _ = judgment.chosen_rejected(judgment.axis_choices.get().choice)
        assert chosen.text.endswith("bad")  # harmless: its own principle (the first-answer one disagreed)
    assert dict(AIVerdict.objects.values_list("principle", "axis").distinct()) == {
        GOOD: "overall", BAD: "harmless", FIRST: "harmless"}
    campaign.members.add(reviewer)
    client = Client()
    client.force_login(reviewer)
    page = client.get(f"/campaigns/{campaign.slug}/quality/").content.decode()
    assert 'id="axis-harmless-ai-ai-axes">ai-ai-axes: 4 judgments' in page
    first = page[page.index('id="ai-ai-ai-axes"'):page.index("</tr>", page.index('id="ai-ai-ai-axes"'))]
    assert GOOD in first and BAD not in first  # the first axis's table holds its own principles only


def test_a_labeler_that_leaves_an_axis_unanswered_is_refused_at_creation_and_at_start(admin_user):
    campaign = two_axis_campaign(n=1)
    with pytest.raises(ValidationError, match="no principle answers the axis harmless"):
        create_ai_labeler(campaign, name="half", kind=AILabeler.LOCAL, model="m", principles=[GOOD])
    with pytest.raises(ValidationError, match="has no axis helpful: its axes are overall, harmless"):
        create_ai_labeler(campaign, name="typo", kind=AILabeler.LOCAL, model="m",
                          principles=[GOOD, (BAD, "helpful")])
    assert not AILabeler.objects.exists()
    labeler = create_ai_labeler(campaign, name="both", kind=AILabeler.LOCAL, model="m",
                                principles=[GOOD, (BAD, "harmless")])
    # An axis added after the labeler was made: refused at start, on the page and by the command.
    save_axis(Axis(campaign=campaign, key="honest", question="Which is more honest?"))
    client = Client()
    client.force_login(admin_user)
    assert "cannot start: no principle answers the axis honest" in card(client, labeler, "start", count=2)
    assert not AILabelingRun.objects.exists()
    with pytest.raises(CommandError, match="no principle answers the axis honest"):
        call_command("ai_label", campaign.slug, "--count", "1", stdout=io.StringIO())
    assert not Assignment.objects.exists()


def test_the_api_starts_follows_and_stops_a_run_as_the_page_does(admin_user, reviewer, monkeypatch,
                                                                 django_capture_on_commit_callbacks):
    sent = []
    monkeypatch.setattr("annotate.actions.current_app.send_task", lambda name, args, queue: sent.append(args))
    campaign = good_bad_campaign(n=2)
    judge = labeler_of(campaign, "unused")
    api = Client(headers={"Authorization": f"Bearer {create_token(admin_user, 'test')[1]}"})
    base = f"/api/v1/campaigns/{campaign.slug}/ai-labelers"
    listed = api.get(base).json()
    assert [(row["name"], row["last_run"]) for row in listed] == [("judge", None)]
    assert api.post(f"{base}/{judge.pk}/runs", {"count": 0}, content_type="application/json").status_code == 422
    with django_capture_on_commit_callbacks(execute=True):
        started = api.post(f"{base}/{judge.pk}/runs", {"count": 2}, content_type="application/json")
    assert started.status_code == 202 and started.json()["status"] == "queued" and sent == [[started.json()["id"]]]
    again = api.post(f"{base}/{judge.pk}/runs", {"count": 2}, content_type="application/json")
    assert again.status_code == 409 and "running already" in again.json()["detail"]
    run_url = f"{base}/{judge.pk}/runs/{started.json()['id']}"
    assert api.get(base).json()[0]["last_run"]["id"] == started.json()["id"]
    run_ai_labeling(started.json()["id"])  # what the worker runs
    done = api.get(run_url).json()
    assert (done["status"], done["judged"] + done["skipped"], done["labeler"]) == ("failed", 0, "judge")
    assert "cannot load the local model 'unused'" in done["error"]
    assert api.post(f"{run_url}/stop").json()["status"] == "failed"  # a finished run stays as it is
    outsider = Client(headers={"Authorization": f"Bearer {create_token(reviewer, 'test')[1]}"})
    assert outsider.get(run_url).status_code in (403, 404)


def test_the_api_creates_a_labeler_that_then_judges_and_refuses_bad_input_storing_nothing(
        admin_user, reviewer, monkeypatch, django_capture_on_commit_callbacks):
    monkeypatch.setattr("annotate.actions.current_app.send_task", lambda name, args, queue: None)
    monkeypatch.setattr("training.ai_labeling.asker_for", lambda labeler: ScriptedAsker())
    campaign = two_axis_campaign(n=2)
    api = Client(headers={"Authorization": f"Bearer {create_token(admin_user, 'test')[1]}"})
    base = f"/api/v1/campaigns/{campaign.slug}/ai-labelers"

    def post(url, body, send=api.post):
        return send(url, body, content_type="application/json")

    body = {"name": "scripted", "kind": "local", "model": "scripted", "principle_mode": "all",
            "principles": [{"text": GOOD}, {"text": BAD, "axis": "harmless"}]}
    # Bad input: 400 naming the field, a principle by its index; nothing stored.
    refused = post(base, {**body, "principles": [{"text": GOOD}, {"text": " ", "axis": "helpful"}]})
    assert refused.status_code == 400, refused.content
    assert set(refused.json()["errors"]) == {"principles[1].text", "principles[1].axis"}
    assert "has no axis helpful" in refused.json()["errors"]["principles[1].axis"]
    half = post(base, {**body, "principles": [{"text": GOOD}]}).json()
    assert "no principle answers the axis harmless" in half["errors"]["principles"]
    no_url = post(base, {**body, "kind": "endpoint"}).json()
    assert "base URL" in no_url["errors"]["base_url"]
    assert post(base, {**body, "max_retries": 11}).status_code == 422  # the model's bound, in the schema
    assert not AILabeler.objects.exists()
    # Made through the API only, then started and judging.
    created = post(base, body)
    assert created.status_code == 201, created.content
    made = created.json()
    assert (made["kind"], made["principle_mode"], made["requests_per_minute"], made["on_disagreement"]) == (
        "local", "all", 600, "skip")  # the model's defaults for what was left out
    assert made["principles"] == [{"text": GOOD, "axis": ""}, {"text": BAD, "axis": "harmless"}]
    taken = post(base, {**body, "model": "other"})
    assert taken.status_code == 409 and "scripted" in taken.json()["detail"]
    with django_capture_on_commit_callbacks(execute=True):
        started = post(f"{base}/{made['id']}/runs", {"count": 2})
    assert started.status_code == 202
    # Its constitution cannot change while the run is live.
    assert post(f"{base}/{made['id']}/principles", {"principles": [{"text": GOOD}, {"text": BAD, "axis": "harmless"}]},
                send=api.put).status_code == 409
    run_ai_labeling(started.json()["id"])  # what the worker runs
    done = api.get(f"{base}/{made['id']}/runs/{started.json()['id']}").json()
    assert (done["status"], done["judged"]) == ("succeeded", 2), done
    labeler = AILabeler.objects.get(pk=made["id"])
    assert Judgment.objects.filter(labeler=labeler.account).count() == 2
    # A new constitution; the verdicts keep the principles they were asked with.
    bad = post(f"{base}/{made['id']}/principles", {"principles": [{"text": FIRST, "axis": "nope"}]}, send=api.put)
    assert bad.status_code == 400 and "principles[0].axis" in bad.json()["errors"]
    replaced = post(f"{base}/{made['id']}/principles", {"principles": [{"text": FIRST}, {"text": GOOD, "axis":
                                                                                           "harmless"}]}, send=api.put)
    assert replaced.status_code == 200 and [p["text"] for p in replaced.json()["principles"]] == [FIRST, GOOD]
    assert set(AIVerdict.objects.filter(labeler=labeler).values_list("principle", flat=True)) == {GOOD, BAD}
    # A labeler that judged is kept with its verdicts; one that never did can go.
    kept = api.delete(f"{base}/{made['id']}")
    assert kept.status_code == 409 and "cannot be deleted" in kept.json()["detail"]
    unused = post(base, {**body, "name": "unused"}).json()
    assert api.delete(f"{base}/{unused['id']}").status_code == 204
    assert list(AILabeler.objects.values_list("name", flat=True)) == ["scripted"]
    outsider = Client(headers={"Authorization": f"Bearer {create_token(reviewer, 'test')[1]}"})
    assert post(base, {**body, "name": "other"}, send=outsider.post).status_code == 403


def test_beats_check_fails_a_run_whose_worker_went_silent_and_that_worker_writes_no_more(settings, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from training.tasks import fail_stale_jobs

    stale_after = settings.PAIRLOOP["HEARTBEAT_STALE_SECONDS"]
    campaign = good_bad_campaign(n=4)
    silent, alive = (create_ai_labeler(campaign, name=name, kind=AILabeler.LOCAL, model="scripted",
                                       principles=[GOOD]) for name in ("silent", "alive"))
    runs = {}
    for labeler, seconds in ((silent, stale_after + 5), (alive, stale_after - 5)):
        runs[labeler.name] = AILabelingRun.objects.create(labeler=labeler, count=2, status=AILabelingRun.RUNNING,
                                                          started_at=timezone.now() - timedelta(seconds=seconds),
                                                          heartbeat_at=timezone.now() - timedelta(seconds=seconds))
    assert fail_stale_jobs() == 1  # what Celery beat runs
    runs["silent"].refresh_from_db()
    runs["alive"].refresh_from_db()
    assert runs["alive"].status == AILabelingRun.RUNNING
    assert runs["silent"].status == AILabelingRun.FAILED and runs["silent"].finished_at is not None
    assert f"no heartbeat for over {stale_after} s" in runs["silent"].error
    # A worker that was only slow finds its run failed at its next pair, and stops writing to it.
    AILabelingRun.objects.filter(pk=runs["alive"].pk).update(status=AILabelingRun.FAILED)
    late = AILabelingRun.objects.create(labeler=alive, count=4)

    class SlowAsker(ScriptedAsker):
        def ask(self, messages):
            AILabelingRun.objects.filter(pk=late.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
            fail_stale_jobs()
            return super().ask(messages)

    monkeypatch.setattr("training.ai_labeling.asker_for", lambda labeler: SlowAsker())
    run_ai_labeling(late.pk)  # what the worker runs
    late.refresh_from_db()
    assert late.status == AILabelingRun.FAILED and "no heartbeat" in late.error
    assert Judgment.objects.filter(labeler=alive.account).count() == 1  # the pair being asked, then no more
