"""Tie-breaks: a pair whose judgments split gets one more judgment, up to the campaign's limit, through
the real queue (claim_next_pair / submit_judgment / undo)."""

from __future__ import annotations

import pytest

from annotate import actions
from annotate.models import Pair
from tests.conftest import make_campaign, make_user

pytestmark = pytest.mark.django_db


def judge(campaign, user, choice: str) -> int:
    """The user claims the next pair and picks choice in response_a / response_b terms; returns its id."""
    claim = actions.claim_next_pair(campaign, user)
    assert claim.assignment is not None, f"{user.username} got no pair: {claim.reason}"
    shown = choice
    if choice in ("a", "b") and not claim.assignment.a_on_left:
        shown = "b" if choice == "a" else "a"
    actions.submit_judgment(assignment_id=claim.assignment.pk, labeler=user, choice=shown)
    return claim.assignment.pair_id


def people(n):
    return [make_user(f"person{i}") for i in range(n)]


def test_it_asks_one_more_judgment_for_a_split_pair_until_it_is_decided():
    ann, bob, cy, dee = people(4)
    campaign = make_campaign(n_pairs=1, members=[ann, bob, cy, dee], overlap=2, tie_break_limit=2,
                             ask_strength=False)
    actions.forget_judgments_left(campaign)
    pair_id = judge(campaign, ann, "a")
    assert judge(campaign, bob, "b") == pair_id  # a against b: split
    pair = Pair.objects.get(pk=pair_id)
    assert pair.is_open and pair.extra_judgments == 1 and pair.needs_judgments()
    assert actions.judgments_left(campaign) == 1
    assert judge(campaign, cy, "a") == pair_id  # 2 to 1: decided
    pair.refresh_from_db()
    assert not pair.is_open and pair.judgments_count == 3 and pair.extra_judgments == 1
    assert actions.claim_next_pair(campaign, dee).reason == "empty"
    actions.forget_judgments_left(campaign)
    assert actions.judgments_left(campaign) == 0


def test_it_stops_at_the_campaigns_limit_and_never_breaks_ties_without_one():
    ann, bob, cy, dee = people(4)
    campaign = make_campaign(n_pairs=1, members=[ann, bob, cy, dee], overlap=2, tie_break_limit=1,
                             ask_strength=False)
    pair_id = judge(campaign, ann, "a")
    judge(campaign, bob, "b")
    judge(campaign, cy, "tie")  # a, b, tie: still split, but the limit is reached
    pair = Pair.objects.get(pk=pair_id)
    assert not pair.is_open and pair.judgments_count == 3
    assert actions.claim_next_pair(campaign, dee).reason == "empty"

    plain = make_campaign(slug="plain", n_pairs=1, members=[ann, bob, cy], overlap=2, ask_strength=False)
    pair_id = judge(plain, ann, "a")
    judge(plain, bob, "b")
    assert not Pair.objects.get(pk=pair_id).is_open  # tie_break_limit 0: a split stays split
    agreeing = make_campaign(slug="agree", n_pairs=1, members=[ann, bob, cy], overlap=2, tie_break_limit=3,
                             ask_strength=False)
    pair_id = judge(agreeing, ann, "a")
    judge(agreeing, bob, "a")
    assert not Pair.objects.get(pk=pair_id).is_open  # agreement needs no tie-break


def test_undoing_the_splitting_judgment_takes_its_tie_break_back():
    ann, bob = people(2)
    campaign = make_campaign(n_pairs=1, members=[ann, bob], overlap=2, tie_break_limit=2, ask_strength=False)
    pair_id = judge(campaign, ann, "a")
    judge(campaign, bob, "b")
    assert Pair.objects.get(pk=pair_id).extra_judgments == 1
    actions.undo_last_judgment(campaign, bob)
    pair = Pair.objects.get(pk=pair_id)
    assert pair.judgments_count == 1 and pair.extra_judgments == 0 and pair.is_open
