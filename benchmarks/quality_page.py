"""The quality page on a large campaign: 100,000 judgments by 50 labelers, how fast it answers.

Creates a throwaway database of its own (PostgreSQL from DATABASE_URL, named pairloop_bench_quality
or PAIRLOOP_TEST_DATABASE_NAME; else SQLite in a temporary directory), seeds one campaign with bulk
inserts (overlap 3: about 33,334 pairs, each judged by three of the 50 labelers, who are right 60-98%
of the time, one of them always picking the left side), then prints:

- the cold computation of the statistics (annotate.quality.refresh: what the first view and the
  refresh task do), and
- the page as a reviewer gets it through Django's test client (GET /campaigns/bench/quality/), with
  the statistics cached as the page keeps them (refreshed by a task once FRESH_SECONDS old) and one
  labeler excluded: median, p95 and max over --requests requests.

    .venv/bin/python benchmarks/quality_page.py                      # SQLite, in-process cache
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/pairloop REDIS_URL=redis://127.0.0.1:6379/14 \\
        .venv/bin/python benchmarks/quality_page.py

Without REDIS_URL the cache is an in-process one. Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the model answers the question with care and explains each step in plain words so a reader "
         "can follow").split()


def setup_django(scratch: Path, database: str = "pairloop_bench_quality") -> None:
    """Django on the test database `database` (SQLite in `scratch` when no DATABASE_URL), Redis only if REDIS_URL."""
    os.environ.setdefault("PAIRLOOP_DATA_DIR", str(scratch / "data"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
    sys.path.insert(0, str(REPO))
    import django
    from django.conf import settings

    if "REDIS_URL" not in os.environ:
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    default_db = settings.DATABASES["default"]
    if not os.environ.get("PAIRLOOP_TEST_DATABASE_NAME"):
        bench_name = (str(scratch / "bench.sqlite3") if default_db["ENGINE"].endswith("sqlite3")
                      else database)
        default_db["TEST"] = {**default_db.get("TEST", {}), "NAME": bench_name}
    settings.ALLOWED_HOSTS = ["*"]
    django.setup()


def seed(judgments: int, labelers: int, overlap: int, rng: random.Random):
    from django.contrib.auth.models import User
    from django.utils import timezone

    from annotate.models import Campaign, Judgment, Pair, Prompt, Response, content_hash

    users = User.objects.bulk_create([User(username=f"labeler{i:02d}") for i in range(labelers)])
    users = list(User.objects.filter(username__startswith="labeler").order_by("username"))
    accuracy = {u.pk: 0.6 + 0.38 * i / max(1, labelers - 1) for i, u in enumerate(users)}
    lefty = users[0].pk  # always picks the left side
    campaign = Campaign.objects.create(slug="bench", name="Bench", overlap=overlap)
    pairs_wanted = -(-judgments // overlap)
    start = timezone.now() - timedelta(days=10)
    batch = 5000
    made = 0
    for offset in range(0, pairs_wanted, batch):
        n = min(batch, pairs_wanted - offset)
        prompts = Prompt.objects.bulk_create([
            Prompt(campaign=campaign, text=f"Question {offset + i}?", hash=content_hash(f"q{offset + i}"))
            for i in range(n)])
        responses = Response.objects.bulk_create([
            Response(prompt=p, text=f"{side} {p.pk}: " + " ".join(rng.choices(WORDS, k=rng.randint(20, 80))),
                     hash=content_hash(side, str(p.pk)))
            for p in prompts for side in ("good", "poor")])
        pairs = Pair.objects.bulk_create([
            Pair(campaign=campaign, prompt=p, response_a=responses[2 * i], response_b=responses[2 * i + 1],
                 key=content_hash(str(p.pk)), judgments_count=overlap, is_open=False)
            for i, p in enumerate(prompts)])
        rows = []
        for pair in pairs:
            for user in rng.sample(users, overlap):
                if made >= judgments:
                    break
                a_on_left = rng.random() < 0.5
                if user.pk == lefty:
                    choice = Judgment.A if a_on_left else Judgment.B
                else:
                    choice = Judgment.A if rng.random() < accuracy[user.pk] else Judgment.B
                rows.append(Judgment(pair=pair, labeler=user, choice=choice, a_on_left=a_on_left,
                                     milliseconds=rng.randint(15000, 90000),
                                     created_at=start + timedelta(seconds=30 * made)))
                made += 1
        Judgment.objects.bulk_create(rows, batch_size=5000)
    return campaign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judgments", type=int, default=100_000)
    parser.add_argument("--labelers", type=int, default=50)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20)
    opts = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="pairloop-quality-bench-"))
    setup_django(scratch)
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client

    from annotate import quality
    from annotate.actions import exclude_judgments
    from annotate.models import Judgment

    test_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        started = time.perf_counter()
        campaign = seed(opts.judgments, opts.labelers, opts.overlap, random.Random(0))
        seeded = time.perf_counter() - started
        stored = Judgment.objects.filter(pair__campaign=campaign).count()

        started = time.perf_counter()
        statistics_now = quality.refresh(campaign)
        cold = time.perf_counter() - started

        admin = User.objects.create_superuser("bench-admin", "bench@example.com", "x")
        # One labeler left out, as an admin would after seeing the flags: the page counts what is excluded.
        exclude_judgments(campaign, by=admin, labeler=User.objects.get(username="labeler00"),
                          reason="always picks the left side")
        client = Client()
        client.force_login(admin)
        url = f"/campaigns/{campaign.slug}/quality/"
        times = []
        for _ in range(opts.requests):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.status_code
        flagged = sum(1 for row in statistics_now["labelers"] if row["flags"])
    finally:
        connection.creation.destroy_test_db(test_name, verbosity=0)

    times.sort()
    result = {
        "database": connection.vendor, "judgments": stored, "labelers": opts.labelers,
        "seed_seconds": round(seeded, 1), "cold_statistics_seconds": round(cold, 2),
        "page_ms_median": round(statistics.median(times), 1),
        "page_ms_p95": round(times[max(0, int(len(times) * 0.95) - 1)], 1),
        "page_ms_max": round(times[-1], 1),
        "fresh_seconds": quality.FRESH_SECONDS, "labelers_flagged": flagged,
        "agreement_items": statistics_now["agreement"]["items"],
    }
    print(f"{stored} judgments by {opts.labelers} labelers on {connection.vendor} (seeded in {seeded:.0f} s)")
    print(f"statistics computed cold (first view, or the refresh task): {cold:.2f} s")
    print(f"quality page, statistics cached (refreshed by a task once {quality.FRESH_SECONDS} s old): "
          f"median {result['page_ms_median']} ms, p95 {result['page_ms_p95']} ms, "
          f"max {result['page_ms_max']} ms over {opts.requests} requests")
    print(f"{flagged} labelers flagged; agreement over {result['agreement_items']} pairs")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
