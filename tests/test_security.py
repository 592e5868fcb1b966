"""Security settings as an attacker or an operator meets them: production checks, the secret key,
login throttling, who sees tracebacks, password-reset pages only with email, and demo passwords."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def production_env(tmp_path, **extra) -> dict[str, str]:
    """The environment of README's 'Running on PostgreSQL and Redis' section."""
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    env.update(DATABASE_URL=env.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/pairloop"),
               REDIS_URL=env.get("REDIS_URL", "redis://127.0.0.1:6379/0"), PAIRLOOP_DATA_DIR=str(tmp_path),
               DEBUG="0", ALLOWED_HOSTS="pairloop.example.org", PAIRLOOP_HTTPS="1", PAIRLOOP_BEHIND_PROXY="1",
               CSRF_TRUSTED_ORIGINS="https://pairloop.example.org", SECRET_KEY=secrets.token_urlsafe(50))
    env.update(extra)
    return env


def test_it_refuses_to_serve_a_host_name_without_a_secret_key(tmp_path):
    env = production_env(tmp_path)
    del env["SECRET_KEY"]
    result = manage(env, "check")
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr
    assert not (tmp_path / "secret_key").exists()  # no key of its own that other hosts would not share


def test_it_writes_the_embedded_key_file_readable_by_its_owner_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY"}}
    env["PAIRLOOP_DATA_DIR"] = str(tmp_path)
    assert manage(env, "check").returncode == 0
    key_file = tmp_path / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    assert len(key) >= 50
    assert manage(env, "check").returncode == 0
    assert key_file.read_text() == key  # kept: sessions survive restarts
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("secret_key")] == ["secret_key"]
