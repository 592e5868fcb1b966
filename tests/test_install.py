"""pyproject.toml gives ranges; constraints.txt pins the tested set exactly, each pin inside its range."""

from __future__ import annotations

import tomllib
from pathlib import Path

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

