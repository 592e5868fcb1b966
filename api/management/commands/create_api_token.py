"""manage.py create_api_token USERNAME [--scope ...]: make an API token and print it, once."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from api.actions import TokenRefused, create_token
from api.models import SCOPE_NAMES


class Command(BaseCommand):
    help = ("Make an API token for a user and print it once (only its hash is kept). Scopes default to "
            "all that the user's role allows.")

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--scope", action="append", choices=SCOPE_NAMES, dest="scopes",
                            help="a scope to grant (repeat for more); default: every scope the role allows")
        parser.add_argument("--name", default="cli", help="what the token is for (default: cli)")

    def handle(self, *args, **options):
        user = get_user_model()._default_manager.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user {options['username']!r}")
        try:
            token, raw = create_token(user, options["name"], options["scopes"])
        except TokenRefused as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"Token {token.name!r} for {user.get_username()} with scopes "
                          f"{', '.join(token.scopes)}; it is shown only now:")
        self.stdout.write(raw)
