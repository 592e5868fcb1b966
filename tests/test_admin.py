"""The Django admin is no second door: a campaign's settings keep the model's bounds and go through the
same action as the API, and rounds and their jobs are read-only there."""

from __future__ import annotations

import pytest
from django.forms.models import model_to_dict
from django.test import Client
from django.utils import timezone

from annotate.actions import PairInput, add_pairs, claim_next_pair, submit_judgment
from annotate.models import Campaign, Pair
from tests.conftest import PASSWORD, make_campaign
from training.models import Round

pytestmark = pytest.mark.django_db


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def change_campaign(admin_user, campaign: Campaign, **changes):
    """POST the campaign's admin change page as it shows the campaign, with these changes."""
    data = {}
    for name, value in model_to_dict(campaign).items():
        if name == "members":
            value = [user.pk for user in value]
        elif value is None:
            value = ""
        elif value is False:
            continue  # an unticked box is not sent
        data[name] = value
    created = timezone.localtime(data.pop("created_at"))
    data["created_at_0"], data["created_at_1"] = f"{created:%Y-%m-%d}", f"{created:%H:%M:%S}"
    return client_for(admin_user).post(f"/admin/annotate/campaign/{campaign.pk}/change/", {**data, **changes})


def test_it_refuses_a_campaign_setting_out_of_bounds_with_the_reason(admin_user, labeler):
    campaign = make_campaign("bounded")
    page = change_campaign(admin_user, campaign, gold_rate="5")
    assert page.status_code == 200  # the form again, not a redirect
    assert "Ensure this value is less than or equal to 1.0." in page.content.decode()
    assert Campaign.objects.get(pk=campaign.pk).gold_rate == 0.0
    changed = change_campaign(admin_user, campaign, gold_rate="0.5", policy_model="gpt2", members=[labeler.pk])
    assert changed.status_code == 302
    campaign = Campaign.objects.get(pk=campaign.pk)
    assert (campaign.gold_rate, campaign.policy_model, list(campaign.members.all())) == (0.5, "gpt2", [labeler])


def open_pairs(campaign: Campaign) -> int:
    return Pair.objects.filter(campaign=campaign, is_open=True).count()


def test_a_new_overlap_in_the_admin_reopens_and_closes_pairs_as_the_api_s_does(admin_user, labeler, outsider):
    campaign = make_campaign("k", n_pairs=2, members=[labeler, outsider], overlap=1)
    add_pairs(campaign, [PairInput("Known?", "good", "bad", preferred="a")], notify=False)
    for _ in range(2):
        assignment = claim_next_pair(campaign, labeler).assignment
        submit_judgment(assignment_id=assignment.pk, labeler=labeler, choice="a", strength=2)
    assert open_pairs(campaign) == 0
    assert change_campaign(admin_user, campaign, overlap="2").status_code == 302
    assert open_pairs(campaign) == 2  # the imported preference stays judged
    campaign = Campaign.objects.get(pk=campaign.pk)
    assert campaign.overlap == 2 and claim_next_pair(campaign, outsider).assignment is not None
    assert change_campaign(admin_user, campaign, overlap="1").status_code == 302
    assert open_pairs(campaign) == 0


def test_it_keeps_a_round_s_settings_and_checkpoints_from_an_admin_post(admin_user):
    campaign = make_campaign("rounds")
    run = Round.objects.create(campaign=campaign, number=1, parent_policy="sft", config={"ppo_steps": 10},
                               policy_checkpoint="/runs/1/policy", reward_checkpoint="/runs/1/reward")
    admin = client_for(admin_user)
    page = admin.get(f"/admin/training/round/{run.pk}/change/").content.decode()
    assert "/runs/1/policy" in page and 'name="_save"' not in page  # shown, not editable
    forged = {"campaign": campaign.pk, "number": 1, "parent_policy": "other", "config": '{"ppo_steps": 1}',
              "policy_checkpoint": "/elsewhere", "reward_checkpoint": "", "jobs-TOTAL_FORMS": 0,
              "jobs-INITIAL_FORMS": 0}
    assert admin.post(f"/admin/training/round/{run.pk}/change/", forged).status_code == 403
    assert admin.post(f"/admin/training/round/{run.pk}/delete/", {"post": "yes"}).status_code == 403
    assert admin.get("/admin/training/round/add/").status_code == 403
    run.refresh_from_db()
    assert (run.parent_policy, run.config, run.policy_checkpoint) == ("sft", {"ppo_steps": 10}, "/runs/1/policy")
