"""`medfed site start` names why its node cannot join: a key the aggregator did not register, a
server certificate from another CA, an aggregator that is not there (real SuperLink, real
SuperNodes, the real command line)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deploy import write_site

from medfed.errors import TransportError
from medfed.storage import replace_file
from medfed.transport import certs
from medfed.transport.deploy import register_sites, start_superlink
from medfed.transport.processes import ProcessGroup, descendant_groups, free_port
from medfed.transport.provision import provision_workspace

pytestmark = pytest.mark.slow

SITE = "hospital-a"
_CLI = (sys.executable, "-c", "from medfed.cli.app import main; main()")


@contextlib.contextmanager
def site_start(config: Path, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`medfed site start`, its stdout to ``out`` and stderr piped; killed with all it started."""
    with out.open("wb") as stdout:
        process = subprocess.Popen(
            [*_CLI, "site", "start", "--config", str(config)],
            stdout=stdout,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "400"},  # one console line each, unwrapped
        )
    try:
        yield process
    finally:
        for pgid in {process.pid} | descendant_groups(process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        process.wait(timeout=30)


def _refusal(config: Path, out: Path) -> str:
    """The one line `site start` ends with; its exit code is the transport error's."""
    with site_start(config, out) as process:
        _, err = process.communicate(timeout=120)
    text = err.decode()
    assert process.returncode == TransportError.exit_code, (text, out.read_text())
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_site_start_names_a_refused_key_a_foreign_ca_and_an_absent_aggregator(
    tmp_path: Path,
) -> None:
    workspace = provision_workspace(
        out=tmp_path / "ws", sites=[SITE], host="127.0.0.1", port=free_port()
    )
    other = provision_workspace(out=tmp_path / "other", sites=["x"], host="127.0.0.1", port=1)
    fresh_key = tmp_path / "fresh/node_key"
    fresh_key.parent.mkdir()
    replace_file(fresh_key, certs.make_node_key().private_openssh, mode=0o600)

    with ProcessGroup(grace_s=5.0) as group:
        group.add(start_superlink(workspace=workspace, log_file=tmp_path / "superlink.log"))
        register_sites(workspace=workspace, flwr_home=tmp_path / "flwr-home")

        unregistered = write_site(workspace, SITE, tmp_path / "unreg", node_private_key=fresh_key)
        line = _refusal(unregistered, tmp_path / "unreg.out")
        assert line.startswith("error[transport]: the aggregator at 127.0.0.1:"), line
        assert "refused this node" in line and "is not registered there" in line
        assert "flwr supernode register" in line  # the fix

        foreign = other.path(other.manifest.ca.cert)
        wrong_ca = write_site(workspace, SITE, tmp_path / "ca", root_certificates=foreign)
        line = _refusal(wrong_ca, tmp_path / "ca.out")
        assert f"is not signed by the CA in {foreign}" in line, line
        assert "unable to get local issuer certificate" in line
        assert "transport.root_certificates" in line

    # Nothing listens on the port any more: the node keeps retrying and says why, once.
    absent = write_site(workspace, SITE, tmp_path / "absent")
    out = tmp_path / "absent.out"
    with site_start(absent, out) as process:
        deadline = time.monotonic() + 90
        while "warning:" not in out.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    text = out.read_text()
    warnings = [line for line in text.splitlines() if "warning:" in line]
    assert len(warnings) == 1, text
    assert f"cannot connect to {workspace.manifest.address}" in warnings[0]
    assert "is the aggregator running?" in warnings[0]
    assert "connected to the aggregator" not in text
