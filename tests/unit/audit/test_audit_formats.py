"""The HTML page and the PDF hold the same report: sections, numbers, tables and plots."""

from __future__ import annotations

import html as html_lib
import json
import re
from pathlib import Path

import pytest
from audit_support import NOISE, TERMS, Federation
from report_text import (
    html_text,
    in_order,
    numbers,
    pdf_images,
    pdf_outline,
    pdf_text,
    rows_in_order,
    without,
)

from medfed.audit import build_report, figures
from medfed.audit import pdf as pdf_module
from medfed.audit.contents import SUMMARY_HEADING
from medfed.audit.document import Document, Plot, Section, Table
from medfed.audit.findings import fmt
from medfed.privacy import Release

pytest.importorskip("pypdf")


def _with_releases_and_models(federation: Federation) -> None:
    """Every kind of release at site-a, and the run's global checkpoints (models tables)."""
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
    run = federation.workspace_dir / "runs" / "run-1"
    for round_, sites in ((1, ["site-b"]), (2, ["site-a", "site-b"])):
        directory = run / "global" / f"round-{round_:04d}"
        directory.mkdir(parents=True)
        meta = {"metadata": {"round": round_, "sites": sites}, "weights": {"sha256": "ab12"}}
        (directory / "model.json").write_text(json.dumps(meta))


def test_html_and_pdf_hold_the_same_sections_numbers_and_plots(
    federation: Federation, tmp_path: Path
) -> None:
    _with_releases_and_models(federation)
    report = build_report(workspace=federation.workspace_dir)
    document = report.document()
    page = report.to_html()
    out = tmp_path / "report.pdf"
    report.write_pdf(out)
    shown, html_headings = html_text(page)
    printed = pdf_text(out)

    headings = list(document.body.headings())
    assert html_headings == headings
    assert pdf_outline(out) == headings
    assert in_order(printed, [heading for _, heading in headings])
    names = [heading for _, heading in headings]
    assert names[1] == SUMMARY_HEADING and names[2:4] == ["Findings", "Checks"]
    for site in ("site-a", "site-b"):
        assert "Models trained on this site's data (run checkpoints (global/round-NNNN))" in names
        assert f"Site {site}" in names

    # Every number, each as often: the workspace's path (which a PDF line may break) aside.
    workspace = str(report.workspace)
    html_numbers = numbers(without(shown, workspace))
    assert html_numbers == numbers(without(printed, workspace))
    site = report.site("site-a")
    for value in ("17", "0.3", "0.8", "0.6", fmt(site.rounds[-1].epsilon_after), fmt(site.cap)):
        assert html_numbers[value] > 0, value

    # Every table cell is in both, in order.
    for block in document.body.walk():
        if isinstance(block, Table):
            rows = [list(block.header)] + [
                [c if isinstance(c, str) else c.text for c in row] for row in block.rows
            ]
            assert in_order(shown, [cell for row in rows for cell in row])
            assert rows_in_order(printed, rows), block.header

    plots = [block for block in document.body.walk() if isinstance(block, Plot)]
    if figures.plots_available():
        assert len(plots) == page.count("<svg") == pdf_images(out) == 4
    # The models' checkpoints, relative to the workspace named at the top.
    assert "runs/run-1/global/round-0002" in shown and "runs/run-1/global/round-0002" in printed
    assert str(report.workspace / "runs") not in shown


def test_the_site_column_never_wraps(federation: Federation, tmp_path: Path) -> None:
    report = build_report(workspace=federation.workspace_dir)
    page = report.to_html()
    assert '<th class="nowrap">site</th>' in page
    assert page.count('<td class="nowrap">site-a</td>') == sum(
        1 for check in report.verification.checks if check.site_id == "site-a"
    )
    out = tmp_path / "report.pdf"
    report.write_pdf(out)
    printed = pdf_text(out)
    assert "site-a" in printed and "site- a" not in printed and "site- b" not in printed


def test_plots_left_out_in_both_formats_without_matplotlib(
    federation: Federation, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(figures, "plots_available", lambda: False)
    report = build_report(workspace=federation.workspace_dir)
    page = report.to_html()
    out = tmp_path / "report.pdf"
    report.write_pdf(out)
    assert "<svg" not in page and html_lib.escape(figures.NO_PLOTS) in page
    assert pdf_images(out) == 0 and figures.NO_PLOTS in pdf_text(out)
    assert "Plots" not in [heading for _, heading in report.document().body.headings()]


def test_core_fonts_print_what_they_cannot_show_as_a_question_mark(
    federation: Federation, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    federation.train("site-b", run="r\u00e9union\u2192x", round_=1)
    report = build_report(workspace=federation.workspace_dir)
    unicode_out, core_out = tmp_path / "unicode.pdf", tmp_path / "core.pdf"
    report.write_pdf(unicode_out)
    monkeypatch.setattr(pdf_module, "unicode_fonts", lambda: None)
    report.write_pdf(core_out)

    assert "r\u00e9union\u2192x" in pdf_text(unicode_out)
    core = pdf_text(core_out)
    assert "r\u00e9union?x" in core and "\u2192" not in core
    assert numbers(core) == numbers(pdf_text(unicode_out))


def test_tables_wider_than_the_page_are_fitted_to_it(tmp_path: Path) -> None:
    """Cells far wider than the page, at many widths: every one is laid out, none is lost, and
    only the long words (a hash, a URI) are broken, never the short ones beside them."""
    short = ("demo", "medfed-demo", "1", "site-a, site-b")
    for length in range(20, 80, 7):
        long = (f"{'a' * length}0", f"models:/m-{'b' * length}1")
        document = Document(
            title="wide",
            body=Section(
                heading="Wide tables",
                level=1,
                blocks=(
                    Table(
                        header=("run_name", "name", "version", "sites", "run_id", "source"),
                        rows=((*short, *long), (*short, *reversed(long))),
                        numeric=frozenset({2}),
                        nowrap=frozenset({2}),
                    ),
                ),
            ),
        )
        out = tmp_path / f"wide-{length}.pdf"
        out.write_bytes(pdf_module.pdf_bytes(document))
        printed = pdf_text(out)
        assert in_order(printed, ["run_name", "name", "version", "sites", "run_id", "source"])
        assert rows_in_order(printed, [list(short), list(short)]), length
        for cell in long:  # its characters in order, across the lines it was broken into
            assert re.search(r"\s?".join(map(re.escape, cell)), printed), (length, cell)
