"""Several questions (axes) per pair: one submit answers them all, on the page and through the API; undo
takes them all back; exports, quality and ratings read one axis at a time."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from annotate.actions import save_axis
from annotate.models import Assignment, Axis, AxisChoice, Judgment, Pair
from tests.conftest import make_campaign
from tests.test_api import api_for
from tests.test_labeling_http import client_for, current_assignment, press_undo, undo_id

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


def test_labeling_every_axis_costs_the_same_queries_as_one_axis_plus_one_insert(labeler):
    one = make_campaign(slug="one", n_pairs=2, members=[labeler], ask_strength=False)
    several = two_axes(labeler, ask_strength=False)
    client = client_for(labeler)

    def submit(campaign, body):
        assignment = current_assignment(client.get(campaign.label_url()))
        with CaptureQueriesContext(connection) as queries:
            client.post(f"{campaign.label_url()}{assignment.pk}/judge/", body, HTTP_HX_REQUEST="true")
        return len(queries)

    single = submit(one, {"choice": "tie"})
    both = submit(several, {"choice-helpful": "tie", "choice-harmless": "both_bad"})
    assert both == single + 1  # the further axes' choices: one INSERT, whatever their number


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
