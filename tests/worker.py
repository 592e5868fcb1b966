"""A real Celery worker in a subprocess, for tests that run rounds end to end.

It consumes both queues (default and training) of the broker at REDIS_URL and connects to the
test database (DATABASE_URL built from the test connection), so tests need
`@pytest.mark.django_db(transaction=True)`: the worker sees only committed rows. The worker runs
in its own process group, so `kill()` takes the pool's children too, like a machine that dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from django.db import connection

from tests.services import database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def database_url_for_worker() -> str:
    """DATABASE_URL of the database the tests run on (the test database, not the configured one)."""
    return database_url(connection.settings_dict)


class Worker:
    def __init__(self, *, queues: str = "default,training", env: dict[str, str] | None = None,
                 purge: bool = False):
        self.queues, self.extra_env, self.purge = queues, dict(env or {}), purge
        self.name = f"test-{uuid.uuid4().hex[:8]}@%h"
        self.log_path = Path(tempfile.mkstemp(prefix="pairloop-worker-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 90) -> Worker:
        env = dict(os.environ)
        env.update({"DATABASE_URL": database_url_for_worker(), "DJANGO_SETTINGS_MODULE": "pairloop.settings",
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        command = [sys.executable, "-m", "celery", "-A", "pairloop", "worker", "-Q", self.queues,
                   "-n", self.name, "--concurrency", "1", "--loglevel", "INFO", "--without-gossip",
                   "--without-mingle", "--without-heartbeat"]
        if self.purge:
            command.append("--purge")  # messages left in the broker by earlier runs
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the worker was not ready after {ready_timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once: no chance to clean up or ack."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
