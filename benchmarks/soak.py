#!/usr/bin/env python
"""Soak: N labelers at human pace for M minutes over real HTTP on PostgreSQL, with Redis restarted once.

What it does, top to bottom:
  1. starts its own redis-server on a spare loopback port (never the machine's Redis), with no
     persistence, so a restart loses everything Redis held (cache, channel layer), as a crash would;
  2. creates its own database (default `pairloop_soak`), migrates and seeds it with the pieces of
     benchmarks/labeling_load.py (imported, not copied): labelers, one campaign of --pairs pairs, k=--overlap;
  3. starts gunicorn on a loopback port against that database and that Redis, and signs the labelers'
     session cookies (no password hashing);
  4. runs the labelers for --minutes: each submits a judgment every --pace seconds (start times spread
     evenly), one round trip each (the judge POST answers with the next pair); halfway through it stops
     Redis, waits --redis-down-seconds and starts it again on the same port;
  5. prints the number of 5xx answers (before, during and after the outage), judgments confirmed
     against judgments stored, and pairs judged more than k times. Target: 0, equal, 0.

"Confirmed" is a judge POST answered 2xx with the next pair: a new judgment, or "Already recorded"
for an assignment whose earlier submit got no such answer (the labeler then knows it is stored).
The last line is one JSON object with every figure; the exit status is 1 when a target is missed.

    .venv/bin/python benchmarks/soak.py                                  # 100 labelers, 10 minutes
    .venv/bin/python benchmarks/soak.py --labelers 10 --minutes 1 --redis-down-seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labeling_load as load  # noqa: E402  (benchmarks/labeling_load.py: database, server, labelers)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labelers", type=int, default=100, help="concurrent simulated labelers")
    p.add_argument("--minutes", type=float, default=10.0, help="how long the labelers label")
    p.add_argument("--redis-down-seconds", type=float, default=30.0,
                   help="how long Redis stays stopped, from the middle of the run")
    p.add_argument("--pace", type=float, default=2.0, help="seconds between one labeler's judgments")
    p.add_argument("--pairs", type=int, default=20_000,
                   help="pairs in the campaign (default: more than 100 labelers judge in 10 minutes at k=3)")
    p.add_argument("--overlap", type=int, default=3, help="judgments wanted per pair (k)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn sync workers")
    p.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432",
                   help="PostgreSQL server URL (no database name); the soak creates its own database")
    p.add_argument("--db-name", default="pairloop_soak", help="database to (re)create")
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server",
                   help="the redis-server binary to start (on a spare port)")
    p.add_argument("--keep-db", action="store_true", help="leave the database in place at the end")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulated labelers")
    args = p.parse_args(argv)
    if args.labelers < 1 or args.minutes <= 0 or args.redis_down_seconds < 0 or args.pace <= 0:
        p.error("--labelers, --minutes and --pace must be positive, --redis-down-seconds not negative")
    if args.redis_down_seconds >= args.minutes * 60 / 2:
        p.error("--redis-down-seconds must end before the run does (it starts halfway)")
    # labeling_load's pieces read these.
    args.server, args.login = "wsgi", "session"
    return args


class RedisServer:
    """A redis-server of our own on a loopback port, stopped and started again on the same port."""

    def __init__(self, binary: str, data_dir: Path):
        self.binary, self.data_dir = binary, data_dir
        self.port = load.free_port()
        self.process: subprocess.Popen | None = None
        self.log = open(data_dir / "redis.log", "ab")  # noqa: SIM115 - closed in stop(final=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.data_dir)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"redis-server exited: {(self.data_dir / 'redis.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start within 15 s") from None
                time.sleep(0.05)

    def stop(self, final: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if final:
            self.log.close()


@dataclass
class Tally:
    """What the labelers saw, by phase of the outage: before, down (Redis stopped) and after."""

    phase: str = "before"
    answers: dict = field(default_factory=lambda: {"before": {}, "down": {}, "after": {}})

    def count(self, outcome: str) -> None:
        by_outcome = self.answers[self.phase]
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1

    def server_errors(self, phase: str | None = None) -> int:
        phases = [phase] if phase else list(self.answers)
        return sum(n for p in phases for outcome, n in self.answers[p].items()
                   if outcome.startswith("http 5"))


async def judge_once(labeler: load.Labeler, rng: random.Random, tally: Tally) -> None:
    """One judgment as labeling_load judges it; "Already recorded" confirms an unconfirmed earlier submit."""
    samples: list[load.Sample] = []
    try:
        await load.judge(labeler, rng, samples)
    except load.HttpError:  # answered 200 without a pair card
        tally.count("no pair card")
        return
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
        tally.count(f"connection: {type(exc).__name__}")
        return
    outcome = samples[-1].outcome
    if outcome == "already recorded":
        labeler.confirmed += 1
    tally.count(outcome)


async def label_for(args, labelers: list[load.Labeler], tally: Tally) -> None:
    rng = random.Random(args.seed)
    stop_at = time.perf_counter() + args.minutes * 60

    async def human(labeler: load.Labeler, offset: float) -> None:
        due = time.perf_counter() + offset
        while due < stop_at:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await judge_once(labeler, rng, tally)
            due += args.pace

    offsets = [i * args.pace / len(labelers) for i in range(len(labelers))]
    await asyncio.gather(*(human(labeler, offset) for labeler, offset in zip(labelers, offsets)))


async def restart_redis_midway(args, redis: RedisServer, tally: Tally, started: float) -> None:
    await asyncio.sleep(args.minutes * 60 / 2)
    tally.phase = "down"
    await asyncio.to_thread(redis.stop)
    print(f"{time.perf_counter() - started:6.1f}s  Redis stopped", flush=True)
    await asyncio.sleep(args.redis_down_seconds)
    await asyncio.to_thread(redis.start)
    tally.phase = "after"
    print(f"{time.perf_counter() - started:6.1f}s  Redis started again", flush=True)


async def report_progress(labelers: list[load.Labeler], tally: Tally, started: float) -> None:
    while True:
        await asyncio.sleep(30)
        print(f"{time.perf_counter() - started:6.1f}s  confirmed {sum(x.confirmed for x in labelers)}, "
              f"5xx {tally.server_errors()} ({tally.phase})", flush=True)


async def soak(args, server: load.Server, redis: RedisServer, cookies: dict):
    labelers = [load.Labeler(f"bench-{i + 1:04d}", server.ports[0]) for i in range(args.labelers)]
    for labeler in labelers:
        labeler.cookies.update(cookies[labeler.username])
    gate = asyncio.Semaphore(4)

    async def first_page(labeler):
        async with gate:
            await labeler.log_in()  # with signed cookies: only the label page, which shows the first pair

    await asyncio.gather(*(first_page(labeler) for labeler in labelers))
    tally = Tally()
    started = time.perf_counter()
    progress = asyncio.create_task(report_progress(labelers, tally, started))
    await asyncio.gather(label_for(args, labelers, tally), restart_redis_midway(args, redis, tally, started))
    progress.cancel()
    for labeler in labelers:
        if labeler.connection is not None:
            await labeler.connection.close()
    return labelers, tally


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="pairloop-soak-"))
    print(f"pairloop soak: {args.labelers} labelers, one judgment every {args.pace:g}s each, "
          f"{args.minutes:g} min, Redis down {args.redis_down_seconds:g}s from the middle; "
          f"{args.pairs:,} pairs, k={args.overlap}, gunicorn x{args.workers}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    redis = RedisServer(args.redis_server, data_dir)
    server = None
    result: dict = {"labelers": args.labelers, "minutes": args.minutes,
                    "redis_down_seconds": args.redis_down_seconds, "pace_s": args.pace, "pairs": args.pairs,
                    "overlap": args.overlap, "workers": args.workers}
    try:
        redis.start()
        env = {"DATABASE_URL": load.recreate_database(args), "REDIS_URL": redis.url,
               "PAIRLOOP_DATA_DIR": str(data_dir), "PAIRLOOP_CHANNEL_PREFIX": "pairloop-soak"}
        load.django_setup(env)
        timings = load.seed(args)
        print(f"seeded in {timings['migrate_s'] + timings['seed_s'] + timings['vacuum_analyze_s']:.1f}s; "
              f"Redis on port {redis.port}", flush=True)
        cookies = load.signed_session_cookies([f"bench-{i + 1:04d}" for i in range(args.labelers)])
        server = load.start_server(args, env, data_dir)
        labelers, tally = asyncio.run(soak(args, server, redis, cookies))
        server.stop()
        server = None
        checks = load.integrity(args, labelers)
        errors = {phase: tally.server_errors(phase) for phase in tally.answers}
        result.update({"server_errors": sum(errors.values()), "server_errors_by_phase": errors,
                       "answers_by_phase": tally.answers, **checks})
        result["ok"] = (result["server_errors"] == 0 and checks["pairs_over_k"] == 0
                        and checks["stored_judgments"] == checks["confirmed_submits"])
        print(f"5xx answers: {result['server_errors']} (before {errors['before']}, while Redis was down "
              f"{errors['down']}, after {errors['after']})   target 0", flush=True)
        print(f"judgments confirmed {checks['confirmed_submits']}, stored {checks['stored_judgments']}   "
              "target equal", flush=True)
        print(f"pairs over k: {checks['pairs_over_k']}   target 0 (also: labeler twice on a pair "
              f"{checks['labeler_twice_on_a_pair']}, judgments_count mismatches "
              f"{checks['judgments_count_mismatches']})", flush=True)
        for phase, answers in tally.answers.items():
            print(f"  answers {phase:<6} {dict(sorted(answers.items()))}", flush=True)
        verdict = "OK" if result["ok"] else "TARGET MISSED"
        print(f"-> {verdict}; server log: {server_log_tail(data_dir)}", flush=True)
    finally:
        if server is not None:
            server.stop()
        redis.stop(final=True)
        from django.db import connection

        connection.close()
        if not args.keep_db:
            load.drop_database(args)
        shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


def server_log_tail(data_dir: Path) -> str:
    """The last error line gunicorn logged, if any (the full log is deleted with the data directory)."""
    log = data_dir / "server.log"
    if not log.exists():
        return "no log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if "Error" in line]
    return lines[-1][:300] if lines else "no errors logged"


if __name__ == "__main__":
    raise SystemExit(main())
