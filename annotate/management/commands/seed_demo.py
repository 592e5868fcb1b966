from django.core.management.base import BaseCommand

from annotate.demo import DEMO_SLUG, DEMO_USERS, seed_demo
from annotate.models import Pair


class Command(BaseCommand):
    help = "Create the demo users and the 'demo' campaign from the demo SFT policy's own answers (safe to rerun)."

    def add_arguments(self, parser):
        parser.add_argument("--prompts", type=int, default=120, help="demo prompts to sample (default 120)")
        parser.add_argument("--per-prompt", type=int, default=3, help="responses sampled per prompt (default 3)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--preset", choices=["demo", "tiny"], default=None,
                            help="demo policy preset (default PAIRLOOP_DEMO_POLICY_PRESET)")

    def handle(self, *args, prompts, per_prompt, seed, preset, **options):
        self.stdout.write("Preparing the demo policy (built once, then cached) and sampling its answers…")
        result = seed_demo(prompts=prompts, per_prompt=per_prompt, seed=seed, preset=preset)
        total = Pair.objects.filter(campaign__slug=DEMO_SLUG).count()
        self.stdout.write(self.style.SUCCESS(
            f"Demo campaign '{DEMO_SLUG}': {result.pairs.created} pairs added, {result.pairs.skipped} already there, "
            f"{total} in all. Policy: {result.policy}"))
        if result.users_created:
            self.stdout.write(f"Created users: {', '.join(result.users_created)}")
        self.stdout.write("Demo logins (username / password):")
        for username, password, role in DEMO_USERS:
            self.stdout.write(f"  {username:<10} {password:<16} {role}")
