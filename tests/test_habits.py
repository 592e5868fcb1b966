"""Habits the product code keeps, checked on its source: no function longer than a reader can hold."""

from __future__ import annotations

import ast
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
