"""Typed readers for environment variables: a bad value stops start-up with a message that names it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class Env:
    def __init__(self, environ: Mapping[str, str] | None = None):
        self.environ = os.environ if environ is None else environ

    def str(self, name: str, default: str) -> str:
        return self.environ.get(name, default)

    def bool(self, name: str, default: bool) -> bool:
        raw = self.environ.get(name)
        if raw is None:
            return default
        value = raw.strip().lower()
        if value in TRUE:
            return True
        if value in FALSE:
            return False
        raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")

    def int(self, name: str, default: int, *, minimum: int | None = None) -> int:
        raw = self.environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
        if minimum is not None and value < minimum:
            raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum}")
        return value

    def list(self, name: str, default: list[str]) -> list[str]:
        raw = self.environ.get(name)
        if raw is None:
            return default
        return [item.strip() for item in raw.split(",") if item.strip()]

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.environ.get(name, default)
        if value not in choices:
            shown = ", ".join(c or "(empty)" for c in choices)
            raise ImproperlyConfigured(f"{name}={value!r} is not one of: {shown}")
        return value


def redis_url_parts(url: str) -> tuple[str, str]:
    """(celery broker URL, channels/redis-py address) for a redis:// , rediss:// or unix:// URL."""
    if url.startswith("unix://"):
        path = url[len("unix://"):]
        if not path.startswith("/"):
            raise ImproperlyConfigured(f"REDIS_URL={url!r}: a unix socket URL needs an absolute path")
        return f"redis+socket://{path}", url
    if url.startswith(("redis://", "rediss://")):
        return url, url
    raise ImproperlyConfigured(f"REDIS_URL={url!r} must start with redis://, rediss:// or unix://")


def make_private(directory: Path) -> Path:
    """Make `directory` private to this user (mode 0700, created if missing) and every file and folder this
    process creates from now on too (umask 077): the data directory holds the database, uploads,
    checkpoints and the Redis socket."""
    os.umask(0o077)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_uid == os.getuid():
        directory.chmod(0o700)
    return directory
