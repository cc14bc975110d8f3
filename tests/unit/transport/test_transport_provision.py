"""Provisioning of the Flower deployment: CA, SuperLink certificate, site kits, workspace.yaml."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import typer
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from medfed.cli.provision_cmd import provision
from medfed.errors import ConfigError
from medfed.privacy import key_id, load_or_create_signing_key, load_public_key, public_key_path
from medfed.transport import SUPERLINK_PORT, check_certificate, provision_workspace
from medfed.workspace import Workspace, load_workspace, spki_pem

SITES = ["hospital-a", "hospital_b", "c.1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    out = tmp_path_factory.mktemp("ws") / "federation"
    return provision_workspace(out=out, sites=SITES, host="fl.hospital.example")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("other") / "ws"
    return provision_workspace(out=out, sites=["x"], host="127.0.0.1").path("ca/ca.crt")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_node_keys_are_p384_openssh_pairs(workspace: Workspace) -> None:
    for site in SITES:
        kit = workspace.root / "sites" / site
        private_bytes = (kit / "node_key").read_bytes()
        assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(private_bytes, password=None)
        public_line = (kit / "node_key.pub").read_text().strip()
        assert public_line.startswith("ecdsa-sha2-nistp384 AAAA")
        public = serialization.load_ssh_public_key(public_line.encode())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert private.curve.name == public.curve.name == "secp384r1"
        assert private.public_key() == public
        assert workspace.site(site).public_key == public_line
    keys = {(workspace.root / "sites" / s / "node_key.pub").read_text() for s in SITES}
    assert len(keys) == len(SITES)


def test_ledger_keys_are_ed25519_pairs_registered_by_key_id(workspace: Workspace) -> None:
    ids = set()
    for site in SITES:
        kit = workspace.root / "sites" / site
        entry = workspace.site(site)
        assert entry.ledger_public_key_file == f"sites/{site}/ledger_key.pub"
        assert public_key_path(kit / "ledger_key.pem") == kit / "ledger_key.pub"
        # The site's ledger code loads the provisioned key instead of creating its own.
        before = (kit / "ledger_key.pub").read_bytes()
        private = load_or_create_signing_key(kit / "ledger_key.pem")
        assert (kit / "ledger_key.pub").read_bytes() == before
        assert (kit / "ledger_key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        public = load_public_key(kit / "ledger_key.pub")
        assert private.public_key() == public == workspace.ledger_public_key(site)
        assert entry.ledger_key_id == key_id(public)
        ids.add(entry.ledger_key_id)
    assert len(ids) == len(SITES)


def test_a_swapped_ledger_public_key_is_refused(tmp_path: Path) -> None:
    ws = provision_workspace(out=tmp_path / "ws", sites=["a", "b"], host="localhost")
    (ws.root / "sites/a/ledger_key.pub").write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="is not the key"):
        ws.ledger_public_key("a")
    assert key_id(ws.ledger_public_key("b")) == ws.site("b").ledger_key_id
    with pytest.raises(ConfigError, match="no site 'c'"):
        ws.ledger_public_key("c")


def test_node_public_key_pem_is_what_flower_registers(workspace: Workspace) -> None:
    # Flower's own serialisation, which NodeInfo.public_key carries.
    public_key_to_bytes = pytest.importorskip(
        "flwr.supercore.primitives.asymmetric"
    ).public_key_to_bytes
    for site in SITES:
        pem = workspace.node_public_key_pem(site)
        public_line = workspace.path(workspace.site(site).node_public_key_file).read_bytes()
        ssh_key = serialization.load_ssh_public_key(public_line)
        assert isinstance(ssh_key, ec.EllipticCurvePublicKey)
        assert pem == public_key_to_bytes(ssh_key)
        assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
        assert serialization.load_pem_public_key(pem) == ssh_key
        assert workspace.site_for_node_key(pem) == site
    stranger = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert workspace.site_for_node_key(public_key_to_bytes(stranger)) is None
    assert workspace.site_for_node_key(b"not a key") is None
    ledger_pem = workspace.path(workspace.site(SITES[0]).ledger_public_key_file).read_bytes()
    assert workspace.site_for_node_key(ledger_pem) is None  # an Ed25519 key is no node key


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_fingerprint_matches_ssh_keygen(workspace: Workspace) -> None:
    entry = workspace.site("hospital-a")
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(workspace.path(entry.node_public_key_file))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed[0] == "384"
    assert listed[1] == entry.fingerprint
    assert listed[-1] == "(ECDSA)"


def test_private_files_0600_and_their_directories_0700(workspace: Workspace) -> None:
    root = workspace.root
    secrets = [root / "ca/ca.key", root / "superlink/server.key"]
    secrets += [root / "sites" / s / "node_key" for s in SITES]
    secrets += [root / "sites" / s / "ledger_key.pem" for s in SITES]
    for path in secrets:
        assert _mode(path) == 0o600, path
        assert _mode(path.parent) == 0o700, path.parent
    assert _mode(root) == 0o700
    assert _mode(root / "ca/ca.crt") == 0o644
    assert _mode(root / "sites" / SITES[0] / "ledger_key.pub") == 0o644
    leftovers = [p.name for p in root.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # staging directory renamed into place, nothing left behind


def test_ca_is_a_ca_and_signs_the_server_cert(workspace: Workspace) -> None:
    ca = _cert(workspace.path("ca/ca.crt"))
    server = _cert(workspace.path("superlink/server.crt"))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert ca_key.curve.name == "secp384r1"
    assert server.signature_hash_algorithm is not None
    ca_key.verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    assert server.issuer == ca.subject
    for name in ("ca/ca.crt", "superlink/ca.crt", *(f"sites/{s}/ca.crt" for s in SITES)):
        assert workspace.path(name).read_bytes() == workspace.path("ca/ca.crt").read_bytes()


def test_server_cert_names_and_purpose(workspace: Workspace) -> None:
    server = _cert(workspace.path("superlink/server.crt"))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.hospital.example", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_ip_host_becomes_an_ip_san(tmp_path: Path) -> None:
    ws = provision_workspace(out=tmp_path / "ws", sites=["a"], host="10.1.2.3")
    san = _cert(ws.path("superlink/server.crt")).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert ipaddress.ip_address("10.1.2.3") in san.value.get_values_for_type(x509.IPAddress)
    assert "10.1.2.3" not in san.value.get_values_for_type(x509.DNSName)
    assert ws.manifest.address == f"10.1.2.3:{SUPERLINK_PORT}"


def test_check_certificate(workspace: Workspace, other_ca: Path) -> None:
    server = workspace.path("superlink/server.crt")
    ca = workspace.path("ca/ca.crt")
    assert check_certificate(cert=server, ca=ca) == []
    wrong = check_certificate(cert=server, ca=other_ca)
    assert len(wrong) == 1 and "not by the CA" in wrong[0]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    assert any("expired" in p for p in check_certificate(cert=server, ca=ca, now=later))
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    assert any("not valid until" in p for p in check_certificate(cert=server, ca=ca, now=earlier))
    # The CA certificate itself is no server certificate: wrong usage is reported.
    usage = check_certificate(cert=ca, ca=ca)
    assert any("CA certificate, not a server" in p for p in usage)
    assert any("serverAuth" in p for p in usage)
    with pytest.raises(ConfigError, match="cannot read certificate"):
        check_certificate(cert=workspace.root / "missing.crt", ca=ca)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        check_certificate(cert=workspace.path("workspace.yaml"), ca=ca)


def test_workspace_yaml_round_trips_without_secrets(workspace: Workspace) -> None:
    text = workspace.path("workspace.yaml").read_text()
    assert "PRIVATE KEY" not in text
    for site in SITES:
        for name in ("node_key", "ledger_key.pem"):
            secret = (workspace.root / "sites" / site / name).read_text()
            body = "".join(secret.splitlines()[1:-1])
            assert body[:40] not in text.replace("\n", "")
    loaded = load_workspace(workspace.root)
    assert loaded == workspace
    assert load_workspace(workspace.path("workspace.yaml")) == workspace
    data = yaml.safe_load(text)
    assert [s["site_id"] for s in data["sites"]] == SITES
    assert data["port"] == SUPERLINK_PORT and data["host"] == "fl.hospital.example"
    ledger_pub = load_public_key(workspace.root / "sites" / SITES[0] / "ledger_key.pub")
    assert data["sites"][0]["ledger_key_id"] == key_id(ledger_pub)
    assert data["sites"][0]["ledger_public_key_file"] == f"sites/{SITES[0]}/ledger_key.pub"
    expiry = _cert(workspace.path("superlink/server.crt")).not_valid_after_utc
    assert loaded.manifest.certificate_not_after == expiry


def test_load_workspace_errors(tmp_path: Path, workspace: Workspace) -> None:
    with pytest.raises(ConfigError, match="no workspace file"):
        load_workspace(tmp_path)
    bad = tmp_path / "workspace.yaml"
    bad.write_text(workspace.path("workspace.yaml").read_text() + "surprise: 1\n")
    with pytest.raises(ConfigError, match="surprise"):
        load_workspace(tmp_path)
    bad.write_text("sites: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_workspace(bad)


def test_site_template_is_plain_yaml_with_relative_paths(workspace: Workspace) -> None:
    text = workspace.path("sites/c.1/site.template.yaml").read_text()
    assert text.lstrip().startswith("#")
    data = yaml.safe_load(text)
    assert data["site_id"] == "c.1"
    assert data["transport"] == {
        "superlink_address": f"fl.hospital.example:{SUPERLINK_PORT}",
        "root_certificates": "ca.crt",
        "node_private_key": "node_key",
        "node_public_key": "node_key.pub",
        "receipt_public_key": "aggregator_receipt.pub",
        "warm_worker": True,
    }
    # the kit's receipt key is the public half of the key the aggregator signs receipts with
    receipt_key = workspace.receipt_signing_key()
    assert receipt_key is not None
    kit_key = workspace.path("sites/c.1/aggregator_receipt.pub").read_bytes()
    assert kit_key == spki_pem(receipt_key.public_key())
    assert "CHANGE-ME" in data["data"]["manifest"]
    assert "epsilon_cap" in data["privacy"]
    assert data["paths"]["signing_key"] == "ledger_key.pem"
    assert "privacy ledger" in text and "public half" in text


def test_numeric_looking_site_id_stays_a_string(tmp_path: Path) -> None:
    ws = provision_workspace(out=tmp_path / "ws", sites=["1e5", "null"], host="::1")
    for site in ("1e5", "null"):
        template = yaml.safe_load(ws.path(f"sites/{site}/site.template.yaml").read_text())
        assert template["site_id"] == site
    assert ws.manifest.address == f"[::1]:{SUPERLINK_PORT}"
    assert load_workspace(ws.root).manifest.sites[0].site_id == "1e5"


def test_bad_site_ids_are_all_reported_at_once(tmp_path: Path) -> None:
    sites = ["ok", "-dash", "has space", "", "Ok", "x" * 64, "ok"]
    with pytest.raises(ConfigError) as info:
        provision_workspace(out=tmp_path / "ws", sites=sites, host="localhost")
    message = info.value.message
    for bad in ("'-dash'", "'has space'", "''", repr("x" * 64), "'Ok' duplicates 'ok'"):
        assert bad in message
    assert message.count("duplicates") == 2
    assert info.value.hint
    with pytest.raises(ConfigError, match="list of ids"):
        provision_workspace(out=tmp_path / "ws", sites="a,b", host="localhost")
    with pytest.raises(ConfigError, match="no sites"):
        provision_workspace(out=tmp_path / "ws", sites=[], host="localhost")
    assert not (tmp_path / "ws").exists()


def test_bad_host_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    for host in ("https://fl.example", "fl.example:8000", "two words", "-bad.example", ""):
        with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
            provision_workspace(out=tmp_path / "ws", sites=["a"], host=host)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_out_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "ws"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        provision_workspace(out=out, sites=["a"], host="localhost")
    with pytest.raises(ConfigError, match="not a medfed workspace"):
        provision_workspace(out=out, sites=["a"], host="localhost", force=True)
    assert (out / "notes.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert provision_workspace(out=empty, sites=["a"], host="localhost").root == empty


def test_force_replaces_a_workspace_but_not_its_history(tmp_path: Path) -> None:
    out = tmp_path / "ws"
    first = provision_workspace(out=out, sites=["a"], host="localhost")
    with pytest.raises(ConfigError, match="not empty"):
        provision_workspace(out=out, sites=["a"], host="localhost")
    second = provision_workspace(out=out, sites=["a", "b"], host="localhost", force=True)
    assert [s.site_id for s in load_workspace(out).manifest.sites] == ["a", "b"]
    assert second.site("a").public_key != first.site("a").public_key
    (out / "ledger").mkdir()
    with pytest.raises(ConfigError, match="federation history"):
        provision_workspace(out=out, sites=["a"], host="localhost", force=True)
    assert load_workspace(out) == second


def _handshake(workspace: Workspace, client_ca: Path, server_name: str) -> str:
    """TLS handshake over loopback; returns the negotiated version or raises the client error."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(
        workspace.path("superlink/server.crt"), workspace.path("superlink/server.key")
    )
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(client_ca))
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(5))
            except (ssl.SSLError, OSError) as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                tls.sendall(b"hello")
                assert tls.recv(5) == b"hello"
                return str(tls.version())
        finally:
            thread.join(timeout=10)


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "fl.hospital.example"])
def test_real_tls_handshake_with_the_workspace_ca(workspace: Workspace, name: str) -> None:
    version = _handshake(workspace, workspace.path("sites/hospital-a/ca.crt"), name)
    assert version.startswith("TLSv1.")


def test_tls_handshake_fails_with_another_ca(workspace: Workspace, other_ca: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(workspace, other_ca, "127.0.0.1")


def test_tls_handshake_fails_for_a_name_not_in_the_certificate(workspace: Workspace) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(workspace, workspace.path("ca/ca.crt"), "other.example")


def test_cli_prints_layout_and_next_steps_without_secrets(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(provision)
    app.command("noop")(lambda: None)  # a second command keeps `provision` a named subcommand
    out = tmp_path / "fed"
    result = CliRunner().invoke(
        app,
        ["provision", "--out", str(out), "--sites", "a, b", "--host", "10.0.0.5", "--port", "8443"],
    )
    assert result.exit_code == 0, result.output
    text = result.output
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    for site in ("a", "b"):
        public_body = (out / "sites" / site / "node_key.pub").read_text().split()[1]
        assert public_body not in text  # fingerprints only
    assert f"medfed aggregator start --workspace {out}" in text
    assert "medfed site start --config site.yaml" in text
    assert "sites/b/" in text
    assert load_workspace(out).manifest.address == "10.0.0.5:8443"
    assert [s.site_id for s in load_workspace(out).manifest.sites] == ["a", "b"]

    again = CliRunner().invoke(app, ["provision", "--out", str(out), "--sites", "a"])
    assert again.exit_code != 0
    assert isinstance(again.exception, ConfigError)


def test_a_filled_in_kit_template_is_a_valid_site_config(tmp_path: Path) -> None:
    from medfed.config import load_site_config

    provision_workspace(out=tmp_path / "ws", sites=["hospital-a"], host="10.1.2.3")
    kit = tmp_path / "ws" / "sites" / "hospital-a"
    text = (kit / "site.template.yaml").read_text()
    (kit / "site.yaml").write_text(text.replace("CHANGE-ME", "local"))
    config = load_site_config(kit / "site.yaml")
    assert config.site_id == "hospital-a"
    assert config.transport is not None
    assert config.transport.superlink_address.startswith("10.1.2.3:")
    assert config.transport.root_certificates == (kit / "ca.crt").resolve()
    assert config.transport.node_private_key == (kit / "node_key").resolve()
    assert config.data.manifest == (kit / "local" / "manifest.csv").resolve()
    assert config.signing_key_path == (kit / "ledger_key.pem").resolve()
    assert config.paths.workdir == (kit / "local" / "medfed-work").resolve()
