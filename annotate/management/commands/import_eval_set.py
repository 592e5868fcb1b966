"""manage.py import_eval_set CAMPAIGN_SLUG PATH [--name NAME]: a campaign's evaluation prompts from a file."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotate.evalsets import import_eval_set
from annotate.importing import ImportFailed
from annotate.models import Campaign


class Command(BaseCommand):
    help = ("Import a campaign's evaluation set: rows with a `prompt` (text or chat turns) and an optional "
            "`reference` answer, in any format import_pairs reads. Its rounds are evaluated on it, never trained "
            "on it. The whole file is checked first: any bad row and nothing is imported.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="the campaign's slug")
        parser.add_argument("path", help="file (.jsonl, .json, .csv, .parquet, optionally .gz) or directory")
        parser.add_argument("--name", default="", help="what to call it (default: the file's name)")

    def handle(self, *args, **options):
        campaign = Campaign.objects.filter(slug=options["campaign"]).first()
        if campaign is None:
            raise CommandError(f"no campaign with slug {options['campaign']!r}")
        try:
            eval_set, created = import_eval_set(campaign, options["path"], options["name"])
        except ImportFailed as exc:
            listing = "\n".join(f"  {line}" for line in exc.lines())
            raise CommandError(f"nothing was imported from {options['path']}: {exc.total} "
                               f"error{'s' if exc.total != 1 else ''}\n{listing}") from None
        count = eval_set.prompts.count()
        if created:
            self.stdout.write(f"Imported evaluation set {eval_set.name!r} version {eval_set.version} "
                              f"({count} prompts) into {campaign.slug!r}.")
        else:
            self.stdout.write(f"Evaluation set version {eval_set.version} ({count} prompts) is already in "
                              f"{campaign.slug!r}: nothing changed.")
