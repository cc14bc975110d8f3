"""Structured logs: the JSON formatter, the text formatter and how the format is chosen."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medfed.errors import ConfigError
from medfed.logs import (
    LOG_FORMAT_ENV,
    JsonFormatter,
    TextFormatter,
    configure_from_env,
    configure_logging,
    resolve_log_format,
)


def _record(message: str = "round %d done", *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("medfed.site", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


@pytest.fixture
def clean_logging() -> Iterator[None]:
    """Give back the root and Flower loggers as they were (the tests reconfigure them)."""
    root, flower, medfed = (logging.getLogger(n) for n in ("", "flwr", "medfed"))
    saved = (root.handlers[:], root.level, flower.handlers[:], flower.propagate, medfed.level)
    flower_level = flower.level
    yield
    flower.setLevel(flower_level)
    root.handlers[:], flower.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    flower.propagate = saved[3]
    medfed.setLevel(saved[4])


def test_a_json_line_has_the_fields_and_the_context_a_record_carries() -> None:
    line = JsonFormatter().format(_record("round %d done", 3, run_id="r1", round=3, site_id="a"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "medfed.site"
    assert entry["message"] == "round 3 done"
    assert (entry["run_id"], entry["round"], entry["site_id"]) == ("r1", 3, "a")
    assert entry["time"].endswith("+00:00") and "T" in entry["time"]


def test_a_json_line_leaves_out_missing_context_and_any_other_extra() -> None:
    entry = json.loads(
        JsonFormatter().format(_record("x", path="/data/patient-007.nii.gz", key="secret"))
    )
    assert set(entry) == {"time", "level", "logger", "message"}
    assert "patient-007" not in json.dumps(entry) and "secret" not in json.dumps(entry)


def test_multi_line_messages_and_exceptions_stay_on_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record("first\nsecond")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "first\nsecond"
    assert entry["error"] == "ValueError" and "boom" in entry["traceback"]


def test_the_text_format_appends_the_context() -> None:
    text = TextFormatter().format(_record("declined", run_id="r1", site_id="a"))
    assert text.endswith("WARNING medfed.site: declined [run_id=r1 site_id=a]")
    assert "[" not in TextFormatter().format(_record("plain"))


def test_the_format_comes_from_the_option_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(LOG_FORMAT_ENV, raising=False)
    assert resolve_log_format(None) == "text"
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    assert resolve_log_format(None) == "json"
    assert resolve_log_format("text") == "text"
    with pytest.raises(ConfigError, match="xml"):
        resolve_log_format("xml")


@pytest.mark.usefixtures("clean_logging")
def test_configured_processes_write_json_for_medfed_and_flower_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    configure_logging(log_format="json", stream=stream)
    configure_logging(log_format="json", stream=stream)  # again: still one handler
    logging.getLogger("medfed.site").info("trained", extra={"round": 2})
    logging.getLogger("flwr").info("Received: train message")
    logging.getLogger("flwr").debug("not shown at INFO")
    logging.getLogger("alembic.runtime").info("libraries only from WARNING on")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["logger"], e["message"]) for e in lines] == [
        ("medfed.site", "trained"),
        ("flwr", "Received: train message"),
    ]
    assert lines[0]["round"] == 2


@pytest.mark.usefixtures("clean_logging")
def test_a_bad_format_in_the_environment_falls_back_to_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(LOG_FORMAT_ENV, "yaml")
    assert configure_from_env() == "text"
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    assert configure_from_env() == "json"
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler.formatter, JsonFormatter)


def test_a_bad_log_format_is_one_line_before_anything_starts(
    tmp_path: Path, run_medfed: Any
) -> None:
    for command in (["site", "start", "--config", "site.yaml"], ["aggregator", "start", "-w", "."]):
        result = run_medfed(*command, "--log-format", "xml", cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (
            "error[config]: log format 'xml' is not one of text, json (hint: use --log-format "
            "text|json (or set MEDFED_LOG_FORMAT))"
        )
