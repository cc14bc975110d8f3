"""The audit of a site with distributed-noise rounds: both epsilons recomputed and shown."""

from __future__ import annotations

import csv
import io
import json
import math

from audit_support import DELTA, TERMS, Federation, lines_of, write_lines

from medfed.audit import build_report, verify_workspace
from medfed.audit.accounting import LOCAL_LABEL
from medfed.audit.contents import statement_rows
from medfed.audit.findings import fmt
from medfed.audit.sites_csv import CSV_COLUMNS, DISTRIBUTED_COLUMNS
from medfed.privacy import RoundPlan, compute_epsilon, load_or_create_signing_key
from medfed.privacy.distributed_noise import DistributedNoise, DistributedPlan
from medfed.privacy.events import GENESIS_HASH, canonical_json, line_hash, sign

PLAN = DistributedPlan(
    noise=DistributedNoise(
        clip=1.0, scale=64.0, beta=math.exp(-0.5), dim=1 << 12, local_stddev=60.0, count_weight=16
    ),
    sites=9,
    budget="distributed",
)
LABEL = "distributed epsilon (9 sites and secure aggregation hold)"


def _distributed_round(federation: Federation, site_id: str) -> None:
    ledger = federation.site_ledger(site_id)
    plan = RoundPlan(
        run_id="run-2",
        round=1,
        planned_rounds=1,
        steps=1,
        sample_rate=1.0,
        noise_multiplier=PLAN.enforced_noise_multiplier,
        max_grad_norm=1.0,
        distributed=PLAN,
    )
    ledger.commit(ledger.reserve(plan=plan, terms=TERMS), steps=1)
    federation.send(site_id)


def test_both_epsilons_are_recomputed_beside_the_enforced_one(federation: Federation) -> None:
    _distributed_round(federation, "site-a")
    result = verify_workspace(workspace=federation.workspace_dir)

    assert result.passed, [f.one_line() for f in result.findings]
    site = result.site("site-a")
    report = federation.site_ledger("site-a").verify()
    d = site.distributed
    assert d is not None
    for view, value in (("distributed", d.distributed), ("local", d.local)):
        history = report.history_of(view)  # type: ignore[arg-type]
        assert value == compute_epsilon(history=history, delta=DELTA, accountant="rdp")
    # The budget names the distributed guarantee: that is what the cap was checked against.
    assert site.spent == d.distributed < d.local
    assert (d.budget, d.sites, d.seqs) == (("distributed",), (9,), (5,))
    assert d.distributed_label == LABEL
    line = site.one_line()
    assert f"{LABEL} " in line and f"{LOCAL_LABEL} " in line
    assert "budget enforced on the distributed epsilon" in line
    data = json.loads(json.dumps(result.to_json()))["sites"]
    assert data["site-a"]["distributed_epsilon"]["local"] == d.local
    assert data["site-a"]["distributed_epsilon"]["budget_enforced_on"] == ["distributed"]
    checks = {(c.site_id, c.name): c for c in result.checks}
    assert "the budget is enforced on the distributed epsilon" in (
        checks[("site-a", "distributed noise")].detail
    )
    # A site without distributed rounds: nothing added.
    other = result.site("site-b")
    assert other.distributed is None and "distributed_epsilon" not in data["site-b"]
    assert "distributed" not in other.one_line()
    assert ("site-b", "distributed noise") not in checks


def test_the_report_shows_both_and_names_the_enforced_one(federation: Federation) -> None:
    _distributed_round(federation, "site-a")
    report = build_report(workspace=federation.workspace_dir)

    site = report.site("site-a")
    assert site.distributed is not None
    rows = dict(statement_rows(site))
    assert rows[LABEL] == fmt(site.distributed.distributed)
    assert rows[LOCAL_LABEL] == fmt(site.distributed.local)
    assert rows["budget enforced on"].startswith("the distributed epsilon")
    assert "PLD" in rows["distributed noise"]
    assert report.to_json()["sites"]["site-a"]["distributed_epsilon"]["sites"] == [9]
    other = report.site("site-b")
    assert not any("distributed" in item for item, _ in statement_rows(other))
    assert "distributed_epsilon" not in report.to_json()["sites"]["site-b"]

    table = list(csv.reader(io.StringIO(report.to_sites_csv())))
    assert tuple(table[0]) == CSV_COLUMNS + DISTRIBUTED_COLUMNS
    by_site = {row[0]: dict(zip(table[0], row, strict=True)) for row in table[1:]}
    assert float(by_site["site-a"]["epsilon_distributed"]) == site.distributed.distributed
    assert float(by_site["site-a"]["epsilon_local"]) == site.distributed.local
    assert by_site["site-a"]["budget_enforced_on"] == "distributed"
    assert by_site["site-a"]["distributed_sites"] == "9"
    assert [by_site["site-b"][name] for name in DISTRIBUTED_COLUMNS] == ["", "", "", ""]


def test_without_distributed_rounds_the_table_keeps_its_columns(federation: Federation) -> None:
    report = build_report(workspace=federation.workspace_dir)
    table = list(csv.reader(io.StringIO(report.to_sites_csv())))
    assert tuple(table[0]) == CSV_COLUMNS
    assert all(len(row) == len(CSV_COLUMNS) for row in table)


def test_a_distributed_round_under_a_prv_ledger_is_a_finding(federation: Federation) -> None:
    _distributed_round(federation, "site-a")
    path = federation.copy_path("site-a")
    key = load_or_create_signing_key(
        federation.workspace_dir / "sites" / "site-a" / "ledger_key.pem"
    )
    previous, lines = GENESIS_HASH, []
    for raw in lines_of(path):
        obj = {k: v for k, v in json.loads(raw).items() if k != "signature"}
        obj["prev_hash"] = previous
        if obj["kind"] == "terms":
            obj["accountant"] = "prv"
        line = canonical_json(sign(obj, key))
        lines.append(line)
        previous = line_hash(line)
    write_lines(path, lines)

    result = verify_workspace(workspace=federation.workspace_dir)
    [finding] = [f for f in result.findings if f.site_id == "site-a"]
    assert (finding.check, finding.seq) == ("ledger-copy", 5)
    assert "under the prv accountant" in finding.problem
    assert result.site("site-a").distributed is None
