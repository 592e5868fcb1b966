"""manage.py export_pairs CAMPAIGN_SLUG OUT --format jsonl|parquet|hf [--raw] [--no-simulated]."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotate.exporting import FORMATS, export_pairs
from annotate.models import Campaign


class Command(BaseCommand):
    help = ("Export a campaign's Bradley-Terry pairs in TRL's prompt/chosen/rejected columns plus margin, "
            "pair_id and labeler (ties and both-bad left out), or with --raw every judgment.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="the campaign's slug")
        parser.add_argument("out", help="output file (jsonl, parquet) or directory (hf)")
        parser.add_argument("--format", choices=FORMATS, default="jsonl",
                            help="jsonl, parquet, or hf (a datasets save_to_disk directory)")
        parser.add_argument("--raw", action="store_true",
                            help="every judgment: choice, strength, shown order, milliseconds, rationale, "
                                 "labeler")
        parser.add_argument("--no-simulated", action="store_true",
                            help="leave out simulated labelers' judgments")

    def handle(self, *args, **options):
        try:
            campaign = Campaign.objects.get(slug=options["campaign"])
        except Campaign.DoesNotExist:
            raise CommandError(f"no campaign with slug {options['campaign']!r}") from None
        result = export_pairs(campaign, options["out"], format=options["format"], raw=options["raw"],
                              include_simulated=not options["no_simulated"])
        kind = "judgments" if options["raw"] else "pairs"
        self.stdout.write(f"Wrote {result.rows} {kind} to {result.path}")
