"""`medfed site init`: a commented site.yaml from a provisioning kit and a manifest."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.config import load_site_config
from medfed.config.site import PolicySection, PrivacySection, ReleaseSection, SiteConfig
from medfed.errors import ConfigError, DataError
from medfed.site.onboarding import init_site, read_kit
from medfed.transport.provision import provision_workspace
from medfed.workspace import Workspace

SITE = "hospital-a"


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return provision_workspace(out=tmp_path / "ws", sites=[SITE], host="127.0.0.1", port=18443)


@pytest.fixture
def kit(workspace: Workspace) -> Path:
    return workspace.path(workspace.site(SITE).kit)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A manifest of 200 patients; init only reads the manifest, not the images."""
    rows = ["patient_id,image,label"] + [
        f"p{i:03d},img/p{i:03d}.nii.gz,lab/p{i:03d}.nii.gz" for i in range(200)
    ]
    path = tmp_path / "data" / "manifest.csv"
    path.parent.mkdir()
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def comment_text(text: str) -> str:
    """Every comment of a YAML text, joined into one line of words."""
    parts = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    return " ".join(" ".join(parts).split())


def test_written_config_loads_with_the_kit_and_manifest(
    tmp_path: Path, kit: Path, manifest: Path, workspace: Workspace
) -> None:
    out = tmp_path / "etc" / "site.yaml"
    result = init_site(kit=kit, manifest=manifest, out=out)

    config = load_site_config(out)
    assert result.path == out and result.n_cases == 200
    assert config.site_id == SITE
    assert config.transport is not None
    assert config.transport.superlink_address == workspace.manifest.address
    assert config.transport.root_certificates == kit / "ca.crt"
    assert config.transport.node_private_key == kit / "node_key"
    assert config.transport.node_public_key == kit / "node_key.pub"
    assert config.signing_key_path == kit / "ledger_key.pem"
    assert config.data.manifest == manifest
    assert config.paths.workdir == out.parent / f"medfed-work-{SITE}"
    assert config.privacy.noise_multiplier == 1.0
    assert config.privacy.epsilon_cap == PrivacySection.model_fields["epsilon_cap"].default
    # Safe defaults, written out explicitly: a quarter of the cap per round at most.
    assert config.policy == PolicySection(max_epsilon_per_round=config.privacy.epsilon_cap / 4)
    assert config.policy.min_noise_multiplier == 0.5
    assert config.release == ReleaseSection()  # nothing public: counts and Dice get noise
    # Names where data and keys are: not readable by every local user.
    assert stat.S_IMODE(out.stat().st_mode) & 0o007 == 0


def test_every_setting_is_explained_from_the_models(
    tmp_path: Path, kit: Path, manifest: Path
) -> None:
    out = tmp_path / "site.yaml"
    init_site(kit=kit, manifest=manifest, out=out, epsilon_cap=3.0, delta=1e-7)
    text = out.read_text(encoding="utf-8")
    comments = comment_text(text)

    assert "TLS" in comments and "telemetry" in comments
    # Policy is written out in full: every field, active, each with its description.
    raw = yaml.safe_load(text)
    assert set(raw["policy"]) == set(PolicySection.model_fields)
    for section_name, field in SiteConfig.model_fields.items():
        section = field.annotation
        models = [a for a in getattr(section, "__args__", (section,)) if isinstance(a, type)]
        for model in models:
            if not hasattr(model, "model_fields"):
                continue
            for key, info in model.model_fields.items():
                assert re.search(rf"^\s*(# )?{key}:", text, re.MULTILINE), (section_name, key)
                if info.description:
                    assert " ".join(info.description.split()) in comments, (section_name, key)
    # Numbers survive the round trip as numbers (PyYAML reads "1e-07" as a string).
    assert raw["privacy"]["delta"] == 1e-7
    assert raw["privacy"]["epsilon_cap"] == 3.0
    # Rarely changed settings stay at the package defaults (commented out).
    assert "training" not in raw and "# training:" in text


def test_refuses_to_overwrite_without_force(tmp_path: Path, kit: Path, manifest: Path) -> None:
    out = tmp_path / "site.yaml"
    out.write_text("mine\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="already exists") as caught:
        init_site(kit=kit, manifest=manifest, out=out)
    assert "--force" in (caught.value.hint or "")
    assert out.read_text(encoding="utf-8") == "mine\n"

    init_site(kit=kit, manifest=manifest, out=out, force=True)
    assert load_site_config(out).site_id == SITE


def test_missing_manifest_and_incomplete_kit_are_clear_errors(
    tmp_path: Path, kit: Path, manifest: Path
) -> None:
    out = tmp_path / "site.yaml"
    with pytest.raises(ConfigError, match="no such manifest"):
        init_site(kit=kit, manifest=tmp_path / "nope.csv", out=out)
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError):
        init_site(kit=kit, manifest=bad, out=out)
    (kit / "node_key").unlink()
    with pytest.raises(ConfigError, match=r"missing node_key \(the node's private key\)"):
        read_kit(kit)
    assert not out.exists()


def test_delta_must_be_below_one_over_the_patients(
    tmp_path: Path, kit: Path, manifest: Path
) -> None:
    with pytest.raises(ConfigError, match="not below 1/200"):
        init_site(kit=kit, manifest=manifest, out=tmp_path / "site.yaml", delta=0.01)


def test_invalid_option_is_reported_before_anything_is_written(
    tmp_path: Path, kit: Path, manifest: Path
) -> None:
    out = tmp_path / "site.yaml"
    with pytest.raises(ConfigError, match=r"privacy\.epsilon_cap"):
        init_site(kit=kit, manifest=manifest, out=out, epsilon_cap=-1.0)
    assert not out.exists()


def test_cli_init_writes_and_refuses_overwrite(tmp_path: Path, kit: Path, manifest: Path) -> None:
    out = tmp_path / "site.yaml"
    args = ["site", "init", "--kit", str(kit), "--data", str(manifest), "--out", str(out)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "medfed site check --config" in first.output
    second = CliRunner().invoke(app, args)
    assert isinstance(second.exception, ConfigError)
    assert load_site_config(out).site_id == SITE


def test_two_sites_in_one_directory_get_their_own_work_directories(
    tmp_path: Path, manifest: Path
) -> None:
    from medfed.privacy import SiteLedger
    from medfed.privacy.site_ledger import Release

    workspace = provision_workspace(
        out=tmp_path / "two", sites=["site-a", "site-b"], host="127.0.0.1", port=18444
    )
    configs = {}
    for site in ("site-a", "site-b"):
        out = tmp_path / "etc" / f"{site}.yaml"
        init_site(kit=workspace.path(workspace.site(site).kit), manifest=manifest, out=out)
        configs[site] = load_site_config(out)
    assert configs["site-a"].ledger_path != configs["site-b"].ledger_path

    # site-a's ledger exists; site-b may not be pointed at its work directory
    a = configs["site-a"]
    ledger = SiteLedger(path=a.ledger_path, key_path=a.signing_key_path, site_id="site-a")
    public = Release(
        run_id="r",
        round=0,
        quantity="patients",
        values={"train": 9.0, "validation": 2.0},
        mechanism="public",
        reason="test",
    )
    ledger.release(release=public, terms=a.terms)
    with pytest.raises(ConfigError, match="holds the privacy ledger of site 'site-a'"):
        init_site(
            kit=workspace.path(workspace.site("site-b").kit),
            manifest=manifest,
            out=tmp_path / "etc" / "b2.yaml",
            workdir=a.paths.workdir,
        )
