"""build_report: the per-site privacy statement in JSON, self-contained HTML and PDF."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from audit_support import CAP, DELTA, NOISE, SAMPLE_RATE, STEPS, Federation, lines_of
from report_text import pdf_text, rows_in_order

from medfed.audit import build_report, figures, verify_workspace
from medfed.audit.findings import fmt


def test_the_statement_holds_what_an_auditor_needs(federation: Federation) -> None:
    report = build_report(workspace=federation.workspace_dir)
    data = json.loads(report.to_json_text())

    assert data["verdict"] == "PASS" and set(data["sites"]) == {"site-a", "site-b"}
    site = data["sites"]["site-a"]
    assert site["privacy_unit"].startswith("patient")
    assert site["adjacency"] == "add/remove one patient"
    assert "Poisson" in site["sampling"] and site["sample_rates"] == [SAMPLE_RATE]
    assert site["noise_multipliers"] == [NOISE] and site["clipping_norms"] == [1.0]
    assert site["released_patient_counts"] == [] and site["releases"] == []
    assert site["terms"] == ["terms set at seq 0: cap 8 at delta 1e-05 (rdp)"]
    assert site["accountant"] == "rdp" and "model weights" in site["declared_public"]
    assert site["steps_total"] == 2 * STEPS
    assert site["delta"] == DELTA and site["epsilon_cap"] == CAP.epsilon
    assert site["rounds_participated"] == 2 and site["runs"] == {"run-1": [1, 2]}
    assert site["ledger_accountants"] == {
        "rdp": "rdp-improved (Balle et al. 2020; Opacus default orders)"
    }
    eps = site["epsilon"]
    assert site["epsilon_spent"] == eps["opacus_rdp"]
    assert site["epsilon_remaining"] == pytest.approx(CAP.epsilon - eps["opacus_rdp"])
    assert {"opacus_rdp", "dp_accounting_rdp", "pld", "accountants"} <= set(eps)
    assert "dp-accounting RdpAccountant" in eps["accountants"]["dp_accounting_rdp"]
    [versions] = site["library_versions"]
    assert "opacus" in versions["versions"] and versions["seqs"] == [1, 3]
    curve = [row["epsilon_after"] for row in site["rounds"]]
    assert curve[0] < curve[1] == eps["opacus_rdp"]
    assert [p["round"] for p in site["dice_vs_epsilon"]] == [1, 2]
    summary = json.loads((federation.workspace_dir / "runs/run-1/summary.json").read_text())
    assert site["epsilon_spent"] == pytest.approx(summary["sites"][0]["epsilon_spent"], rel=1e-12)
    assert data["verification"]["findings"] == []


def test_html_is_self_contained_and_escaped(federation: Federation) -> None:
    federation.train("site-b", run="<script>alert(1)</script>", round_=1)
    html = build_report(workspace=federation.workspace_dir).to_html()

    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert '<link rel="stylesheet"' not in html
    for site in ("site-a", "site-b"):
        assert f'<section id="site-{site}">' in html
    if figures.plots_available():
        assert html.count("<svg") == 4  # epsilon and Dice per site


def test_findings_are_embedded(federation: Federation) -> None:
    path = federation.copy_path("site-a")
    path.write_bytes(path.read_bytes().replace(b'"steps":4', b'"steps":3', 1))

    report = build_report(workspace=federation.workspace_dir)
    assert report.verification.verdict == "FAIL"
    site = report.site("site-a")
    assert not site.verified and site.rounds == () and len(site.findings) == 1
    html = report.to_html()
    assert "FINDING [ledger-copy] site site-a: ledgers/site-a.ledger.jsonl: line 2 (seq 1)" in html
    assert report.to_json()["sites"]["site-a"]["findings"][0]["line"] == 2


def test_models_come_from_the_runs_checkpoints_without_mlflow(federation: Federation) -> None:
    run = federation.workspace_dir / "runs" / "run-1"
    for round_, sites in ((1, ["site-b"]), (2, ["site-a", "site-b"])):
        directory = run / "global" / f"round-{round_:04d}"
        directory.mkdir(parents=True)
        meta = {"metadata": {"round": round_, "sites": sites}, "weights": {"sha256": "ab"}}
        (directory / "model.json").write_text(json.dumps(meta))
    summary = json.loads((run / "summary.json").read_text())
    summary["model"] = str(run / "global" / "round-0002")
    (run / "summary.json").write_text(json.dumps(summary))

    report = build_report(workspace=federation.workspace_dir)
    a, b = report.site("site-a"), report.site("site-b")
    assert a.models_source.startswith("run checkpoints")
    assert [(m["round"], m["direct"], m["final"]) for m in a.models] == [(2, True, True)]
    assert [(m["round"], m["direct"]) for m in b.models] == [(1, True), (2, True)]


def test_a_runs_moving_average_is_listed_as_one_and_marked_final(federation: Federation) -> None:
    run = federation.workspace_dir / "runs" / "run-1"
    for round_ in (1, 2):
        directory = run / "global" / f"round-{round_:04d}"
        directory.mkdir(parents=True)
        meta = {"metadata": {"round": round_, "sites": ["site-a"]}, "weights": {"sha256": "ab"}}
        (directory / "model.json").write_text(json.dumps(meta))
    ema = run / "ema-model"
    ema.mkdir()
    meta = {"metadata": {"ema": {"decay": 0.9, "rounds": [1, 2]}}, "weights": {"sha256": "cd"}}
    (ema / "model.json").write_text(json.dumps(meta))
    summary = json.loads((run / "summary.json").read_text())
    summary["model"] = str(ema)
    (run / "summary.json").write_text(json.dumps(summary))

    models = build_report(workspace=federation.workspace_dir).site("site-a").models
    assert [(m["round"], m["final"]) for m in models] == [
        (1, False),
        (2, False),
        ("moving average (EMA, decay 0.9) of rounds 1-2", True),
    ]
    assert models[-1]["sha256"] == "cd"
    # a site none of whose rounds the average holds is not listed under it
    assert all("moving average" not in str(m["round"]) for m in _models_of(federation, "site-b"))


def _models_of(federation: Federation, site: str) -> list[dict[str, object]]:
    return list(build_report(workspace=federation.workspace_dir).site(site).models)


def test_without_matplotlib_plots_are_left_out_with_a_note(
    federation: Federation, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(figures, "plots_available", lambda: False)
    report = build_report(workspace=federation.workspace_dir)
    html = report.to_html()
    assert "<svg" not in html and "matplotlib is not installed" in html
    # The PDF needs no matplotlib: it is written, with the same note instead of the plots.
    report.write_pdf(tmp_path / "report.pdf")
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF")


def test_pdf_report(federation: Federation, tmp_path: Path) -> None:
    pypdf = pytest.importorskip("pypdf")
    out = tmp_path / "out" / "report.pdf"
    report = build_report(workspace=federation.workspace_dir)
    report.write_pdf(out)
    assert out.read_bytes().startswith(b"%PDF")
    metadata = pypdf.PdfReader(out).metadata
    assert metadata is not None
    assert metadata.title == f"medfed privacy audit: {report.workspace}"
    text = pdf_text(out)
    for site in ("site-a", "site-b"):
        statement = report.site(site)
        assert f"Site {site}" in text
        rows = [
            [
                f"epsilon spent ({statement.accountant}, the ledger's accountant)",
                fmt(statement.spent),
            ],
            ["cap / remaining", f"{fmt(statement.cap)} / {fmt(statement.remaining)}"],
        ]
        assert rows_in_order(text[text.index(f"Site {site}") :], rows)


def test_report_and_verify_agree(federation: Federation) -> None:
    lines = lines_of(federation.copy_path("site-b"))
    result = verify_workspace(workspace=federation.workspace_dir)
    report = build_report(workspace=federation.workspace_dir)
    assert report.verification.to_json() == result.to_json()
    assert len(report.site("site-b").rounds) == len(lines) // 2


def test_every_released_quantity_is_listed_with_its_mechanism_and_unit(
    federation: Federation,
) -> None:
    from audit_support import TERMS

    from medfed.privacy import Release

    ledger = federation.site_ledger("site-a")
    committed = ledger.verify().reservations[-1]
    for release in (
        Release(
            run_id="run-1",
            round=2,
            quantity="patients",
            values={"train": 17, "validation": 5},
            mechanism="gaussian",
            noise_multiplier=5.0,
            sensitivity=1.0,
            noise_std=5.0,
        ),
        Release(
            run_id="run-1",
            round=2,
            quantity="train_loss",
            values={"loss": 0.8},
            mechanism="dp-sgd",
            noise_multiplier=NOISE,
            sensitivity=2.0,
            noise_std=0.3,
            reservation_seq=committed.seq,
        ),
        Release(
            run_id="run-1",
            round=2,
            quantity="validation_dice",
            values={"dice": 0.6},
            mechanism="public",
            reason="a published benchmark set",
        ),
    ):
        ledger.release(release=release, terms=TERMS)
    federation.send("site-a")

    report = build_report(workspace=federation.workspace_dir)
    site = report.to_json()["sites"]["site-a"]
    rows = {row["quantity"]: row for row in site["releases"]}
    assert set(rows) == {"patients", "train_loss", "validation_dice"}
    assert all(row["unit"] == "patient" for row in rows.values())
    assert rows["patients"]["mechanism"] == "gaussian"
    assert "charged as one unsampled Gaussian step" in rows["patients"]["cover"]
    assert f"reservation seq {committed.seq}" in rows["train_loss"]["cover"]
    assert rows["validation_dice"]["cover"].endswith("a published benchmark set")
    assert site["released_patient_counts"] == [
        {"seq": rows["patients"]["seq"], "train": 17.0, "validation": 5.0}
    ]
    html = report.to_html()
    assert "Released quantities" in html and "a published benchmark set" in html
    assert "charged as one unsampled Gaussian step" in html
    # The Gaussian release is in the epsilon the report states, and verification still passes.
    assert report.verification.passed, [f.one_line() for f in report.verification.findings]
