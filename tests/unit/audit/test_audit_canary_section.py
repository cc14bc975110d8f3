"""The report includes `medfed audit canary` results: a table per result, in HTML, PDF and JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from audit_support import Federation
from report_text import html_text, pdf_text, rows_in_order

from medfed.audit import build_report
from medfed.audit.canary import HONEST, LOWER_BOUND_NOTE
from medfed.cli.app import main
from medfed.errors import ConfigError


def _result(site_id: str, *, claimed: float, bound: float, correct: int = 31) -> dict[str, Any]:
    """A result document in the schema `medfed audit canary` writes."""
    return {
        "claimed_epsilon": claimed,
        "empirical_epsilon_lower_bound": bound,
        "confidence": 0.95,
        "canaries": 200,
        "violated": bound > claimed,
        "schema": "medfed.canary-audit/1",
        "site_id": site_id,
        "run_id": "canary-audit-20261201T101500Z",
        "created": "2026-12-01T10:15:00+00:00",
        "score": "gradient",
        "guesses": 40,
        "correct": correct,
        "guess_counts": [10, 20, 40],
        "included_canaries": 97,
        "target_epsilon": 2.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "sample_rate": 0.04,
        "noise_multiplier": 1.37,
        "max_grad_norm": 1.0,
        "steps": 120,
        "ledger": "/site/audit/canary-20261201T101500Z/ledger.jsonl",
        "seconds": 12.5,
        "reference": "Steinke, Nasr, Jagielski 2023",
    }


def _write(directory: Path, document: dict[str, Any], name: str = "canary-1.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_an_honest_result_beside_a_site_ledger_is_in_html_pdf_and_json(
    federation: Federation, tmp_path: Path
) -> None:
    ledger = federation.site_ledger("site-a").path
    _write(ledger.parent / "audit", _result("site-a", claimed=2.0, bound=0.4125))
    report = build_report(workspace=federation.workspace_dir, site_ledgers={"site-a": ledger})
    assert report.verification.passed
    assert [c.detail for c in report.verification.checks if c.name == "canary-audit"] == [
        "lower bound 0.4125 <= claimed epsilon 2 "
        f"(31/40 correct; {ledger.parent / 'audit' / 'canary-1.json'})"
    ]
    rows = [
        ["claimed epsilon (the audit run's own)", "2"],
        ["empirical lower bound at confidence 0.95", "0.4125"],
        ["canaries", "200"],
        ["correct guesses / guesses", "31 / 40"],
        ["score kind", "gradient"],
        ["date", "2026-12-01T10:15:00+00:00"],
    ]
    page, headings = html_text(report.to_html())
    pdf = tmp_path / "audit.pdf"
    report.write_pdf(pdf)
    printed = pdf_text(pdf)
    for shown in (page, printed):
        assert rows_in_order(shown, rows), shown
        assert HONEST in shown
        assert LOWER_BOUND_NOTE.split(",")[0] in shown
        assert "found no more privacy loss than its run claimed" in shown
    site_a = headings.index((2, "Site site-a"))
    assert headings[site_a + 1 :].index(
        (3, "Empirical privacy audit: canary-audit-20261201T101500Z")
    ) < headings[site_a + 1 :].index((2, "Site site-b"))
    data = json.loads(report.to_json_text())
    assert len(data["canary_audits"]) == 1
    assert data["canary_audits"][0]["empirical_epsilon_lower_bound"] == 0.4125
    assert data["canary_audits"][0]["violated"] is False


def test_a_violated_result_is_a_finding_and_says_so(federation: Federation) -> None:
    path = _write(federation.root / "handed", _result("site-b", claimed=2.0, bound=5.25))
    report = build_report(workspace=federation.workspace_dir, canary_results=[path])
    findings = report.verification.findings
    assert [f.check for f in findings] == ["canary-audit"]
    assert findings[0].site_id == "site-b"
    assert (
        findings[0]
        .one_line()
        .startswith(
            f"FINDING [canary-audit] site site-b: {path}: VIOLATED: the empirical lower bound 5.25 "
            "at confidence 0.95 exceeds the claimed epsilon 2"
        )
    )
    assert report.verification.verdict == "FAIL"
    assert report.site("site-b").findings == (findings[0],)
    page, _ = html_text(report.to_html())
    assert page.count("VIOLATED: the empirical lower bound 5.25") == 3  # findings, site, table
    assert (
        "measured more privacy loss than its run claimed (at least epsilon 5.25 against 2" in page
    )
    assert json.loads(report.to_json_text())["canary_audits"][0]["violated"] is True


def test_a_result_of_a_site_not_in_the_report_has_its_own_section(
    federation: Federation,
) -> None:
    path = _write(federation.root / "handed", _result("site-z", claimed=2.0, bound=0.1))
    report = build_report(workspace=federation.workspace_dir, canary_results=[path])
    page, headings = html_text(report.to_html())
    assert headings[-2:] == [
        (2, "Empirical privacy audit"),
        (3, "Site site-z (not in this report): canary-audit-20261201T101500Z"),
    ]
    assert HONEST in page


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (
            {**_result("site-a", claimed=2.0, bound=0.4), "schema": "x/1"},
            "schema 'x/1', not 'medfed.canary-audit/1'",
        ),
        (
            {k: v for k, v in _result("site-a", claimed=2.0, bound=0.4).items() if k != "score"},
            "missing or invalid: score (text)",
        ),
        (
            {**_result("site-a", claimed=2.0, bound=0.4), "claimed_epsilon": "2"},
            "missing or invalid: claimed_epsilon (a finite number)",
        ),
        (_result("site-a", claimed=2.0, bound=0.4, correct=41), "correct 41 > guesses 40"),
    ],
)
def test_a_malformed_named_file_is_one_error_naming_it(
    federation: Federation, document: dict[str, Any], problem: str
) -> None:
    path = _write(federation.root / "handed", document)
    with pytest.raises(ConfigError) as raised:
        build_report(workspace=federation.workspace_dir, canary_results=[path])
    assert str(raised.value) == f"--canary {path}: not a canary audit result: {problem}"


def test_a_malformed_file_beside_a_ledger_is_a_finding(federation: Federation) -> None:
    ledger = federation.site_ledger("site-a").path
    path = ledger.parent / "audit" / "canary-2.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json", encoding="utf-8")
    report = build_report(workspace=federation.workspace_dir, site_ledgers={"site-a": ledger})
    [finding] = report.verification.findings
    assert (finding.site_id, finding.check, finding.source) == ("site-a", "canary-audit", str(path))
    assert finding.problem.startswith("not a canary audit result: unreadable (JSONDecodeError")


def test_cli_canary_option(
    federation: Federation,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    path = _write(federation.root / "handed", _result("site-a", claimed=2.0, bound=0.4125))
    out_file = tmp_path / "audit.json"
    base = ["medfed", "audit", "report", "--workspace", str(federation.workspace_dir)]
    monkeypatch.setattr(sys, "argv", [*base, "--out", str(out_file), "--canary", str(path)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code in (0, None), capsys.readouterr()
    data = json.loads(out_file.read_text())
    assert [a["source"] for a in data["canary_audits"]] == [str(path)]
    assert data["verdict"] == "PASS"

    broken = _write(federation.root / "handed", {"schema": "medfed.canary-audit/1"}, "bad.json")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [*base, "--out", str(out_file), "--canary", str(broken)])
    with pytest.raises(SystemExit) as exited:
        main()
    _, err = capsys.readouterr()
    assert exited.value.code == ConfigError.exit_code
    assert "Traceback" not in err
    assert f"--canary {broken}: not a canary audit result: missing or invalid: " in err
