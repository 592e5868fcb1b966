"""Habits the product code keeps, checked on its source: no function longer than a reader can hold, and
no training library loaded by a web process or a worker until a job needs it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = ["annotate", "api", "training", "demo", "pairloop"]
LONGEST_FUNCTION = 150  # lines, from `def` to its last line


def product_files() -> list[Path]:
    """Every Python file of the product packages, migrations left out (Django writes them)."""
    return sorted(path for package in PRODUCT_PACKAGES for path in (ROOT / package).rglob("*.py")
                  if "migrations" not in path.relative_to(ROOT).parts)


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(where, lines) of every function and method in a file, nested ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_product_function_is_over_150_lines():
    files = product_files()
    assert len(files) > 50 and any(path.name == "ppo.py" for path in files)  # the walk found the product
    too_long = [f"{where} ({lines} lines)" for path in files for where, lines in function_lengths(path)
                if lines > LONGEST_FUNCTION]
    assert too_long == [], "split these into named steps:\n" + "\n".join(too_long)


# What a web process and a worker load as they start: a server's entry point first, as gunicorn and daphne
# import it, then the URLs and every task.
STARTUP = """
import json, sys
import pairloop.wsgi, pairloop.asgi
from django.urls import get_resolver
get_resolver().url_patterns
from pairloop.celery import app
app.loader.import_default_modules()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(%r))))
"""
TRAINING_LIBRARIES = ("torch", "transformers", "datasets", "pyarrow", "peft", "accelerate")


def test_a_web_process_or_worker_loads_no_training_library_as_it_starts():
    started = subprocess.run([sys.executable, "-c", STARTUP % (TRAINING_LIBRARIES,)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-4000:]
    assert json.loads(started.stdout.splitlines()[-1]) == []
