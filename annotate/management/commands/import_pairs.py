"""manage.py import_pairs CAMPAIGN_SLUG PATH: add pairs from JSONL, CSV, Parquet or a datasets directory."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotate.importing import ImportFailed, import_file
from annotate.models import Campaign


class Command(BaseCommand):
    help = ("Import pairs into a campaign from JSONL, CSV, Parquet or a datasets save_to_disk directory. "
            "The whole file is checked first: any bad row and nothing is imported.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="the campaign's slug")
        parser.add_argument("path", help="file (.jsonl, .json, .csv, .parquet, optionally .gz) or directory")
        parser.add_argument("--pairs-per-prompt", type=int, default=None,
                            help="for rows with a `responses` list: sample this many pairs per row "
                                 "(default: all)")
        parser.add_argument("--seed", type=int, default=0, help="seed for --pairs-per-prompt sampling")
        parser.add_argument("--priority", type=int, default=0,
                            help="queue priority of the new pairs (higher first)")

    def handle(self, *args, **options):
        try:
            campaign = Campaign.objects.get(slug=options["campaign"])
        except Campaign.DoesNotExist:
            raise CommandError(f"no campaign with slug {options['campaign']!r}") from None
        try:
            result = import_file(campaign, options["path"], pairs_per_prompt=options["pairs_per_prompt"],
                                 seed=options["seed"], priority=options["priority"])
        except ImportFailed as exc:
            listing = "\n".join(f"  {line}" for line in exc.lines())
            raise CommandError(f"nothing was imported from {options['path']}: {exc.total} "
                               f"error{'s' if exc.total != 1 else ''}\n{listing}") from None
        self.stdout.write(f"Imported {result.created} pairs into {campaign.slug!r} from {result.rows} rows; "
                          f"skipped {result.skipped} duplicates.")
