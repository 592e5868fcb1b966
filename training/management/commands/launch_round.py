"""manage.py launch_round CAMPAIGN_SLUG [--preset demo|tiny] [--set KEY=VALUE ...] [--force] [--wait]"""

from __future__ import annotations

import sys
import time

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from annotate.models import Campaign
from training import actions
from training.config import FIELDS, PRESETS, field_help, parse_assignments
from training.models import Job, Round


class Command(BaseCommand):
    help = ("Launch the next training round of a campaign: export -> reward model -> PPO or GRPO (or DPO, "
            "no reward model) -> sample -> "
            "enqueue new pairs, as a Celery chain. With --wait, follow its jobs and exit non-zero "
            "if one fails.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="campaign slug")
        # argparse formats help with %, so a "%" in a setting's docstring must stay text (as in parser_for).
        keys = ", ".join(f"{name} ({field_help(name).rstrip('.')})" for name in FIELDS if name != "preset")
        keys = keys.replace("%", "%%")
        parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                            help="starting values: demo (minutes on 2 CPU cores) or tiny (for tests)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help=f"override one setting; keys: {keys}")
        parser.add_argument("--force", action="store_true",
                            help="launch even when too little is new since the last successful round")
        parser.add_argument("--user", default="", help="username recorded as the launcher")
        parser.add_argument("--wait", action="store_true",
                            help="follow the jobs with a progress bar until the round ends")
        parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks (--wait)")

    def handle(self, *args, **options):
        campaign = Campaign.objects.filter(slug=options["campaign"]).first()
        if campaign is None:
            raise CommandError(f"no campaign {options['campaign']!r}")
        user = None
        if options["user"]:
            user = User.objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"no user {options['user']!r}")
        try:
            config = actions.launch_config(campaign, options["preset"], parse_assignments(options["set"]))
            freshness = actions.launch_freshness(campaign)
            round_ = actions.launch_round(campaign, user, config, force=options["force"])
        except actions.StaleLaunch as exc:
            raise CommandError(f"{exc} (--force)") from None
        except (ValueError, actions.RoundRefused) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(freshness.sentence())
        self.stdout.write(self.style.SUCCESS(f"Launched round {round_.number} of {campaign.slug} "
                                             f"(id {round_.pk}) from {round_.parent_policy}"))
        if options["wait"]:
            self.follow(round_, options["poll"])

    def follow(self, round_: Round, poll: float) -> None:
        """Progress bars per job until every job succeeded, or one failed or was cancelled."""
        bars: dict[int, tqdm] = {}  # jobs run one after another: one open bar at a time
        done: set[int] = set()
        started_waiting = time.monotonic()
        hinted = False
        try:
            while True:
                actions.fail_stale_jobs()
                jobs = list(Job.objects.filter(round=round_).order_by("order"))
                for job in jobs:
                    if job.status == Job.QUEUED or job.pk in done:
                        continue
                    bar = bars.get(job.pk)
                    if bar is None:
                        bar = bars[job.pk] = tqdm(desc=f"{job.order + 1}. {job.kind:<7}",
                                                  total=job.total_steps or None, file=sys.stderr,
                                                  dynamic_ncols=True, leave=True)
                    if job.total_steps and bar.total != job.total_steps:
                        bar.total = job.total_steps
                    bar.n = job.step
                    bar.set_postfix_str(job.status, refresh=True)
                    if job.status != Job.RUNNING:
                        bar.close()
                        done.add(job.pk)
                ended = [job for job in jobs if job.status in (Job.FAILED, Job.CANCELLED)]
                if ended:
                    job = ended[0]
                    raise CommandError(f"{job.get_kind_display()} job {job.status}: "
                                       f"{job.error_summary() or 'no error text'}")
                if all(job.status == Job.SUCCEEDED for job in jobs):
                    break
                waited = time.monotonic() - started_waiting
                if not hinted and waited > 30 and all(j.status == Job.QUEUED for j in jobs):
                    self.stderr.write("No worker has picked up the round yet: is one running? "
                                      "(celery -A pairloop worker -Q default,training)")
                    hinted = True
                time.sleep(poll)
        finally:
            for bar in bars.values():
                bar.close()
        enqueue = jobs[-1]
        self.stdout.write(self.style.SUCCESS(
            f"Round {round_.number} done: {enqueue.result.get('created', 0)} new pairs in the queue; "
            f"policy {Round.objects.get(pk=round_.pk).policy_checkpoint}"))
