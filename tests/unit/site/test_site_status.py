"""The site node's status file: recorded messages, start/stop, liveness, the ClientApp hook."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.config import load_site_config
from medfed.config.site import SiteConfig
from medfed.errors import DataError, PolicyError
from medfed.site import clientapp
from medfed.site.node_status import (
    is_site_node_command,
    read_status,
    record_message,
    record_node_start,
    record_node_stop,
    status_path,
)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    data = {
        "site_id": "hospital-a",
        "data": {"manifest": "manifest.csv"},
        "paths": {"workdir": "work"},
        "privacy": {"noise_multiplier": 1.0, "epsilon_cap": 4.0},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def config(config_path: Path) -> SiteConfig:
    return load_site_config(config_path)


@pytest.fixture
def node_like() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line reads like `medfed site start`."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "medfed", "site", "start"]
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_nothing_recorded_is_offline_with_the_budget_from_the_ledger(config: SiteConfig) -> None:
    state = read_status(config=config)
    assert not state.online
    assert state.offline_reason is not None and "never started" in state.offline_reason
    assert state.last_run_id is None and state.messages == 0
    assert state.epsilon_spent == 0.0 and state.epsilon_remaining == 4.0
    assert state.budget_error is None


def test_messages_are_counted_and_the_last_error_kept(config: SiteConfig) -> None:
    record_message(config=config, run_id="run-1", round=1, kind="train", error=None)
    record_message(
        config=config, run_id="run-1", round=2, kind="train", error="error[policy]: too few noise"
    )
    record_message(config=config, run_id="run-1", round=2, kind="evaluate", error=None)

    state = read_status(config=config)
    assert (state.last_run_id, state.last_round, state.last_kind) == ("run-1", 2, "evaluate")
    assert state.messages == 3 and state.declined == 1
    assert state.last_error == "error[policy]: too few noise"
    assert state.last_error_at is not None
    path = status_path(config)
    assert path == config.paths.workdir / "node" / "status.json"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert path.stat().st_mode & 0o077 == 0


def test_online_while_the_node_process_lives_offline_after_stop(
    config: SiteConfig, node_like: subprocess.Popen[bytes]
) -> None:
    record_node_start(config=config, pid=node_like.pid)
    state = read_status(config=config)
    assert state.online and state.pid == node_like.pid and state.offline_reason is None

    record_node_stop(config=config, reason="SIGTERM from the service manager")
    state = read_status(config=config)
    assert not state.online
    assert state.offline_reason == "stopped: SIGTERM from the service manager"
    assert state.stopped_at is not None


def test_a_dead_pid_is_offline(config: SiteConfig) -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass", "medfed", "site", "start"])
    process.wait()
    record_node_start(config=config, pid=process.pid)
    state = read_status(config=config)
    assert not state.online
    assert state.offline_reason == (
        f"process {process.pid} is not running (it ended without recording a stop)"
    )


def test_a_live_process_that_is_no_site_node_is_offline(config: SiteConfig) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record_node_start(config=config, pid=other.pid)
        state = read_status(config=config)
    finally:
        other.kill()
        other.wait()
    assert not state.online
    assert state.offline_reason is not None and "not a medfed site node" in state.offline_reason


def test_site_node_command_lines() -> None:
    assert is_site_node_command(
        ["/venv/bin/python", "/venv/bin/medfed", "site", "start", "-c", "x"]
    )
    assert is_site_node_command(["/venv/bin/python", "/venv/bin/flower-supernode", "--superlink"])
    assert not is_site_node_command(["/venv/bin/medfed", "site", "status"])
    assert not is_site_node_command(["python", "-m", "pytest", "tests/unit/site/start"])


def test_concurrent_clientapp_processes_lose_no_update(config_path: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from medfed.config import load_site_config
        from medfed.site.node_status import record_message
        config = load_site_config({str(config_path)!r})
        for i in range(20):
            record_message(config=config, run_id=sys.argv[1], round=i, kind="train", error=None)
        """
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, f"run-{n}"]) for n in range(4)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]
    state = read_status(config=load_site_config(config_path))
    assert state.messages == 80
    json.loads(status_path(load_site_config(config_path)).read_text(encoding="utf-8"))


def test_damaged_ledger_shows_as_unknown_budget(config: SiteConfig) -> None:
    config.ledger_path.parent.mkdir(parents=True, exist_ok=True)
    config.ledger_path.write_text("{not json\n", encoding="utf-8")
    state = read_status(config=config)
    assert state.epsilon_spent is None
    assert state.budget_error is not None and "error[ledger]" in state.budget_error


def test_cli_status_json(config_path: Path, config: SiteConfig) -> None:
    record_message(config=config, run_id="run-7", round=3, kind="train", error=None)
    result = CliRunner().invoke(app, ["site", "status", "--config", str(config_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["site_id"] == "hospital-a"
    assert data["online"] is False
    assert (data["last_run_id"], data["last_round"], data["messages"]) == ("run-7", 3, 1)
    assert data["epsilon_cap"] == 4.0 and data["epsilon_remaining"] == 4.0

    text = CliRunner().invoke(app, ["site", "status", "--config", str(config_path)])
    assert text.exit_code == 0, text.output
    assert "offline" in text.output and "run-7 round 3" in text.output


# --- the ClientApp records every message ------------------------------------------------------


def _message(run_name: str, round_: int) -> Message:
    content = RecordDict({"config": ConfigRecord({"run_name": run_name, "round": round_})})
    return Message(content, dst_node_id=5, message_type="train")


def _context(config_path: Path) -> Context:
    return Context(
        run_id=77,
        node_id=5,
        node_config={clientapp.NODE_CONFIG_KEY: str(config_path)},
        state=RecordDict(),
        run_config={},
    )


@pytest.mark.usefixtures("task_identity")
def test_clientapp_records_answers_and_declines_and_logs_the_run(
    config_path: Path, config: SiteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    def answer(site: SiteConfig, message: Message) -> RecordDict:
        return RecordDict()

    def refuse(site: SiteConfig, message: Message) -> RecordDict:
        raise PolicyError("run asks for 3 rounds, policy allows 2")

    def bad_data(site: SiteConfig, message: Message) -> RecordDict:
        raise DataError("/secret/patients/p001.nii.gz: file not found")

    caplog.set_level(logging.INFO, logger="medfed.site")
    reply = clientapp._handle(_message("study-1", 1), _context(config_path), answer)
    assert not reply.has_error()
    declined = clientapp._handle(_message("study-1", 2), _context(config_path), refuse)
    assert declined.has_error()
    redacted = clientapp._handle(_message("study-1", 3), _context(config_path), bad_data)

    state = read_status(config=config)
    assert state.messages == 3 and state.declined == 2
    assert (state.last_run_id, state.last_round) == ("study-1", 3)
    assert state.last_error is not None and state.last_error.startswith("error[data]")
    # Patient paths stay out of the status file, the logs and the reply to the aggregator.
    assert redacted.has_error() and "/secret/patients" not in redacted.error.reason
    assert "/secret/patients" not in status_path(config).read_text(encoding="utf-8")
    assert all("/secret/patients" not in r.getMessage() for r in caplog.records)
    fields = ("run_id", "round", "site_id")
    rounds = [tuple(vars(r)[f] for f in fields) for r in caplog.records if "run_id" in vars(r)]
    assert rounds == [
        ("study-1", 1, "hospital-a"),
        ("study-1", 2, "hospital-a"),
        ("study-1", 3, "hospital-a"),
    ]


@pytest.mark.usefixtures("task_identity")
def test_clientapp_records_a_crash_and_sends_no_detail_of_it(
    config_path: Path, config: SiteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    def crash(site: SiteConfig, message: Message) -> RecordDict:
        raise RuntimeError("expected input[2, 3, 16, 16, 16] to have 1 channels")

    with caplog.at_level(logging.ERROR, logger="medfed.site"):
        reply = clientapp._handle(_message("study-2", 4), _context(config_path), crash)
    # The aggregator gets one fixed sentence; shapes and values stay in the node's log.
    assert reply.has_error()
    assert reply.error.reason == (
        "error[error]: unexpected error at the site (hint: the site's log has the details)"
    )
    assert "16, 16" in caplog.text
    state = read_status(config=config)
    assert state.last_error == "unexpected RuntimeError (see the node log)"
    assert (state.last_run_id, state.last_round) == ("study-2", 4)


@pytest.mark.usefixtures("task_identity")
def test_clientapp_without_site_config_declines_and_logs_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def never(site: SiteConfig, message: Message) -> RecordDict:
        raise AssertionError("no work without a site config")

    context = Context(run_id=77, node_id=5, node_config={}, state=RecordDict(), run_config={})
    caplog.set_level(logging.INFO, logger="medfed.site")
    reply = clientapp._handle(_message("study-3", 1), context, never)
    assert reply.has_error() and "site-config" in reply.error.reason
    (record,) = [r for r in caplog.records if "run_id" in vars(r)]
    assert (vars(record)["run_id"], vars(record)["round"], vars(record)["site_id"]) == (
        "study-3",
        1,
        None,
    )
