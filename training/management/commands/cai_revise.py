"""manage.py cai_revise CAMPAIGN_SLUG --labeler NAME --count N"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotate.models import AILabeler, Campaign
from training.ai_labeling import AILabelingError
from training.cai import cai_revise


class Command(BaseCommand):
    help = ("Constitutional AI's critique and revision: the campaign's current policy answers some of its prompts, "
            "an AI labeler's model critiques and revises each answer by a sampled principle, and each revision "
            "enters the queue as a pair the AI proposes (revision preferred) for people to confirm or overturn.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="campaign slug")
        parser.add_argument("--labeler", required=True, help="the name of the AI labeler whose model revises")
        parser.add_argument("--count", type=int, default=16, help="prompts to answer and revise (fewer if it has fewer)")
        parser.add_argument("--seed", type=int, default=0,
                            help="seed of the prompts', principles' and revision sides' sampling")
        parser.add_argument("--priority", type=int, default=0, help="queue priority of the proposed pairs")

    def handle(self, *args, **options):
        campaign = Campaign.objects.filter(slug=options["campaign"]).first()
        if campaign is None:
            raise CommandError(f"no campaign {options['campaign']!r}")
        if options["count"] < 0:
            raise CommandError("--count must be 0 or more")
        labeler = AILabeler.objects.filter(campaign=campaign, name=options["labeler"]).first()
        if labeler is None:
            raise CommandError(f"{campaign.slug} has no AI labeler {options['labeler']!r}")
        try:
            result = cai_revise(labeler, count=options["count"], seed=options["seed"], priority=options["priority"])
        except AILabelingError as exc:
            raise CommandError(f"AI labeler {labeler.name} stopped: {exc}") from None
        self.stdout.write(self.style.SUCCESS(
            f"AI labeler {labeler.name} proposed {result.proposed} revised answers on {campaign.slug}; "
            f"{result.unchanged} revisions were empty or unchanged, {result.duplicates} pairs existed already."))
