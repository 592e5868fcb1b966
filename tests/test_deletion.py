"""Judgments never disappear by a cascade: deleting what they hang on (a user, campaign, prompt, response,
pair or assignment) is refused with ProtectedError."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.db.models import ProtectedError

from annotate.actions import claim_next_pair, submit_judgment
from annotate.models import Assignment, Campaign, Judgment, Pair, Prompt, Response
from tests.conftest import make_campaign

pytestmark = pytest.mark.django_db


def judge_some(campaign, labeler, n: int) -> list[Judgment]:
    judgments = []
    for _ in range(n):
        assignment = claim_next_pair(campaign, labeler).assignment
        judgment, _ = submit_judgment(assignment_id=assignment.pk, labeler=labeler, choice="a", strength=3)
        judgments.append(judgment)
    return judgments


def snapshot():
    """Every row judgments depend on, and every pair's count: what a deletion must leave as it was."""
    return {
        "judgments": sorted(Judgment.objects.values_list("pk", "pair_id", "labeler_id", "choice")),
        "pairs": sorted(Pair.objects.values_list("pk", "judgments_count", "is_open")),
        "assignments": Assignment.objects.count(),
        "prompts": Prompt.objects.count(),
        "responses": Response.objects.count(),
        "campaigns": Campaign.objects.count(),
        "users": User.objects.count(),
    }


@pytest.fixture
def judged(labeler):
    """A campaign whose first three pairs the labeler judged (overlap 1: those pairs are closed)."""
    campaign = make_campaign("judged", n_pairs=5, members=[labeler], overlap=1)
    judge_some(campaign, labeler, 3)
    return campaign


def test_it_raises_protected_error_when_code_deletes_what_judgments_hang_on(labeler, judged):
    judgment = Judgment.objects.select_related("pair__prompt", "pair__response_a", "assignment").first()
    before = snapshot()
    for row in (labeler, judged, judgment.pair.prompt, judgment.pair.response_a, judgment.pair,
                judgment.assignment):
        with pytest.raises(ProtectedError):
            row.delete()
    for rows in (User.objects.all(), Campaign.objects.all(), Pair.objects.all(), Assignment.objects.all()):
        with pytest.raises(ProtectedError):
            rows.delete()
    assert snapshot() == before
