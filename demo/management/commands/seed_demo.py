import os

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from annotate.models import Campaign, Pair
from demo.seed import AXIS_JUDGES, DEMO_SLUG, SEED_SIZES, known_passwords_allowed, seed_demo, seed_size
from demo.simulate import DEFAULT_JUDGE, DEFAULT_NOISE, make_judge, simulate_labelers
from training.actions import usable_judgments
from training.engine.common import LineProgress

SIZES = ", ".join(f"{name} {size.prompts}" for name, size in SEED_SIZES.items())
JUDGED = ", ".join(f"{name} {size.judged if size.judged is not None else 'PAIRLOOP_MIN_JUDGMENTS'}"
                   for name, size in SEED_SIZES.items())


class Command(BaseCommand):
    help = "Create the demo users and the 'demo' campaign from the demo SFT policy's own answers (safe to rerun)."

    def add_arguments(self, parser):
        parser.add_argument("--prompts", type=int, default=None,
                            help=f"demo prompts to sample (default by preset, demo.seed.SEED_SIZES: "
                                 f"{SIZES})")
        parser.add_argument("--per-prompt", type=int, default=3, help="responses sampled per prompt (default 3)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--judged", type=int, default=None,
                            help=f"usable judgments the campaign gets from a simulated labeler "
                                 f"({DEFAULT_JUDGE}, {DEFAULT_NOISE * 100:g}%% noise, marked simulated), so that "
                                 "a round can be launched at once and beat SFT (default by preset, "
                                 f"demo.seed.SEED_SIZES: {JUDGED}; 0: none)")
        parser.add_argument("--preset", choices=["demo", "tiny"], default=None,
                            help="demo policy preset (default PAIRLOOP_DEMO_POLICY_PRESET)")
        parser.add_argument("--host", default=os.environ.get("PAIRLOOP_HOST", "127.0.0.1"),
                            help="address the demo will be served on (default PAIRLOOP_HOST or 127.0.0.1); the "
                                 "README's demo passwords only for the embedded default on a loopback address, "
                                 "random ones otherwise")

    def handle(self, *args, prompts, per_prompt, seed, preset, judged, host, **options):
        size = seed_size(preset)
        prompts = size.prompts if prompts is None else prompts
        judged = size.judged if judged is None else judged
        judged = settings.PAIRLOOP["MIN_JUDGMENTS"] if judged is None else judged
        if judged < 0:
            raise CommandError("--judged must be 0 or more")
        known = known_passwords_allowed(host)
        self.stdout.write(f"Preparing the demo policy (built once, then cached) and sampling its answers to "
                          f"{prompts:,} demo prompts…")
        result = seed_demo(prompts=prompts, per_prompt=per_prompt, seed=seed, preset=preset,
                           known_passwords=known, on_progress=LineProgress("seed_demo", self.stdout))
        total = Pair.objects.filter(campaign__slug=DEMO_SLUG).count()
        self.stdout.write(self.style.SUCCESS(
            f"Demo campaign '{DEMO_SLUG}': {result.pairs.created} pairs added, {result.pairs.skipped} already there, "
            f"{total} in all. Policy: {result.policy}"))
        self._judge_until(Campaign.objects.get(slug=DEMO_SLUG), judged, seed)
        if result.users_created:
            self.stdout.write(f"Created users: {', '.join(result.users_created)}")
        if known:
            self.stdout.write("Demo logins (username / password):")
        else:
            self.stdout.write(self.style.WARNING(
                "Demo logins (username / password): random passwords, shown only this once; the README's public "
                "ones are used only on the embedded default served on 127.0.0.1."))
        for login in result.logins:
            password = login.password or "(unchanged)"
            self.stdout.write(f"  {login.username:<10} {password:<16} {login.role}")

    def _judge_until(self, campaign: Campaign, wanted: int, seed: int) -> None:
        """Simulated judgments until the campaign has `wanted` usable ones (ties do not count), or no pair
        is left."""
        judge = make_judge(DEFAULT_JUDGE)
        axes = {axis.key for axis in campaign.axes()}
        axis_judges = {key: make_judge(spec) for key, spec in AXIS_JUDGES.items() if key in axes}
        recorded = 0
        progress = LineProgress("seed_demo", self.stdout)
        while (missing := wanted - usable_judgments(campaign)) > 0:
            def on_judgment(n: int, done: int = wanted - missing) -> None:
                progress({"stage": "simulated judgments", "step": done + n, "total": wanted})

            result = simulate_labelers(campaign, judge, noise=DEFAULT_NOISE, count=missing,
                                       seed=seed + recorded, on_judgment=on_judgment, axis_judges=axis_judges)
            recorded += result.judgments
            if result.stopped:
                break
        usable = usable_judgments(campaign)
        if recorded:
            open_pairs = Pair.objects.filter(campaign=campaign, is_open=True, gold_choice="").count()
            self.stdout.write(f"A simulated labeler ({judge.name}, {DEFAULT_NOISE:.0%} noise) judged "
                              f"{recorded:,} pairs, marked simulated: {usable:,} usable judgments in the "
                              f"campaign; {open_pairs:,} pairs wait for people.")
        if usable >= settings.PAIRLOOP["MIN_JUDGMENTS"]:
            self.stdout.write("Enough to launch a training round now.")
        elif usable < wanted:
            self.stdout.write(self.style.WARNING(
                f"Only {usable} usable judgments (wanted {wanted}): the campaign ran out of pairs; "
                "seed more prompts with --prompts."))
