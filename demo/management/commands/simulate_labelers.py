"""manage.py simulate_labelers CAMPAIGN_SLUG --judge rule:NAME|rm:PATH --noise 0.25 --count N
[--labelers 1] [--axis-judge KEY=rule:NAME ...]"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotate.models import Campaign
from demo.simulate import DEFAULT_JUDGE, DEFAULT_NOISE, SimulationError, make_judge, simulate_labelers


class Command(BaseCommand):
    help = ("Record judgments by simulated labelers (bot accounts; marked simulated, so human statistics "
            "leave them out). A rule judge of the demo tasks or a reward model decides; --noise flips A/B.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="campaign slug")
        parser.add_argument("--judge", default=DEFAULT_JUDGE,
                            help="rule:NAME (a demo rule judge, e.g. rule:correct_sentence) "
                                 "or rm:PATH (a reward model)")
        parser.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                            help="probability of flipping each A/B choice (0-1)")
        parser.add_argument("--count", type=int, default=100,
                            help="judgments to record (fewer if the queue runs dry)")
        parser.add_argument("--labelers", type=int, default=1, help="bot accounts taking turns")
        parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
        parser.add_argument("--device", default="auto", help="device of an rm: judge")
        parser.add_argument("--axis-judge", action="append", default=[], metavar="KEY=JUDGE",
                            help="judge one further axis of the campaign by its own rule:NAME or rm:PATH "
                                 "(repeat per axis); an axis given none is judged by --judge")

    def handle(self, *args, **options):
        campaign = Campaign.objects.filter(slug=options["campaign"]).first()
        if campaign is None:
            raise CommandError(f"no campaign {options['campaign']!r}")
        if options["count"] < 0 or options["labelers"] < 1:
            raise CommandError("--count must be 0 or more and --labelers 1 or more")
        try:
            judge = make_judge(options["judge"], device=options["device"])
            axis_judges = {}
            for given in options["axis_judge"]:
                key, sep, spec = given.partition("=")
                if not sep or not key:
                    raise SimulationError(f"--axis-judge takes KEY=JUDGE (e.g. harmless=rule:polite), got {given!r}")
                axis_judges[key] = make_judge(spec, device=options["device"])
        except SimulationError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Judge {judge.name}: {judge.description}")
        for key, axis_judge in axis_judges.items():
            self.stdout.write(f"Judge of {key}: {axis_judge.name}: {axis_judge.description}")
        self.stdout.write(f"Noise: each A/B choice flipped with probability {options['noise']}")
        try:
            result = simulate_labelers(campaign, judge, noise=options["noise"], count=options["count"],
                                       labelers=options["labelers"], seed=options["seed"], axis_judges=axis_judges)
        except SimulationError as exc:
            raise CommandError(str(exc)) from None
        choices = ", ".join(f"{k} {v}" for k, v in sorted(result.by_choice.items())) or "none"
        self.stdout.write(self.style.SUCCESS(
            f"Recorded {result.judgments} simulated judgments on {campaign.slug} "
            f"({choices}; {result.flipped} flipped)."))
        if result.stopped == "empty":
            self.stdout.write("Stopped early: the queue has no pair left for these labelers.")
