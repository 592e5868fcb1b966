"""Real model outputs in a real browser: Markdown code renders as code, HTML in a prompt, a response or a
chat turn shows as written and never runs, and the raw-text toggle works by keyboard across pairs."""

from __future__ import annotations

import uuid

import pytest

from annotate import rendering
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


PAYLOADS = [
    "<script>window.x = 1; alert(1)</script>",
    '<img src=x onerror="window.x = 2; alert(2)">',
    'Plain answer 3 <svg onload="window.x = 3; alert(3)"></svg>',
    '<a href="javascript:window.x = 4; alert(4)">click me</a>',
    '<iframe srcdoc="<script>parent.x = 5; parent.alert(5)</script>"></iframe>',
]
# What Markdown itself makes (annotate.rendering.ALLOWED_TAGS) and the block of text shown unformatted.
MARKDOWN_TAGS = set(rendering.ALLOWED_TAGS) | {"div"}
SHOWN = """() => {
  const views = [...document.querySelectorAll(
    '#pair .response-md, #pair .turn-text, #pair .prompt:not(.conversation)')];
  return {texts: views.map(v => v.textContent.trim()),
          tags: [...new Set(views.flatMap(v => [...v.querySelectorAll('*')].map(e => e.localName)))]};
}"""


def test_html_in_prompts_responses_and_chat_turns_shows_as_written_and_nothing_runs(page, labeler):
    run = uuid.uuid4().hex[:8]  # texts of their own: HTML kept from an earlier run does not answer for them
    campaign = make_campaign("html", members=[labeler], ask_strength=False)
    pairs = [PairInput(f"Payload {i} ({run}): {payload}", payload, f"*Fine* ({run}): {payload}")
             for i, payload in enumerate(PAYLOADS)]
    turns = [{"role": "system", "content": f"Turn {i} ({run}): {payload}"}
             for i, payload in enumerate(PAYLOADS)]
    pairs.append(PairInput([*turns, {"role": "user", "content": f"Go on ({run})."}], "Yes.", "No."))
    add_pairs(campaign, pairs, notify=False)
    requests, dialogs = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    log_in(page, labeler)
    open_label_page(page, campaign)

    texts, tags = [], set()
    for n in range(len(pairs)):
        page.wait_for_timeout(150)  # an onerror or onload handler would have fired by now
        shown = page.evaluate(SHOWN)
        texts += shown["texts"]
        tags |= set(shown["tags"])
        assert page.evaluate("typeof window.x") == "undefined"
        previous = current_assignment_id(page)
        page.keyboard.press("3")
        if n + 1 < len(pairs):
            wait_for_another_pair(page, previous)
    page.wait_for_selector("#queue-empty")

    for i, payload in enumerate(PAYLOADS):
        assert f"Payload {i} ({run}): {payload}" in texts  # in a prompt, every character as written
        assert payload in texts  # a response that is only HTML: never an empty box
        assert f"Fine ({run}): {payload}" in texts  # Markdown around it still renders
        assert f"Turn {i} ({run}): {payload}" in texts  # a chat turn
    assert tags <= MARKDOWN_TAGS, f"{tags - MARKDOWN_TAGS} in the formatted view"
    assert "em" in tags
    assert page.evaluate("typeof window.x") == "undefined" and dialogs == []
    assert not [url for url in requests if url.startswith("javascript:") or url.split("?")[0].endswith("/x")]
    assert page.js_errors == []
