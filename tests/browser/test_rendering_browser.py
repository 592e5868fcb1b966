"""Real model outputs in a real browser: Markdown code renders as code, a script inside Markdown does
not run, and the raw-text toggle works by keyboard across pairs."""

from __future__ import annotations

import pytest

from annotate.actions import PairInput, add_pairs
from tests.browser.test_labeling_browser import (
    current_assignment_id,
    log_in,
    open_label_page,
    wait_for_another_pair,
)
from tests.conftest import make_campaign

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CODE = ("Here:\n\n```python\nprint('hi')\n```\n\n<script>window.__pwned=1</script>\n"
        '<img src=x onerror="window.__pwned=1">')


def test_it_renders_markdown_runs_nothing_and_toggles_raw_text_by_keyboard(page, labeler):
    campaign = make_campaign("md", members=[labeler], ask_strength=False)
    add_pairs(campaign, [PairInput("Show code", CODE, "Just *text*."),
                         PairInput("Show code again", CODE + " 2", "More *text*.")], notify=False)
    log_in(page, labeler)
    open_label_page(page, campaign)

    code = page.locator(".response-md pre code")
    assert code.count() == 1 and code.inner_text().strip() == "print('hi')"
    assert page.locator(".response-md em").count() == 1
    page.wait_for_timeout(150)  # an onerror handler would fire by now
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img").count() == 0
    assert page.locator(".response-text").first.is_hidden()

    page.keyboard.press("r")
    assert page.locator(".response-md").first.is_hidden()
    raw = page.locator(".response-text").filter(has_text="```python")
    assert raw.is_visible() and "<script>window.__pwned=1</script>" in raw.inner_text()
    assert page.get_attribute("#raw-toggle", "aria-pressed") == "true"

    # The choice holds for the next pair, swapped in by htmx; r again shows the formatted text.
    first = current_assignment_id(page)
    page.keyboard.press("3")
    wait_for_another_pair(page, first)
    assert page.locator(".response-text").first.is_visible()
    page.keyboard.press("r")
    assert page.locator(".response-md pre code").is_visible()
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.js_errors == []
