"""A tracking URI's password never reaches a log line, the console or a file the tracker writes."""

from __future__ import annotations

import io
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from tracking_support import FakeRun

from medfed.logs import configure_logging, redact_secrets
from medfed.tracking.tracker import FederationTracker

SECRET = "s3cret-Pa55"


def test_redaction_hides_passwords_and_secret_query_values() -> None:
    assert redact_secrets(f"http://alice:{SECRET}@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact_secrets(f"see https://u:{SECRET}@h/ now") == "see https://u:***@h/ now"
    assert redact_secrets(f"https://h/api?token={SECRET}&a=1") == "https://h/api?token=***&a=1"
    # nothing to hide: unchanged
    for text in ("http://host:5000", "sqlite:////tmp/mlflow.db", "user@example.org: 5 s"):
        assert redact_secrets(text) == text


@pytest.mark.slow
def test_a_tracker_that_cannot_reach_its_server_keeps_the_password_to_itself(
    fake_run: Callable[..., FakeRun],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    run = fake_run()
    console = io.StringIO()
    handler = configure_logging(log_format="text", stream=console)
    try:
        caplog.set_level(logging.DEBUG)
        tracker = FederationTracker(
            tracking_uri=f"http://alice:{SECRET}@127.0.0.1:{port}",
            run_dir=run.run_dir,
            timeout_s=1.0,
        )
        for event in run.events():
            tracker.on_event(event)
        tracker.close()
    finally:
        logging.getLogger().removeHandler(handler)
    assert tracker.pending > 0
    assert any("MLflow unavailable" in line for line in console.getvalue().splitlines())
    assert SECRET not in console.getvalue()
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    # the filter is on the handler: what reached it was redacted, whatever the record held
    files = [p for p in run.workspace.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow-pending.jsonl" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
