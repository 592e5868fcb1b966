import os

from django.core.management.base import BaseCommand

from demo.seed import secure_demo_logins


class Command(BaseCommand):
    help = ("Give demo users who still have the README's public passwords random ones, unless the embedded "
            "default is served on a loopback address (embedded serve runs it before it serves).")

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("PAIRLOOP_HOST", "127.0.0.1"),
                            help="address the app is served on (default PAIRLOOP_HOST or 127.0.0.1)")

    def handle(self, *args, host, **options):
        changed = secure_demo_logins(host)
        if not changed:
            return
        self.stdout.write(self.style.WARNING(
            f"Serving on {host}: demo users had the README's public passwords; new ones, shown only this once:"))
        for login in changed:
            self.stdout.write(f"  {login.username:<10} {login.password:<16} {login.role}")
