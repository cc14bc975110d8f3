"""NodeWatch reads a SuperNode log from where it stood at start and reports each change once."""

from __future__ import annotations

from pathlib import Path

from medfed.config.site import TransportSection
from medfed.site.node_watch import NodeWatch
from medfed.site.preflight.result import CheckResult


def _watch(tmp_path: Path, said: list[str], status: str = "FAIL") -> tuple[NodeWatch, Path]:
    log = tmp_path / "supernode.log"
    log.write_text("an earlier start\n[code: 2004] Failed to activate SuperNode.\n")
    transport = TransportSection(
        superlink_address="127.0.0.1:9",
        root_certificates=tmp_path / "ca.crt",
        node_private_key=tmp_path / "node_key",
        node_public_key=tmp_path / "node_key.pub",
    )
    probe = lambda address: CheckResult("reach", status, f"cannot connect to {address} (x)")  # noqa: E731
    return NodeWatch(transport=transport, log_file=log, say=said.append, probe=probe), log


def test_retries_warn_once_then_connecting_is_said(tmp_path: Path) -> None:
    said: list[str] = []
    watch, log = _watch(tmp_path, said)
    with log.open("a") as out:
        out.write("WARNING: Connection attempt failed, retrying in 1 seconds\n")
    watch.tick()
    with log.open("a") as out:
        out.write("WARNING: Connection attempt failed, retrying in 2 seconds\n")
    watch.tick()
    assert len(said) == 1 and said[0].startswith("warning: cannot connect to 127.0.0.1:9")
    with log.open("a") as out:
        out.write("INFO: SuperNode ID: 42\n")
    watch.tick()
    assert said[1] == "connected to the aggregator at 127.0.0.1:9"


def test_an_earlier_start_in_the_log_is_not_this_exit(tmp_path: Path) -> None:
    watch, log = _watch(tmp_path, [])
    with log.open("a") as out:
        out.write("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed (x)\n")
    error = watch.exit_error(1)
    assert "is not signed by the CA in" in error.message and "self-signed" in error.message
    assert "not registered" not in error.message
    watch, _ = _watch(tmp_path, [])
    assert watch.exit_error(1).message == "the SuperNode exited with code 1"
