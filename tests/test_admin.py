"""The Django admin is no second door: a campaign's settings keep the model's bounds and go through the
same action as the API, and rounds and their jobs are read-only there."""

from __future__ import annotations

import pytest
from django.forms.models import model_to_dict
from django.test import Client
from django.utils import timezone

from annotate.models import Campaign
from tests.conftest import PASSWORD, make_campaign

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


def test_it_refuses_a_campaign_setting_out_of_bounds_with_the_reason(admin_user):
    campaign = make_campaign("bounded")
    page = change_campaign(admin_user, campaign, gold_rate="5")
    assert page.status_code == 200  # the form again, not a redirect
    assert "Ensure this value is less than or equal to 1.0." in page.content.decode()
    assert Campaign.objects.get(pk=campaign.pk).gold_rate == 0.0
    assert change_campaign(admin_user, campaign, gold_rate="0.5").status_code == 302
    assert Campaign.objects.get(pk=campaign.pk).gold_rate == 0.5
