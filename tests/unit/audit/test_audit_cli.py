"""`medfed audit verify|report`: findings on stdout, one error line, the audit exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from audit_support import Federation, lines_of, write_lines

from medfed.cli.app import main
from medfed.cli.audit_cmd import parse_ledgers
from medfed.errors import AuditError, ConfigError


def _medfed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["medfed", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0), out, err


def test_verify_passes_with_exit_zero(
    federation: Federation, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _medfed(
        monkeypatch, capsys, "audit", "verify", "--workspace", str(federation.workspace_dir)
    )
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("PASS: 0 finding(s)")
    assert any(line.startswith("site site-a: 5 entries; epsilon ") for line in lines)
    assert err == ""


def test_verify_names_the_tampered_entry_and_exits_with_the_audit_code(
    federation: Federation, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = federation.copy_path("site-b")
    lines = lines_of(path)
    lines[3] = lines[3].replace(b'"steps":4', b'"steps":3')
    write_lines(path, lines)

    code, out, err = _medfed(
        monkeypatch, capsys, "audit", "verify", "--workspace", str(federation.workspace_dir)
    )
    assert code == AuditError.exit_code == 10
    assert out.splitlines()[0] == (
        "FINDING [ledger-copy] site site-b: ledgers/site-b.ledger.jsonl: line 4 (seq 3): "
        "bad signature: the entry was changed after it was signed"
    )
    assert out.strip().splitlines()[-1].startswith("FAIL: 1 finding(s)")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error[audit]: 1 finding(s) for site(s) site-b")


def test_verify_json(
    federation: Federation, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    site_ledger = federation.site_ledger("site-a").path
    code, out, _ = _medfed(
        monkeypatch,
        capsys,
        "audit",
        "verify",
        "--workspace",
        str(federation.workspace_dir),
        "--run",
        "run-1",
        "--ledger",
        f"site-a={site_ledger}",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["verdict"] == "PASS" and data["runs"] == ["run-1"]
    assert data["sites"]["site-a"]["site_ledger_entries"] == 5
    assert data["sites"]["site-b"]["site_ledger_entries"] is None


@pytest.mark.parametrize("fmt", ["json", "html"])
def test_report_writes_the_chosen_format(
    fmt: str,
    federation: Federation,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    out_file = tmp_path / "reports" / f"audit.{fmt}"
    code, out, _ = _medfed(
        monkeypatch,
        capsys,
        "audit",
        "report",
        "--workspace",
        str(federation.workspace_dir),
        "--out",
        str(out_file),
    )
    assert code == 0
    assert out.startswith(f"{fmt} report written to {out_file}: 2 site(s); verification PASS")
    text = out_file.read_text()
    if fmt == "json":
        assert set(json.loads(text)["sites"]) == {"site-a", "site-b"}
    else:
        assert "site-a" in text and "site-b" in text


def test_bad_ledger_options_are_config_errors() -> None:
    assert parse_ledgers(["site-a=x/y.jsonl"]) == {"site-a": Path("x/y.jsonl")}
    with pytest.raises(ConfigError, match="not SITE=PATH"):
        parse_ledgers(["site-a"])
    with pytest.raises(ConfigError, match="twice"):
        parse_ledgers(["a=1", "a=2"])


@pytest.mark.parametrize("name", ["audit.docx", "audit"])
def test_report_refuses_an_unknown_suffix_in_one_line(
    name: str,
    federation: Federation,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    out_file = tmp_path / name
    code, out, err = _medfed(
        monkeypatch,
        capsys,
        "audit",
        "report",
        "--workspace",
        str(federation.workspace_dir),
        "--out",
        str(out_file),
    )
    assert code == ConfigError.exit_code == 2
    assert not out_file.exists() and out == ""
    [line] = err.strip().splitlines()
    what = "suffix '.docx'" if name.endswith(".docx") else "no suffix"
    assert line.startswith(
        f"error[config]: --out {out_file} has {what}: the report is written as "
        ".html, .htm, .json or .pdf only (hint: "
    )
    assert "--format html|json|pdf" in line


@pytest.mark.parametrize(
    ("name", "fmt", "written"),
    [
        ("audit.PDF", None, "pdf"),
        ("audit.docx", "pdf", "pdf"),
        ("audit.html", "json", "json"),
        ("audit.htm", None, "html"),
    ],
)
def test_report_format_wins_over_the_suffix(
    name: str,
    fmt: str | None,
    written: str,
    federation: Federation,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    out_file = tmp_path / name
    args = ["--format", fmt] if fmt else []
    code, out, err = _medfed(
        monkeypatch,
        capsys,
        "audit",
        "report",
        "--workspace",
        str(federation.workspace_dir),
        "--out",
        str(out_file),
        *args,
    )
    assert code == 0, err
    assert out.startswith(f"{written} report written to {out_file}: 2 site(s)")
    assert err == ""
    data = out_file.read_bytes()
    if written == "pdf":
        assert data.startswith(b"%PDF")
    elif written == "json":
        assert json.loads(data)["verdict"] == "PASS"
    else:
        assert data.startswith(b"<!DOCTYPE html>")
