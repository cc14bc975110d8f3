"""`medfed site check`: each preflight check on a good setup and on the mistakes it catches.

The aggregator is stood in for by a TLS server thread with the workspace's SuperLink
certificate (the real SuperLink, and the registration check, are in
tests/integration/test_site_check.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from site_support import no_gpu, write_dataset
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.config import load_site_config
from medfed.config.site import SiteConfig
from medfed.privacy.budget import PrivacyTerms
from medfed.privacy.site_ledger import RoundPlan, SiteLedger
from medfed.site import preflight
from medfed.site.onboarding import init_site
from medfed.site.preflight import (
    PREFLIGHT_FAILED_EXIT_CODE,
    check_ca,
    check_compute,
    check_config,
    check_data,
    check_disk,
    check_ledger,
    check_ledger_key,
    check_node_key,
    check_reachable,
    check_tls,
    check_versions,
    run_preflight,
)
from medfed.storage import replace_file
from medfed.transport import certs
from medfed.transport.processes import free_port
from medfed.transport.provision import provision_workspace
from medfed.workspace import Workspace

SITE = "hospital-a"
NOW = dt.datetime.now(dt.UTC)


class TlsServer:
    """Accepts connections on loopback and completes TLS handshakes, nothing more."""

    def __init__(self, workspace: Workspace) -> None:
        superlink = workspace.manifest.superlink
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(workspace.path(superlink.cert), workspace.path(superlink.key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(2.0)
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return provision_workspace(out=tmp_path / "ws", sites=[SITE], host="127.0.0.1", port=18443)


@pytest.fixture
def server(workspace: Workspace) -> Iterator[TlsServer]:
    running = TlsServer(workspace)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def site_yaml(tmp_path: Path, workspace: Workspace, server: TlsServer) -> Path:
    """A site.yaml made by `site init`, its aggregator address pointing at the TLS server."""
    manifest = write_dataset(tmp_path / "data", cases=4)
    out = tmp_path / "site.yaml"
    init_site(kit=workspace.path(workspace.site(SITE).kit), manifest=manifest, out=out, delta=1e-3)
    raw = yaml.safe_load(out.read_text(encoding="utf-8"))
    raw["transport"]["superlink_address"] = f"127.0.0.1:{server.port}"
    raw["data"]["patch_size"] = [16, 16, 16]
    out.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return out


@pytest.fixture
def site(site_yaml: Path) -> SiteConfig:
    return load_site_config(site_yaml)


def test_a_good_setup_passes(site_yaml: Path) -> None:
    report = run_preflight(config_path=site_yaml, min_free_bytes=1, gpu_probe=no_gpu)
    statuses = {r.name: r.status for r in report.results}
    for name in (
        "config",
        "node key",
        "CA certificate",
        "aggregator reachable",
        "TLS",
        "ledger key",
        "ledger",
        "privacy budget",
        "dataset",
        "disk",
        "python",
        "flwr",
        "libraries",
    ):
        assert statuses[name] == "PASS", report.result(name)
    # A TLS stand-in is no SuperLink: the registration cannot be told, which is not a FAIL.
    assert statuses["node registered"] == "WARN"
    assert statuses["compute"] == "WARN"  # CPU fallback
    assert report.ok and report.status == "WARN"
    assert all(r.fix for r in report.results if r.status != "PASS")


def test_invalid_config_fails_first(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("site_id: a\nnoise_multipler: 2\n", encoding="utf-8")
    result, config = check_config(path)
    assert config is None and result.status == "FAIL"
    report = run_preflight(config_path=path, gpu_probe=no_gpu)
    assert not report.ok and report.results[0].name == "config"


def test_group_or_world_readable_node_key_fails(site: SiteConfig) -> None:
    assert site.transport is not None
    key = site.transport.node_private_key
    key.chmod(0o644)
    result = check_node_key(site.transport)
    assert result.status == "FAIL"
    assert result.detail == f"{key} is readable by others"
    assert result.fix == f"chmod 600 {key}"
    key.chmod(0o640)
    assert check_node_key(site.transport).detail == f"{key} is readable by its group"


def test_node_key_not_matching_its_public_half_fails(site: SiteConfig) -> None:
    assert site.transport is not None
    other = certs.make_node_key()
    site.transport.node_public_key.write_text(other.public_openssh + "\n", encoding="utf-8")
    result = check_node_key(site.transport)
    assert result.status == "FAIL" and "is not the public half" in result.detail


def test_ledger_key_readable_by_others_fails(site: SiteConfig) -> None:
    site.signing_key_path.chmod(0o604)
    result = check_ledger_key(site)
    assert result.status == "FAIL" and "readable by others" in result.detail


def _ca_file(tmp_path: Path, *, start: dt.datetime, days: int) -> Path:
    ca = certs.make_ca(now=start, valid_days=days, common_name="test CA")
    path = tmp_path / f"ca-{start.date()}-{days}.crt"
    path.write_bytes(certs.cert_pem(ca.cert))
    return path


def test_ca_dates(tmp_path: Path) -> None:
    expired = check_ca(_ca_file(tmp_path, start=NOW - dt.timedelta(days=400), days=365), now=NOW)
    assert expired.status == "FAIL" and "expired on" in expired.detail
    future = check_ca(_ca_file(tmp_path, start=NOW + dt.timedelta(days=2), days=365), now=NOW)
    assert future.status == "FAIL" and "not valid until" in future.detail
    assert "clock" in (future.fix or "")
    soon = check_ca(_ca_file(tmp_path, start=NOW - dt.timedelta(days=1), days=20), now=NOW)
    assert soon.status == "WARN" and "expires in 18 days" in soon.detail
    good = check_ca(_ca_file(tmp_path, start=NOW, days=365), now=NOW)
    assert good.status == "PASS"
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("hello", encoding="utf-8")
    assert check_ca(garbage, now=NOW).status == "FAIL"


def test_wrong_ca_fails_the_tls_check(tmp_path: Path, server: TlsServer) -> None:
    other = provision_workspace(out=tmp_path / "other", sites=["x"], host="127.0.0.1", port=1)
    wrong = other.path(other.manifest.ca.cert)
    result = check_tls(f"127.0.0.1:{server.port}", ca=wrong, timeout_s=5.0, now=NOW)
    assert result.status == "FAIL"
    assert f"its certificate is not signed by the CA in {wrong}" in result.detail


def test_wrong_ca_in_the_config_fails_the_whole_check(
    tmp_path: Path, site_yaml: Path, site: SiteConfig
) -> None:
    assert site.transport is not None
    other = provision_workspace(out=tmp_path / "other", sites=["x"], host="127.0.0.1", port=1)
    replace_file(site.transport.root_certificates, other.path(other.manifest.ca.cert).read_bytes())
    report = run_preflight(config_path=site_yaml, min_free_bytes=1, gpu_probe=no_gpu)
    assert report.result("CA certificate").status == "PASS"  # a valid CA, just the wrong one
    assert report.result("TLS").status == "FAIL"
    assert report.result("node registered").status == "WARN"
    assert not report.ok


def test_closed_loopback_port_is_unreachable() -> None:
    port = free_port()
    result = check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)
    assert result.status == "FAIL"
    assert result.detail.startswith(f"cannot connect to 127.0.0.1:{port}")
    assert "aggregator running" in (result.fix or "")


def test_unreachable_aggregator_fails_the_report_and_skips_tls(site_yaml: Path) -> None:
    raw = yaml.safe_load(site_yaml.read_text(encoding="utf-8"))
    raw["transport"]["superlink_address"] = f"127.0.0.1:{free_port()}"
    site_yaml.write_text(yaml.safe_dump(raw), encoding="utf-8")
    report = run_preflight(config_path=site_yaml, min_free_bytes=1, gpu_probe=no_gpu)
    assert report.result("aggregator reachable").status == "FAIL"
    assert report.result("TLS").detail.startswith("not checked")
    assert not report.ok


def test_bad_dataset_fails(site: SiteConfig) -> None:
    assert check_data(site).status == "PASS"
    label = next((site.data.manifest.parent / "labels").iterdir())
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 7, np.uint8), np.eye(4)), label)
    result = check_data(site)
    assert result.status == "FAIL"
    assert result.detail.startswith("1 of 4 cases bad (first: ")
    assert "label values [7] are not in classes [0, 1]" in result.detail
    assert str(label) not in result.detail  # no patient file paths in the summary line
    assert "medfed data check" in (result.fix or "")


def _spend(site: SiteConfig, *, steps: int) -> None:
    ledger = SiteLedger(path=site.ledger_path, key_path=site.signing_key_path, site_id=SITE)
    plan = RoundPlan(
        run_id="run-1",
        round=1,
        planned_rounds=1,
        steps=steps,
        sample_rate=0.25,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    terms = site.terms
    roomy = PrivacyTerms(accountant=terms.accountant, delta=terms.delta, epsilon_cap=1000.0)
    reservation = ledger.reserve(plan=plan, terms=roomy)
    ledger.commit(reservation, steps=steps)


def test_tampered_ledger_fails(site: SiteConfig) -> None:
    _spend(site, steps=5)
    ledger, budget, terms = check_ledger(site)
    assert ledger.status == "PASS" and "3 entries" in ledger.detail
    assert budget.status == "PASS"
    # The test spent under a cap of 1000: the config's cap differs from the ledger's.
    assert terms.status == "WARN" and "the ledger cap 1000" in terms.detail
    text = site.ledger_path.read_text(encoding="utf-8")
    site.ledger_path.write_text(text.replace('"steps":5', '"steps":1', 1), encoding="utf-8")
    ledger, budget = check_ledger(site)
    assert ledger.status == "FAIL"
    assert "bad signature" in ledger.detail or "canonical" in ledger.detail
    assert budget.status == "FAIL"


def test_budget_exhausted_fails_and_nearly_spent_warns(site: SiteConfig) -> None:
    _spend(site, steps=10)
    spent = SiteLedger(path=site.ledger_path, key_path=site.signing_key_path, site_id=SITE).spent(
        delta=site.privacy.delta, accountant=site.privacy.accountant
    )

    def with_cap(cap: float) -> SiteConfig:
        privacy = site.privacy.model_copy(update={"epsilon_cap": cap})
        return site.model_copy(update={"privacy": privacy})

    exhausted = check_ledger(with_cap(spent * 0.9))[1]
    assert exhausted.status == "FAIL" and "exhausted" in exhausted.detail
    nearly = check_ledger(with_cap(spent * 1.05))[1]
    assert nearly.status == "WARN" and "left (under 10%)" in nearly.detail
    plenty = check_ledger(with_cap(spent * 3))[1]
    assert plenty.status == "PASS"


def test_low_disk_warns(tmp_path: Path) -> None:
    result = check_disk(tmp_path / "not" / "yet", min_free_bytes=2**62)
    assert result.status == "WARN" and str(tmp_path) in result.detail
    assert check_disk(tmp_path, min_free_bytes=1).status == "PASS"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_workdir_fails(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert check_disk(locked / "work", min_free_bytes=1).status == "FAIL"


def test_compute_is_never_a_failure() -> None:
    assert check_compute("auto", probe=lambda: "NVIDIA H100").status == "PASS"
    assert check_compute("auto", probe=no_gpu).status == "WARN"
    cuda_only = check_compute("cuda", probe=no_gpu)
    assert cuda_only.status == "WARN" and "training.device" in (cuda_only.fix or "")

    def broken() -> str | None:
        raise RuntimeError("driver mismatch")

    assert check_compute("auto", probe=broken).status == "WARN"


def test_versions_against_the_pins() -> None:
    pins = [
        "torch<3,>=2.3",
        "opacus<1.7,>=1.6.0",
        'monai<1.7,>=1.6.1; extra == "site"',
        'flwr==1.41.0; extra == "site"',
    ]
    good = {"torch": "2.5.0", "opacus": "1.6.0", "monai": "1.6.1", "flwr": "1.41.0"}

    def run(**changes: str | None) -> dict[str, preflight.CheckResult]:
        versions = {**good, **changes}
        results = check_versions(
            python="3.11.7",
            requires_python=">=3.11",
            requirements=pins,
            installed=versions.get,
        )
        return {r.name: r for r in results}

    assert {r.status for r in run().values()} == {"PASS"}
    flwr = run(flwr="1.42.0")["flwr"]
    assert flwr.status == "FAIL" and "flwr 1.42.0 installed, medfed pins ==1.41.0" in flwr.detail
    assert run(flwr=None)["flwr"].status == "FAIL"
    assert run(torch="3.0.0")["libraries"].status == "WARN"
    missing = run(monai=None)["libraries"]
    assert missing.status == "FAIL" and "monai" in missing.detail
    old_python = check_versions(
        python="3.10.4", requires_python=">=3.11", requirements=pins, installed=good.get
    )
    assert old_python[0].status == "FAIL"
    unknown = check_versions(python="3.11.7", requirements=[], installed=good.get)
    assert {r.name: r.status for r in unknown}["flwr"] == "WARN"


def test_installed_versions_match_the_pins() -> None:
    results = {r.name: r for r in check_versions()}
    assert results["flwr"].status == "PASS", results["flwr"]


def test_cli_check_exit_code_and_json(site_yaml: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["site", "check", "--config", str(site_yaml), "--min-free-gb", "0"])
    assert ok.exit_code == 0, ok.output
    assert "ready" in ok.output and "NOT ready" not in ok.output

    raw = yaml.safe_load(site_yaml.read_text(encoding="utf-8"))
    raw["transport"]["superlink_address"] = f"127.0.0.1:{free_port()}"
    site_yaml.write_text(yaml.safe_dump(raw), encoding="utf-8")
    failed = runner.invoke(app, ["site", "check", "--config", str(site_yaml), "--json"])
    assert failed.exit_code == PREFLIGHT_FAILED_EXIT_CODE, failed.output
    report = json.loads(failed.output)
    assert report["ok"] is False and report["status"] == "FAIL"
    by_name = {c["check"]: c for c in report["checks"]}
    assert by_name["aggregator reachable"]["status"] == "FAIL"
    assert by_name["aggregator reachable"]["fix"]
