"""manage.py publish_round ROUND_ID OUT_DIR [--license ID] [--language CODE ...] [--force] [--push REPO [--private]]"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from training.models import Round
from training.publishing import DEFAULT_LICENSE, PublishError, hub_token, publish_round, push


class Command(BaseCommand):
    help = ("Write a finished round's preferences as a Hugging Face dataset folder (Parquet under data/, a "
            "save_to_disk copy, and a README.md dataset card with its sizes, label sources, agreement, "
            "exclusions, models, settings and review); with --push, upload it to a dataset repository.")

    def add_arguments(self, parser):
        parser.add_argument("round", type=int, help="the round's id (its page is /rounds/ID/)")
        parser.add_argument("out", help="the folder to write (replaced only when it is an earlier published round)")
        parser.add_argument("--license", default=DEFAULT_LICENSE,
                            help=f"the card's license id on the Hub (default {DEFAULT_LICENSE!r})")
        parser.add_argument("--language", action="append", default=[], metavar="CODE",
                            help="a language of the prompts and responses (ISO 639-1, e.g. en, zh); repeatable")
        parser.add_argument("--force", action="store_true", help="replace OUT even when it is something else")
        parser.add_argument("--push", metavar="REPO",
                            help="then upload it to this Hub dataset repository (needs HF_TOKEN or `hf auth login`, "
                                 "and HF_HUB_OFFLINE unset)")
        parser.add_argument("--private", action="store_true", help="create the Hub repository private (--push)")

    def handle(self, *args, **options):
        round_ = Round.objects.select_related("campaign").filter(pk=options["round"]).first()
        if round_ is None:
            raise CommandError(f"no round with id {options['round']}")
        try:
            token = hub_token() if options["push"] else ""
            published = publish_round(round_, options["out"], license=options["license"],
                                      languages=options["language"], repo=options["push"] or "",
                                      force=options["force"])
        except PublishError as exc:
            raise CommandError(f"nothing was published: {exc}") from None
        self.stdout.write(f"Wrote {published.rows} rows of {round_} with its dataset card to {published.path}")
        if options["push"]:
            url = push(published.path, options["push"], token=token, private=options["private"] or None)
            self.stdout.write(f"Pushed to the dataset repository {options['push']}: {url}")
