"""Two axes labeled by keyboard in a real browser, at a desktop's and a phone's width: each axis in turn on
the same pair, Backspace back one axis, and one request per pair."""

from __future__ import annotations

import pytest

from annotate.actions import save_axis
from annotate.models import Assignment, Axis, Judgment
from tests.browser.test_labeling_browser import (
    current_assignment_id,
    log_in,
    open_label_page,
    wait_for_another_pair,
)
from tests.conftest import make_campaign

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

FLIP = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}


@pytest.mark.parametrize("width", [1280, 390])
def test_it_labels_two_axes_by_keyboard_going_back_one_in_one_request_per_pair(page, labeler, width):
    campaign = make_campaign(f"axes-{width}", n_pairs=3, members=[labeler], axis_key="helpful",
                             question="Which answer helps more?")
    save_axis(Axis(campaign=campaign, key="harmless", question="Which answer is less harmful?", position=1))
    page.set_viewport_size({"width": width, "height": 900})
    log_in(page, labeler)
    open_label_page(page, campaign)
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    first = current_assignment_id(page)

    assert page.is_visible("#axis-1") and not page.is_visible("#axis-2")
    page.keyboard.press("1")  # helpful: A, then how much
    page.wait_for_selector("#axis-1 .strength-row", state="visible")
    page.keyboard.press("2")
    page.wait_for_selector("#axis-2", state="visible")  # the next question, on the same pair
    assert not page.is_visible("#axis-1") and "less harmful" in page.inner_text("#axis-2 legend")
    page.keyboard.press("Backspace")  # back to helpful: answer it again
    page.wait_for_selector("#axis-1", state="visible")
    page.keyboard.press("2")
    page.wait_for_selector("#axis-1 .strength-row", state="visible")
    page.keyboard.press("4")
    page.wait_for_selector("#axis-2", state="visible")
    assert posts == []  # nothing sent before the last axis
    page.keyboard.press("3")  # harmless: tie, which sends both
    second = wait_for_another_pair(page, first)
    assert len(posts) == 1 and current_assignment_id(page) == second
    assert page.is_visible("#axis-1") and not page.is_visible("#axis-2")  # the next pair starts at helpful

    judgment = Judgment.objects.get(labeler=labeler)
    a_on_left = Assignment.objects.get(pk=first).a_on_left
    assert judgment.choices_by_axis(campaign) == {"helpful": "b" if a_on_left else "a", "harmless": "tie"}
    assert judgment.strength == 4
    assert page.js_errors == []
