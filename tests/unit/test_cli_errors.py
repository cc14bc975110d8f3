"""User mistakes end in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _medfed(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from medfed.cli.app import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_missing_config_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = _medfed("site", "train", "--config", "missing.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error[config]: missing.yaml: file not found")
    assert "hint:" in lines[0]


def test_help_lists_the_command_groups(tmp_path: Path) -> None:
    result = _medfed("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("data", "privacy", "site"):
        assert group in result.stdout


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    result = _medfed("--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
