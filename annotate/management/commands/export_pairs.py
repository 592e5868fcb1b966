"""manage.py export_pairs CAMPAIGN OUT --format jsonl|parquet|hf [--trl-format auto|conversational|standard]
[--axis KEY] [--raw] [--no-simulated] [--force]."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotate.exporting import FORMATS, TRL_FORMATS, ExportError, export_pairs
from annotate.models import Campaign


class Command(BaseCommand):
    help = ("Export a campaign's Bradley-Terry pairs in TRL's prompt/chosen/rejected columns plus margin, "
            "pair_id and labeler (ties and both-bad left out), or with --raw every judgment.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="the campaign's slug")
        parser.add_argument("out", help="output file (jsonl, parquet) or directory (hf)")
        parser.add_argument("--format", choices=FORMATS, default="jsonl",
                            help="jsonl, parquet, or hf (a datasets save_to_disk directory)")
        parser.add_argument("--trl-format", choices=TRL_FORMATS, default="auto",
                            help="TRL's dataset format: conversational (prompt as messages, chosen/rejected "
                                 "as assistant messages) or standard (text); default auto: conversational "
                                 "when the campaign has chat prompts")
        parser.add_argument("--axis", default=None,
                            help="the axis whose pairs to export, by key (default: the campaign's first); "
                                 "a raw export holds every axis")
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
                                  include_simulated=not options["no_simulated"], force=options["force"],
                                  trl_format=options["trl_format"], axis=options["axis"])
        except ExportError as exc:
            raise CommandError(f"nothing was exported: {exc}") from None
        kind = "judgments" if options["raw"] else "pairs"
        form = " (conversational: prompts as messages)" if result.conversational else ""
        self.stdout.write(f"Wrote {result.rows} {kind}{form} to {result.path}")
        if result.left_out and result.left_out.count:
            self.stdout.write(f"Left out {result.left_out.sentence()}")
