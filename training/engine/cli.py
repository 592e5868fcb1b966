"""The engine's command lines: an argparse parser from an Args dataclass, and the run that prints
the final metrics as its last line.

Plain Python; this package never imports Django.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from training.engine.common import TqdmProgress, no_progress, print_final_metrics
from training.engine.errors import EngineError
from training.engine.fields import field_docs
from training.engine.ranks import end_processes


def value_type(hint):
    """The type a command-line value of a field annotated `hint` converts to: `int | None` -> int."""
    options = [t for t in typing.get_args(hint) if t is not type(None)]
    return options[0] if options else hint


def parser_for(cls, description: str, *, prog: str | None = None, required: tuple[str, ...] = (),
               flag_names: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per field of the Args dataclass `cls`, its docstring as help.

    Booleans get --flag / --no-flag; list fields are repeated flags (`flag_names` gives them a
    singular name, e.g. reward_models -> --reward-model); `required` fields have no default."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    flag_names = flag_names or {}
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in fields(cls):
        flag = "--" + flag_names.get(f.name, f.name.replace("_", "-"))
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        hint = hints[f.name]
        kind = value_type(hint)
        doc = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %; a "10%" must stay text
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=doc)
        elif typing.get_origin(hint) is list:
            item = (typing.get_args(hint) or (str,))[0]
            parser.add_argument(flag, dest=f.name, action="append", type=item, default=[],
                                metavar=flag[2:].upper().replace("-", "_"), help=f"{doc} (repeat for several)")
        elif f.name in required:
            parser.add_argument(flag, dest=f.name, type=kind, required=True, help=doc)
        else:
            kind = typing.get_origin(kind) or kind  # str | list[str] takes a str on the command line
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=f"{doc} (default: {default})")
    return parser


def run_cli(cls, main: Callable[..., dict[str, Any]], argv: list[str] | None, *, stage: str, description: str,
            required: tuple[str, ...] = (), flag_names: dict[str, str] | None = None) -> int:
    """The engine's command lines: flags -> Args -> main(args, progress bar) -> final metrics as the last line.

    A problem with the input (EngineError) prints `error: ...` on stderr and, as the last line of
    stdout, {"error": ...} for scripts; the exit status is then 2."""
    parser = parser_for(cls, description, prog=f"python -m training.engine.{stage}", required=required,
                        flag_names=flag_names)
    args = cls(**vars(parser.parse_args(argv)))
    first = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch, rank 0 alone reports
    progress = TqdmProgress(stage) if first else no_progress
    close = progress.close if first else (lambda: None)
    try:
        metrics = main(args, progress)
    except EngineError as exc:
        close()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if first:
            print_final_metrics({"error": str(exc)})
        return 2
    close()
    end_processes()
    if first:
        print_final_metrics(metrics)
    return 0
