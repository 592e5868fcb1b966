"""Services a fault test may break on purpose: a private Redis server it stops and starts, and the
machine's PostgreSQL cluster it restarts. The shared Redis on 6379 is never touched."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
