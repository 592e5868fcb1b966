"""Shared personas and helpers. The suite never reads ../shared: a user's clone has none."""

from __future__ import annotations

import os

# Models and tokenizers come from local files only: a missing one fails at once instead of reaching for a hub.
# Set before anything imports huggingface_hub, which reads these once, at import.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import pytest  # noqa: E402
from django.contrib.auth.models import Group, User  # noqa: E402

from annotate.access import REVIEWERS_GROUP  # noqa: E402
from annotate.actions import PairInput, add_pairs  # noqa: E402
from annotate.models import Campaign  # noqa: E402
from tests.must_run import pytest_runtest_makereport  # noqa: E402,F401  (a hook: pytest finds it here)

PASSWORD = "correct-horse-battery"


def make_user(username: str, **extra) -> User:
    user = User.objects.create_user(username=username, password=PASSWORD, **extra)
    return user


@pytest.fixture
def admin_user(db):
    return make_user("ada-admin", is_staff=True, is_superuser=True)


@pytest.fixture
def reviewer(db):
    user = make_user("rene-reviewer")
    group, _ = Group.objects.get_or_create(name=REVIEWERS_GROUP)
    user.groups.add(group)
    return user


@pytest.fixture
def labeler(db):
    return make_user("lena-labeler")


@pytest.fixture
def outsider(db):
    """A labeler who is not a member of the campaign: must be refused everywhere."""
    return make_user("otto-outsider")


def make_campaign(slug="shop", n_pairs=0, members=(), **options) -> Campaign:
    campaign = Campaign.objects.create(slug=slug, name=slug.title(), instructions="Pick the **better** answer.",
                                       **options)
    campaign.members.add(*members)
    if n_pairs:
        add_pairs(campaign, [PairInput(f"Question {i}?", f"Answer A{i}", f"Answer B{i}") for i in range(n_pairs)],
                  notify=False)
    return campaign


@pytest.fixture
def campaign(labeler):
    return make_campaign(n_pairs=10, members=[labeler])

