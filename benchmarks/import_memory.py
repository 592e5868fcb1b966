"""Importing a large JSONL file: rows per second and peak memory (RSS), to show the import streams.

Builds an N-row JSONL file (prompt, response_a, response_b; every row a new pair) in a temporary
directory, creates a throwaway database of its own (PostgreSQL from DATABASE_URL, named
pairloop_bench_import or PAIRLOOP_TEST_DATABASE_NAME; else SQLite in a temporary directory), migrates it,
imports the file with annotate.importing.import_file (validation pass, then add_pairs in one transaction)
and prints rows/s, the RSS just before the import (/proc/self/status VmRSS) and the process's peak RSS
(resource.getrusage). Each size runs in its own process, so each peak is that run's own; if the import
held the file in memory, peak minus before would grow with N, while a streaming import stays flat.

    .venv/bin/python benchmarks/import_memory.py                      # 10,000 and 100,000 rows, SQLite
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/pairloop REDIS_URL=redis://127.0.0.1:6379/14 \\
        .venv/bin/python benchmarks/import_memory.py --rows 100000

Without REDIS_URL the cache and channel layer are switched to in-process ones (the import only clears
a cache key and pushes one "pairs arrived" message).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_now_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_file(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            row = {
                "prompt": f"Question {i}: how would you explain topic {i % 977} to a newcomer in two "
                          "sentences?",
                "response_a": f"Answer A{i}. " + "A careful explanation of the idea, step by step. " * 4,
                "response_b": f"Answer B{i}. " + "A shorter, looser take on the same idea. " * 3,
            }
            handle.write(json.dumps(row) + "\n")


def run_one(rows: int) -> dict:
    """One measured import in this process (a fresh process per size)."""
    scratch = Path(tempfile.mkdtemp(prefix="pairloop-import-bench-"))
    os.environ.setdefault("PAIRLOOP_DATA_DIR", str(scratch / "data"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
    sys.path.insert(0, str(REPO))
    import django
    from django.conf import settings

    if "REDIS_URL" not in os.environ:
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # Its own throwaway database, so it never clobbers a test database someone else is using.
    default_db = settings.DATABASES["default"]
    if not os.environ.get("PAIRLOOP_TEST_DATABASE_NAME"):
        bench_name = (str(scratch / "bench.sqlite3") if default_db["ENGINE"].endswith("sqlite3")
                      else "pairloop_bench_import")
        default_db["TEST"] = {**default_db.get("TEST", {}), "NAME": bench_name}
    django.setup()
    from django.db import connection

    path = scratch / "pairs.jsonl"
    build_file(path, rows)
    file_mib = round(path.stat().st_size / 2**20, 1)
    test_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        from annotate.importing import import_file
        from annotate.models import Campaign, Pair

        campaign = Campaign.objects.create(slug="bench", name="Bench")
        before = rss_now_mib()
        started = time.perf_counter()
        result = import_file(campaign, path)
        seconds = time.perf_counter() - started
        peak = rss_mib()
        stored = Pair.objects.filter(campaign=campaign).count()
    finally:
        connection.creation.destroy_test_db(test_name, verbosity=0)
        path.unlink(missing_ok=True)
    return {
        "rows": rows, "file_mib": file_mib,
        "created": result.created, "skipped": result.skipped, "stored_pairs": stored,
        "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds), "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak, 1), "database": connection.vendor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,100000",
                        help="comma-separated sizes, each run in its own process")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size here
    opts = parser.parse_args()
    if opts.one:
        print(json.dumps(run_one(opts.one)))
        return
    results = []
    for rows in [int(n) for n in opts.rows.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--one", str(rows)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"import of {rows} rows failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'rows':>8} {'file MiB':>9} {'db':>10} {'seconds':>8} {'rows/s':>8} {'RSS before MiB':>15} "
          f"{'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['rows']:>8} {r['file_mib']:>9} {r['database']:>10} {r['seconds']:>8} {r['rows_per_s']:>8} "
              f"{r['rss_before_mib']:>15} {r['peak_rss_mib']:>13}   "
              f"created {r['created']}, skipped {r['skipped']}")
    if len(results) > 1:
        low, high = results[0], results[-1]
        own = [r["peak_rss_mib"] - r["rss_before_mib"] for r in (low, high)]
        print(f"{high['rows'] // low['rows']}x the rows: the import's own memory (peak - before) went from "
              f"{own[0]:.1f} to {own[1]:.1f} MiB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
