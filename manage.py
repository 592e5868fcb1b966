#!/usr/bin/env python
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
    if not os.environ.get("REDIS_URL") and not os.environ.get("PAIRLOOP_EMBEDDED_CHILD"):
        # The embedded default: run the command as a child beside the embedded Redis, joining the one
        # `serve` runs or starting it for the command (queued jobs are saved on stop for the next `serve`).
        from pairloop.embedded import run

        sys.exit(run([sys.executable, *sys.argv]))
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
