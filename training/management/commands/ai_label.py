"""manage.py ai_label CAMPAIGN_SLUG --count N [--labeler NAME]"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotate.models import AILabeler, Campaign
from training.ai_labeling import AILabelingError, ai_label


class Command(BaseCommand):
    help = ("Let one of a campaign's AI labelers judge pairs from its queue: each principle asked in both "
            "orders, kept only when they agree; judgments marked ai.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="campaign slug")
        parser.add_argument("--count", type=int, default=100,
                            help="pairs to take, judged or skipped (fewer if the queue runs dry)")
        parser.add_argument("--labeler", default="", help="the AI labeler's name; needed when there are several")
        parser.add_argument("--seed", type=int, default=0, help="seed of the principle sampling")

    def handle(self, *args, **options):
        campaign = Campaign.objects.filter(slug=options["campaign"]).first()
        if campaign is None:
            raise CommandError(f"no campaign {options['campaign']!r}")
        if options["count"] < 0:
            raise CommandError("--count must be 0 or more")
        labelers = campaign.ai_labelers.all()
        if options["labeler"]:
            labelers = labelers.filter(name=options["labeler"])
        names = sorted(labeler.name for labeler in labelers)
        if len(names) != 1:
            raise CommandError(f"{campaign.slug} has {len(names)} AI labelers matching "
                               f"{options['labeler'] or 'any name'} ({', '.join(names) or 'none'}): "
                               "name one with --labeler")
        labeler: AILabeler = labelers.get()
        try:
            result = ai_label(labeler, count=options["count"], seed=options["seed"])
        except AILabelingError as exc:
            raise CommandError(f"AI labeler {labeler.name} stopped: {exc}") from None
        choices = ", ".join(f"{k} {v}" for k, v in sorted(result.by_choice.items())) or "none"
        self.stdout.write(self.style.SUCCESS(
            f"AI labeler {labeler.name} recorded {result.judgments} judgments on {campaign.slug} ({choices}); "
            f"skipped {result.skipped} ({result.disagreed} orders disagreed, {result.malformed} answers "
            f"named neither response)."))
        if result.stopped == "empty":
            self.stdout.write("Stopped early: the queue has no pair left for this labeler.")
