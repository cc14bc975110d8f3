"""User mistakes end in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

RunMedfed = Callable[..., CompletedProcess[str]]


def test_missing_config_is_one_line_without_traceback(
    tmp_path: Path, run_medfed: RunMedfed
) -> None:
    result = run_medfed("site", "train", "--config", "missing.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error[config]: missing.yaml: file not found")
    assert "hint:" in lines[0]


def test_help_lists_the_command_groups(tmp_path: Path, run_medfed: RunMedfed) -> None:
    result = run_medfed("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("data", "privacy", "site"):
        assert group in result.stdout


def test_unknown_option_is_a_usage_error(tmp_path: Path, run_medfed: RunMedfed) -> None:
    result = run_medfed("--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
