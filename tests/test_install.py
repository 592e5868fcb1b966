"""Packaging: pyproject.toml gives ranges and constraints.txt pins the tested set exactly, each pin inside
its range; the wheel holds every package and data file the installed app needs."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def pins() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found.setdefault(canonicalize_name(name), []).append(version)
    return found


def test_it_pins_every_declared_dependency_exactly_and_inside_its_range():
    pinned = pins()
    for requirement in declared():
        versions = pinned.get(canonicalize_name(requirement.name))
        assert versions, f"constraints.txt has no pin for {requirement.name}"
        assert requirement.specifier.contains(Version(versions[0]), prereleases=True), (
            f"constraints.txt pins {requirement.name}=={versions[0]}, outside pyproject's {requirement}")


def test_it_pins_each_package_once_to_one_exact_version():
    for name, versions in pins().items():
        assert len(versions) == 1, f"constraints.txt pins {name} {len(versions)} times"
        assert versions[0] and str(Version(versions[0])) == versions[0], f"{name}: not an exact pin"



# --- the wheel: built, installed where the source tree cannot be seen, and started ------------------------

WHEEL_SCRIPT = """
import json, sys
import json
from pathlib import Path

import django
django.setup()
from django.contrib.staticfiles import finders
from django.test import Client

import annotate, api, demo, pairloop, training
from demo import tiny_models

print(json.dumps({
    "files": [m.__file__ for m in (annotate, api, demo, pairloop, training)],
    "login": Client().get("/accounts/login/").content.decode(),
    "schema": Client().get("/api/v1/openapi.json").json()["info"]["title"],
    "static": [bool(finders.find(name)) for name in ("pairloop/app.css", "pairloop/label.js",
                                                     "plotly/plotly.min.js", "ninja/swagger-ui.css")],
    "chat_template": len(tiny_models.read_template("meta-llama-Llama-3.2-3B-Instruct.jinja")),
}))
"""


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    import subprocess

    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_starts_without_the_source_tree(tmp_path):
    """pip install . (not editable) into a fresh venv that sees the shared venv's dependencies but not this
    checkout: Django's check and migrations, pages with their templates and static files, the API schema,
    an engine stage's --help, and `accelerate launch` of a stage on two processes."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    import zipfile

    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "__pycache__", "*.egg-info", "build", "tests", "benchmarks", "node_modules"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE",
                                                           "DATABASE_URL", "REDIS_URL")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(source)], tmp_path, env)
    [wheel] = (tmp_path / "dist").glob("pairloop-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("pairloop-0.1.0.dist-info/METADATA").decode()
    required = {Requirement(line.split(":", 1)[1]).name for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert "accelerate" in required  # PAIRLOOP_TRAINING_PROCESSES > 1 launches every stage through it

    venv = tmp_path / "venv"
    _run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).strip())
    # The shared venv's packages, as a plain path: its own .pth files (the editable pairloop's) are not read.
    (site / "shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hidden = subprocess.run([str(python), "-c", "import annotate"], cwd=run_dir, env=env, capture_output=True)
    assert hidden.returncode != 0, "the checkout is importable: this test would not notice a missing package"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path, env)

    env.update(PAIRLOOP_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1")
    pairloop = str(venv / "bin" / "pairloop")  # the console script: manage.py, installed
    _run([pairloop, "migrate", "--noinput", "-v", "0"], run_dir, env)  # the embedded default: SQLite, Redis
    assert "System check identified no issues" in _run([pairloop, "check"], run_dir, env)
    _run([pairloop, "makemigrations", "--check", "--dry-run"], run_dir, env)  # every migration shipped

    found = json.loads(_run([str(python), "-c", WHEEL_SCRIPT], run_dir,
                            {**env, "DJANGO_SETTINGS_MODULE": "pairloop.settings",
                             "REDIS_URL": "redis://127.0.0.1:9/0"}).splitlines()[-1])
    assert all(file.startswith(str(site)) for file in found["files"]), found["files"]
    assert 'name="password"' in found["login"] and "/static/pairloop/app.css" in found["login"]
    assert found["schema"] and found["static"] == [True, True, True, True] and found["chat_template"] > 1000

    assert "usage:" in _run([str(python), "-m", "training.engine.ppo", "--help"], run_dir, env)
    launch = [str(python), "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", "0", "-m", "training.engine.reward", "--help"]
    launched = _run(launch, run_dir, {**env, "CUDA_VISIBLE_DEVICES": ""})
    assert launched.count("usage:") == 2, launched[-2000:]  # both ranks ran the installed stage
