"""The HTTP API (/api/v1/) through the real HTTP client with real tokens: tokens and scopes, labeling
with the page's leases and rules, import and export as the commands do them, rounds, and each role's
token on every endpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from annotate.actions import PairInput, add_pairs, change_campaign_settings, claim_next_pair, submit_judgment
from annotate.models import Assignment, Campaign, Judgment, Pair
from api.actions import create_token, revoke_token
from api.models import ApiToken
from tests.conftest import make_campaign
from training.models import Job, Round

pytestmark = pytest.mark.django_db

API = "/api/v1"


class Api:
    """The test client sending one token as `Authorization: Bearer`."""

    def __init__(self, token: str | None):
        self.client = Client()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path, **params):
        return self.client.get(API + path, params, headers=self.headers)

    def post(self, path, body=None):
        return self.client.post(API + path, json.dumps(body or {}), content_type="application/json",
                                headers=self.headers)

    def delete(self, path, body=None):
        return self.client.delete(API + path, headers=self.headers)

    def patch(self, path, body):
        return self.client.patch(API + path, json.dumps(body), content_type="application/json",
                                 headers=self.headers)


def api_for(user, scopes=None) -> Api:
    return Api(create_token(user, "test", scopes)[1])


@pytest.fixture
def no_broker(monkeypatch, settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 1}
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)  # the rows are the record


# --- tokens -------------------------------------------------------------------------------------

def test_it_prints_a_new_token_once_and_keeps_only_its_hash(labeler, campaign):
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_token", labeler.username, "--name", "ai labeler", stdout=out, stderr=err)
    raw = out.getvalue().strip()
    token = ApiToken.objects.get(user=labeler)
    assert token.scopes == ["label"] and "shown only now" in err.getvalue()
    stored = json.dumps(list(ApiToken.objects.values()), default=str)
    assert raw.split("_", 2)[2] not in stored  # the secret is nowhere in the row
    response = Api(raw).get("/campaigns")
    assert response.status_code == 200 and [c["slug"] for c in response.json()] == ["shop"]
    token.refresh_from_db()
    assert token.last_used_at is not None


def test_the_command_refuses_a_scope_above_the_users_role(labeler, reviewer):
    with pytest.raises(CommandError, match="may not have the scope admin"):
        call_command("create_api_token", labeler.username, "--scope", "admin", stdout=io.StringIO())
    with pytest.raises(CommandError, match="no user"):
        call_command("create_api_token", "nobody", stdout=io.StringIO())
    call_command("create_api_token", reviewer.username, "--scope", "export", stdout=io.StringIO(),
                 stderr=io.StringIO())
    assert ApiToken.objects.get(user=reviewer).scopes == ["export"]
    assert not ApiToken.objects.filter(user=labeler).exists()


def test_the_admin_lists_tokens_without_their_secret_and_revokes_them(admin_user, labeler, client):
    token, raw = create_token(labeler, "nightly pipeline")
    client.force_login(admin_user)
    page = client.get("/admin/api/apitoken/").content.decode()
    assert "nightly pipeline" in page and token.prefix in page and raw not in page and token.hash not in page
    detail = client.get(f"/admin/api/apitoken/{token.pk}/change/").content.decode()
    assert raw.split("_", 2)[2] not in detail and token.hash not in detail
    client.post("/admin/api/apitoken/", {"action": "revoke", "_selected_action": [token.pk]})
    assert Api(raw).get("/campaigns").status_code == 401


def test_it_refuses_a_missing_forged_revoked_or_deactivated_token_with_401(labeler, campaign, client):
    token, raw = create_token(labeler, "t")
    assert Api(raw).get("/campaigns").status_code == 200
    assert Api(None).get("/campaigns").status_code == 401
    assert Api(raw[:-2] + "xx").get("/campaigns").status_code == 401
    assert Api("not-a-token").get("/campaigns").status_code == 401
    client.force_login(labeler)  # a session is not a token
    assert client.get(f"{API}/campaigns").status_code == 401
    revoke_token(token)
    assert Api(raw).get("/campaigns").status_code == 401
    other = create_token(labeler, "second")[1]
    labeler.is_active = False
    labeler.save(update_fields=["is_active"])
    assert Api(other).get("/campaigns").status_code == 401


def test_a_token_loses_what_its_users_role_no_longer_allows(admin_user, campaign):
    api = api_for(admin_user)
    assert api.get("/campaigns/shop/queue").status_code == 200
    admin_user.is_staff = admin_user.is_superuser = False
    admin_user.save(update_fields=["is_staff", "is_superuser"])
    response = api.get("/campaigns/shop/queue")
    assert response.status_code == 403 and "review" in response.json()["detail"]


def test_an_admin_creates_a_campaign_and_changes_its_settings(admin_user, labeler):
    api = api_for(admin_user)
    created = api.post("/campaigns", {"slug": "new", "name": "New one", "overlap": 2, "ask_strength": False})
    assert created.status_code == 201
    assert created.json()["overlap"] == 2 and created.json()["lease_seconds"] == 600  # the default
    taken = api.post("/campaigns", {"slug": "new", "name": "Again"})
    assert taken.status_code == 400 and set(taken.json()["errors"]) == {"slug"}
    assert api.post("/campaigns", {"slug": "bad slug!", "name": "x"}).status_code == 422

    changed = api.patch("/campaigns/new", {"allow_tie": False, "daily_cap": 50})
    assert changed.status_code == 200 and changed.json()["choices"] == ["a", "b", "both_bad"]
    assert changed.json()["overlap"] == 2 and changed.json()["daily_cap"] == 50
    assert api.patch("/campaigns/new", {"overlap": 0}).status_code == 422
    assert api_for(labeler).patch("/campaigns/new", {"name": "mine"}).status_code == 403
    assert api.patch("/campaigns/nope", {"name": "x"}).status_code == 404
    with pytest.raises(ValidationError) as refused:  # the action itself, for callers without a schema
        change_campaign_settings(Campaign.objects.get(slug="new"), instructions=None, overlap=3)
    assert set(refused.value.message_dict) == {"instructions"}
    assert Campaign.objects.get(slug="new").overlap == 2


def test_a_new_overlap_reopens_and_closes_pairs_at_once(admin_user, labeler, outsider):
    campaign = make_campaign(slug="k", n_pairs=2, members=[labeler, outsider], overlap=1)
    add_pairs(campaign, [PairInput("Known?", "good", "bad", preferred="a")], notify=False)
    judged(campaign, labeler, n=2)
    api = api_for(admin_user)
    assert api.get("/campaigns/k/queue").json()["open_pairs"] == 0
    assert api.patch("/campaigns/k", {"overlap": 2}).status_code == 200
    state = api.get("/campaigns/k/queue").json()
    assert state["open_pairs"] == 2 and state["judgments_left"] == 2  # the imported preference stays judged
    assert api_for(outsider).post("/campaigns/k/claim").json()["assignment"] is not None
    api.patch("/campaigns/k", {"overlap": 1})
    assert api.get("/campaigns/k/queue").json()["open_pairs"] == 0


# --- labeling -----------------------------------------------------------------------------------

def test_a_labeler_labels_through_the_api_with_the_pages_rules(labeler, campaign):
    api = api_for(labeler)
    claim = api.post("/campaigns/shop/claim").json()
    shown = claim["assignment"]
    assert shown["prompt"].startswith("Question") and claim["choices"] == ["a", "b", "tie", "both_bad"]
    assert api.post("/campaigns/shop/claim").json()["assignment"]["id"] == shown["id"]  # the same lease
    path = f"/campaigns/shop/assignments/{shown['id']}/judgment"
    missing = api.post(path, {"choice": "a"})
    assert missing.status_code == 400 and missing.json()["detail"] == "say how much better: strength 1 to 4"
    response = api.post(path, {"choice": "a", "strength": 4, "milliseconds": 900})
    assert response.status_code == 201
    judgment = Judgment.objects.get(pk=response.json()["id"])
    left_is_a = Assignment.objects.get(pk=shown["id"]).a_on_left
    assert judgment.source == Judgment.API and judgment.labeler == labeler and judgment.milliseconds == 900
    assert judgment.choice == ("a" if left_is_a else "b")  # shown terms turned into the pair's terms
    again = api.post(path, {"choice": "b", "strength": 1})
    assert again.status_code == 200 and again.json()["created"] is False
    assert Judgment.objects.filter(labeler=labeler).count() == 1

    undone = api.post("/campaigns/shop/undo", {"judgment_id": judgment.pk})
    assert undone.status_code == 200 and not Judgment.objects.filter(pk=judgment.pk).exists()
    assert api.post("/campaigns/shop/undo", {"judgment_id": judgment.pk}).status_code == 409
    assert api.post("/campaigns/shop/claim").json()["assignment"]["id"] == shown["id"]  # leased back

    skipped = api.post(f"/campaigns/shop/assignments/{shown['id']}/skip")
    assert skipped.status_code == 200 and skipped.json()["skipped"] is True
    assert api.post("/campaigns/shop/claim").json()["assignment"]["pair_id"] != shown["pair_id"]


def test_a_labeler_acknowledges_a_content_warning_before_the_first_pair(labeler):
    make_campaign(slug="red", n_pairs=2, members=[labeler], content_warning="Offensive text ahead.")
    api = api_for(labeler)
    pending = api.post("/campaigns/red/claim")
    assert pending.status_code == 409 and pending.json()["content_warning"] == "Offensive text ahead."
    assert api.post("/campaigns/red/warning").status_code == 200
    assert api.post("/campaigns/red/claim").json()["assignment"] is not None


def test_a_judgment_can_bring_the_next_pair_in_the_same_round_trip(labeler, campaign):
    api = api_for(labeler)
    shown = api.post("/campaigns/shop/claim").json()["assignment"]
    judged_pairs = set()
    for _ in range(3):
        answer = api.post(f"/campaigns/shop/assignments/{shown['id']}/judgment?next=true",
                          {"choice": "tie"}).json()
        judged_pairs.add(answer["pair_id"])
        shown = answer["next"]["assignment"]
        assert shown["pair_id"] not in judged_pairs and answer["next"]["judged_today"] == len(judged_pairs)
    assert Judgment.objects.filter(labeler=labeler, source=Judgment.API).count() == 3
    without = api.post(f"/campaigns/shop/assignments/{shown['id']}/judgment", {"choice": "tie"}).json()
    assert without["next"] is None


def test_claims_next_pairs_and_samples_give_a_chat_prompts_turns(admin_user, reviewer, labeler, no_broker):
    campaign = make_campaign(slug="chat", members=[labeler], overlap=1, ask_strength=False)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
             {"role": "assistant", "content": "5."}, {"role": "user", "content": "As a sentence?"}]
    add_pairs(campaign, [PairInput(turns, "Two plus three is five.", "Five it is."),
                         PairInput("A plain question?", "yes", "no")], notify=False)
    api = api_for(labeler)
    seen = {}
    shown = api.post("/campaigns/chat/claim").json()["assignment"]
    while shown:
        seen[shown["prompt"]] = shown["prompt_turns"]
        answer = api.post(f"/campaigns/chat/assignments/{shown['id']}/judgment?next=true", {"choice": "a"}).json()
        shown = answer["next"]["assignment"]  # the next pair's prompt comes the same way
    chat_text = Pair.objects.get(prompt__turns__isnull=False).prompt.text
    assert seen == {chat_text: turns, "A plain question?": None}
    assert chat_text.startswith("**system:** Be brief.")  # the flattened text stays as it was

    round_id = api_for(admin_user).post("/campaigns/chat/rounds", {"preset": "tiny"}).json()["id"]
    prompt_ids = dict(Pair.objects.values_list("prompt__text", "prompt_id"))
    Job.objects.filter(round_id=round_id, kind=Job.SAMPLE).update(status=Job.SUCCEEDED, result={"samples": [
        {"prompt": text, "prompt_id": pk, "new": ["x"], "other": []} for text, pk in prompt_ids.items()]})
    samples = api_for(reviewer).get(f"/rounds/{round_id}/samples").json()
    assert {s["prompt"]: s["prompt_turns"] for s in samples} == seen


def test_api_labelers_share_the_queue_and_its_overlap_with_the_page(labeler, outsider):
    campaign = make_campaign(slug="one", n_pairs=1, members=[labeler, outsider], overlap=1)
    held = claim_next_pair(campaign, labeler).assignment  # leased on the page
    claim = api_for(outsider).post("/campaigns/one/claim").json()
    assert claim["assignment"] is None and claim["reason"] == "empty"
    submit_judgment(assignment_id=held.pk, labeler=labeler, choice="a", strength=2)
    assert Pair.objects.get().is_open is False


def test_a_labeler_cannot_judge_anothers_lease_or_label_anothers_campaign(labeler, outsider, campaign):
    make_campaign(slug="other", n_pairs=1, members=[outsider])
    held = claim_next_pair(campaign, labeler).assignment
    api = api_for(outsider)
    assert api.post("/campaigns/shop/claim").status_code == 404
    assert api.post(f"/campaigns/other/assignments/{held.pk}/judgment", {"choice": "a", "strength": 1}) \
        .status_code == 404
    assert not Judgment.objects.exists()


def test_an_invalid_judgment_is_refused_with_422_and_changes_nothing(labeler, campaign):
    api = api_for(labeler)
    assignment = api.post("/campaigns/shop/claim").json()["assignment"]
    path = f"/campaigns/shop/assignments/{assignment['id']}/judgment"
    for body in ({"choice": "c"}, {"choice": "a", "strength": 9}, {"choice": "a", "rationale": "x\x00"},
                 {"choice": "a", "milliseconds": -1}):
        assert api.post(path, body).status_code == 422, body
    assert not Judgment.objects.exists()


# --- import, export, queue ----------------------------------------------------------------------

ROWS = [{"prompt": f"What is {i} + {i}?", "response_a": f"It is {2 * i}.", "response_b": f"Maybe {i}."}
        for i in range(3)]


def test_it_imports_pairs_from_a_json_body_as_import_pairs_does(admin_user):
    make_campaign(slug="imp")
    api = api_for(admin_user)
    response = api.post("/campaigns/imp/pairs", {"rows": ROWS, "priority": 5})
    assert response.status_code == 201 and response.json() == {"created": 3, "skipped": 0, "rows": 3}
    assert set(Pair.objects.values_list("priority", flat=True)) == {5}
    assert api.post("/campaigns/imp/pairs", {"rows": ROWS}).json() == {"created": 0, "skipped": 3, "rows": 3}


def test_a_bad_row_imports_nothing_and_names_its_line_and_field_as_the_command_does(admin_user, tmp_path):
    make_campaign(slug="imp")
    rows = [*ROWS, {"prompt": "Fine?", "response_a": "", "response_b": "b"}]
    response = api_for(admin_user).post("/campaigns/imp/pairs", {"rows": rows})
    assert response.status_code == 400 and not Pair.objects.exists()
    path = Path(tmp_path) / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(CommandError) as refused:
        call_command("import_pairs", "imp", str(path))
    assert response.json()["errors"] == [line.strip() for line in str(refused.value).splitlines()[1:]]
    assert response.json()["errors"][0].startswith("line 4, field 'response_a'")
    nul = api_for(admin_user).post("/campaigns/imp/pairs", {"rows": [{**ROWS[0], "prompt": "a\x00b"}]})
    assert nul.status_code == 400 and "line 1, field 'prompt': holds a NUL" in nul.json()["detail"]


def test_an_uploaded_file_is_imported_in_the_background_as_the_page_does(admin_user, settings,
                                                                      django_capture_on_commit_callbacks):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from annotate.importing import run_import_job

    make_campaign(slug="imp")
    api = api_for(admin_user)
    rows = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    with django_capture_on_commit_callbacks() as enqueued:
        response = api.client.post(f"{API}/campaigns/imp/imports", headers=api.headers, data={
            "file": SimpleUploadedFile("pairs.jsonl", rows), "priority": "4"})
    assert response.status_code == 202 and response.json()["status"] == "queued" and len(enqueued) == 1
    job_id = response.json()["id"]
    run_import_job(job_id)  # what the worker runs
    done = api.get(f"/campaigns/imp/imports/{job_id}").json()
    assert (done["status"], done["pairs_created"], done["rows_total"]) == ("succeeded", 3, 3)
    assert set(Pair.objects.values_list("priority", flat=True)) == {4}

    settings.PAIRLOOP = {**settings.PAIRLOOP, "MAX_UPLOAD_BYTES": 10}
    too_big = api.client.post(f"{API}/campaigns/imp/imports", headers=api.headers,
                              data={"file": SimpleUploadedFile("pairs.jsonl", rows)})
    assert too_big.status_code == 413 and "PAIRLOOP_MAX_UPLOAD_BYTES" in too_big.json()["detail"]
    assert api.client.post(f"{API}/campaigns/imp/imports", headers=api.headers).status_code == 400
    assert api_for(admin_user, ["label"]).get(f"/campaigns/imp/imports/{job_id}").status_code == 403


def test_an_upload_is_refused_with_the_pages_bounds_naming_the_field_and_nothing_stored(admin_user):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from annotate.importing import uploads_dir
    from annotate.models import ImportJob

    make_campaign(slug="imp")
    api = api_for(admin_user)
    rows = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    stored = set(uploads_dir().iterdir()) if uploads_dir().is_dir() else set()
    for fields, detail in (({"priority": str(2**31)}, "Priority must be at most 2147483647."),
                           ({"priority": str(-(2**31) - 1)}, "Priority must be at least -2147483648."),
                           ({"priority": "high"}, "Priority must be a whole number, not 'high'."),
                           ({"pairs_per_prompt": "0"}, "Pairs per prompt must be at least 1.")):
        response = api.client.post(f"{API}/campaigns/imp/imports", headers=api.headers,
                                   data={"file": SimpleUploadedFile("pairs.jsonl", rows), **fields})
        assert (response.status_code, response.json()) == (400, {"detail": detail})
    assert not ImportJob.objects.exists() and not Pair.objects.exists()
    assert (set(uploads_dir().iterdir()) if uploads_dir().is_dir() else set()) == stored


def test_it_streams_the_same_export_as_export_pairs(reviewer, labeler, campaign, tmp_path):
    assignment = claim_next_pair(campaign, labeler).assignment
    submit_judgment(assignment_id=assignment.pk, labeler=labeler, choice="b", strength=3)
    api = api_for(reviewer)
    for raw in (False, True):
        response = api.get("/campaigns/shop/export", format="jsonl", raw=str(raw).lower())
        assert response.status_code == 200
        out = tmp_path / f"export-{raw}.jsonl"
        call_command("export_pairs", "shop", str(out), *(["--raw"] if raw else []), stdout=io.StringIO())
        assert b"".join(response.streaming_content) == out.read_bytes()
    assert api.get("/campaigns/shop/export", format="csv").status_code == 400
    assert api.get("/campaigns/shop/export", trl_format="sharegpt").status_code == 400
    response = api.get("/campaigns/shop/export", format="jsonl", trl_format="conversational")
    out = tmp_path / "conversational.jsonl"
    call_command("export_pairs", "shop", str(out), "--trl-format", "conversational", stdout=io.StringIO())
    body = b"".join(response.streaming_content)
    assert body == out.read_bytes() and json.loads(body)["chosen"][0]["role"] == "assistant"


def test_it_shows_the_queue_state_as_the_campaign_page_counts_it(reviewer, labeler, campaign):
    assignment = claim_next_pair(campaign, labeler).assignment
    submit_judgment(assignment_id=assignment.pk, labeler=labeler, choice="a", strength=1)
    claim_next_pair(campaign, labeler)
    state = api_for(reviewer).get("/campaigns/shop/queue").json()
    assert state["pairs"] == 10 and state["open_pairs"] == 9 and state["judgments"] == 1
    assert state["live_leases"] == 1 and state["pairs_by_judgments"] == {"0": 9, "1": 1}
    assert state["judgments_left"] == 10 * campaign.overlap - 1
    page = Client()
    page.force_login(reviewer)
    html = page.get("/campaigns/shop/").content.decode()
    assert [s.split("</div>")[0] for s in html.split('<div class="stat">')[1:5]] == [
        "<strong>10</strong>pairs", "<strong>9</strong>still need judgments", "<strong>1</strong>judgments",
        "<strong>1</strong>usable Bradley-Terry pairs"]
    assert f"<tr><td>{labeler.username}</td><td>human</td><td>1</td><td>1</td><td>—</td></tr>" in html


# --- rounds -------------------------------------------------------------------------------------

def judged(campaign, labeler, n=2):
    for _ in range(n):
        assignment = claim_next_pair(campaign, labeler).assignment
        submit_judgment(assignment_id=assignment.pk, labeler=labeler, choice="a", strength=2)


def test_an_admin_launches_reads_cancels_and_resumes_a_round(admin_user, labeler, campaign, no_broker):
    judged(campaign, labeler)
    api = api_for(admin_user)
    bad = api.post("/campaigns/shop/rounds", {"preset": "tiny", "settings": {"ppo_steps": 0, "pairing": "x"}})
    assert bad.status_code == 400 and set(bad.json()["errors"]) == {"ppo_steps", "pairing"}
    unknown = api.post("/campaigns/shop/rounds", {"preset": "tiny", "settings": {"ppo_stepz": 3}})
    assert unknown.status_code == 400 and "unknown round settings: ppo_stepz" in unknown.json()["detail"]
    assert not Round.objects.exists()

    launched = api.post("/campaigns/shop/rounds", {"preset": "tiny", "settings": {"ppo_steps": "4"}})
    assert launched.status_code == 201
    round_ = launched.json()
    assert round_["number"] == 1 and round_["config"]["ppo_steps"] == 4
    assert [job["kind"] for job in round_["jobs"]] == ["export", "reward", "ppo", "sample", "enqueue", "evaluate"]
    again = api.post("/campaigns/shop/rounds", {"preset": "tiny"})
    assert again.status_code == 409 and "still queued" in again.json()["detail"]

    first = round_["jobs"][0]["id"]
    cancelled = api.post(f"/rounds/{round_['id']}/jobs/{first}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["jobs"][0]["status"] == "cancelled"
    assert api.get(f"/rounds/{round_['id']}").json()["status"] == "cancelled"
    resumed = api.post(f"/rounds/{round_['id']}/jobs/{first}/resume")
    assert resumed.status_code == 200 and Job.objects.get(pk=first).status == Job.QUEUED
    assert api.post(f"/rounds/{round_['id']}/jobs/{first}/resume").status_code == 409
    assert api.get("/campaigns/shop/rounds").json()["items"][0]["id"] == round_["id"]
    assert api.get(f"/rounds/{round_['id']}/samples").json() == []
    assert api.get(f"/rounds/{round_['id']}/ratings").json() is None


def test_it_reports_a_finished_rounds_samples_and_job_results(admin_user, reviewer, labeler, campaign,
                                                             no_broker):
    judged(campaign, labeler)
    round_id = api_for(admin_user).post("/campaigns/shop/rounds", {"preset": "tiny"}).json()["id"]
    sample = Job.objects.get(round_id=round_id, kind=Job.SAMPLE)
    Job.objects.filter(pk=sample.pk).update(status=Job.SUCCEEDED, result={
        "samples": [{"prompt": "Question 1?", "prompt_id": 1, "new": ["one", "two"]}], "reward/mean": 0.5})
    api = api_for(reviewer)
    samples = api.get(f"/rounds/{round_id}/samples").json()
    assert samples == [{"prompt": "Question 1?", "prompt_turns": None, "responses": ["one", "two"]}]
    jobs = api.get(f"/rounds/{round_id}").json()["jobs"]
    assert next(job for job in jobs if job["kind"] == "sample")["result"]["reward/mean"] == 0.5


def test_a_failed_jobs_traceback_goes_to_admins_and_its_summary_to_reviewers(admin_user, reviewer, labeler,
                                                                             campaign, no_broker, client):
    judged(campaign, labeler)
    round_id = api_for(admin_user).post("/campaigns/shop/rounds", {"preset": "tiny"}).json()["id"]
    error = ("RuntimeError: out of memory\n\nTraceback (most recent call last):\n"
             '  File "/srv/pairloop/training/runner.py", line 9, in run_ppo\nRuntimeError: out of memory')
    Job.objects.filter(round_id=round_id, kind=Job.EXPORT).update(status=Job.FAILED, error=error)

    def errors(api) -> list[str]:
        one = [job["error"] for job in api.get(f"/rounds/{round_id}").json()["jobs"] if job["error"]]
        listed = [job["error"] for job in api.get("/campaigns/shop/rounds").json()["items"][0]["jobs"]
                  if job["error"]]
        assert one == listed
        return one

    assert errors(api_for(reviewer)) == ["RuntimeError: out of memory"]
    assert errors(api_for(admin_user)) == [error]
    # The round page follows the same rule.
    client.force_login(reviewer)
    page = client.get(f"/rounds/{round_id}/").content.decode()
    assert "RuntimeError: out of memory" in page and "Traceback (most recent" not in page
    client.force_login(admin_user)
    assert "Traceback (most recent" in client.get(f"/rounds/{round_id}/").content.decode()


# --- every role's token on every endpoint -------------------------------------------------------

# (method, path, body); {slug}, {other}, {assignment}, {round}, {job} filled from the fixture.
ENDPOINTS = {
    "campaign_list": ("GET", "/campaigns", None),
    "campaign_create": ("POST", "/campaigns", {"slug": "fresh", "name": "Fresh"}),
    "campaign_update": ("PATCH", "/campaigns/{slug}", {"lease_seconds": 300}),
    "import_upload": ("POST", "/campaigns/{slug}/imports", None),
    "import_read": ("GET", "/campaigns/{slug}/imports/{import}", None),
    "webhook_list": ("GET", "/campaigns/{slug}/webhooks", None),
    "webhook_add": ("POST", "/campaigns/{slug}/webhooks", {"url": "http://93.184.215.14/hook"}),
    "webhook_remove": ("DELETE", "/campaigns/{slug}/webhooks/{webhook}", None),
    "campaign_read": ("GET", "/campaigns/{slug}", None),
    "campaign_queue": ("GET", "/campaigns/{slug}/queue", None),
    "pairs_import": ("POST", "/campaigns/{slug}/pairs", {"rows": ROWS}),
    "campaign_export": ("GET", "/campaigns/{slug}/export", None),
    "label_claim": ("POST", "/campaigns/{slug}/claim", None),
    "label_acknowledge_warning": ("POST", "/campaigns/{slug}/warning", None),
    "label_judge": ("POST", "/campaigns/{slug}/assignments/{assignment}/judgment",
                    {"choice": "a", "strength": 2}),
    "label_skip": ("POST", "/campaigns/{slug}/assignments/{assignment}/skip", None),
    "label_undo": ("POST", "/campaigns/{slug}/undo", {"judgment_id": 1}),
    "round_list": ("GET", "/campaigns/{slug}/rounds", None),
    "round_launch": ("POST", "/campaigns/{slug}/rounds", {"preset": "tiny", "settings": {"ppo_steps": 0}}),
    "round_read": ("GET", "/rounds/{round}", None),
    "job_cancel": ("POST", "/rounds/{round}/jobs/{job}/cancel", None),
    "job_resume": ("POST", "/rounds/{round}/jobs/{job}/resume", None),
    "round_samples": ("GET", "/rounds/{round}/samples", None),
    "round_ratings": ("GET", "/rounds/{round}/ratings", None),
}
ROLES = ("member", "non_member", "reviewer", "admin", "label_only_admin")
# What each role's token (every scope its role allows; the last one an admin's token with only `label`)
# gets. The member's is their own lease; others judging or skipping it get 404 (it is not theirs).
STATUS = {
    #                    member  non-member reviewer  admin  label-only admin
    "campaign_list":     (200,   200,       200,      200,   200),
    "campaign_create":   (403,   403,       403,      201,   403),
    "campaign_update":   (403,   403,       403,      200,   403),
    "import_upload":     (403,   403,       403,      400,   403),  # 400: the admin sent no file
    "import_read":       (403,   403,       403,      200,   403),
    "webhook_list":      (403,   403,       403,      200,   403),
    "webhook_add":       (403,   403,       403,      201,   403),
    "webhook_remove":    (403,   403,       403,      204,   403),
    "campaign_read":     (200,   404,       200,      200,   200),
    "campaign_queue":    (403,   403,       200,      200,   403),
    "pairs_import":      (403,   403,       403,      201,   403),
    "campaign_export":   (403,   403,       200,      200,   403),
    "label_claim":       (200,   404,       404,      200,   200),
    "label_acknowledge_warning": (200, 404,   404,      200,   200),
    "label_judge":       (201,   404,       404,      404,   404),
    "label_skip":        (200,   404,       404,      404,   404),
    "label_undo":        (409,   404,       404,      409,   409),
    "round_list":        (403,   403,       200,      200,   403),
    "round_launch":      (403,   403,       403,      400,   403),
    "round_read":        (403,   403,       200,      200,   403),
    "job_cancel":        (403,   403,       403,      200,   403),
    "job_resume":        (403,   403,       403,      409,   403),
    "round_samples":     (403,   403,       200,      200,   403),
    "round_ratings":     (403,   403,       200,      200,   403),
}


def test_every_roles_token_gets_the_expected_status_from_every_endpoint(labeler, outsider, reviewer,
                                                                          admin_user, campaign, no_broker):
    from django.db import transaction

    add_pairs(campaign, [PairInput("Known?", "good", "bad", preferred="a")], notify=False)
    make_campaign(slug="other", n_pairs=1, members=[outsider])
    assignment = claim_next_pair(campaign, labeler).assignment
    from training.actions import launch_round
    from training.config import build_config

    round_ = launch_round(campaign, admin_user, build_config("tiny", {}))
    from django.core.files.uploadedfile import SimpleUploadedFile

    from annotate.importing import start_import_job
    from api.webhooks import add_webhook

    upload = SimpleUploadedFile("p.jsonl", json.dumps(ROWS[0]).encode())
    imported = start_import_job(campaign, admin_user, upload)
    values = {"import": imported.pk, "slug": "shop", "assignment": assignment.pk, "round": round_.pk,
              "job": round_.jobs.order_by("order").first().pk,
              "webhook": add_webhook(campaign, "http://93.184.215.14/hook")[0].pk}
    tokens = {"member": api_for(labeler), "non_member": api_for(outsider), "reviewer": api_for(reviewer),
              "admin": api_for(admin_user), "label_only_admin": api_for(admin_user, ["label"])}
    assert set(STATUS) == set(ENDPOINTS)
    wrong = []
    for name, (method, path, body) in ENDPOINTS.items():
        url = path.format(**values)
        for role, expected in zip(ROLES, STATUS[name]):
            with transaction.atomic():  # each request sees the same starting state
                api = tokens[role]
                send = getattr(api, method.lower())
                got = (send(url) if method == "GET" else send(url, body)).status_code
                transaction.set_rollback(True)
            if got != expected:
                wrong.append(f"{name} {method} {url} as {role}: expected {expected}, got {got}")
    assert not wrong, "\n".join(wrong)


# --- the schema ---------------------------------------------------------------------------------

def test_it_publishes_its_schema_and_a_docs_page_that_loads_nothing_from_elsewhere(client):
    schema = client.get(f"{API}/openapi.json").json()
    assert schema["openapi"].startswith("3.") and f"{API}/campaigns/{{slug}}/claim" in schema["paths"]
    assert schema["components"]["securitySchemes"]["TokenAuth"]["scheme"] == "bearer"
    page = client.get(f"{API}/docs").content.decode()
    assert "swagger-ui-bundle.js" in page and "/static/ninja/" in page
    assert "//cdn" not in page and "https://" not in page and "http://" not in page
    from django.contrib.staticfiles import finders

    for name in ("swagger-ui-bundle.js", "swagger-ui-init.js", "swagger-ui.css"):
        assert finders.find(f"ninja/{name}"), name  # collectstatic serves them with ours
