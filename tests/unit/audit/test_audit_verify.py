"""verify_workspace: every alteration of a ledger is found and named; the numbers are checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from audit_support import (
    CAP,
    DELTA,
    NOISE,
    SAMPLE_RATE,
    SITES,
    STEPS,
    TERMS,
    Federation,
    lines_of,
    write_lines,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.audit import AuditResult, Finding, verify_workspace
from medfed.errors import ConfigError
from medfed.privacy import PrivacyTerms, RoundPlan, compute_epsilon, key_id
from medfed.privacy.events import GENESIS_HASH, canonical_json, line_hash, sign
from medfed.privacy.ledger_head import write_head


def _verify(federation: Federation, **kwargs: object) -> AuditResult:
    return verify_workspace(workspace=federation.workspace_dir, **kwargs)  # type: ignore[arg-type]


def _only(result: AuditResult) -> Finding:
    assert len(result.findings) == 1, [f.one_line() for f in result.findings]
    return result.findings[0]


def test_an_honest_federation_passes_and_both_libraries_are_reported(
    federation: Federation,
) -> None:
    result = _verify(federation)

    assert result.passed, [f.one_line() for f in result.findings]
    assert result.verdict == "PASS" and result.run_names == ("run-1",)
    for site_id in SITES:
        site = result.site(site_id)
        # terms, then two rounds of reserve and commit
        assert site.copy is not None and len(site.copy.entries) == 5
        history = federation.site_ledger(site_id).history()
        eps = site.epsilons
        assert eps is not None and eps.delta == DELTA
        assert eps.opacus_rdp == compute_epsilon(history=history, delta=DELTA, accountant="rdp")
        assert eps.pld == compute_epsilon(history=history, delta=DELTA, accountant="pld")
        # Same integer orders: the two libraries agree to rounding.
        assert eps.dp_accounting_rdp_integer == pytest.approx(eps.opacus_rdp_integer, rel=1e-10)
        # Their own default orders: close, dp-accounting's fractional bound a little looser.
        assert eps.dp_accounting_rdp == pytest.approx(eps.opacus_rdp, rel=1e-3)
        assert eps.pld <= eps.opacus_rdp
        assert 0 < eps.opacus_rdp <= CAP.epsilon
        [run] = site.runs
        assert run.entries == 5 and run.summary == pytest.approx(eps.opacus_rdp, rel=1e-12)
    names = {(c.site_id, c.name, c.status) for c in result.checks}
    assert ("site-a", "ledger copy", "pass") in names
    assert ("site-a", "two libraries", "pass") in names
    assert ("site-a", "cap", "pass") in names
    assert ("site-a", "terms", "pass") in names
    assert ("site-a", "run run-1: summary epsilon", "pass") in names
    assert (None, "run run-1: MLflow epsilon", "skipped") in names
    text = "\n".join(result.lines())
    assert text.endswith("run(s): run-1") and "PASS: 0 finding(s)" in text
    assert json.loads(json.dumps(result.to_json()))["verdict"] == "PASS"


def test_edited_value_is_named_by_site_line_and_seq(federation: Federation) -> None:
    path = federation.copy_path("site-b")
    lines = lines_of(path)
    lines[3] = lines[3].replace(b'"noise_multiplier":1.1', b'"noise_multiplier":5.0')
    write_lines(path, lines)

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.check, finding.line, finding.seq) == (
        "site-b",
        "ledger-copy",
        4,
        3,
    )
    assert finding.source == "ledgers/site-b.ledger.jsonl"
    assert "bad signature" in finding.problem
    assert finding.one_line().startswith(
        "FINDING [ledger-copy] site site-b: ledgers/site-b.ledger.jsonl: line 4 (seq 3): "
    )


def test_deleted_line(federation: Federation) -> None:
    path = federation.copy_path("site-a")
    lines = lines_of(path)
    del lines[1]
    write_lines(path, lines)

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.line, finding.seq) == ("site-a", 2, 2)
    assert "seq 2 where seq 1 was expected" in finding.problem


def test_reordered_lines(federation: Federation) -> None:
    path = federation.copy_path("site-a")
    lines = lines_of(path)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(path, lines)

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.line, finding.seq) == ("site-a", 3, 3)
    assert "seq 3 where seq 2 was expected" in finding.problem


def test_line_signed_by_a_foreign_key(federation: Federation) -> None:
    path = federation.copy_path("site-a")
    lines = lines_of(path)
    foreign = Ed25519PrivateKey.generate()
    obj = {k: v for k, v in json.loads(lines[3]).items() if k != "signature"}
    obj["key_id"] = key_id(foreign.public_key())
    lines[3] = canonical_json(sign(obj, foreign))
    write_lines(path, lines)

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.line, finding.seq) == ("site-a", 4, 3)
    assert f"signed by key {obj['key_id']}" in finding.problem


def test_a_key_shipped_with_the_ledger_is_never_trusted(federation: Federation) -> None:
    """A whole ledger re-signed by another key, its public key next to it: line 1 is refused."""
    path = federation.copy_path("site-a")
    foreign = Ed25519PrivateKey.generate()
    previous, lines = GENESIS_HASH, []
    for raw in lines_of(path):
        obj = {k: v for k, v in json.loads(raw).items() if k != "signature"}
        obj.update(prev_hash=previous, key_id=key_id(foreign.public_key()))
        lines.append(canonical_json(sign(obj, foreign)))
        previous = line_hash(lines[-1])
    write_lines(path, lines)
    path.with_suffix(".pub").write_bytes(
        foreign.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.line, finding.seq) == ("site-a", 1, 0)
    assert "not by this site's key" in finding.problem


def test_a_swapped_registered_key_file_is_a_finding(federation: Federation) -> None:
    kit = federation.workspace_dir / "sites"
    shutil.copy(kit / "site-b" / "ledger_key.pub", kit / "site-a" / "ledger_key.pub")

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.check) == ("site-a", "key")
    assert "is not the key" in finding.problem


def test_spending_past_the_cap_is_found(federation: Federation) -> None:
    """A site that lowered its cap below what it had spent."""
    federation.change_terms("site-a", PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=1.0))

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.check) == ("site-a", "cap")
    assert "exceeds the site's cap 1" in finding.problem


def test_a_raised_cap_or_delta_is_found(federation: Federation) -> None:
    federation.change_terms("site-b", PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=20.0))

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.check, finding.seq) == ("site-b", "terms", 5)
    assert "the site raised its cap: terms changed at seq 5" in finding.problem


def test_a_pld_site_within_its_cap_passes(tmp_path: Path) -> None:
    """The audit checks the cap with the ledger's accountant, not always RDP."""
    from medfed.privacy import DPSteps
    from medfed.transport.provision import provision_workspace

    provision_workspace(out=tmp_path / "workspace", sites=list(SITES), host="127.0.0.1")
    federation = Federation(root=tmp_path)
    history = [DPSteps(noise_multiplier=NOISE, sample_rate=SAMPLE_RATE, steps=12)]
    pld = compute_epsilon(history=history, delta=DELTA, accountant="pld")
    rdp = compute_epsilon(history=history, delta=DELTA, accountant="rdp")
    cap = (pld + rdp) / 2  # RDP would say over the cap
    for site in SITES:
        federation.change_terms(site, PrivacyTerms(accountant="pld", delta=DELTA, epsilon_cap=cap))
        ledger = federation.site_ledger(site)
        ledger.commit(
            ledger.reserve(
                plan=RoundPlan(
                    run_id="run-1",
                    round=1,
                    planned_rounds=1,
                    steps=12,
                    sample_rate=SAMPLE_RATE,
                    noise_multiplier=NOISE,
                    max_grad_norm=1.0,
                ),
                terms=PrivacyTerms(accountant="pld", delta=DELTA, epsilon_cap=cap),
            ),
            steps=12,
        )
        federation.send(site)
    federation.finish_run("run-1", rounds=1)

    result = _verify(federation)
    assert result.passed, [f.one_line() for f in result.findings]
    site = result.site("site-a")
    assert site.accountant == "pld" and site.spent == pytest.approx(pld)
    assert site.epsilons is not None and site.epsilons.opacus_rdp > cap


def test_a_later_run_does_not_upset_an_earlier_summary(federation: Federation) -> None:
    federation.train("site-a", run="run-2", round_=1, noise=2.0)
    federation.finish_run("run-2", rounds=1)

    result = _verify(federation)
    assert result.passed, [f.one_line() for f in result.findings]
    runs = {run.run_name: run for run in result.site("site-a").runs}
    assert (runs["run-1"].entries, runs["run-2"].entries) == (5, 7)
    assert runs["run-1"].recomputed is not None and runs["run-2"].recomputed is not None
    assert runs["run-1"].recomputed < runs["run-2"].recomputed
    only = _verify(federation, run_name="run-1")
    assert only.run_names == ("run-1",) and only.passed


def test_a_dishonest_summary_is_found(federation: Federation) -> None:
    path = federation.workspace_dir / "runs" / "run-1" / "summary.json"
    summary = json.loads(path.read_text())
    summary["sites"][1]["epsilon_spent"] *= 0.9
    path.write_text(json.dumps(summary))

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.check) == ("site-b", "summary")
    assert "sites[].epsilon_spent" in finding.problem and "first 5 entries" in finding.problem


def test_a_malformed_summary_is_a_finding_not_a_crash(federation: Federation) -> None:
    path = federation.workspace_dir / "runs" / "run-1" / "summary.json"
    summary = json.loads(path.read_text())
    summary["sites"][0]["epsilon_spent"] = "low"
    summary["budgets"]["sites"]["site-b"]["delta"] = 0
    path.write_text(json.dumps(summary))

    result = _verify(federation)
    found = sorted((f.site_id, f.check, f.problem.split(" is ")[0]) for f in result.findings)
    assert found == [
        ("site-a", "summary", "sites[].epsilon_spent"),
        ("site-b", "summary", "budgets.sites.site-b.delta"),
    ]


def test_a_summary_of_another_ledger_is_found(federation: Federation) -> None:
    path = federation.workspace_dir / "runs" / "run-1" / "summary.json"
    summary = json.loads(path.read_text())
    summary["budgets"]["sites"]["site-a"]["last_hash"] = "0" * 64
    path.write_text(json.dumps(summary))

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.check, finding.line, finding.seq) == (
        "site-a",
        "summary",
        5,
        4,
    )


def test_a_copy_shorter_than_its_summary_is_found(federation: Federation) -> None:
    """Cutting the copy's last round keeps its chain valid: only the summary tells."""
    path = federation.copy_path("site-b")
    write_lines(path, lines_of(path)[:3])

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.check) == ("site-b", "summary")
    assert "counted 5 ledger entries but the aggregator's copy holds 3" in finding.problem


def test_the_sites_own_ledger_may_run_ahead_of_the_copy(federation: Federation) -> None:
    ledger = federation.site_ledger("site-a")
    ledger.reserve(plan=_plan("run-2"), terms=TERMS)  # not yet sent to the aggregator

    result = _verify(federation, site_ledgers={"site-a": ledger.path})
    assert result.passed, [f.one_line() for f in result.findings]
    site = result.site("site-a")
    assert site.site_ledger is not None and len(site.site_ledger.entries) == 6
    assert site.epsilons is not None and site.site_ledger_epsilon is not None
    assert site.site_ledger_epsilon > site.epsilons.opacus_rdp == site.runs[0].recomputed
    [check] = [c for c in result.checks if c.name == "site ledger vs copy"]
    assert "1 more at the site" in check.detail


def test_a_site_ledger_that_diverges_from_the_copy_is_found(federation: Federation) -> None:
    """The site re-signs its own history (it holds the key): valid alone, but not the copy's."""
    ledger = federation.site_ledger("site-a")
    key = serialization.load_pem_private_key(ledger.key_path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    previous, lines = GENESIS_HASH, []
    for index, raw in enumerate(lines_of(ledger.path)):
        obj = {k: v for k, v in json.loads(raw).items() if k != "signature"}
        obj["prev_hash"] = previous
        if index == 3:
            obj["noise_multiplier"] = 1.2
        lines.append(canonical_json(sign(obj, key)))
        previous = line_hash(lines[-1])
    write_lines(ledger.path, lines)
    write_head(ledger.path, site_id="site-a", count=5, last_hash=previous, private_key=key)
    assert len(ledger.verify().entries) == 5  # a valid ledger on its own

    finding = _only(_verify(federation, site_ledgers={"site-a": ledger.path}))
    assert (finding.site_id, finding.check, finding.line, finding.seq) == (
        "site-a",
        "agreement",
        4,
        3,
    )
    assert "diverge" in finding.problem


def test_a_site_ledger_that_was_cut_is_found(federation: Federation) -> None:
    ledger = federation.site_ledger("site-b")
    write_lines(ledger.path, lines_of(ledger.path)[:4])

    result = _verify(federation, site_ledgers={"site-b": ledger.path})
    checks = sorted((f.check, f.line) for f in result.findings)
    # The head notices the cut; the comparison names the first entry the site lost.
    assert checks == [("agreement", 5), ("site-ledger", None)]
    assert all(f.site_id == "site-b" for f in result.findings)


def test_an_unregistered_copy_is_a_finding(federation: Federation) -> None:
    shutil.copy(federation.copy_path("site-a"), federation.copy_path("site-z"))

    finding = _only(_verify(federation))
    assert (finding.site_id, finding.check) == ("site-z", "registration")


def test_user_mistakes_are_config_errors(federation: Federation, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no run 'nope'"):
        _verify(federation, run_name="nope")
    with pytest.raises(ConfigError, match="does not register: site-q"):
        _verify(federation, site_ledgers={"site-q": tmp_path / "x"})
    with pytest.raises(ConfigError, match="belongs to one run"):
        _verify(federation, mlflow_run="abc")
    with pytest.raises(ConfigError, match="no workspace file"):
        verify_workspace(workspace=tmp_path / "empty")


def _plan(run: str) -> RoundPlan:
    return RoundPlan(
        run_id=run,
        round=1,
        planned_rounds=1,
        steps=STEPS,
        sample_rate=SAMPLE_RATE,
        noise_multiplier=NOISE,
        max_grad_norm=1.0,
    )
