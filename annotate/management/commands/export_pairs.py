"""manage.py export_pairs CAMPAIGN OUT --format jsonl|parquet|hf [--raw] [--no-simulated] [--force]."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotate.exporting import FORMATS, ExportError, export_pairs
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
        parser.add_argument("--force", action="store_true",
                            help="replace OUT even when it is not an earlier export of the same kind "
                                 "(default: refuse, e.g. a backups directory)")

    def handle(self, *args, **options):
        try:
            campaign = Campaign.objects.get(slug=options["campaign"])
        except Campaign.DoesNotExist:
            raise CommandError(f"no campaign with slug {options['campaign']!r}") from None
        try:
            result = export_pairs(campaign, options["out"], format=options["format"], raw=options["raw"],
                                  include_simulated=not options["no_simulated"], force=options["force"])
        except ExportError as exc:
            raise CommandError(f"nothing was exported: {exc}") from None
        kind = "judgments" if options["raw"] else "pairs"
        self.stdout.write(f"Wrote {result.rows} {kind} to {result.path}")
        if result.left_out and result.left_out.count:
            self.stdout.write(f"Left out {result.left_out.sentence()}")
