"""manage.py evaluate ROUND_ID [--to-labelers [--priority N]]: evaluate a finished round again on the campaign's
evaluation set, or send its last evaluation to labelers as a blind batch."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from training import actions
from training.models import Round


class Command(BaseCommand):
    help = ("Evaluate a finished round on demand: its policy, the previous round's and the SFT policy answer the "
            "campaign's evaluation set and are compared by the round's judges (an evaluate job on the training "
            "queue; the round page shows the result). With --to-labelers, its last evaluation's answers go to the "
            "labelers instead, as blind pairs that never train anything.")

    def add_arguments(self, parser):
        parser.add_argument("round", type=int, help="the round's id (as in its page's address, /rounds/ID/)")
        parser.add_argument("--to-labelers", action="store_true",
                            help="send the last evaluation's answers to labelers as a blind batch")
        parser.add_argument("--priority", type=int, default=0,
                            help="the blind pairs' priority in the queue (higher is served first; default 0)")

    def handle(self, *args, **options):
        round_ = Round.objects.select_related("campaign").filter(pk=options["round"]).first()
        if round_ is None:
            raise CommandError(f"no round with id {options['round']}")
        if options["to_labelers"]:
            try:
                added = actions.send_evaluation_to_labelers(round_, priority=options["priority"])
            except actions.RoundRefused as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(self.style.SUCCESS(f"Sent {added} blind evaluation pairs of {round_} to the labelers."))
            return
        try:
            job = actions.evaluate_round(round_)
        except actions.RoundRefused as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(f"Queued the evaluation of {round_} (job {job.pk})."))
