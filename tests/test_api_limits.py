"""The API's bounds: a per-token rate limit on the labeling endpoints, shared by every web process through
Redis; a cap on the pairs one JSON import request may make; and paginated round lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.cache import cache
from django.test import Client

from api.actions import create_token

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
API = "/api/v1"


def post(token: str, path: str, body: dict | None = None):
    return Client().post(API + path, json.dumps(body or {}), content_type="application/json",
                         headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def limit_of_three(settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "API_RATE_LIMIT": 3}
    return 3


def fresh_token(user) -> tuple[int, str]:
    token, secret = create_token(user, "rate", ["label"])
    cache.delete_many([f"pairloop:api-rate:{token.pk}:count", f"pairloop:api-rate:{token.pk}:start"])
    return token.pk, secret


def test_it_answers_429_with_retry_after_past_a_tokens_rate_limit(limit_of_three, labeler, campaign):
    _, token = fresh_token(labeler)
    claims = [post(token, f"/campaigns/{campaign.slug}/claim") for _ in range(2)]
    assert [c.status_code for c in claims] == [200, 200]
    assignment = claims[-1].json()["assignment"]["id"]
    judged = post(token, f"/campaigns/{campaign.slug}/assignments/{assignment}/judgment?next=true",
                  {"choice": "tie", "milliseconds": 5200})
    assert judged.status_code == 201
    refused = post(token, f"/campaigns/{campaign.slug}/claim")
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert "PAIRLOOP_API_RATE_LIMIT" in refused.json()["detail"]
    assert post(token, f"/campaigns/{campaign.slug}/assignments/{assignment}/skip").status_code == 429
    # Per token: the same labeler's other token is not slowed.
    _, other = fresh_token(labeler)
    assert post(other, f"/campaigns/{campaign.slug}/claim").status_code == 200


def test_the_rate_limit_is_counted_across_processes(limit_of_three, labeler, campaign):
    token_id, token = fresh_token(labeler)
    env = {**os.environ, "PAIRLOOP_API_RATE_LIMIT": "3", "DJANGO_SETTINGS_MODULE": "pairloop.settings"}
    script = (f"import django; django.setup(); from api.auth import count_request; "
              f"[count_request({token_id}) for _ in range(3)]")
    other_process = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=120)
    assert other_process.returncode == 0, other_process.stderr
    assert post(token, f"/campaigns/{campaign.slug}/claim").status_code == 429


def test_a_json_import_making_too_many_pairs_is_refused_and_points_to_uploads(admin_user):
    from annotate.models import Pair
    from api.views import MAX_JSON_IMPORT_PAIRS
    from tests.conftest import make_campaign

    make_campaign("bulk")
    token = create_token(admin_user, "import", ["import"])[1]
    answers = [f"answer {i}" for i in range(45)]  # 990 pairs a row, under the 1,000 one row may make
    rows = [{"prompt": f"Pick one, {n}?", "responses": answers} for n in range(11)]  # 10,890 pairs
    assert 11 * 990 > MAX_JSON_IMPORT_PAIRS
    refused = post(token, "/campaigns/bulk/pairs", {"rows": rows})
    assert refused.status_code == 413
    detail = refused.json()["detail"]
    assert "10890 pairs" in detail and "/api/v1/campaigns/bulk/imports" in detail
    assert not Pair.objects.exists()
    sampled = post(token, "/campaigns/bulk/pairs", {"rows": rows, "pairs_per_prompt": 50})
    assert sampled.status_code == 201 and sampled.json()["created"] == 550


def test_the_rounds_list_comes_a_page_at_a_time(reviewer, campaign):
    from training.models import Round

    for number in range(1, 26):
        Round.objects.create(campaign=campaign, number=number, parent_policy="sft")
    token = create_token(reviewer, "read", ["review"])[1]

    def get(**params):
        return Client().get(f"{API}/campaigns/{campaign.slug}/rounds", params,
                            headers={"Authorization": f"Bearer {token}"})

    first = get().json()
    assert first["count"] == 25
    assert [r["number"] for r in first["items"]] == list(range(25, 5, -1))  # newest first, 20 a page
    last = get(limit=10, offset=20).json()
    assert [r["number"] for r in last["items"]] == [5, 4, 3, 2, 1]
    assert get(limit=101).status_code == 422  # at most 100 a page
