"""How the label page shows real model outputs: sanitised Markdown with the raw text beside it, chat
prompts as a conversation, and a content warning each labeler acknowledges once."""

from __future__ import annotations

import pytest
from django.test import Client

from annotate.actions import PairInput, add_pairs
from annotate.models import Assignment, WarningAcknowledgment
from tests.conftest import PASSWORD, make_campaign, make_user

pytestmark = pytest.mark.django_db

CODE_ANSWER = "Use a loop:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\n- one\n- two\n"
SCRIPT_ANSWER = "Fine.\n\n<script>alert('x')</script>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_it_renders_responses_as_sanitised_markdown_with_the_raw_text_beside(labeler):
    campaign = make_campaign(members=[labeler])
    add_pairs(campaign, [PairInput("How do I count to three?", CODE_ANSWER, SCRIPT_ANSWER)], notify=False)
    body = client_for(labeler).get(f"/campaigns/{campaign.slug}/label/").content.decode()
    assert '<pre><code>for i in range(3):' in body
    assert "<li>one</li>" in body and "<td>1</td>" in body  # lists and tables
    assert "<script>alert" not in body  # stripped from the formatted view...
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in body  # ...and shown as text in the raw one
    assert "```python" in body  # the raw text, as written
    assert 'id="raw-toggle"' in body


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
