"""What a labeler does in a real browser (Debian's chromium through Playwright) against the app
served for real by daphne: log in, label by keyboard without page reloads, undo, stay safe from
untrusted text, never double-submit, wait on an empty queue for pushed pairs, and be refused
another campaign."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from annotate.actions import PairInput, add_pairs
from annotate.models import Assignment, Judgment, Pair
from tests.browser.conftest import off_the_loop
from tests.conftest import PASSWORD, make_campaign

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

MARKER = "window.__marker"


def log_in(page, user: User) -> None:
    page.goto("/accounts/login/")
    page.fill("#id_username", user.username)
    page.fill("#id_password", PASSWORD)
    page.click("#login-button")
    page.wait_for_url("**/")
    assert page.locator("h1").inner_text() == "Campaigns"


def open_label_page(page, campaign) -> None:
    """From the home page, as a labeler would, then mark the window to detect full reloads."""
    page.click(f'a[href="{campaign.label_url()}"]')
    page.wait_for_selector("#pair")
    page.evaluate(f"{MARKER} = 'no reload since'")


def current_assignment_id(page) -> int:
    return int(page.get_attribute("#pair", "data-assignment"))


def wait_for_another_pair(page, previous_id: int) -> int:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            # A new card, settled: htmx wires up the new buttons when it settles (20 ms later).
            "prev => { const card = document.getElementById('pair');"
            " return card && card.dataset.assignment && card.dataset.assignment !== String(prev)"
            " && !document.querySelector('.htmx-added, .htmx-settling'); }",
            arg=previous_id,
        )
    except PlaywrightTimeout:
        card = page.evaluate("document.getElementById('pair')?.outerHTML || '(no #pair)'")
        raise AssertionError(f"no new pair after {previous_id}; js errors {page.js_errors}; card:\n{card[:3000]}")
    assert page.evaluate(MARKER) == "no reload since", "the page reloaded instead of swapping the pair"
    return current_assignment_id(page)


def test_it_labels_five_pairs_by_keyboard_and_undoes_one(page, labeler):
    campaign = make_campaign("keys", n_pairs=7, members=[labeler])
    assert campaign.ask_strength and campaign.allow_tie and campaign.allow_both_bad
    log_in(page, labeler)
    open_label_page(page, campaign)

    # (choice key, strength key): A better, B better, tie, both bad, B better.
    plan = [("1", "3"), ("2", "1"), ("3", None), ("4", None), ("2", "4")]
    shown_choice = {"1": "a", "2": "b", "3": "tie", "4": "both_bad"}
    judged = []  # (assignment id, shown choice, strength, left text, right text)
    assignment_id = current_assignment_id(page)
    for choice_key, strength_key in plan:
        left = page.inner_text("#response-a .response-text")
        right = page.inner_text("#response-b .response-text")
        page.wait_for_timeout(60)  # a person reads first; the page measures that time
        page.keyboard.press(choice_key)
        if strength_key is not None:
            page.wait_for_selector("#strength-row", state="visible")
            assert page.inner_text("#strength-side") == shown_choice[choice_key].upper()
            page.keyboard.press(strength_key)
        judged.append((assignment_id, shown_choice[choice_key], strength_key and int(strength_key), left, right))
        assignment_id = wait_for_another_pair(page, assignment_id)
    assert page.inner_text("#judged-today") == "5"
    assert Judgment.objects.filter(labeler=labeler).count() == 5

    # Undo brings the last judged pair back, on the same lease, in place.
    page.keyboard.press("u")
    undone_id = wait_for_another_pair(page, assignment_id)
    assert undone_id == judged[-1][0]
    assert "Undone" in page.inner_text("#pair .note")
    assert page.inner_text("#response-a .response-text") == judged[-1][3]
    assert Judgment.objects.filter(labeler=labeler).count() == 4
    assert not Judgment.objects.filter(assignment_id=undone_id).exists()
    assert Pair.objects.get(assignments__pk=undone_id).judgments_count == 0

    # Judge it again, differently: A better, strength 2.
    page.wait_for_timeout(60)
    page.keyboard.press("1")
    page.keyboard.press("2")
    wait_for_another_pair(page, undone_id)
    judged[-1] = (undone_id, "a", 2, judged[-1][3], judged[-1][4])

    judgments = Judgment.objects.filter(labeler=labeler).select_related("pair__response_a", "pair__response_b")
    assert judgments.count() == 5
    assert page.js_errors == []
    for assignment_pk, shown, strength, left_text, right_text in judged:
        assignment = Assignment.objects.select_related("pair__response_a", "pair__response_b").get(pk=assignment_pk)
        judgment = judgments.get(assignment=assignment)
        pair = assignment.pair
        # What the browser showed on each side is what the assignment says it showed.
        shown_left, shown_right = (pair.response_a, pair.response_b) if assignment.a_on_left else (
            pair.response_b, pair.response_a)
        assert (shown_left.text, shown_right.text) == (left_text, right_text)
        # The shown choice maps back to the canonical response_a / response_b.
        expected = {"tie": Judgment.TIE, "both_bad": Judgment.BOTH_BAD}.get(shown)
        if expected is None:
            picked_left = shown == "a"
            expected = Judgment.A if picked_left == assignment.a_on_left else Judgment.B
            chosen, rejected = judgment.chosen_rejected()
            assert chosen.text == (left_text if picked_left else right_text)
            assert rejected.text == (right_text if picked_left else left_text)
        assert judgment.choice == expected
        assert judgment.strength == strength
        assert judgment.a_on_left == assignment.a_on_left
        assert judgment.milliseconds is not None and judgment.milliseconds >= 50
        assert judgment.source == Judgment.HUMAN
        assert assignment.completed_at is not None
        assert pair.judgments_count == 1 and not pair.is_open


EVIL_PROMPT = (
    "Summarise **this**: [click](javascript:window.__pwned=1) "
    '<a href="javascript:window.__pwned=1">raw link</a> <script>window.__pwned=1</script> '
    '<img src=x onerror="window.__pwned=1">'
)
EVIL_A = '<script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=1">'
EVIL_B = '[click](javascript:window.__pwned=1) or <a href="javascript:window.__pwned=1">this</a>'


def assert_nothing_ran(page) -> None:
    page.wait_for_timeout(150)  # an onerror handler would fire by now
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img").count() == 0
    assert page.locator("[onerror]").count() == 0
    assert page.locator('a[href^="javascript:" i]').count() == 0
    inline_scripts = page.evaluate("[...document.scripts].filter(s => !s.src).map(s => s.textContent)")
    assert not any("__pwned" in text for text in inline_scripts)


def test_it_shows_untrusted_text_as_text_and_runs_nothing(page, labeler):
    campaign = make_campaign("evil", members=[labeler], ask_strength=False)
    add_pairs(campaign, [PairInput(EVIL_PROMPT, EVIL_A, EVIL_B),
                         PairInput(EVIL_PROMPT + " again", EVIL_B + " 2", EVIL_A + " 2")], notify=False)
    log_in(page, labeler)
    open_label_page(page, campaign)

    # First pair: rendered in the full page.
    texts = {page.inner_text("#response-a .response-text"), page.inner_text("#response-b .response-text")}
    assert texts == {EVIL_A, EVIL_B}
    assert page.locator("#prompt strong").inner_text() == "this"  # the prompt's Markdown is rendered
    prompt_text = page.inner_text("#prompt")
    assert "raw link" in prompt_text and "click" in prompt_text
    assert_nothing_ran(page)
    for link in page.locator("#prompt a").all():
        link.click()
    assert_nothing_ran(page)

    # Second pair: swapped in by htmx, which would run inline scripts it is given.
    first = current_assignment_id(page)
    page.keyboard.press("3")
    wait_for_another_pair(page, first)
    texts = {page.inner_text("#response-a .response-text"), page.inner_text("#response-b .response-text")}
    assert texts == {EVIL_A + " 2", EVIL_B + " 2"}
    assert_nothing_ran(page)
    assert page.js_errors == []


def test_it_records_one_judgment_for_double_submissions(page, labeler):
    campaign = make_campaign("twice", n_pairs=5, members=[labeler])
    log_in(page, labeler)
    open_label_page(page, campaign)
    judged_pairs = []

    # Two keypresses in the same instant.
    first = current_assignment_id(page)
    judged_pairs.append(Assignment.objects.get(pk=first).pair_id)
    page.evaluate("""() => { for (let i = 0; i < 2; i++)
        document.dispatchEvent(new KeyboardEvent('keydown', {key: '3', bubbles: true})); }""")
    second = wait_for_another_pair(page, first)

    # A double-click on a strength button.
    judged_pairs.append(Assignment.objects.get(pk=second).pair_id)
    page.keyboard.press("1")
    page.dblclick('#strength-row button[name="strength"][value="3"]')
    third = wait_for_another_pair(page, second)

    # Two requests racing past the page's own guard, straight at the server.
    judged_pairs.append(Assignment.objects.get(pk=third).pair_id)
    statuses = page.evaluate("""async (url) => {
        const token = JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRFToken'];
        const post = () => fetch(url, {method: 'POST', headers: {'X-CSRFToken': token, 'HX-Request': 'true'},
                                       body: new URLSearchParams({choice: 'tie', ms: '900'})});
        const responses = await Promise.all([post(), post()]);
        return responses.map(r => r.status);
    }""", f"{campaign.label_url()}{third}/judge/")
    assert statuses == [200, 200]

    judgments = Judgment.objects.filter(labeler=labeler)
    assert sorted(judgments.values_list("pair_id", flat=True)) == sorted(judged_pairs)
    for pair in Pair.objects.filter(pk__in=judged_pairs):
        assert pair.judgments_count == 1
    assert judgments.get(pair_id=judged_pairs[1]).strength == 3
    assert page.inner_text("#judged-today") == "2"  # the page's own count: the raced pair came after
    assert page.js_errors == []


WATCH_SOCKETS = """
    window.__sockets = [];
    const NativeWebSocket = window.WebSocket;
    window.WebSocket = class extends NativeWebSocket {
        constructor(...args) { super(...args); window.__sockets.push(this); }
    };
"""


def test_it_shows_new_pairs_on_an_empty_queue_without_a_reload(page, labeler):
    campaign = make_campaign("waiting", members=[labeler])
    page.add_init_script(WATCH_SOCKETS)
    log_in(page, labeler)
    open_label_page(page, campaign)
    assert "No pairs are waiting for you" in page.inner_text("#queue-empty")
    assert page.locator("#response-a").count() == 0
    # The push goes to listeners only: wait until the page's socket is open (the server has joined
    # it to the campaign's group by then).
    page.wait_for_function("window.__sockets.some(s => s.readyState === WebSocket.OPEN)")

    off_the_loop(add_pairs, campaign, [PairInput("Fresh question?", "Fresh answer one", "Fresh answer two")])

    page.wait_for_selector("#response-a .response-md")  # the formatted text (the raw one shows on r)
    assert page.evaluate(MARKER) == "no reload since"
    texts = {page.inner_text("#response-a .response-text"), page.inner_text("#response-b .response-text")}
    assert texts == {"Fresh answer one", "Fresh answer two"}
    assert Assignment.objects.get(labeler=labeler).pk == current_assignment_id(page)
    assert page.js_errors == []


def test_it_refuses_a_labeler_another_campaigns_page(page, labeler):
    mine = make_campaign("mine", n_pairs=1, members=[labeler])
    theirs = make_campaign("theirs", n_pairs=3)
    log_in(page, labeler)
    assert page.locator(f'a[href="{theirs.label_url()}"]').count() == 0
    assert page.locator(f'a[href="{mine.label_url()}"]').count() == 1

    response = page.goto(theirs.label_url())
    assert response.status == 404
    assert page.request.get(f"/campaigns/{theirs.slug}/instructions/").status == 404
    assert page.request.post(f"/campaigns/{theirs.slug}/label/undo/").status in (403, 404)
    # Its live channel refuses the socket too.
    outcome = page.evaluate("""(path) => new Promise(resolve => {
        const socket = new WebSocket(`ws://${location.host}${path}`);
        socket.onopen = () => { socket.close(); resolve('open'); };
        socket.onclose = () => resolve('refused');
    })""", f"/ws/campaigns/{theirs.slug}/")
    assert outcome == "refused"
    assert not Assignment.objects.filter(pair__campaign=theirs).exists()


@pytest.mark.parametrize("width", [1280, 390])
def test_it_shows_the_strength_question_only_after_a_choice(page, labeler, width):
    campaign = make_campaign(f"strength-{width}", n_pairs=3, members=[labeler])
    assert campaign.ask_strength
    page.set_viewport_size({"width": width, "height": 900})
    log_in(page, labeler)
    open_label_page(page, campaign)
    strength_buttons = page.locator('#strength-row button[name="strength"]')
    assert strength_buttons.count() == 4

    def visible_strength_buttons() -> int:
        return sum(strength_buttons.nth(i).is_visible() for i in range(strength_buttons.count()))

    assert not page.is_visible("#strength-row"), "the strength question shows before any choice"
    assert visible_strength_buttons() == 0

    page.keyboard.press("1")
    page.wait_for_selector("#strength-row", state="visible")
    assert visible_strength_buttons() == 4
    assert " ".join(page.inner_text("#strength-question").split()) == "How much better is A?"

    page.keyboard.press("Escape")
    page.wait_for_selector("#strength-row", state="hidden")
    assert visible_strength_buttons() == 0

    # Back with the mouse, and after a submit the next pair's question is hidden again.
    page.click('button.choice[data-choice="b"]')
    page.wait_for_selector("#strength-row", state="visible")
    assert " ".join(page.inner_text("#strength-question").split()) == "How much better is B?"
    page.click("#strength-cancel")
    page.wait_for_selector("#strength-row", state="hidden")
    first = current_assignment_id(page)
    page.keyboard.press("2")
    page.keyboard.press("3")
    wait_for_another_pair(page, first)
    assert not page.is_visible("#strength-row")
    assert Judgment.objects.filter(labeler=labeler, strength=3).count() == 1
