"""Evaluation sets: imported prompt files, versioned by content, never mixed with training prompts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from annotate.models import EvalSet, Prompt
from tests.conftest import make_campaign

pytestmark = pytest.mark.django_db

ROWS = [{"prompt": "What is 2 plus 2?", "reference": "4"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
        {"prompt": "Sort: pear apple", "reference": "apple pear"}]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def import_set(campaign, path: Path) -> str:
    out = io.StringIO()
    call_command("import_eval_set", campaign.slug, str(path), stdout=out)
    return out.getvalue()


def test_it_imports_text_and_chat_prompts_with_their_references(tmp_path):
    campaign = make_campaign()
    said = import_set(campaign, write(tmp_path / "eval.jsonl", ROWS))
    eval_set = EvalSet.current(campaign)
    assert eval_set.version in said and "3 prompts" in said
    prompts = list(eval_set.prompts.all())
    assert [p.reference for p in prompts] == ["4", "", "apple pear"]
    assert prompts[1].turns[1] == {"role": "user", "content": "Name a colour."}
    assert not Prompt.objects.filter(campaign=campaign).exists()  # nothing became a training prompt


def test_the_same_content_is_one_version_and_changed_content_a_new_one(tmp_path):
    campaign = make_campaign()
    import_set(campaign, write(tmp_path / "a.jsonl", ROWS))
    first = EvalSet.current(campaign)
    assert "nothing changed" in import_set(campaign, write(tmp_path / "b.jsonl", ROWS))
    assert EvalSet.objects.filter(campaign=campaign).count() == 1
    import_set(campaign, write(tmp_path / "c.jsonl", ROWS[:2] + [{"prompt": "Sort: b a", "reference": "a b"}]))
    second = EvalSet.current(campaign)
    assert second.version != first.version and first.prompts.count() == 3  # the old version stays


def test_a_training_prompt_is_refused_naming_its_line_and_nothing_is_stored(tmp_path):
    campaign = make_campaign(n_pairs=3)  # training prompts "Question 0?" .. "Question 2?"
    rows = ROWS + [{"prompt": "Question 1?"}]
    with pytest.raises(CommandError, match=r"line 4, field 'prompt': is a training prompt"):
        import_set(campaign, write(tmp_path / "eval.jsonl", rows))
    assert not EvalSet.objects.exists()


def test_a_bad_row_or_a_repeat_is_refused_naming_its_line(tmp_path):
    campaign = make_campaign()
    rows = [ROWS[0], {"prompt": ""}, ROWS[0]]
    with pytest.raises(CommandError, match=r"line 2, field .prompt.: empty text"):
        import_set(campaign, write(tmp_path / "eval.jsonl", rows))
    assert not EvalSet.objects.exists()
    with pytest.raises(CommandError, match=r"line 2, field 'prompt': repeats the prompt of line 1"):
        import_set(campaign, write(tmp_path / "eval.jsonl", [ROWS[0], ROWS[0]]))


def test_pairs_on_an_evaluation_prompt_are_refused_naming_the_line(tmp_path):
    campaign = make_campaign()
    import_set(campaign, write(tmp_path / "eval.jsonl", ROWS))
    pairs = [{"prompt": "Fresh?", "response_a": "x", "response_b": "y"},
             {"prompt": "What is 2 plus 2?", "response_a": "4", "response_b": "5"}]
    with pytest.raises(CommandError, match=r"line 2, field 'prompt': is in an evaluation set"):
        call_command("import_pairs", campaign.slug, str(write(tmp_path / "pairs.jsonl", pairs)), stdout=io.StringIO())
    assert not Prompt.objects.filter(campaign=campaign).exists()


def upload(rows: list[dict], name: str = "eval.jsonl"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, "".join(json.dumps(row) + "\n" for row in rows).encode())


def test_an_admin_uploads_a_set_on_its_page_and_sees_it_listed(client, admin_user):
    campaign = make_campaign()
    client.force_login(admin_user)
    assert 'id="eval-sets-link"' in client.get(f"/campaigns/{campaign.slug}/").content.decode()
    response = client.post(f"/campaigns/{campaign.slug}/eval-sets/", {"file": upload(ROWS), "name": "maths"},
                           follow=True)
    eval_set = EvalSet.current(campaign)
    page = response.content.decode()
    assert response.status_code == 200 and eval_set.name == "maths"
    assert f"Imported maths version {eval_set.version} (3 prompts)" in page
    assert f"<code>{eval_set.version}</code></td><td>3</td>" in page
    again = client.post(f"/campaigns/{campaign.slug}/eval-sets/", {"file": upload(ROWS, "copy.jsonl")}, follow=True)
    assert "is already here: nothing changed" in again.content.decode()
    assert EvalSet.objects.filter(campaign=campaign).count() == 1


def test_a_bad_upload_names_each_line_and_field_and_stores_nothing(client, admin_user):
    campaign = make_campaign(n_pairs=2)
    client.force_login(admin_user)
    response = client.post(f"/campaigns/{campaign.slug}/eval-sets/", {"file": upload([ROWS[0], {"prompt": ""}])})
    assert response.status_code == 400
    assert "line 2, field &#x27;prompt&#x27;: empty text" in response.content.decode()
    response = client.post(f"/campaigns/{campaign.slug}/eval-sets/", {"file": upload([ROWS[0], {"prompt": "Question 1?"}])})
    assert response.status_code == 400
    assert "line 2, field &#x27;prompt&#x27;: is a training prompt" in response.content.decode()
    assert not EvalSet.objects.exists()
    assert client.post(f"/campaigns/{campaign.slug}/eval-sets/", {}).status_code == 400


def test_only_admins_see_or_upload_evaluation_sets(client, reviewer):
    campaign = make_campaign()
    client.force_login(reviewer)
    assert client.get(f"/campaigns/{campaign.slug}/eval-sets/").status_code == 404
    assert client.post(f"/campaigns/{campaign.slug}/eval-sets/", {"file": upload(ROWS)}).status_code == 404
    assert not EvalSet.objects.exists()


def test_the_api_uploads_a_set_and_lists_the_campaigns_sets(admin_user, reviewer):
    from tests.test_api import api_for

    campaign = make_campaign(n_pairs=1)
    api = api_for(admin_user)
    url = f"/api/v1/campaigns/{campaign.slug}/eval-sets"
    response = api.client.post(url, {"file": upload(ROWS), "name": "maths"}, headers=api.headers)
    eval_set = EvalSet.current(campaign)
    assert response.status_code == 201
    assert response.json() | {"created_at": None} == {"id": eval_set.pk, "name": "maths", "version": eval_set.version,
                                                      "prompts": 3, "created_at": None}
    again = api.client.post(url, {"file": upload(ROWS)}, headers=api.headers)
    assert again.status_code == 200 and again.json()["id"] == eval_set.pk
    refused = api.client.post(url, {"file": upload([{"prompt": "Question 0?"}])}, headers=api.headers)
    assert refused.status_code == 400 and refused.json()["errors"] == [
        "line 1, field 'prompt': is a training prompt of this campaign: an evaluation prompt never is"]
    assert [row["version"] for row in api.get(f"/campaigns/{campaign.slug}/eval-sets").json()] == [eval_set.version]
    assert api_for(reviewer).get(f"/campaigns/{campaign.slug}/eval-sets").status_code == 403
    assert EvalSet.objects.count() == 1
