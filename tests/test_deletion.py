"""Judgments never disappear by a cascade: deleting what they hang on (a user, campaign, prompt, response,
pair or assignment) is refused, in the admin with a clear page and in code with ProtectedError; labelers are
deactivated instead, and judgments, assignments and jobs are read-only in the admin."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.db.models import ProtectedError
from django.test import Client

from annotate.actions import claim_next_pair, submit_judgment
from annotate.models import Assignment, Campaign, Judgment, Pair, Prompt, Response
from tests.conftest import PASSWORD, make_campaign, make_user
from training.models import Job, Round

pytestmark = pytest.mark.django_db


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


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


def test_it_refuses_to_delete_a_labeler_who_has_judged_in_the_admin(admin_user, labeler, judged):
    before = snapshot()
    assert len(before["judgments"]) == 3 and {count for _, count, _ in before["pairs"]} == {0, 1}
    admin = client_for(admin_user)
    page = admin.post(f"/admin/auth/user/{labeler.pk}/delete/", {"post": "yes"})
    assert page.status_code == 200
    text = page.content.decode()
    assert "Cannot delete user" in text
    assert "lena-labeler: 3 judgments, 3 assignments" in text
    assert "deactivate them instead" in text
    bulk = admin.post("/admin/auth/user/", {"action": "delete_selected", "_selected_action": [labeler.pk],
                                            "post": "yes"})
    assert bulk.status_code == 200 and "Cannot delete user" in bulk.content.decode()
    assert snapshot() == before
    assert User.objects.get(pk=labeler.pk).is_active


def test_it_deletes_a_user_who_never_labeled_in_the_admin(admin_user, judged):
    typo = make_user("lena-labeller")
    response = client_for(admin_user).post(f"/admin/auth/user/{typo.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not User.objects.filter(pk=typo.pk).exists()


def test_it_deactivates_a_labeler_who_is_signed_out_and_whose_judgments_count(admin_user, labeler, judged):
    other = make_user("olga-other")
    judged.members.add(other)
    held = claim_next_pair(judged, labeler).assignment  # a live lease on the fourth pair
    session = client_for(labeler)
    assert session.get(judged.label_url()).status_code == 200
    before = snapshot()

    admin = client_for(admin_user)
    response = admin.post("/admin/auth/user/", {"action": "deactivate", "_selected_action": [labeler.pk]},
                          follow=True)
    assert "Deactivated 1 user; 1 pair lease went back to the queue." in response.content.decode()

    assert not User.objects.get(pk=labeler.pk).is_active
    assert session.get(judged.label_url())["Location"].startswith("/accounts/login/")
    assert snapshot()["judgments"] == before["judgments"] and snapshot()["pairs"] == before["pairs"]
    # The pair they held goes to someone else at once, not when the lease would have run out.
    assert claim_next_pair(judged, other).assignment.pair_id == held.pair_id
    detail = admin.get(judged.get_absolute_url()).content.decode()
    assert "lena-labeler" in detail  # their judgments still count in the campaign's figures


@pytest.mark.parametrize("model_name", ["campaign", "prompt", "response", "pair"])
def test_it_refuses_to_delete_what_judgments_hang_on_in_the_admin(admin_user, judged, model_name):
    judgment = Judgment.objects.select_related("pair").first()
    target = {
        "campaign": judged,
        "prompt": judgment.pair.prompt,
        "response": judgment.pair.response_b,
        "pair": judgment.pair,
    }[model_name]
    before = snapshot()
    admin = client_for(admin_user)
    page = admin.post(f"/admin/annotate/{model_name}/{target.pk}/delete/", {"post": "yes"})
    assert page.status_code == 200
    text = page.content.decode()
    assert f"Cannot delete {model_name}" in text
    assert "judgment" in text and "Judgments are never deleted" in text
    bulk = admin.post(f"/admin/annotate/{model_name}/", {"action": "delete_selected",
                                                         "_selected_action": [target.pk], "post": "yes"})
    assert bulk.status_code == 200 and "Cannot delete" in bulk.content.decode()
    assert snapshot() == before


def test_it_deletes_a_pair_and_a_campaign_nobody_labeled_in_the_admin(admin_user, judged):
    untouched = Pair.objects.filter(campaign=judged, assignments__isnull=True).first()
    admin = client_for(admin_user)
    assert admin.post(f"/admin/annotate/pair/{untouched.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not Pair.objects.filter(pk=untouched.pk).exists()
    empty = make_campaign("unused", n_pairs=2)
    assert admin.post(f"/admin/annotate/campaign/{empty.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not Campaign.objects.filter(pk=empty.pk).exists()
    assert Judgment.objects.count() == 3


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


def test_it_shows_judgments_assignments_and_jobs_read_only_in_the_admin(admin_user, labeler, judged):
    judgment = Judgment.objects.first()
    run = Round.objects.create(campaign=judged, number=1, parent_policy="sft")
    job = Job.objects.create(round=run, kind=Job.REWARD, order=0, status=Job.FAILED, error="boom")
    admin = client_for(admin_user)
    shown = (("/admin/annotate/judgment/", judgment), ("/admin/annotate/assignment/", judgment.assignment),
             ("/admin/training/job/", job))
    for base, row in shown:
        listing = admin.get(base)
        assert listing.status_code == 200
        assert f"{base}add/" not in listing.content.decode()  # no "Add" button
        assert 'name="action"' not in listing.content.decode()  # no bulk actions (delete)
        view = admin.get(f"{base}{row.pk}/change/")
        assert view.status_code == 200
        assert "View " in view.content.decode() and 'name="_save"' not in view.content.decode()
        assert admin.post(f"{base}{row.pk}/change/", {}).status_code == 403
        assert admin.post(f"{base}{row.pk}/delete/", {"post": "yes"}).status_code == 403
        assert admin.get(f"{base}add/").status_code == 403
    round_page = admin.get(f"/admin/training/round/{run.pk}/change/").content.decode()
    assert "Reward model" in round_page or "reward model" in round_page  # the round's jobs show...
    assert 'name="jobs-0-status"' not in round_page  # ...but not as form fields
    assert Judgment.objects.count() == 3
    job.refresh_from_db()
    assert (job.status, job.error) == (Job.FAILED, "boom")


def test_it_ends_the_leases_of_a_labeler_unticked_active_on_their_admin_page(admin_user, labeler, judged):
    held = claim_next_pair(judged, labeler).assignment
    response = client_for(admin_user).post(f"/admin/auth/user/{labeler.pk}/change/", {
        "username": labeler.username, "date_joined_0": "2026-01-05", "date_joined_1": "09:00:00",
        "email": "", "first_name": "", "last_name": "",  # "is_active" left out: unticked
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    assert not User.objects.get(pk=labeler.pk).is_active
    assert not Assignment.objects.live().filter(pk=held.pk).exists()
    assert Judgment.objects.filter(labeler=labeler).count() == 3
