"""AI-labeler judgments per second against a local OpenAI-compatible server, and what the swap costs.

Starts `transformers serve` on a free loopback port with a tiny chat model built here (demo/tiny_models.py,
or --model PATH), then asks CAI's multiple-choice question (training/engine/judge.py) about --pairs pairs
with 1, 4 and 16 requests in flight (threads, each with its own client), each pair in both orders as an AI
labeler does, and once more in one order only: the swap's cost is the ratio. No database: the figures are
the endpoint's side of `manage.py ai_label`.

    .venv/bin/python benchmarks/ai_label.py [--pairs 64] [--concurrency 1 4 16] [--model PATH]

Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.engine.judge import EndpointAsker, ask_both_orders, question  # noqa: E402

PRINCIPLE = "Which of these assistant responses is more helpful?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, log) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("transformers")), "serve", "--host", "127.0.0.1",
               "--port", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("transformers serve did not start within 180 s")


def run(base_url: str, model: str, pairs: int, concurrency: int, swap: bool) -> float:
    """Judgments per second: `pairs` pairs, `concurrency` at a time, asked in both orders when `swap`."""
    askers = [EndpointAsker(base_url, model, timeout=300, max_retries=0, per_minute=10**9)
              for _ in range(concurrency)]

    def judge(index: int) -> None:
        asker = askers[index % concurrency]
        a, b = f"Answer number {index}, first.", f"Answer number {index}, second."
        if swap:
            ask_both_orders(asker, f"Human: question {index}?", PRINCIPLE, a, b, a_first=True)
        else:
            asker.ask(question(f"Human: question {index}?", PRINCIPLE, a, b))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(judge, range(pairs)))
    return pairs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="pairs judged per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests in flight")
    parser.add_argument("--model", default="", help="a local chat model path; default: a tiny qwen2 built here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, open(Path(folder) / "serve.log", "w") as log:
        model = args.model
        if not model:
            from demo.tiny_models import build_policy

            model = str(build_policy("qwen2", Path(folder) / "tiny-qwen2"))
        port = free_port()
        server = start_server(port, log)
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            run(base_url, model, 4, 1, swap=True)  # loads the model
            figures = {"model": model, "pairs": args.pairs, "cpus": os.cpu_count()}
            for concurrency in args.concurrency:
                both = run(base_url, model, args.pairs, concurrency, swap=True)
                one = run(base_url, model, args.pairs, concurrency, swap=False)
                figures[f"c{concurrency}"] = {"judgments_per_s_swapped": round(both, 2),
                                              "judgments_per_s_one_order": round(one, 2),
                                              "swap_cost": round(one / both, 2)}
                print(f"{concurrency:>3} in flight: {both:7.2f} judgments/s asked in both orders, "
                      f"{one:7.2f} in one order: the swap costs {one / both:.2f}x")
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
