"""A report of hundreds of sites stays small: federation-wide tables, a section per finding.

The federation's two real sites are verified as always; the others are copies of site-a's
verified statement under other names, with their epsilon spread over the cap, so that the
report is drawn at the size of a large federation without provisioning hundreds of sites.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path

import pytest
from audit_support import (
    CAP,
    NOISE,
    SAMPLE_RATE,
    STEPS,
    TERMS,
    Federation,
    lines_of,
    write_lines,
)
from report_text import html_text, pdf_text

from medfed.aggregator.budget import BudgetTracker
from medfed.aggregator.finish import write_report
from medfed.audit import build_report
from medfed.audit.overview import DETAIL_LIMIT, MAX_LISTED, NEAR_CAP_SHARE
from medfed.audit.report import AuditReport
from medfed.privacy import RoundPlan
from medfed.transport.provision import provision_workspace

SITES = 240
MAX_BYTES = 5_000_000


def _large(federation: Federation, *, sites: int = SITES) -> AuditReport:
    """site-b's copy tampered with (a real finding); ``sites - 2`` copies of site-a besides."""
    path = federation.copy_path("site-b")
    lines = lines_of(path)
    lines[3] = lines[3].replace(b'"noise_multiplier":1.1', b'"noise_multiplier":5.0')
    write_lines(path, lines)
    report = build_report(workspace=federation.workspace_dir)
    model = report.site("site-a")
    copies = []
    for index in range(sites - 2):
        # Spent from 60% to 100% of the cap, spread evenly: a quarter near it.
        spent = CAP.epsilon * (0.6 + 0.4 * index / (sites - 3))
        copies.append(
            dataclasses.replace(model, site_id=f"virtual-{index:04d}", epsilon_spent=spent)
        )
    checks = tuple(
        dataclasses.replace(check, site_id=copy.site_id)
        for copy in copies
        for check in report.verification.checks
        if check.site_id == "site-a"
    )
    verification = dataclasses.replace(
        report.verification, checks=(*report.verification.checks, *checks)
    )
    return dataclasses.replace(report, sites=(*report.sites, *copies), verification=verification)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_large_federation_gets_a_bounded_report_that_names_its_findings(
    federation: Federation, tmp_path: Path
) -> None:
    pytest.importorskip("pypdf")
    report = _large(federation)
    assert len(report.sites) == SITES > DETAIL_LIMIT

    started = time.monotonic()
    files = report.write_files(tmp_path / "audit")
    seconds = time.monotonic() - started

    assert seconds < 60
    assert files.html.stat().st_size < MAX_BYTES and files.pdf.stat().st_size < MAX_BYTES
    page, headings = html_text(files.html.read_text(encoding="utf-8"))
    pdf = pdf_text(files.pdf)
    for text in (page, pdf):
        # The site with a finding has its own section and its finding, by name.
        assert "Site site-b" in text and "FINDING [ledger-copy] site site-b" in text
        # Sites without a finding have none, and the report says where their detail is.
        assert "Site site-a" not in text and "Site virtual-0000" not in text
        assert f"This federation has {SITES} sites, more than {DETAIL_LIMIT}" in text
        assert "audit_report.json" in text and "audit_sites.csv" in text
    site_sections = [h for level, h in headings if level == 2 and h.startswith("Site ")]
    assert site_sections == ["Site site-b"]
    # The sites near their cap are named (the most spent first), up to the limit.
    near = [
        s for s in report.sites if s.spent is not None and s.spent >= NEAR_CAP_SHARE * CAP.epsilon
    ]
    assert len(near) > MAX_LISTED
    most = max(near, key=lambda s: s.spent or 0.0)
    assert most.site_id in page and "Sites near their cap" in page
    assert f"{len(near)} sites in all; the {MAX_LISTED} with the largest share" in page
    # Checks are counted per kind, not listed per site.
    assert f"ledger copy {SITES - 1} e.g. site" in page

    rows = list(csv.DictReader(io.StringIO(files.csv.read_text(encoding="utf-8"))))
    assert len(rows) == SITES
    by_site = {row["site_id"]: row for row in rows}
    assert (
        by_site["site-b"]["findings"] != "0"
        and "ledger-copy" in by_site["site-b"]["finding_checks"]
    )
    assert float(by_site[most.site_id]["epsilon_spent"]) == pytest.approx(most.spent)
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert len(data["sites"]) == SITES and data["verdict"] == "FAIL"


def test_a_small_federation_keeps_a_section_per_site(
    federation: Federation, tmp_path: Path
) -> None:
    files = build_report(workspace=federation.workspace_dir).write_files(tmp_path, pdf=False)

    page, headings = html_text(files.html.read_text(encoding="utf-8"))
    assert [h for level, h in headings if level == 2 and h.startswith("Site")] == [
        "Site site-a",
        "Site site-b",
    ]
    assert "This federation has" not in page and files.csv.is_file() and not files.pdf.exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_run_report_of_two_hundred_signed_ledgers(tmp_path: Path) -> None:
    """The finish step's report over 200 provisioned sites, each with a real signed ledger."""
    pytest.importorskip("pypdf")
    sites = [f"site-{index:03d}" for index in range(200)]
    root = tmp_path / "fed"
    provision_workspace(out=root / "workspace", sites=sites, host="127.0.0.1")
    federation = Federation(root=root)
    ws = federation.workspace
    tracker = BudgetTracker(
        directory=ws.root / "ledgers",
        public_keys={site: ws.ledger_public_key(site) for site in sites},
    )
    plan = RoundPlan(
        run_id="run-1",
        round=1,
        planned_rounds=10,
        steps=STEPS,
        sample_rate=SAMPLE_RATE,
        noise_multiplier=NOISE,
        max_grad_norm=1.0,
    )
    for site in sites:
        ledger = federation.site_ledger(site)
        ledger.commit(ledger.reserve(plan=plan, terms=TERMS), steps=STEPS)
        lines = ledger.path.read_text(encoding="ascii").splitlines()
        tracker.receive(site_id=site, first_seq=0, lines=lines)
    budgets = tracker.state_json()
    run = ws.layout.run("run-1")
    run.directory.mkdir(parents=True)
    events = [{"event": "run_started", "run_name": "run-1"}] + [
        {
            "event": "site_update",
            "run_name": "run-1",
            "site": site,
            "round": 1,
            "dice_before": 0.5,
            "epsilon_spent": budgets["sites"][site]["epsilon_spent"],
        }
        for site in sites
    ]
    run.events.write_text("".join(json.dumps(event) + "\n" for event in events))
    summary = {"run_name": "run-1", "status": "finished", "budgets": budgets, "sites": []}
    (run.directory / "summary.json").write_text(json.dumps(summary))
    # The aggregator's copy of one site's ledger edited after the fact: a finding.
    copy = federation.copy_path("site-123")
    lines = lines_of(copy)
    lines[1] = lines[1].replace(b'"steps":4', b'"steps":1')
    write_lines(copy, lines)

    started = time.monotonic()
    report = write_report(layout=ws.layout, run_name="run-1", sites=sites, budget_state=budgets)
    seconds = time.monotonic() - started

    audit = report / "audit"
    html = (audit / "audit_report.html").read_text(encoding="utf-8")
    sizes = {path.name: path.stat().st_size for path in audit.iterdir()}
    assert sizes["audit_report.html"] < MAX_BYTES and sizes["audit_report.pdf"] < MAX_BYTES
    assert seconds < 120, seconds
    page, headings = html_text(html)
    assert [h for level, h in headings if level == 2 and h.startswith("Site ")] == ["Site site-123"]
    assert "FINDING [ledger-copy] site site-123" in page
    assert "FINDING [ledger-copy] site site-123" in pdf_text(audit / "audit_report.pdf")
    rows = list(csv.DictReader(io.StringIO((audit / "audit_sites.csv").read_text())))
    assert len(rows) == 200 and {r["site_id"] for r in rows if r["findings"] != "0"} == {"site-123"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_when_many_sites_have_findings_each_is_shown_without_plots(
    federation: Federation, tmp_path: Path
) -> None:
    report = _large(federation, sites=DETAIL_LIMIT + 70)
    finding = report.site("site-b").findings[0]
    flagged = tuple(
        dataclasses.replace(site, findings=(dataclasses.replace(finding, site_id=site.site_id),))
        for site in report.sites
    )
    report = dataclasses.replace(report, sites=flagged)

    files = report.write_files(tmp_path, pdf=False)

    page, headings = html_text(files.html.read_text(encoding="utf-8"))
    assert len([h for level, h in headings if level == 2 and h.startswith("Site ")]) == len(flagged)
    assert all(f"Site {site.site_id}" in page for site in flagged)
    # One plot for the federation, none per site: the sections keep their tables.
    assert files.html.read_text(encoding="utf-8").count("<svg") == 1
    assert files.html.stat().st_size < MAX_BYTES
