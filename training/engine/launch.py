"""One engine stage on several processes: `accelerate launch --num_processes N` as a child of the caller.

The training worker's way to spread a job over the GPUs of its box (PAIRLOOP_TRAINING_PROCESSES), with DDP. The
caller's Args and pinned chat date go to the child as JSON; rank 0 writes each progress event, and at the end
the final metrics or the error, as JSON lines on stdout, which `run` hands to the caller's on_progress. When
on_progress raises (a cancel), `run` creates the stop file: rank 0 sees it at its next step, every rank
stops there and the resumable checkpoint is written, as in one process. StopWithoutSaving (the job was
taken away) kills every process at once: the launcher (torchrun's agent) and each rank, which it starts in
a session of its own. When the caller dies, rank 0's next event finds no reader: the ranks stop there and
write the resumable checkpoint, as on a cancel. A rank that dies ends the launcher (torchrun stops the
others), and `run` raises with the end of its error output.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from training.engine.chat_date import chat_date, pinned_chat_date
from training.engine.checkpoints import to_jsonable
from training.engine.common import EngineError, ProgressFn, args_from_dict
from training.engine.stop import StopWithoutSaving

STAGES = {"sft": "SFTArgs", "reward": "RewardArgs", "ppo": "PPOArgs", "dpo": "DPOArgs", "grpo": "GRPOArgs"}
LINE = "pairloop-event "  # prefix of the child's JSON lines; anything else on stdout is passed over
STOP_GRACE_SECONDS = 120  # how long a stopped child may take to write its checkpoint before it is killed
ERROR_TAIL = 3000  # characters of the child's error output kept in the message


class Stopped(Exception):
    """Raised in rank 0's progress callback when the parent asked the run to stop."""


def command(stage: str, args_file: Path, stop_file: Path, processes: int) -> list[str]:
    """The `accelerate launch` command line: DDP through torchrun's launcher (NCCL on GPUs, gloo on CPU)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_processes", str(processes), "--num_machines", "1",
            "--main_process_port", "0", "-m", "training.engine.launch", stage, str(args_file), str(stop_file)]


def run(stage: str, args: Any, on_progress: ProgressFn, processes: int) -> dict[str, Any]:
    """Run `training.engine.<stage>.main(args)` on `processes` processes; its final metrics."""
    if stage not in STAGES:
        raise EngineError(f"no multi-process stage {stage!r}: one of {', '.join(STAGES)}")
    with tempfile.TemporaryDirectory(prefix=f"pairloop-{stage}-") as tmp:
        args_file, stop_file, errors = Path(tmp) / "args.json", Path(tmp) / "stop", Path(tmp) / "stderr"
        args_file.write_text(json.dumps({"args": to_jsonable(args), "chat_date": chat_date()}))
        with errors.open("w+") as stderr:
            child = subprocess.Popen(command(stage, args_file, stop_file, processes),
                                     stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
            final, error, stopped = None, None, None
            try:
                for line in child.stdout:
                    if not line.startswith(LINE):
                        continue
                    message = json.loads(line[len(LINE):])
                    final, error = message.get("final", final), message.get("error", error)
                    if "event" in message and stopped is None:
                        try:
                            on_progress(message["event"])
                        except StopWithoutSaving:
                            raise
                        except BaseException as exc:  # noqa: BLE001 - re-raised once the child saved
                            stopped = exc
                            stop_file.touch()
                            deadline = threading.Timer(STOP_GRACE_SECONDS, kill_tree, (child,))
                            deadline.daemon = True
                            deadline.start()
                child.wait()
            except BaseException:
                kill_tree(child)
                raise
            stderr.seek(0)
            tail = stderr.read()[-ERROR_TAIL:]
    if stopped is not None:
        raise stopped
    if error is not None:
        raise EngineError(error)
    if child.returncode != 0 or final is None:
        raise EngineError(f"the {processes} training processes failed (exit status {child.returncode}):\n{tail}")
    return final


def process_tree(pid: int) -> list[int]:
    """Every process below `pid`, whatever its session, read from /proc (empty where there is none)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # ended while we read
    below, level = [], {pid}
    while level:
        level = {child for child, parent in parents.items() if parent in level}
        below += sorted(level)
    return below


def kill_tree(child: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every process below it, then reap the launcher."""
    if child.poll() is None:
        # torchrun starts each rank with start_new_session, so killing the launcher's group alone leaves the
        # ranks training (and writing checkpoints) on their own. Find them before the launcher dies and they are
        # handed to init; the launcher goes first, so it cannot start or restart one meanwhile.
        below = process_tree(child.pid)
        for pid, kill in [(child.pid, os.killpg), *((p, os.kill) for p in below)]:
            try:
                kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    child.wait()


def child_main(argv: list[str]) -> int:
    """A rank's side: read the Args, run the stage, and (rank 0) write events and the outcome as JSON lines."""
    stage, args_file, stop_file = argv
    module = importlib.import_module(f"training.engine.{stage}")
    given = json.loads(Path(args_file).read_text())
    args = args_from_dict(getattr(module, STAGES[stage]), given["args"])
    first = int(os.environ.get("RANK", "0")) == 0

    def say(message: dict[str, Any]) -> None:
        if first:
            print(LINE + json.dumps(to_jsonable(message)), flush=True)

    def progress(event: dict[str, Any]) -> None:
        if Path(stop_file).exists():
            raise Stopped("the worker stopped this run")
        say({"event": event})

    try:
        with pinned_chat_date(given["chat_date"]):  # the caller's pinned date, so every rank renders alike
            metrics = module.main(args, progress)
    except EngineError as exc:
        say({"error": str(exc)})
        return 2
    say({"final": metrics})
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
