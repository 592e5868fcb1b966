"""Services the tests start: the app served for real by daphne or gunicorn; and those a fault test may
break on purpose, a private Redis server it stops and starts and the machine's PostgreSQL cluster it
restarts. The shared Redis on 6379 is never touched."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

REPO = Path(__file__).resolve().parent.parent
SERVERS = {
    "daphne": lambda port: [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                            "pairloop.asgi:application"],
    "gunicorn": lambda port: [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}",
                              "pairloop.wsgi:application"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url(settings_dict: dict) -> str:
    """The URL of the database this test process uses (the test database once it is set up)."""
    engine = settings_dict["ENGINE"]
    if engine == "django.db.backends.sqlite3":
        return f"sqlite:///{Path(settings_dict['NAME']).resolve()}"
    if "postgresql" not in engine:
        raise RuntimeError(f"the served app knows no URL for {engine}")
    user = quote(settings_dict.get("USER") or "", safe="")
    password = settings_dict.get("PASSWORD") or ""
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{quote(settings_dict['NAME'], safe='')}"


@dataclass(frozen=True)
class Served:
    """An app server the tests started: its base URL, port and process."""

    url: str
    port: int
    process: subprocess.Popen


def stop(process: subprocess.Popen, log_file, log_path: Path) -> None:
    """Stop a server this module started (killed if it has not gone in 10 s) and remove its log."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log_file.close()
    log_path.unlink(missing_ok=True)


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer {url} within {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")


@contextmanager
def serve_app(url_of_db: str, server: str = "daphne", **extra_env: str) -> Iterator[Served]:
    """`server` (a key of SERVERS) serving the app on a free loopback port against the given database, with
    DEBUG off as in production; stopped (terminated, killed after 10 s) when the block ends."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix=f"pairloop-{server}-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    # With DEBUG off whitenoise serves static files through the finders (WHITENOISE_USE_FINDERS), so no
    # collectstatic is needed.
    env.update(DATABASE_URL=url_of_db, DJANGO_SETTINGS_MODULE="pairloop.settings", DEBUG="0", LOG_LEVEL="WARNING",
               **extra_env)
    process = subprocess.Popen(SERVERS[server](port), cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", port, process)
    try:
        wait_until_serving(f"{served.url}/accounts/login/", process, log_path)
        yield served
    finally:
        stop(process, log_file, log_path)


class PrivateRedis:
    """A redis-server of this test's own on a free loopback port; stop() and start() it at will."""

    def __init__(self):
        self.binary = shutil.which("redis-server")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pairloop-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> PrivateRedis:
        if self.binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=1).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Kill the server, as a crash would: everything it held is gone when it starts again."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_cluster() -> tuple[str, str] | None:
    """(version, name) of this machine's PostgreSQL cluster when this process may restart it, else None."""
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        return None
    listed = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True)
    for line in listed.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "5432" and fields[3] == "online":
            return fields[0], fields[1]
    return None


def pg_ctl(action: str, cluster: tuple[str, str]) -> None:
    """Stop or start the PostgreSQL cluster (stop is `-m fast`: connections are cut, as in a restart)."""
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", cluster[0], cluster[1], action]
    if action == "stop":
        command += ["-m", "fast"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    if action == "start":
        deadline = time.monotonic() + 60
        while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not come back within 60 s")
            time.sleep(0.3)


@contextmanager
def serve_chat_models() -> Iterator[str]:
    """`transformers serve` (transformers' OpenAI-compatible server) on a free loopback port, loading the
    local model path each request names; yields its base URL (.../v1). Stopped when the block ends."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="pairloop-serve-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    command = [str(Path(sys.executable).with_name("transformers")), "serve", "--host", "127.0.0.1",
               "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/health", process, log_path, timeout=120)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process, log_file, log_path)
