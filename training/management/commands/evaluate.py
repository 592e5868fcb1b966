"""manage.py evaluate ROUND_ID: evaluate a finished round again on the campaign's evaluation set."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from training import actions
from training.models import Round


class Command(BaseCommand):
    help = ("Evaluate a finished round on demand: its policy, the previous round's and the SFT policy answer the "
            "campaign's evaluation set and are compared by the round's judges (an evaluate job on the training "
            "queue; the round page shows the result).")

    def add_arguments(self, parser):
        parser.add_argument("round", type=int, help="the round's id (as in its page's address, /rounds/ID/)")

    def handle(self, *args, **options):
        round_ = Round.objects.select_related("campaign").filter(pk=options["round"]).first()
        if round_ is None:
            raise CommandError(f"no round with id {options['round']}")
        try:
            job = actions.evaluate_round(round_)
        except actions.RoundRefused as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(f"Queued the evaluation of {round_} (job {job.pk})."))
