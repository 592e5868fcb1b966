"""Django's command line for pairloop: `python manage.py COMMAND` in a checkout, `pairloop COMMAND` installed.

Without REDIS_URL (the embedded default) the command runs as a child beside the embedded Redis, joining the
one `serve` runs or starting it for the command (queued jobs are saved on stop for the next `serve`)."""

from __future__ import annotations

import os
import sys

from django.core.management import execute_from_command_line

from pairloop.embedded import run


def main(command: list[str] | None = None) -> None:
    """Run the command in sys.argv; `command` is how to start it again as the embedded child (default:
    this module, which an installed pairloop finds from any directory)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
    if not os.environ.get("REDIS_URL") and not os.environ.get("PAIRLOOP_EMBEDDED_CHILD"):
        sys.exit(run(command or [sys.executable, "-m", "pairloop.manage", *sys.argv[1:]]))

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
