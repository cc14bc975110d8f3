"""The command line as hospital IT meets it: version, typos, help on an 80-column terminal,
and demo and run mistakes refused at once, each with what to do."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess

import click
import pytest
import typer
from typer.testing import CliRunner

from medfed import __version__
from medfed.api.running import submit_run
from medfed.cli.app import app
from medfed.config.run import RunSettings
from medfed.errors import ConfigError, TransportError
from medfed.transport.processes import free_port
from medfed.transport.provision import provision_workspace

RunMedfed = Callable[..., CompletedProcess[str]]


def _one_line(result: CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path


def test_version_is_an_option_and_a_command(tmp_path: Path, run_medfed: RunMedfed) -> None:
    for args in (["--version"], ["version"]):
        result = run_medfed(*args, cwd=tmp_path)
        assert result.returncode == 0
        assert result.stdout.strip() == __version__


def test_a_mistyped_command_is_suggested_once(tmp_path: Path, run_medfed: RunMedfed) -> None:
    result = run_medfed("audti", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("Did you mean 'audit'?") == 1


def test_help_shows_every_option_name_whole_at_80_columns() -> None:
    runner = CliRunner()
    root = typer.main.get_command(app)
    paths = list(_commands(root))
    assert ("run",) in paths and ("demo",) in paths and ("site", "start") in paths
    for path in paths:
        command = root
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        assert "…" not in result.output, (path, result.output)
        for param in command.params:
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("-"):
                    assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output), (
                        path,
                        name,
                    )


def test_demo_refuses_port_with_in_process_before_anything_is_made(
    tmp_path: Path, run_medfed: RunMedfed
) -> None:
    result = run_medfed("demo", "--in-process", "--port", "9000", "-w", "d", cwd=tmp_path)
    assert result.returncode == 2
    assert "--port and --in-process do not go together" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_demo_is_kept_and_force_is_suggested(
    tmp_path: Path, run_medfed: RunMedfed
) -> None:
    earlier = tmp_path / "medfed-demo"
    (earlier / "workspace").mkdir(parents=True)
    (earlier / "workspace" / "workspace.yaml").write_text("version: 1\n")
    (earlier / "sites").mkdir()
    line = _one_line(run_medfed("demo", "--in-process", cwd=tmp_path))
    assert line.startswith(f"error[{ConfigError.code}]: ")
    assert "holds an earlier demo" in line
    assert "add --force to replace it" in line
    assert (earlier / "workspace" / "workspace.yaml").read_text() == "version: 1\n"


def test_force_never_deletes_what_is_not_a_demo(tmp_path: Path, run_medfed: RunMedfed) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("keep me")
    result = run_medfed("demo", "-w", "notes", "--in-process", "--force", cwd=tmp_path)
    line = _one_line(result)
    assert result.returncode == ConfigError.exit_code
    assert "not a medfed demo directory" in line and "choose another --workspace" in line
    assert (tmp_path / "notes" / "keep.txt").read_text() == "keep me"


def test_a_busy_port_is_refused_before_any_data_is_made(
    tmp_path: Path, run_medfed: RunMedfed
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = run_medfed("demo", "-w", "d", "--port", str(port), cwd=tmp_path)
        seconds = time.monotonic() - started
    line = _one_line(result)
    assert result.returncode == TransportError.exit_code
    assert f"port {port} on 127.0.0.1 is not free" in line
    assert "choose another --port" in line
    assert not (tmp_path / "d").exists()  # no synthetic data, no MLflow database
    assert seconds < 30


@pytest.fixture
def idle_workspace(tmp_path: Path) -> Path:
    """A provisioned workspace whose aggregator is not running."""
    out = tmp_path / "ws"
    provision_workspace(out=out, sites=["a", "b"], host="127.0.0.1", port=free_port())
    return out


def test_run_without_an_aggregator_says_so_and_how_to_start_it(
    idle_workspace: Path, run_medfed: RunMedfed
) -> None:
    result = run_medfed(
        "run", "--workspace", str(idle_workspace), "--name", "r1", cwd=idle_workspace
    )
    line = _one_line(result)
    assert result.returncode == TransportError.exit_code
    address = re.search(r"no aggregator is running at (127\.0\.0\.1:\d+) ", line)
    assert address is not None, line
    assert f"for the workspace {idle_workspace}" in line
    assert f"medfed aggregator start --workspace {idle_workspace}" in line
    assert "flwr" not in line and "--run-config" not in line


def test_the_python_api_refuses_a_submission_without_an_aggregator(idle_workspace: Path) -> None:
    with pytest.raises(TransportError, match="no aggregator is running") as caught:
        submit_run(workspace=idle_workspace, settings=RunSettings(run_name="r1"))
    assert caught.value.hint == f"start it: medfed aggregator start --workspace {idle_workspace}"


def test_the_aggregator_refuses_a_busy_port_before_it_makes_its_mlflow_store(
    tmp_path: Path, run_medfed: RunMedfed
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = tmp_path / "ws"
        provision_workspace(out=out, sites=["a"], host="127.0.0.1", port=port)
        result = run_medfed("aggregator", "start", "--workspace", str(out), cwd=tmp_path)
    line = _one_line(result)
    assert result.returncode == TransportError.exit_code
    assert f"port {port} on 127.0.0.1 is not free for the SuperLink" in line
    assert not (out / "mlflow.db").exists()
