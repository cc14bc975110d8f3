"""The report's summary for readers who are not privacy experts: what each site's guarantee
means for one of its patients.

One paragraph per site states the epsilon that counts (the ledger's own accountant, at the
ledger's delta, over everything the ledger charges) against the site's cap, and what that
bounds; the other accountants' values follow as cross-checks. Epsilon is rounded *up* and
what remains of the cap *down*, so that rounding never makes a guarantee look stronger than
the exact numbers in the tables further down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final

from medfed.audit.canary import CanaryAudit
from medfed.audit.document import Paragraph, Span, text
from medfed.audit.findings import fmt
from medfed.audit.statement import SiteStatement
from medfed.privacy.accounting import conversion_of

DIGITS: Final = 3
# The recomputed value of the same computation as the ledger's accountant is no cross-check.
_SAME_AS_LEDGER: Final[dict[str, str]] = {
    "rdp": "opacus_rdp",
    "rdp-classic": "rdp_classic",
    "pld": "pld",
}
_CROSS_CHECKS: Final[tuple[tuple[str, str], ...]] = (
    ("opacus_rdp", "Opacus RDP"),
    ("dp_accounting_rdp", "dp-accounting RDP"),
    ("pld", "dp-accounting PLD"),
    ("rdp_classic", "RDP with the classic conversion of older papers"),
)

READING_GUIDE: Final = (
    "Each site protects its patients with differential privacy, and the unit it protects is "
    "the patient: one patient's images and labels, in the site's data or left out of it. "
    "Epsilon bounds how much that choice can change anything the federation released from the "
    "site (the model weights of every round, and every count, loss or Dice the site released "
    "through a privacy mechanism): no outcome becomes more than e^epsilon times as likely, or "
    "less likely by that factor, apart from a probability of at most delta. Smaller is "
    "stronger. At epsilon 1 the factor is about 2.7, and each further unit of epsilon "
    "multiplies it by about 2.7 again, so a larger epsilon is a much weaker promise. It is a "
    "worst-case bound, for the most exposed patient and an attacker who knows every other "
    "patient's data; it does not measure what anyone actually learned, and a large epsilon is "
    "not evidence that anything leaked. Epsilon adds up over every round and run that used a "
    "site's data, and the cap is what the site agreed to spend on that data in total."
)


def verdict_paragraph(*, findings: int) -> Paragraph:
    """One sentence on whether the record behind the statements below holds."""
    if not findings:
        return text(
            "The audit checked every site's signed privacy record against the site's registered "
            "key, recomputed each epsilon with two independent libraries and compared it with "
            "what the runs reported and with each site's cap: it found nothing wrong."
        )
    return Paragraph(
        spans=(
            Span(
                text=f"The audit found {findings} problem(s), listed under Findings. ", style="fail"
            ),
            Span(
                text="A statement below about a site with findings may not hold: read them "
                "before relying on it."
            ),
        )
    )


def reading_guide() -> Paragraph:
    return Paragraph(
        spans=(Span(text="How to read this. ", style="strong"), Span(text=READING_GUIDE))
    )


def summary_paragraphs(
    site: SiteStatement, *, canary_audits: Sequence[CanaryAudit] = ()
) -> tuple[Paragraph, ...]:
    """The site's paragraph, then its cross-checks (when epsilon could be recomputed)."""
    lead = Span(text=f"{site.site_id}: ", style="strong")
    spans = [lead, Span(text=_guarantee(site))]
    spans += [_canary_outcome(audit) for audit in canary_audits]
    paragraphs = [Paragraph(spans=tuple(spans))]
    checks = cross_checks(site)
    if checks:
        paragraphs.append(text(checks, "note"))
    return tuple(paragraphs)


def _guarantee(site: SiteStatement) -> str:
    who = f"For any one patient of {site.site_id}"
    if not site.verified:
        return (
            f"{who}, this report states no guarantee: the aggregator's copy of the site's ledger "
            "does not verify against the site's registered key, so the privacy record it "
            "would rest on cannot be trusted (see the findings for this site)."
        )
    spent, delta = site.spent, site.delta
    if spent is None or delta is None:
        return (
            f"{who}, this report states no guarantee: the ledger names no delta, so no "
            "epsilon can be computed (see the findings for this site)."
        )
    if math.isinf(spent):
        return (
            f"{who}, this report states no guarantee: the ledger's accountant "
            f"({site.accountant}) finds no finite epsilon for what the site released, so "
            "nothing bounds what could be learned about a patient."
        )
    accountant = f"{site.accountant} accountant: {conversion_of(site.accountant)}"
    if spent == 0:
        sentence = (
            f"{who}, nothing the site released has cost any privacy yet: its ledger charges no "
            f"step, so epsilon is 0 at delta {fmt(delta)}{_cap(site)} ({accountant})"
        )
    else:
        sentence = (
            f"{who}, what anyone can learn about that patient from everything this federation "
            f"released from {site.site_id}'s data is bounded (epsilon {round_up(spent)} at "
            f"delta {fmt(delta)}{_cap(site)}; {accountant}): no outcome becomes more than "
            f"{factor(spent)} times as likely with that patient's data than without it, or the "
            f"other way round, apart from a probability of at most {fmt(delta)}"
        )
    parts = [sentence + ".", _coverage(site)]
    if spent > 0 and site.cap is None:
        parts.append("The ledger's terms name no cap, so the site agreed to no limit.")
    elif site.cap is not None and spent > site.cap:
        parts.append(
            f"This is above the cap of {fmt(site.cap)} the site agreed to: it spent more "
            "privacy than it promised."
        )
    public = _public(site)
    if public:
        parts.append(public)
    if site.findings:
        parts.append(
            f"The audit has {len(site.findings)} finding(s) for this site, listed in its "
            "section; read them before relying on this statement."
        )
    return " ".join(parts)


def _canary_outcome(audit: CanaryAudit) -> Span:
    """One sentence on an empirical audit of the site's training code (``medfed audit canary``)."""
    lead = (
        f" An empirical privacy audit of the site's training code ({audit.run_id}, "
        f"{audit.created}, {audit.canaries} synthetic canary patients) "
    )
    if audit.violated:
        return Span(
            text=lead + f"measured more privacy loss than its run claimed (at least epsilon "
            f"{round_down(audit.lower_bound)} against {round_up(audit.claimed_epsilon)}, at "
            f"confidence {fmt(audit.confidence)}): the training code does not give the "
            "protection its ledger records, so the guarantee above may not hold.",
            style="fail",
        )
    return Span(
        text=lead + "found no more privacy loss than its run claimed; such an audit catches "
        "gross errors in the training code, it does not prove the guarantee."
    )


def _cap(site: SiteStatement) -> str:
    if site.cap is None or site.spent is None:
        return ""
    if site.spent > site.cap:
        return f", above the cap of {fmt(site.cap)}"
    return f", of a cap of {fmt(site.cap)}, {round_down(site.cap - site.spent)} left"


def _coverage(site: SiteStatement) -> str:
    steps = sum(row.reservation.counted_steps for row in site.rounds)
    runs = ", ".join(site.runs) or "none"
    gaussian = sum(1 for row in site.releases if row.release.mechanism == "gaussian")
    text_ = (
        f"This covers the {steps} DP-SGD step(s) of the {len(site.rounds)} round(s) in its "
        f"ledger (run(s): {runs})"
    )
    if gaussian:
        text_ += f" and its {gaussian} release(s) through a Gaussian mechanism"
    return text_ + ", all accounted together as one history."


def _public(site: SiteStatement) -> str:
    """What the site declared public: disclosed as is, so no epsilon covers it."""
    declared = [
        f"{row.release.quantity} ({row.release.reason})"
        for row in site.releases
        if row.release.mechanism == "public"
    ]
    if not declared:
        return ""
    unique = list(dict.fromkeys(declared))
    return (
        "Not covered, because the site declared it public and released it as it is: "
        + "; ".join(unique)
        + "."
    )


def cross_checks(site: SiteStatement) -> str:
    """The other accountants' epsilons of the aggregator's copy, in one sentence."""
    if site.epsilons is None:
        return ""
    values = site.epsilons.to_json()
    same = _SAME_AS_LEDGER.get(site.accountant)
    found = [
        f"{label} {round_up(values[name])}"
        for name, label in _CROSS_CHECKS
        if name != same and values[name] is not None
    ]
    if not found:
        return ""
    return (
        "Cross-checks: the same ledger recomputed independently with other accountants, which "
        "differ by method, not by error (PLD is the tightest bound, the classic conversion of "
        f"older papers the loosest; the checks below compare them): {'; '.join(found)}."
    )


def round_up(value: float | None, digits: int = DIGITS) -> str:
    """``value`` to ``digits`` significant digits, never below it."""
    return _rounded(value, digits, math.ceil)


def round_down(value: float | None, digits: int = DIGITS) -> str:
    """``value`` to ``digits`` significant digits, never above it."""
    return _rounded(value, digits, math.floor)


def _rounded(value: float | None, digits: int, direction: Callable[[float], int]) -> str:
    if value is None or math.isinf(value) or value == 0:
        return fmt(value)
    rounded = _significant(value, digits, direction)
    if abs(rounded) >= 10**digits:
        return f"{rounded:,.0f}"  # 1,240 reads better than 1.24e+03
    return f"{rounded:.{digits}g}"


def _significant(value: float, digits: int, direction: Callable[[float], int]) -> float:
    scale = 10.0 ** (math.floor(math.log10(abs(value))) - digits + 1)
    scaled = value / scale
    # An exact value stays itself: 7.2 / 0.01 is 719.9999..., whose ceiling would give 7.21.
    nearest = round(scaled)
    steps = nearest if math.isclose(scaled, nearest, rel_tol=1e-12) else direction(scaled)
    return float(steps * scale)


def factor(epsilon: float) -> str:
    """e^epsilon, rounded up to two significant digits, as a reader can picture it."""
    if epsilon > 700:
        return "an astronomically large number of"
    value = _significant(math.exp(epsilon), 2, math.ceil)
    if value < 10:
        return f"{value:.1f}"
    if value < 1e6:
        return f"{value:,.0f}"
    return f"{value:.1e}"
