"""The package metadata, the conda environment and the console script agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements.update(r for r in extra if not r.startswith("medfed"))
    return requirements


def _environment_requirements() -> set[str]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert len(pip_lists) == 1, "environment.yml must have exactly one pip section"
    return {r for r in pip_lists[0] if not r.startswith("-e")}


def test_environment_lists_the_same_dependencies_as_pyproject() -> None:
    pyproject, environment = _pyproject_requirements(), _environment_requirements()
    assert pyproject == environment, {
        "only in pyproject.toml": sorted(pyproject - environment),
        "only in environment.yml": sorted(environment - pyproject),
    }


def test_environment_installs_the_package_itself_with_its_extras() -> None:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-e .[site,aggregator,tracking,dev]" in pip_list


def test_console_script_points_at_the_cli() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["medfed"] == "medfed.cli.app:main"
    assert project["requires-python"] == ">=3.11"
