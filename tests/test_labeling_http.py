"""The labeling page over HTTP, with the personas: what a labeler, a reviewer, an admin and an
outsider can and cannot do, and what gets stored."""

from __future__ import annotations

import re
import threading

import pytest
from django.db import connection
from django.test import Client

from annotate import actions
from annotate.actions import PairInput, add_pairs
from annotate.models import Assignment, Judgment, Pair
from tests.conftest import PASSWORD, make_campaign, make_user

pytestmark = pytest.mark.django_db


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def current_assignment(response) -> Assignment:
    match = re.search(rb'data-assignment="(\d+)"', response.content)
    assert match, "no pair on the page"
    return Assignment.objects.select_related("pair").get(pk=int(match.group(1)))


def test_it_shows_a_labeler_their_campaigns_and_a_pair(labeler, campaign):
    client = client_for(labeler)
    home = client.get("/")
    assert home.status_code == 200
    assert campaign.label_url().encode() in home.content
    page = client.get(campaign.label_url())
    assert page.status_code == 200
    assignment = current_assignment(page)
    left, right = assignment.shown()
    text = page.content.decode()
    assert text.index(left.text) < text.index(right.text)
    assert "Judged today: <strong id=\"judged-today\">0</strong>" in text


def test_it_records_a_judgment_and_answers_with_the_next_pair(labeler, campaign):
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    response = client.post(f"{campaign.label_url()}{first.pk}/judge/",
                           {"choice": "a", "strength": "4", "ms": "2300"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert b"<html" not in response.content  # a fragment for htmx to swap in, not a page
    following = current_assignment(response)
    assert following.pk != first.pk
    judgment = Judgment.objects.get()
    shown_left = first.shown()[0]
    assert judgment.chosen_rejected()[0] == shown_left
    assert (judgment.strength, judgment.milliseconds, judgment.a_on_left) == (4, 2300, first.a_on_left)
    assert judgment.labeler == labeler and judgment.source == Judgment.HUMAN


def test_it_stores_a_time_past_the_database_s_integer_as_its_largest(labeler, campaign):
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    response = client.post(f"{campaign.label_url()}{first.pk}/judge/",
                           {"choice": "tie", "ms": str(2**40)}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert Judgment.objects.get().milliseconds == 2**31 - 1


def test_it_records_one_judgment_for_a_double_submit(labeler, campaign):
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    for _ in range(2):
        assert client.post(f"{campaign.label_url()}{first.pk}/judge/", {"choice": "tie"},
                           HTTP_HX_REQUEST="true").status_code == 200
    assert Judgment.objects.filter(pair=first.pair).count() == 1
    assert Pair.objects.get(pk=first.pair_id).judgments_count == 1


def test_it_asks_for_strength_when_the_campaign_wants_it(labeler, campaign):
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    response = client.post(f"{campaign.label_url()}{first.pk}/judge/", {"choice": "b"}, HTTP_HX_REQUEST="true")
    assert b"strength 1 to 4" in response.content
    assert current_assignment(response).pk == first.pk
    assert not Judgment.objects.exists()


def test_it_refuses_options_the_campaign_does_not_offer(labeler):
    campaign = make_campaign("strict", n_pairs=2, members=[labeler], allow_tie=False, allow_both_bad=False)
    client = client_for(labeler)
    page = client.get(campaign.label_url())
    assert b'data-choice="tie"' not in page.content
    first = current_assignment(page)
    response = client.post(f"{campaign.label_url()}{first.pk}/judge/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    assert b"does not offer" in response.content
    assert not Judgment.objects.exists()


def test_it_skips_and_never_shows_the_skipped_pair_again(labeler):
    campaign = make_campaign("two", n_pairs=2, members=[labeler])
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    after_skip = client.post(f"{campaign.label_url()}{first.pk}/skip/", HTTP_HX_REQUEST="true")
    second = current_assignment(after_skip)
    assert second.pair_id != first.pair_id
    client.post(f"{campaign.label_url()}{second.pk}/judge/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    assert b"No pairs are waiting for you" in client.get(campaign.label_url()).content


def undo_id(response) -> str:
    """The judgment the page's "Undo last" button takes back ("" when none)."""
    match = re.search(r"""hx-vals='\{"judgment": "(\d*)"\}'""", response.content.decode())
    assert match, "no undo button on the page"
    return match.group(1)


def press_undo(client, campaign, judgment_id: str):
    """What "Undo last" (or the key u) posts: the judgment id its page was rendered with."""
    return client.post(f"{campaign.label_url()}undo/", {"judgment": judgment_id}, HTTP_HX_REQUEST="true")


def test_it_undoes_the_last_judgment_and_shows_that_pair_again(labeler, campaign):
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    judged = client.post(f"{campaign.label_url()}{first.pk}/judge/", {"choice": "both_bad"},
                         HTTP_HX_REQUEST="true")
    undone = press_undo(client, campaign, undo_id(judged))
    assert current_assignment(undone).pair_id == first.pair_id
    assert not Judgment.objects.exists()
    assert Pair.objects.get(pk=first.pair_id).judgments_count == 0


def left_in_campaign(response) -> int:
    match = re.search(rb'id="left-in-campaign">(\d+)<', response.content)
    assert match, "no progress line on the page"
    return int(match.group(1))


def test_its_progress_line_counts_judgments_undos_and_new_pairs(labeler):
    campaign = make_campaign("progress", n_pairs=10, members=[labeler], overlap=2)
    actions.forget_judgments_left(campaign)  # test databases reuse campaign ids; the cache outlives them
    client = client_for(labeler)
    page = client.get(campaign.label_url())
    assert left_in_campaign(page) == 20
    first = current_assignment(page)
    judged = client.post(f"{campaign.label_url()}{first.pk}/judge/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    assert left_in_campaign(judged) == 19  # counted down at once, without a recount
    undone = press_undo(client, campaign, undo_id(judged))
    assert left_in_campaign(undone) == 20
    add_pairs(campaign, [PairInput(f"More {i}?", f"Yes {i}", f"No {i}") for i in range(3)], notify=False)
    assert left_in_campaign(client.get(campaign.label_url())) == 26


def test_it_says_when_the_queue_is_empty_and_listens_for_new_pairs(labeler):
    campaign = make_campaign("empty", members=[labeler])
    page = client_for(labeler).get(campaign.label_url())
    assert b"No pairs are waiting for you" in page.content
    assert b'ws-connect="/ws/campaigns/empty/"' in page.content


def test_it_stops_at_the_daily_cap(labeler):
    campaign = make_campaign("capped", n_pairs=5, members=[labeler], daily_cap=1)
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    response = client.post(f"{campaign.label_url()}{first.pk}/judge/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    assert b"reached today's cap" in response.content


def test_it_escapes_model_outputs(labeler):
    campaign = make_campaign("xss", members=[labeler])
    add_pairs(campaign, [PairInput("Say [hi](javascript:alert(1)) <script>alert(2)</script>",
                                   '<script>alert("a")</script>', '<img src=x onerror="alert(3)">')], notify=False)
    body = client_for(labeler).get(campaign.label_url()).content.decode()
    assert "<script>alert" not in body
    assert "<img src=x" not in body
    assert 'href="javascript:' not in body and "[hi](javascript:alert(1))" in body  # written out, not a link
    assert "&lt;script&gt;alert(&quot;a&quot;)&lt;/script&gt;" in body
    assert "&lt;img src=x onerror=&quot;alert(3)&quot;&gt;" in body


SYSTEM = {"role": "system", "content": "Answer <b>tersely</b> <script>alert(1)</script>"}
USER = {"role": "user", "content": "Capital of France? <img src=x onerror=alert(2)>"}


@pytest.mark.parametrize("turns, roles", [
    ([SYSTEM, USER], ["system", "user"]),
    ([SYSTEM], ["system"]),                                  # one turn, but not the user's: its role shows
    ([{"role": '"><script>alert(3)</script>', "content": "odd role"}], ['"><script>alert(3)</script>']),
    ([USER], []),                                            # one user turn reads as plain text
])
def test_it_shows_chat_prompts_with_their_roles_escaped(labeler, turns, roles):
    campaign = make_campaign("chat", members=[labeler])
    add_pairs(campaign, [PairInput(turns, "Paris", "Lyon")], notify=False)
    body = client_for(labeler).get(campaign.label_url()).content.decode()
    shown = re.findall(r'<div class="turn" data-role="([^"]*)"><span class="role">([^<]*)</span>', body)
    escape = {'"': "&quot;", "<": "&lt;", ">": "&gt;"}
    escaped = ["".join(escape.get(c, c) for c in role) for role in roles]
    assert shown == [(role, role) for role in escaped]
    assert ('class="prompt conversation"' in body) == bool(roles)
    assert "Capital of France?" in body or USER not in turns
    for unsafe in ("<script>alert", "<img src=x", "onerror=alert(2)>"):
        assert unsafe not in body


def test_it_refuses_an_outsider_everything(outsider, campaign):
    client = client_for(outsider)
    assert campaign.label_url().encode() not in client.get("/").content
    assert client.get(campaign.label_url()).status_code == 404
    assert client.get(campaign.get_absolute_url()).status_code == 404
    assert client.get(f"/campaigns/{campaign.slug}/export/").status_code == 404
    assert client.get(f"/campaigns/{campaign.slug}/import/").status_code == 404
    assert client.get("/admin/annotate/campaign/").status_code == 302  # to the admin login
    assert not Assignment.objects.exists()


def test_it_refuses_a_labeler_someone_elses_assignment(labeler, outsider, campaign):
    theirs = current_assignment(client_for(labeler).get(campaign.label_url()))
    campaign.members.add(outsider)
    client = client_for(outsider)
    assert client.post(f"{campaign.label_url()}{theirs.pk}/judge/", {"choice": "tie"}).status_code == 404
    assert client.post(f"{campaign.label_url()}{theirs.pk}/skip/").status_code == 404
    assert not Judgment.objects.exists()
    assert not Assignment.objects.get(pk=theirs.pk).skipped


def test_it_refuses_a_judgment_sent_through_another_campaign_s_page(labeler, campaign):
    other = make_campaign(slug="kitchen", n_pairs=3, members=[labeler])
    mine = current_assignment(client_for(labeler).get(campaign.label_url()))
    client = client_for(labeler)
    # A pair is judged under its own campaign's rules and counts: never through another campaign's URL.
    assert client.post(f"{other.label_url()}{mine.pk}/judge/", {"choice": "a", "strength": "2"}).status_code == 404
    assert not Judgment.objects.exists()
    assert client.post(f"{campaign.label_url()}{mine.pk}/judge/", {"choice": "a", "strength": "2"}).status_code == 200
    assert Judgment.objects.get().pair.campaign == campaign


def test_it_lets_a_labeler_not_import_or_review(labeler, campaign):
    client = client_for(labeler)
    assert client.get(campaign.get_absolute_url()).status_code == 404
    assert client.post(f"/campaigns/{campaign.slug}/import/").status_code == 404


def test_it_lets_a_reviewer_read_but_not_import(reviewer, campaign):
    client = client_for(reviewer)
    assert client.get(campaign.get_absolute_url()).status_code == 200
    assert client.get(f"/campaigns/{campaign.slug}/import/").status_code == 404


def test_it_lets_an_admin_see_and_import(admin_user, campaign):
    client = client_for(admin_user)
    page = client.get(campaign.get_absolute_url())
    assert page.status_code == 200 and b"Import a file" in page.content
    assert client.get(f"/campaigns/{campaign.slug}/import/").status_code == 200


def test_it_signs_out_a_labeler_deactivated_or_deleted_mid_session(labeler, campaign):
    client = client_for(labeler)
    assert client.get(campaign.label_url()).status_code == 200
    labeler.is_active = False
    labeler.save()
    assert client.get(campaign.label_url())["Location"].startswith("/accounts/login/")
    # A user who never labeled may be deleted (one who did is deactivated instead: tests/test_deletion.py).
    newcomer = make_user("nina-newcomer")
    campaign.members.add(newcomer)
    client = client_for(newcomer)
    assert client.get("/").status_code == 200
    newcomer.delete()
    assert client.get(campaign.label_url())["Location"].startswith("/accounts/login/")


def test_it_requires_login(campaign):
    response = Client().get(campaign.label_url())
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_it_shows_gold_items_to_every_labeler_and_reports_agreement(labeler, outsider, reviewer):
    campaign = make_campaign("gold", n_pairs=3, members=[labeler, outsider], gold_rate=1.0, overlap=1)
    gold = Pair.objects.filter(campaign=campaign).order_by("id").first()
    gold.gold_choice = Judgment.A
    gold.save(update_fields=["gold_choice"])
    for user, shown_choice_for_a in ((labeler, True), (outsider, False)):
        client = client_for(user)
        assignment = current_assignment(client.get(campaign.label_url()))
        assert assignment.pair_id == gold.pk  # gold first at a gold rate of 1, beyond the overlap of 1
        agrees = "a" if assignment.a_on_left == shown_choice_for_a else "b"
        client.post(f"{campaign.label_url()}{assignment.pk}/judge/", {"choice": agrees, "strength": "2"},
                    HTTP_HX_REQUEST="true")
    assert Judgment.objects.filter(pair=gold).count() == 2
    page = client_for(reviewer).get(campaign.get_absolute_url()).content.decode()
    assert re.search(r"lena-labeler</td><td>human</td><td>1</td><td>1</td><td>1 / 1", page)
    assert re.search(r"otto-outsider</td><td>human</td><td>1</td><td>1</td><td>0 / 1", page)


def test_it_refuses_a_skip_sent_through_another_campaign_s_page(labeler, campaign):
    other = make_campaign(slug="kitchen", n_pairs=3, members=[labeler])
    client = client_for(labeler)
    mine = current_assignment(client.get(campaign.label_url()))
    assert client.post(f"{other.label_url()}{mine.pk}/skip/", HTTP_HX_REQUEST="true").status_code == 404
    assert not Assignment.objects.get(pk=mine.pk).skipped
    assert current_assignment(client.get(campaign.label_url())).pk == mine.pk  # still theirs to judge


def judge_two(client, campaign):
    """Judge two pairs through the page; returns the page after the second judgment and both pair ids."""
    first = current_assignment(client.get(campaign.label_url()))
    page = client.post(f"{campaign.label_url()}{first.pk}/judge/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    second = current_assignment(page)
    page = client.post(f"{campaign.label_url()}{second.pk}/judge/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    return page, first.pair_id, second.pair_id


def test_it_undoes_one_judgment_for_a_fast_double_undo(labeler, campaign):
    client = client_for(labeler)
    page, first_pair, second_pair = judge_two(client, campaign)
    last = undo_id(page)
    assert last == str(Judgment.objects.get(pair_id=second_pair).pk)
    # Two presses of u before the page changes both send the judgment the page showed as last.
    undone = press_undo(client, campaign, last)
    again = press_undo(client, campaign, last)
    assert b"Undone: judge it again." in undone.content
    assert b"undone already" in again.content
    assert list(Judgment.objects.values_list("pair_id", flat=True)) == [first_pair]
    assert Pair.objects.get(pk=first_pair).judgments_count == 1
    assert current_assignment(again).pair_id == second_pair
    # Pressing u again on the page that came back takes back the one before, as a labeler expects.
    assert undo_id(again) == str(Judgment.objects.get(pair_id=first_pair).pk)
    press_undo(client, campaign, undo_id(again))
    assert not Judgment.objects.exists()


def test_it_refuses_an_undo_from_a_page_older_than_the_last_judgment(labeler, campaign):
    client = client_for(labeler)
    first = current_assignment(client.get(campaign.label_url()))
    stale = client.post(f"{campaign.label_url()}{first.pk}/judge/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    second = current_assignment(stale)
    # Another tab judges a second pair; the first tab still shows the first judgment as last.
    client.post(f"{campaign.label_url()}{second.pk}/judge/", {"choice": "tie"}, HTTP_HX_REQUEST="true")
    refused = press_undo(client, campaign, undo_id(stale))
    assert b"you have judged another pair since" in refused.content
    assert Judgment.objects.count() == 2
    assert set(Pair.objects.filter(pk__in=[first.pair_id, second.pair_id])
               .values_list("judgments_count", flat=True)) == {1}


def test_it_has_nothing_to_undo_on_a_page_showing_no_judgment(labeler, campaign):
    client = client_for(labeler)
    page = client.get(campaign.label_url())
    assert undo_id(page) == ""
    response = press_undo(client, campaign, "")
    assert b"Nothing to undo" in response.content


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_it_undoes_one_judgment_for_two_undos_arriving_at_once(labeler, campaign):
    if connection.vendor != "postgresql":
        pytest.skip(f"needs PostgreSQL (real concurrency); DATABASE_URL is {connection.vendor}")
    page, first_pair, second_pair = judge_two(client_for(labeler), campaign)
    last = undo_id(page)
    start = threading.Barrier(4)
    notes: list[bytes] = []

    def press_u():
        try:
            client = client_for(labeler)
            start.wait()
            notes.append(press_undo(client, campaign, last).content)
        finally:
            connection.close()

    threads = [threading.Thread(target=press_u) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(b"Undone: judge it again." in note for note in notes) == 1
    assert sum(b"undone already" in note for note in notes) == 3
    assert list(Judgment.objects.values_list("pair_id", flat=True)) == [first_pair]
    assert Pair.objects.get(pk=second_pair).judgments_count == 0
