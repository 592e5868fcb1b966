"""Settings come from environment variables, fail loudly on bad values, and are all documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from pairloop.env import Env, redis_url_parts

ROOT = Path(__file__).resolve().parent.parent


def settings_variables() -> set[str]:
    source = (ROOT / "pairloop" / "settings.py").read_text()
    return set(re.findall(r'env\.\w+\("([A-Z_]+)"', source)) | {"REDIS_URL"}


def documented_variables() -> set[str]:
    """The names in the first column of docs/environment.md's table."""
    text = (ROOT / "docs" / "environment.md").read_text()
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([A-Z_]+)`", cell)}


def test_it_documents_every_environment_variable_in_the_environment_table():
    missing = sorted(settings_variables() - documented_variables())
    assert not missing, f"docs/environment.md's table does not document: {missing}"


@pytest.mark.parametrize("raw", ["maybe", "2", "yes please"])
def test_it_refuses_a_boolean_that_is_not_one(raw):
    with pytest.raises(ImproperlyConfigured, match="DEBUG"):
        Env({"DEBUG": raw}).bool("DEBUG", False)


def test_it_refuses_integers_out_of_range_or_malformed():
    with pytest.raises(ImproperlyConfigured, match="not an integer"):
        Env({"PAIRLOOP_UNDO_SECONDS": "ten"}).int("PAIRLOOP_UNDO_SECONDS", 600)
    with pytest.raises(ImproperlyConfigured, match="at least 0"):
        Env({"PAIRLOOP_UNDO_SECONDS": "-1"}).int("PAIRLOOP_UNDO_SECONDS", 120, minimum=0)


def test_it_maps_redis_urls_for_celery_and_channels():
    assert redis_url_parts("redis://127.0.0.1:6379/2") == ("redis://127.0.0.1:6379/2", "redis://127.0.0.1:6379/2")
    assert redis_url_parts("unix:///tmp/r.sock") == ("redis+socket:///tmp/r.sock", "unix:///tmp/r.sock")
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL"):
        redis_url_parts("http://example")


@pytest.mark.parametrize("name,value,message", [
    ("DATABASE_URL", "nonsense://x", "DATABASE_URL"),
    ("REDIS_URL", "tcp://127.0.0.1", "REDIS_URL"),
    ("PAIRLOOP_UNDO_SECONDS", "soon", "PAIRLOOP_UNDO_SECONDS"),
    ("PAIRLOOP_DEMO_POLICY_PRESET", "huge", "PAIRLOOP_DEMO_POLICY_PRESET"),
])
def test_it_stops_start_up_on_a_bad_value_and_names_it(tmp_path, name, value, message):
    env = {**os.environ, "PAIRLOOP_DATA_DIR": str(tmp_path), name: value}
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_suite_runs_offline_so_a_missing_model_fails_at_once():
    """tests/conftest.py (and scripts/test) set the hub's offline switches before anything imports it."""
    import time

    import huggingface_hub.constants
    from transformers import AutoTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    started = time.monotonic()
    with pytest.raises(OSError):
        AutoTokenizer.from_pretrained("pairloop-tests/no-such-model")
    assert time.monotonic() - started < 5
