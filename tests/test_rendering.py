"""How the label page shows real model outputs: Markdown with any HTML in them shown as written, the raw text
beside it, chat prompts as a conversation, a content warning each labeler acknowledges once, and a bounded
cost for any text, however long or odd."""

from __future__ import annotations

import time
import uuid
from html.parser import HTMLParser

import pytest
from django.test import Client

from annotate import rendering
from annotate.actions import PairInput, add_pairs
from annotate.models import Assignment, WarningAcknowledgment
from tests.conftest import PASSWORD, make_campaign, make_user

pytestmark = pytest.mark.django_db

CODE_ANSWER = "Use a loop:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\n- one\n- two\n"
SCRIPT_ANSWER = "Fine.\n\n<script>alert('x')</script>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
PAYLOADS = [
    "<script>window.x = 1</script>",
    '<img src=x onerror="window.x = 2">',
    'Plain answer 3 <svg onload="window.x = 3"></svg>',
    '<a href="javascript:window.x = 4">click me</a>',
    '<iframe srcdoc="<script>parent.x = 5</script>"></iframe>',
]
MARKDOWN_TAGS = rendering.ALLOWED_TAGS | {"div"}  # div: the plain-text block for text shown unformatted


@pytest.fixture(autouse=True)
def fresh_render_cache(monkeypatch):
    """HTML kept by an earlier run (or an earlier version of the renderer) must not answer for this one."""
    monkeypatch.setattr(rendering, "_FORMAT", uuid.uuid4().hex)


class Region(HTMLParser):
    """The text and the tags inside each element whose class or id is `name`, as a browser reads them."""

    def __init__(self, name: str):
        super().__init__(convert_charrefs=True)
        self.name, self.depth, self.texts, self.tags, self.attributes = name, 0, [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth:
            self.tags.add(tag)
            self.attributes += [(tag, key, value) for key, value in attrs.items()]
            self.depth += tag not in ("br", "hr", "img", "input")
        elif self.name in (attrs.get("class") or "").split() or attrs.get("id") == self.name:
            self.depth = 1
            self.texts.append("")

    def handle_endtag(self, tag):
        if self.depth and tag not in ("br", "hr", "img", "input"):
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.texts[-1] += data


def region(body: str, name: str) -> Region:
    parsed = Region(name)
    parsed.feed(body)
    assert parsed.texts, f"no element {name!r} on the page"
    return parsed


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def label_page(user, campaign) -> str:
    answer = client_for(user).get(f"/campaigns/{campaign.slug}/label/")
    assert answer.status_code == 200
    return answer.content.decode()


def test_it_renders_responses_as_sanitised_markdown_with_the_raw_text_beside(labeler):
    campaign = make_campaign(members=[labeler])
    add_pairs(campaign, [PairInput("How do I count to three?", CODE_ANSWER, SCRIPT_ANSWER)], notify=False)
    body = label_page(labeler, campaign)
    assert '<pre><code>for i in range(3):' in body
    assert "<li>one</li>" in body and "<td>1</td>" in body  # lists and tables
    assert "<script>alert" not in body  # nothing in a response is markup...
    formatted = "".join(region(body, "response-md").texts)
    assert "<script>alert('x')</script>" in formatted  # ...and the formatted view shows it as written
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in body  # as does the raw one
    assert "```python" in body  # the raw text, as written
    assert 'id="raw-toggle"' in body


def formatted_views(body: str) -> list[str]:
    """The text of each formatted view on a label page (prompt or chat turns, both responses), checking that
    no element but Markdown's own is in them."""
    chat = 'class="prompt conversation"' in body
    texts = []
    for name in ("turn-text" if chat else "prompt", "response-md"):
        found = region(body, name)
        assert found.tags <= MARKDOWN_TAGS, f"{found.tags - MARKDOWN_TAGS} in the formatted view"
        texts += [text.strip() for text in found.texts]
    return texts


@pytest.mark.parametrize("payload", PAYLOADS)
def test_html_in_a_prompt_a_response_or_a_chat_turn_shows_as_written(labeler, payload):
    campaign = make_campaign(members=[labeler], ask_strength=False)
    turns = [{"role": "system", "content": f"System says {payload}"}, {"role": "user", "content": "Go on."}]
    add_pairs(campaign, [PairInput(f"Payload 0: {payload}", payload, f"*Fine*: {payload}"),
                         PairInput(turns, "Yes.", "No.")], notify=False)
    client = client_for(labeler)
    seen = []
    for _ in range(2):
        body = client.get(f"/campaigns/{campaign.slug}/label/").content.decode()
        seen += formatted_views(body)
        assignment = Assignment.objects.get(labeler=labeler, completed_at__isnull=True)
        client.post(f"/campaigns/{campaign.slug}/label/{assignment.pk}/judge/", {"choice": "a"})
    assert f"Payload 0: {payload}" in seen  # a prompt: every character, nothing vanished
    assert payload in seen  # a response that is only HTML is not an empty box
    assert f"Fine: {payload}" in seen  # Markdown around it still renders
    assert f"System says {payload}" in seen  # a chat turn


def test_links_keep_safe_targets_and_write_out_unsafe_ones():
    html = rendering.render_model_text(
        "[docs](https://example.com/a) [mail](mailto:a@example.com) [up](../x) "
        "[click me](javascript:alert(1)) [file](file:///etc/passwd) [ftp](ftp://example.com/f) "
        "![pic](https://example.com/p.png)")
    assert '<a href="https://example.com/a" rel="noopener noreferrer nofollow">docs</a>' in html
    assert '<a href="mailto:a@example.com"' in html and '<a href="../x"' in html
    assert "[click me](javascript:alert(1))" in html and "javascript:alert(1)\"" not in html
    assert "[file](file:///etc/passwd)" in html and "[ftp](ftp://example.com/f)" in html
    assert "<img" not in html and ">pic</a>" in html  # an image is a link to click, never fetched by itself


def test_admin_instructions_keep_a_small_html_allow_list(labeler):
    campaign = make_campaign(members=[labeler])
    campaign.instructions = ('Read <em>both</em> answers. <script>x()</script><img src=x onerror="x()"> '
                             '<b onclick="x()">Then</b> choose.')
    campaign.save()
    body = client_for(labeler).get(f"/campaigns/{campaign.slug}/instructions/").content.decode()
    assert "<em>both</em>" in body and "<b>Then</b>" in body
    shown = region(body, "instructions")
    assert shown.tags == {"p", "em", "b"} and "x()" not in body
    assert shown.texts[0].strip() == "Read both answers.  Then choose."


@pytest.mark.parametrize("name, text", [
    ("20000 brackets", "[" * 20000),
    ("brackets just under the size limit", "[" * (rendering.MAX_MARKDOWN_CHARS - 20)),
    ("a list nested 300 deep", "".join("  " * i + f"- item {i}\n" for i in range(300))),
    ("a list nested 300 deep on one line", "- " * 300 + "deepest"),
    ("quotes nested 300 deep", "> " * 300 + "deepest"),
    ("1 MB of brackets, links and emphasis", ("[" * 2000 + "[x](" * 500 + "*a _b " * 1000 + "\n") * 100),
])
def test_a_pathological_text_answers_quickly_and_is_shown_whole(labeler, name, text):
    text = f"START\n\n{text}\nEND"
    campaign = make_campaign(members=[labeler])
    add_pairs(campaign, [PairInput(text, text, "Short.")], notify=False)
    started = time.perf_counter()
    body = label_page(labeler, campaign)
    assert time.perf_counter() - started < 10, name  # it took a minute and more before
    shown = [view for view in formatted_views(body) if view.startswith("START") and view.endswith("END")]
    assert len(shown) == 2, name  # the prompt and the response
    assert all("".join(view.split()) == "".join(text.split()) for view in shown), name  # every character


def test_a_renderer_failure_shows_the_text_as_written(labeler, monkeypatch, caplog):
    def fails(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(rendering._MODEL_TEXT, "parse", fails)
    campaign = make_campaign(members=[labeler])
    add_pairs(campaign, [PairInput("A *prompt*", "Answer with <b>bold</b>", "Other")], notify=False)
    body = label_page(labeler, campaign)
    assert "Answer with <b>bold</b>" in [text.strip() for text in region(body, "response-md").texts]
    assert "Markdown renderer failed" in caplog.text


def test_each_text_is_rendered_once_not_on_every_view(labeler, monkeypatch):
    parse = rendering._MODEL_TEXT.parse
    parsed = []
    monkeypatch.setattr(rendering._MODEL_TEXT, "parse",
                        lambda text, env=None: parsed.append(text) or parse(text, env))
    campaign = make_campaign(members=[labeler])
    add_pairs(campaign, [PairInput("Count *to* three", CODE_ANSWER, "One, two, three.")], notify=False)
    assert "<em>to</em>" in label_page(labeler, campaign)
    assert sorted(parsed) == sorted(["Count *to* three", CODE_ANSWER, "One, two, three."])
    again = label_page(labeler, campaign)  # the same pair again: the kept HTML, no second rendering
    assert "<em>to</em>" in again and "<pre><code>for i in range(3):" in again
    assert len(parsed) == 3


def test_the_round_page_and_the_admin_show_model_html_as_written(admin_user):
    from annotate.models import Prompt, Response
    from training.models import Job, Round

    campaign = make_campaign()
    prompt_text = "Payloads: " + " ".join(PAYLOADS)
    add_pairs(campaign, [PairInput(prompt_text, PAYLOADS[0], PAYLOADS[1])], notify=False)
    prompt = Prompt.objects.get(campaign=campaign)
    round_ = Round.objects.create(campaign=campaign, number=1, parent_policy="sft")
    Job.objects.create(round=round_, kind=Job.SAMPLE, order=5, status=Job.SUCCEEDED, result={
        "samples": [{"prompt": prompt_text, "prompt_id": prompt.pk, "new": PAYLOADS[2:], "other": []}]})
    client = client_for(admin_user)
    pages = {
        "review-responses": f"/rounds/{round_.pk}/",
        "result_list": "/admin/annotate/prompt/",
        "content-main": f"/admin/annotate/response/{Response.objects.get(text=PAYLOADS[0]).pk}/change/",
    }
    for name, url in pages.items():
        answer = client.get(url)
        assert answer.status_code == 200, url
        body = answer.content.decode()
        shown = region(body, name)
        assert not [payload for payload in PAYLOADS if payload in body], url  # never as markup
        assert not [(tag, key, value) for tag, key, value in shown.attributes
                    if key.startswith("on") or value == "x" or (value or "").startswith("javascript:")], url
        text = "".join(shown.texts)
        wanted = {"review-responses": PAYLOADS, "result_list": [prompt_text],
                  "content-main": PAYLOADS[:1]}[name]
        assert all(payload in text for payload in wanted), url


def test_it_shows_a_chat_prompt_as_a_conversation(labeler):
    campaign = make_campaign(members=[labeler])
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is **2+2**?"},
             {"role": "assistant", "content": "5"}, {"role": "user", "content": "Are you sure?"}]
    add_pairs(campaign, [PairInput(turns, "Yes.", "No, it is 4.")], notify=False)
    body = client_for(labeler).get(f"/campaigns/{campaign.slug}/label/").content.decode()
    assert body.count('class="turn"') == 4
    assert '<div class="turn" data-role="assistant"><span class="role">assistant</span>' in body
    assert "<strong>2+2</strong>" in body


def test_it_asks_each_labeler_to_acknowledge_a_content_warning_once(labeler):
    other = make_user("olga-other")
    campaign = make_campaign(n_pairs=3, members=[labeler, other],
                             content_warning="Some responses are **harmful** on purpose.")
    client = client_for(labeler)
    url = f"/campaigns/{campaign.slug}/label/"
    first = client.get(url).content.decode()
    assert "Content warning" in first and "<strong>harmful</strong>" in first
    assert 'id="pair"' not in first and not Assignment.objects.exists()  # no pair leased before it is read

    answer = client.post(f"/campaigns/{campaign.slug}/label/acknowledge/")
    assert answer.status_code == 302 and answer.url == url
    assert 'id="pair"' in client.get(url).content.decode()
    client.post(f"/campaigns/{campaign.slug}/label/acknowledge/")  # again: still one acknowledgment
    assert WarningAcknowledgment.objects.filter(user=labeler).count() == 1
    assert "Content warning" not in client.get(url).content.decode()
    assert "Content warning" in client_for(other).get(url).content.decode()  # each labeler acknowledges
