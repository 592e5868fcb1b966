"""The embedded default as a newcomer meets it: no DATABASE_URL, no REDIS_URL. Migrate, seed the
demo, start `python -m pairloop.embedded serve`, log in with a demo login and label a pair over
real HTTP, with the launcher's embedded Redis and Celery worker running."""

from __future__ import annotations

import http.cookiejar
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.embedded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "PAIRLOOP_TEST_DATABASE_NAME", "PAIRLOOP_EMBEDDED_CHILD"}}
    env.update(PAIRLOOP_DATA_DIR=str(data_dir), PAIRLOOP_DEMO_POLICY_PRESET="tiny")
    return env


def manage(env, *args, timeout=600, plain=False) -> str:
    """manage.py with the embedded Redis up, as scripts/demo runs it (plain: as a user types it)."""
    command = [sys.executable, "manage.py", *args]
    if not plain:
        command = [sys.executable, "-m", "pairloop.embedded", "exec", "--", *command]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


class Browser:
    """A cookie-keeping HTTP client, enough for Django's login and CSRF."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def csrf(self) -> str:
        return next(c.value for c in self.jar if c.name == "csrftoken")

    def get(self, path: str) -> str:
        with self.opener.open(self.base + path, timeout=30) as response:
            return response.read().decode()

    def post(self, path: str, data: dict, headers: dict | None = None) -> str:
        body = urllib.parse.urlencode(data).encode()
        request = urllib.request.Request(self.base + path, data=body, headers={
            "X-CSRFToken": self.csrf(), "Referer": self.base + path, **(headers or {})})
        with self.opener.open(request, timeout=30) as response:
            return response.read().decode()


def test_it_serves_the_seeded_demo_for_labeling_with_no_outside_services(tmp_path):
    data_dir = tmp_path / "var"
    env = embedded_env(data_dir)
    manage(env, "migrate", "--noinput")
    seeded = manage(env, "seed_demo", "--preset", "tiny", "--prompts", "30")
    assert "labeler1" in seeded and "pairloop-label" in seeded
    # A simulated labeler judged enough pairs to launch a round at once; the rest wait for people.
    assert "Enough to launch a training round now" in seeded
    again = manage(env, "seed_demo", "--preset", "tiny", "--prompts", "30")
    assert "0 pairs added" in again and "simulated labeler" not in again  # safe to run twice

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pairloop.embedded", "serve", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        browser = Browser(base)
        deadline = time.time() + 60
        while True:
            try:
                login_page = browser.get("/accounts/login/")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.time() < deadline, "the embedded server did not answer within a minute"
                time.sleep(0.5)
        assert "Log in" in login_page
        browser.post("/accounts/login/", {"username": "labeler1", "password": "pairloop-label", "next": "/"})
        home = browser.get("/")
        assert "/campaigns/demo/label/" in home
        page = browser.get("/campaigns/demo/label/")
        assignment = re.search(r'data-assignment="(\d+)"', page).group(1)
        after = browser.post(f"/campaigns/demo/label/{assignment}/judge/", {"choice-helpful": "tie", "choice-respectful": "tie", "ms": "900"},
                             headers={"HX-Request": "true"})
        assert re.search(r'Judged today: <strong id="judged-today">1</strong>', after)
        admin = Browser(base)
        admin.get("/accounts/login/")
        admin.post("/accounts/login/", {"username": "admin", "password": "pairloop-admin", "next": "/"})
        rounds = admin.get("/campaigns/demo/rounds/")
        assert "Launch round 1" in rounds and "Not enough judgments" not in rounds
        # The worker is up on the embedded broker: ask it (it may still be starting).
        deadline = time.time() + 120
        while True:
            ping = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "pairloop", "inspect", "ping", "--timeout", "10"],
                cwd=ROOT, env={**env, "REDIS_URL": f"unix://{data_dir / 'redis.sock'}"},
                capture_output=True, text=True, timeout=120)
            if "pong" in ping.stdout or time.time() > deadline:
                break
            time.sleep(2)
        assert "pong" in ping.stdout, ping.stdout + ping.stderr
        queues = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "pairloop", "inspect", "active_queues", "--timeout", "10"],
            cwd=ROOT, env={**env, "REDIS_URL": f"unix://{data_dir / 'redis.sock'}"},
            capture_output=True, text=True, timeout=120).stdout
        for queue in ("default", "training", "webhooks"):  # webhook deliveries too
            assert f"'name': '{queue}'" in queues, queues

        # Commands beside the running server join its Redis: the demo keeps serving and its worker answers.
        for name, how in (("exec", False), ("plain", True)):
            pairs = data_dir / f"{name}.jsonl"
            pairs.write_text("".join(f'{{"prompt": "Beside the server, {name} {i}?", "response_a": "a{i}", '
                                     f'"response_b": "b{i}"}}\n' for i in range(2)))
            assert "Imported 2 pairs" in manage(env, "import_pairs", "demo", str(pairs), plain=how)
        again = browser.get("/campaigns/demo/label/")
        assert re.search(r'data-assignment="\d+"', again)
        ping = subprocess.run([sys.executable, "-m", "celery", "-A", "pairloop", "inspect", "ping", "--timeout", "10"],
                              cwd=ROOT, env={**env, "REDIS_URL": f"unix://{data_dir / 'redis.sock'}"},
                              capture_output=True, text=True, timeout=120)
        assert "pong" in ping.stdout, "the worker lost its broker after a command ran beside it"
    finally:
        server.terminate()
        server.wait(timeout=30)
    # With the server stopped, a plain command starts the embedded Redis for itself and stops it after.
    more = data_dir / "later.jsonl"
    more.write_text('{"prompt": "After the server?", "response_a": "x", "response_b": "y"}\n')
    assert "Imported 1 pairs" in manage(env, "import_pairs", "demo", str(more), plain=True)
    assert not (data_dir / "redis.sock").exists()
