"""The labeling page with pathological model text: how long it takes to answer (target: under 200 ms).

Creates a throwaway database of its own (PostgreSQL from DATABASE_URL, named pairloop_bench_render or
PAIRLOOP_TEST_DATABASE_NAME; else SQLite in a temporary directory). For each case below it makes a
campaign with one pair whose prompt and response A are that text (response B is short), and times
GET /campaigns/<slug>/label/ as a labeler gets it through Django's test client:

- cold: nothing rendered yet (the render cache is bypassed for each request), the first view of a text;
- warm: the page again, its HTML kept in the cache (what every later view costs).

    .venv/bin/python benchmarks/render.py                      # SQLite, in-process cache
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/pairloop REDIS_URL=redis://127.0.0.1:6379/14 \\
        .venv/bin/python benchmarks/render.py

Without REDIS_URL the cache is an in-process one. Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from quality_page import setup_django  # the same Django set-up as the quality page's benchmark

TARGET_MS = 200


def cases(max_chars: int) -> dict[str, str]:
    return {
        "1 MB brackets, links, emphasis": ("[" * 2000 + "[x](" * 500 + "*a _b " * 1000 + "\n") * 100,
        "1 MB of '['": "[" * 1_000_000,
        "'[' * 20000": "[" * 20000,
        "'![' up to the size limit": "![" * (max_chars // 2),
        "list nested 300 deep": "".join("  " * i + f"- item {i}\n" for i in range(300)),
        "list nested 300 deep, one line": "- " * 300 + "deepest",
        "ordinary 5 kB answer": ("Use a loop:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\n"
                                 "- **one**, *two*\n- [docs](https://example.com)\n\n| a | b |\n|---|---|\n"
                                 "| 1 | 2 |\n\n") * 40,
    }


def time_page(client, url: str, requests: int, cold: bool) -> list[float]:
    from annotate import rendering

    times = []
    for _ in range(requests):
        if cold:
            rendering._FORMAT = uuid.uuid4().hex  # a fresh cache namespace: every text is rendered again
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.status_code
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5, help="requests per case, cold and warm, default 5")
    opts = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="pairloop-render-bench-"))
    setup_django(scratch, "pairloop_bench_render")
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client

    from annotate import rendering
    from annotate.actions import PairInput, add_pairs
    from annotate.models import Campaign

    test_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    rows = []
    try:
        labeler = User.objects.create_user("bench-labeler", password="x")
        client = Client()
        client.force_login(labeler)
        for n, (name, text) in enumerate(cases(rendering.MAX_MARKDOWN_CHARS).items()):
            campaign = Campaign.objects.create(slug=f"render-{n}", name=name, ask_strength=False)
            campaign.members.add(labeler)
            add_pairs(campaign, [PairInput(text, text, "Short.")], notify=False)
            url = f"/campaigns/{campaign.slug}/label/"
            client.get(url)  # the lease, and Django's first-request work, out of the figures
            cold = time_page(client, url, opts.requests, cold=True)
            warm = time_page(client, url, opts.requests, cold=False)
            page_bytes = len(client.get(url).content)
            rows.append({"case": name, "chars": len(text), "page_bytes": page_bytes,
                         "formatted": len(text) <= rendering.MAX_MARKDOWN_CHARS,
                         "cold_ms_median": round(statistics.median(cold), 1),
                         "cold_ms_max": round(cold[-1], 1),
                         "warm_ms_median": round(statistics.median(warm), 1),
                         "warm_ms_max": round(warm[-1], 1)})
    finally:
        connection.creation.destroy_test_db(test_name, verbosity=0)

    print(f"Labeling page, {opts.requests} requests per case, {connection.vendor}, cache "
          f"{'Redis' if 'REDIS_URL' in os.environ else 'in-process'}; size limit "
          f"{rendering.MAX_MARKDOWN_CHARS} chars (the prompt and response A are the text)")
    print(f"{'case':34} {'chars':>9} {'shown as':>9} {'cold median/max ms':>20} {'warm median/max ms':>20}")
    for row in rows:
        shown = "Markdown" if row["formatted"] else "escaped"
        print(f"{row['case']:34} {row['chars']:>9} {shown:>9} "
              f"{row['cold_ms_median']:>10} / {row['cold_ms_max']:<8} "
              f"{row['warm_ms_median']:>10} / {row['warm_ms_max']:<8}")
    worst_1mb = max(row["cold_ms_max"] for row in rows if row["chars"] >= 1_000_000)
    print(f"1 MB pathological response, worst first view: {worst_1mb} ms (target under {TARGET_MS} ms): "
          f"{'met' if worst_1mb < TARGET_MS else 'NOT met'}")
    print(json.dumps({"database": connection.vendor, "max_markdown_chars": rendering.MAX_MARKDOWN_CHARS,
                      "target_ms": TARGET_MS, "worst_1mb_ms": worst_1mb, "cases": rows}))


if __name__ == "__main__":
    main()
