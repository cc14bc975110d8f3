"""The plain-language summary at the top: per site, the epsilon that counts, the cap, what it
means for one patient, and the other accountants below it as cross-checks."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal

import pytest
from audit_support import DELTA, Federation, lines_of, write_lines
from report_text import html_text, in_order

from medfed.audit import build_report
from medfed.audit.contents import SUMMARY_HEADING
from medfed.audit.document import Paragraph, Section
from medfed.audit.plain_language import factor, round_down, round_up
from medfed.audit.report import AuditReport
from medfed.privacy import PrivacyTerms


def _significant(value: float, digits: int, rounding: str) -> str:
    """``value`` to ``digits`` significant digits in one direction, computed with decimals."""
    rounded = Context(prec=digits, rounding=rounding).plus(Decimal(value))
    return f"{float(rounded):g}" if rounded < 1000 else f"{int(rounded):,}"


def _up(value: float) -> str:
    return _significant(value, 3, ROUND_CEILING)


def _down(value: float) -> str:
    return _significant(value, 3, ROUND_FLOOR)


def _summary(report: AuditReport) -> list[str]:
    [section] = [
        block
        for block in report.document().body.blocks
        if isinstance(block, Section) and block.heading == SUMMARY_HEADING
    ]
    return [block.text for block in section.blocks if isinstance(block, Paragraph)]


def _paragraph(paragraphs: list[str], site: str) -> int:
    [index] = [i for i, p in enumerate(paragraphs) if p.startswith(f"{site}: ")]
    return index


def test_one_paragraph_per_site_with_the_epsilon_that_counts_and_the_cap(
    federation: Federation,
) -> None:
    report = build_report(workspace=federation.workspace_dir)
    paragraphs = _summary(report)
    assert paragraphs[0].endswith("it found nothing wrong.")
    assert paragraphs[1].startswith("How to read this. ")

    for site_id in ("site-a", "site-b"):
        site = report.site(site_id)
        eps = site.epsilons
        assert site.spent is not None and site.cap == 8.0 and eps is not None
        index = _paragraph(paragraphs, site_id)
        text, checks = paragraphs[index], paragraphs[index + 1]
        assert text.startswith(f"{site_id}: For any one patient of {site_id}, what anyone can")
        assert (
            f"(epsilon {_up(site.spent)} at delta {DELTA:g}, of a cap of 8, "
            f"{_down(8.0 - site.spent)} left; rdp accountant: rdp-improved" in text
        )
        assert float(_up(site.spent)) >= site.spent
        assert float(_down(8.0 - site.spent)) <= 8.0 - site.spent
        times = Context(prec=2, rounding=ROUND_CEILING).plus(Decimal(math.exp(site.spent)))
        assert f"no outcome becomes more than {int(times):,} times as likely" in text
        assert "This covers the 8 DP-SGD step(s) of the 2 round(s) in its ledger" in text
        assert "finding" not in text

        assert checks.startswith("Cross-checks: ")
        assert checks.endswith(
            f"dp-accounting RDP {_up(eps.dp_accounting_rdp)}; dp-accounting PLD {_up(eps.pld)}; "
            f"RDP with the classic conversion of older papers {_up(eps.rdp_classic)}."
        )
        assert "Opacus RDP" not in checks  # the ledger's own accountant is no cross-check

    shown, _ = html_text(report.to_html())
    assert in_order(
        shown,
        [
            "Verdict: PASS",
            SUMMARY_HEADING,
            "How to read this.",
            paragraphs[_paragraph(paragraphs, "site-a")],
            paragraphs[_paragraph(paragraphs, "site-b")],
            "Findings",
            "Checks",
            "Site site-a",
        ],
    )


def test_a_site_above_its_cap_is_told_so_with_what_was_declared_public(
    federation: Federation,
) -> None:
    federation.change_terms("site-a", PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=3.0))
    report = build_report(workspace=federation.workspace_dir)
    paragraphs = _summary(report)
    spent = report.site("site-a").spent
    assert spent is not None and spent > 3.0

    assert paragraphs[0].startswith("The audit found 1 problem(s), listed under Findings.")
    text = paragraphs[_paragraph(paragraphs, "site-a")]
    assert f"(epsilon {_up(spent)} at delta {DELTA:g}, above the cap of 3; " in text
    assert "This is above the cap of 3 the site agreed to: it spent more privacy than it " in text
    assert (
        "Not covered, because the site declared it public and released it as it is: patients "
        "(the counts of the test federation)." in text
    )
    assert "The audit has 1 finding(s) for this site" in text
    assert "finding" not in paragraphs[_paragraph(paragraphs, "site-b")]


def test_a_ledger_that_does_not_verify_states_no_guarantee(federation: Federation) -> None:
    path = federation.copy_path("site-b")
    lines = lines_of(path)
    lines[3] = lines[3].replace(b'"steps":4', b'"steps":3')
    write_lines(path, lines)

    paragraphs = _summary(build_report(workspace=federation.workspace_dir))
    index = _paragraph(paragraphs, "site-b")
    assert paragraphs[index] == (
        "site-b: For any one patient of site-b, this report states no guarantee: the "
        "aggregator's copy of the site's ledger does not verify against the site's registered "
        "key, so the privacy record it would rest on cannot be trusted (see the findings for "
        "this site)."
    )
    assert index == len(paragraphs) - 1  # no cross-checks of a ledger that does not verify


@pytest.mark.parametrize(
    ("value", "up", "down"),
    [
        (7.16623, "7.17", "7.16"),
        (0.83377, "0.834", "0.833"),
        (7.2, "7.2", "7.2"),  # an exact value stays itself (7.2 / 0.01 is 719.999...)
        (0.0123401, "0.0124", "0.0123"),
        (1234.5, "1,240", "1,230"),
        (math.inf, "inf", "inf"),
        (None, "n/a", "n/a"),
    ],
)
def test_rounding_never_makes_a_guarantee_look_stronger(
    value: float | None, up: str, down: str
) -> None:
    assert round_up(value) == up and round_down(value) == down


def test_the_factor_is_rounded_up() -> None:
    assert factor(1.0) == "2.8"  # e = 2.718...
    assert factor(math.log(230.0) - 1e-9) == "230"
    assert factor(5.5) == "250"  # 244.69...
    assert factor(20.0) == "4.9e+08"  # 4.85e8
    assert factor(800.0) == "an astronomically large number of"
