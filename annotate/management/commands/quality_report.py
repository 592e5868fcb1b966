"""manage.py quality_report CAMPAIGN [--json]."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from annotate.models import Campaign
from annotate.quality import quality_report


def _pct(value) -> str:
    return "—" if value is None else f"{value:.0%}"


def _num(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


class Command(BaseCommand):
    help = ("Print a campaign's label quality: agreement (percent, Krippendorff's alpha, Cohen's kappa per "
            "labeler pair), position bias, labeler statistics and flags; computed afresh.")

    def add_arguments(self, parser):
        parser.add_argument("campaign", help="the campaign's slug")
        parser.add_argument("--json", action="store_true", help="print the report as one JSON object")

    def handle(self, *args, **options):
        try:
            campaign = Campaign.objects.get(slug=options["campaign"])
        except Campaign.DoesNotExist:
            raise CommandError(f"no campaign with slug {options['campaign']!r}") from None
        report = quality_report(campaign, fresh=True)
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, ensure_ascii=False))
            return
        agreement, bias = report["agreement"], report["position_bias"]
        labelers = len(report["labelers"])
        self.stdout.write(f"{campaign.name}: {report['judgments']} judgments by {labelers} labelers")
        self.stdout.write(f"Agreement: {_pct(agreement['percent'])} over {agreement['items']} pairs judged "
                          f"twice or more; Krippendorff's alpha {_num(agreement['krippendorff_alpha'])}")
        self.stdout.write(f"Position bias: left side won {_pct(bias['left_rate'])} of {bias['n']} "
                          f"(binomial p = {_num(bias['p_value'], 3)})")
        for row in report["labelers"]:
            self.stdout.write(
                f"  {row['username']}: {row['judgments']} judgments, gold {_pct(row['gold_accuracy'])} of "
                f"{row['gold_n']}, left {_pct(row['left_rate'])}, with majority "
                f"{_pct(row['agreement_with_majority'])} of {row['majority_n']}, median "
                f"{_num(row['median_seconds'], 1)} s, too fast {_pct(row['too_fast_rate'])}, "
                f"excluded {row['excluded']}")
            for flag in row["flags"]:
                self.stdout.write(f"    FLAG {flag}")
        for axis in report["further_axes"]:
            agreement, bias = axis["agreement"], axis["position_bias"]
            self.stdout.write(f"Axis {axis['axis']}: agreement {_pct(agreement['percent'])} over "
                              f"{agreement['items']} pairs, alpha {_num(agreement['krippendorff_alpha'])}; left "
                              f"side won {_pct(bias['left_rate'])} of {bias['n']} (p = {_num(bias['p_value'], 3)})")
            for name, flags in axis["flags"].items():
                for flag in flags:
                    self.stdout.write(f"    FLAG {name} on {axis['axis']}: {flag}")
