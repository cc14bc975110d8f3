"""The site's app allow-list: bundle digests and the checks, without a network."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from medfed import app_bundle
from medfed.app_bundle import build_fab, medfed_app, medfed_app_directory, read_fab
from medfed.config.site import SiteConfig
from medfed.errors import AppRefusedError, TransportError
from medfed.site import app_guard
from medfed.site.app_guard import (
    allowed_from_env,
    check_bundle,
    check_flower_internals,
    check_installed,
    write_guard,
)
from medfed.transport.deploy import app_guard_env

ECHO_APP = Path(__file__).parents[2] / "integration" / "flower_echo_app"


def _zip(members: dict[str, bytes], *, level: int | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, data)
    return buffer.getvalue()


def test_the_medfed_app_builds_to_the_same_bundle_every_time() -> None:
    first, second = build_fab(medfed_app_directory()), build_fab(medfed_app_directory())
    assert first == second
    info = medfed_app()
    assert info.file_sha256 == hashlib.sha256(first).hexdigest()
    assert info.fab_id == "medfed/medfed-federation"
    assert set(info.members) == {"pyproject.toml", ".info/CONTENT"}


def test_the_content_digest_ignores_compression_but_not_content() -> None:
    members = read_fab(build_fab(medfed_app_directory())).members
    fast, small = read_fab(_zip(members, level=1)), read_fab(_zip(members, level=9))
    assert fast.content_digest == small.content_digest == medfed_app().content_digest
    changed = dict(members, **{"pyproject.toml": members["pyproject.toml"] + b"\n"})
    assert read_fab(_zip(changed)).content_digest != fast.content_digest


def test_only_listed_bundles_pass_and_by_either_digest() -> None:
    medfed = medfed_app()
    echo = build_fab(ECHO_APP)
    for digest in (medfed.file_sha256, medfed.content_digest):
        check_bundle(build_fab(medfed_app_directory()), allowed={digest})
    with pytest.raises(AppRefusedError, match="not on this site's allow-list") as caught:
        check_bundle(echo, allowed=medfed.digests)
    assert read_fab(echo).content_digest in caught.value.message
    assert str(caught.value).startswith("error[app-refused]: app medfed/medfed-echo-app")
    with pytest.raises(AppRefusedError):
        check_bundle(echo, allowed=set())


def test_what_the_run_claims_must_be_the_bundle_itself() -> None:
    data = build_fab(medfed_app_directory())
    info = medfed_app()
    ok = {"allowed": info.digests, "fab_id": info.fab_id, "fab_version": info.version}
    check_bundle(data, declared_hash=info.file_sha256, **ok)  # type: ignore[arg-type]
    with pytest.raises(AppRefusedError, match="declares app bundle hash"):
        check_bundle(data, declared_hash="0" * 64, **ok)  # type: ignore[arg-type]
    with pytest.raises(AppRefusedError, match="names app medfed/other"):
        check_bundle(data, allowed=info.digests, fab_id="medfed/other", fab_version="0.1.0")


def test_malformed_and_oversized_bundles_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AppRefusedError, match="not a zip"):
        check_bundle(b"not a zip", allowed={"medfed"})
    members = read_fab(build_fab(medfed_app_directory())).members
    twice = io.BytesIO()
    with zipfile.ZipFile(twice, "w") as archive, pytest.warns(UserWarning):
        archive.writestr("pyproject.toml", members["pyproject.toml"])
        archive.writestr("pyproject.toml", b"[project]\n")
    with pytest.raises(AppRefusedError, match="twice"):
        check_bundle(twice.getvalue(), allowed={"medfed"})
    with pytest.raises(AppRefusedError, match=r"pyproject\.toml"):
        check_bundle(_zip({"a.py": b"print(1)"}), allowed={"medfed"})
    monkeypatch.setattr(app_bundle, "MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(AppRefusedError, match="unpacks to more than"):
        check_bundle(_zip({"pyproject.toml": b" " * 5000}), allowed={"medfed"})


def test_an_installed_directory_must_hold_exactly_the_bundle(tmp_path: Path) -> None:
    info = medfed_app()
    (tmp_path / "pyproject.toml").write_bytes(info.members["pyproject.toml"])
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"cache")
    check_installed(tmp_path, info)
    (tmp_path / "client.py").write_text("import os\n")
    with pytest.raises(AppRefusedError, match="differs"):
        check_installed(tmp_path, info)


def test_flower_internals_the_guard_wraps_are_there() -> None:
    module = check_flower_internals()
    assert callable(module.install_from_fab) and callable(module.pull_task_input)


def test_a_changed_flower_stops_the_node_instead_of_running_unchecked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = check_flower_internals()
    monkeypatch.delattr(module, "install_from_fab")
    with pytest.raises(TransportError, match="install_from_fab is missing"):
        check_flower_internals()


def test_the_node_environment_puts_the_guard_first_with_the_site_allow_list(
    tmp_path: Path,
) -> None:
    other = "ab" * 32
    config = SiteConfig.model_validate(
        {
            "site_id": "site-a",
            "data": {"manifest": "m.csv"},
            "policy": {"allowed_app_hashes": ["medfed", other]},
        }
    )
    env = app_guard_env(site=config, bin_dir=tmp_path / "bin")
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert allowed_from_env(env) == medfed_app().digests | {other}
    assert env[app_guard.SITE_ID_ENV] == "site-a"
    guard = tmp_path / "bin" / "flwr-clientapp"
    assert guard.stat().st_mode & 0o777 == 0o700
    done = subprocess.run([str(guard), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: flwr-clientapp" in done.stdout


def test_an_empty_allow_list_allows_nothing() -> None:
    assert allowed_from_env({}) == frozenset()
    assert allowed_from_env({app_guard.ALLOWED_APPS_ENV: " AB , ,cd"}) == {"ab", "cd"}


def test_the_guard_script_keeps_a_path_with_spaces_and_quotes(tmp_path: Path) -> None:
    python = tmp_path / "it's a dir" / "python"
    text = app_guard.guard_script(str(python))
    assert text.startswith("#!/bin/sh\n") and '"$0" "$@"' in text
    path = write_guard(tmp_path / "bin", python="/bin/echo")
    out = subprocess.run([str(path), "x y"], capture_output=True, text=True, timeout=10)
    assert out.stdout.split("\n")[0].endswith(f"{path} x y")
