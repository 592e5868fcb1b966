"""What an admin sees in a real browser on the campaign page's AI labeler card: Start queues a run and the
card replaces itself with its status (htmx, CSRF from the page), Stop ends the queued run, no reload."""

from __future__ import annotations

import pytest

from annotate.actions import create_ai_labeler
from annotate.models import AILabelingRun
from tests.browser.conftest import off_the_loop
from tests.browser.test_labeling_browser import log_in
from tests.conftest import make_campaign

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_admin_starts_and_stops_an_ai_labeler_from_the_campaign_page(page, admin_user):
    campaign = off_the_loop(make_campaign, slug="ai-card", n_pairs=3)
    judge = off_the_loop(create_ai_labeler, campaign, name="judge", kind="local", model="unused",
                         principles=["Which response is better?"])
    log_in(page, admin_user)
    page.goto(campaign.get_absolute_url())
    page.evaluate("window.__marker = 1")
    card = f"#ai-labeler-{judge.pk}"
    page.fill(f"{card} input[name=count]", "2")
    page.click(f"{card} button[type=submit]")
    page.wait_for_selector(f"{card}[data-status=queued]")
    assert "Waiting for a worker" in page.inner_text(card)
    page.click(f"{card} button:has-text('Stop')")
    page.wait_for_selector(f"{card}[data-status=stopped]")
    assert page.locator(f"{card} input[name=count]").count() == 1  # the start form is back
    assert page.evaluate("window.__marker") == 1  # no reload
    run = off_the_loop(lambda: AILabelingRun.objects.get())
    assert (run.status, run.count, run.started_by_id) == ("stopped", 2, admin_user.pk)
