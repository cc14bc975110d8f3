"""`medfed audit trace`: from a registered model back to the ledger entries that paid for it.

One real in-process federation (2 sites x 2 rounds, real DP-SGD, real signed ledgers, a real
MLflow SQLite store) is run once; each test tampers its own copy of it.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message

from medfed.api.demo import prepare_federation
from medfed.audit.trace import record_sha256
from medfed.cli.app import main
from medfed.config import load_site_config
from medfed.errors import AuditError
from medfed.model_files import read_model, write_model
from medfed.privacy import CommitEntry, compute_epsilon
from medfed.privacy.events import canonical_json, line_hash, sign
from medfed.privacy.keys import load_or_create_signing_key
from medfed.privacy.ledger import verify_ledger_bytes
from medfed.site.clientapp import app as medfed_client_app
from medfed.tracking.uri import default_tracking_uri
from medfed.transport.inprocess import run_in_process
from medfed.types import weights_digest

pytestmark = pytest.mark.slow

SITES = ("site-a", "site-b")
VERSION = "medfed-demo/1"


@dataclass(frozen=True)
class Fed:
    """A copy of the federation: its root, workspace and site configs (which point at the
    original sites' files; the tests change only the workspace's)."""

    root: Path
    workspace: Path
    site_configs: dict[str, Path]

    def round_dir(self, round_index: int) -> Path:
        return self.workspace / "runs" / "demo" / "global" / f"round-{round_index:04d}"

    def copy_path(self, site: str) -> Path:
        return self.workspace / "ledgers" / f"{site}.ledger.jsonl"

    def site_ledger(self, site: str) -> Path:
        return load_site_config(self.site_configs[site]).ledger_path


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    root = tmp_path_factory.mktemp("trace") / "fed"
    setup = prepare_federation(
        root=root, sites=len(SITES), cases=12, size=32, rounds=2, local_epochs=1
    )
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings,
        tracking_uri=default_tracking_uri(workspace_root=setup.workspace.root),
    )
    assert result.status == "finished", result.reason
    assert sorted(setup.site_configs) == list(SITES)
    return Fed(root=root, workspace=setup.workspace.root, site_configs=setup.site_configs)


@pytest.fixture
def fed(template: Fed, tmp_path: Path) -> Fed:
    root = tmp_path / "fed"
    shutil.copytree(template.root, root, symlinks=True)
    return Fed(
        root=root,
        workspace=root / template.workspace.relative_to(template.root),
        site_configs=template.site_configs,
    )


def _trace(
    fed: Fed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    argv = ["medfed", "audit", "trace", "--workspace", str(fed.workspace), *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0), out, err


def _findings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FINDING")]


def _failed(code: int, out: str, err: str) -> list[str]:
    assert code == AuditError.exit_code, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.strip().splitlines()[-1].startswith("FAIL")
    return _findings(out)


def _metadata(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "model.json").read_text())["metadata"])


def _set_metadata(path: Path, metadata: dict[str, Any]) -> None:
    manifest = json.loads((path / "model.json").read_text())
    manifest["metadata"] = metadata
    (path / "model.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_an_honest_model_traces_to_every_commit_and_its_epsilon(
    fed: Fed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _trace(fed, monkeypatch, capsys, "--model-version", VERSION, "--json")
    assert code == 0, out + err
    trace = json.loads(out)
    final = read_model(fed.round_dir(2))
    assert trace["passed"] and trace["findings"] == []
    assert trace["model_sha256"] == weights_digest(final.weights) == final.metadata["global_sha256"]
    assert [r["round"] for r in trace["rounds"]] == [0, 1, 2]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=default_tracking_uri(workspace_root=fed.workspace))
    tags = client.get_model_version("medfed-demo", "1").tags
    assert tags["medfed.model_sha256"] == trace["model_sha256"]
    assert tags["medfed.trace_head"] == trace["head"] == record_sha256(final.metadata)
    for site in SITES:
        data = fed.site_ledger(site).read_bytes()
        assert fed.copy_path(site).read_bytes() == data
        public = _public_key(fed, site)
        report = verify_ledger_bytes(data, public_key=public, site_id=site, source=site)
        commits = [e for e in report.entries if isinstance(e, CommitEntry)]
        # The site's own commits name the models the aggregator recorded, round by round.
        for round_index, commit in zip((1, 2), commits, strict=True):
            record = read_model(fed.round_dir(round_index)).metadata
            update = record["updates"][site]
            assert commit.seq == update["commit_seq"]
            assert commit.model_sha256 == record["start_sha256"]
            assert commit.update_sha256 == update["update_sha256"]
        spent = trace["sites"][site]
        last = final.metadata["updates"][site]["ledger_last_seq"]
        assert spent["last_seq"] == last and last >= commits[-1].seq
        upto = verify_ledger_bytes(
            b"".join(line + b"\n" for line in data.split(b"\n")[: last + 1]),
            public_key=public,
            site_id=site,
            source=site,
        )
        expected = compute_epsilon(history=upto.history, delta=1e-5, accountant="rdp")
        assert spent["accountant"] == "rdp" and spent["delta"] == 1e-5
        assert spent["epsilon"] == pytest.approx(expected, rel=1e-12) and expected > 0
        # everything after the chain's last entry is the final model's evaluation, no training
        assert spent["epsilon"] <= compute_epsilon(
            history=report.history, delta=1e-5, accountant="rdp"
        )

    given = [f"--site-ledger={site}={fed.site_ledger(site)}" for site in SITES]
    code, out, err = _trace(fed, monkeypatch, capsys, "--model", str(fed.round_dir(2)), *given)
    assert code == 0, out + err
    assert out.strip().splitlines()[-1] == "PASS"
    assert any(line.startswith("site site-a: epsilon ") for line in out.splitlines())


def _public_key(fed: Fed, site: str) -> Any:
    from medfed.workspace import load_workspace

    return load_workspace(fed.workspace).ledger_public_key(site)


def test_another_rounds_weights_as_the_final_model_are_found(
    fed: Fed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier = read_model(fed.round_dir(1))
    final = fed.round_dir(2)
    write_model(final, weights=earlier.weights, spec=earlier.spec, metadata=_metadata(final))

    findings = _failed(*_trace(fed, monkeypatch, capsys, "--model-version", VERSION))
    assert len(findings) == 1, findings
    assert findings[0].startswith("FINDING round 2: the stored global model's weights are ")

    findings = _failed(*_trace(fed, monkeypatch, capsys, "--model", str(final)))
    assert any(
        f.startswith("FINDING round 2: the model's weights digest ")
        and f.endswith("it is round 1's global model")
        for f in findings
    ), findings


def test_an_edited_round_record_breaks_its_links(
    fed: Fed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record = _metadata(fed.round_dir(1))
    record["updates"]["site-a"]["update_sha256"] = "ab" * 32
    _set_metadata(fed.round_dir(1), record)

    findings = _failed(*_trace(fed, monkeypatch, capsys, "--model-version", VERSION))
    assert len(findings) == 2, findings
    assert findings[0].startswith("FINDING round 2: the record's previous-record hash ")
    assert findings[1].startswith("FINDING round 1 site site-a: the commit at seq ")
    assert "has update_sha256 " in findings[1] and "round record has abababababab..." in findings[1]


def test_a_commit_that_names_another_update_is_found_though_signed(
    fed: Fed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    site = "site-b"
    path = fed.copy_path(site)
    lines = path.read_bytes().split(b"\n")[:-1]
    seq = _metadata(fed.round_dir(2))["updates"][site]["commit_seq"]
    key = load_or_create_signing_key(load_site_config(fed.site_configs[site]).signing_key_path)
    # Rewrite the commit and re-sign it and every entry after it, chain included: only the
    # link to the model breaks, not the ledger.
    for index in range(seq, len(lines)):
        obj = json.loads(lines[index])
        obj.pop("signature")
        obj["prev_hash"] = line_hash(lines[index - 1])
        if index == seq:
            obj["update_sha256"] = "cd" * 32
        lines[index] = canonical_json(sign(obj, key))
    path.write_bytes(b"".join(line + b"\n" for line in lines))

    findings = _failed(*_trace(fed, monkeypatch, capsys, "--model-version", VERSION))
    assert findings == [
        f"FINDING round 2 site site-b: the commit at seq {seq} of ledgers/site-b.ledger.jsonl "
        f"has update_sha256 cdcdcdcdcdcd... where the round record has "
        f"{_metadata(fed.round_dir(2))['updates'][site]['update_sha256'][:12]}..."
    ]
    # the site's own ledger, handed over, wins over the aggregator's copy and still links
    given = f"--site-ledger={site}={fed.site_ledger(site)}"
    code, out, err = _trace(fed, monkeypatch, capsys, "--model-version", VERSION, given)
    assert code == 0, out + err


def test_a_model_registered_from_another_run_is_found(
    fed: Fed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=default_tracking_uri(workspace_root=fed.workspace))
    honest = client.get_model_version("medfed-demo", "1")
    assert honest.run_id is not None
    parent = client.get_run(honest.run_id)
    other = client.create_run(parent.info.experiment_id, run_name="another-run")
    client.set_terminated(other.info.run_id)
    tags = dict(honest.tags)
    tags["medfed.model_sha256"] = weights_digest(read_model(fed.round_dir(1)).weights)
    forged = client.create_model_version(
        "medfed-demo",
        source=f"runs:/{other.info.run_id}/model",
        run_id=other.info.run_id,
        tags=tags,
    )

    findings = _failed(
        *_trace(fed, monkeypatch, capsys, "--model-version", f"medfed-demo/{forged.version}")
    )
    assert len(findings) == 2, findings
    assert findings[0] == (
        f"FINDING model version medfed-demo/{forged.version} was logged on MLflow run "
        f"{other.info.run_id}, not on run 'demo''s parent run {honest.run_id}: it was "
        "registered from another run"
    )
    assert findings[1].startswith("FINDING round 2: the model's weights digest ")
    assert findings[1].endswith("of run 'demo': it is round 1's global model")

    # a model directory of another round, claimed to be the run's model
    elsewhere = fed.root / "exported"
    shutil.copytree(fed.round_dir(1), elsewhere)
    findings = _failed(
        *_trace(fed, monkeypatch, capsys, "--model", str(elsewhere), "--run", "demo")
    )
    assert len(findings) == 1 and "it is round 1's global model" in findings[0], findings


def test_an_update_changed_in_flight_is_not_aggregated(tmp_path: Path) -> None:
    """Finite, same shape, same dtype: only the commit's update digest tells it apart."""

    def client_app(message: Message, context: Context) -> Message:
        reply = medfed_client_app(message, context)
        site = load_site_config(Path(str(context.node_config["site-config"]))).site_id
        if site == "site-b" and message.metadata.message_type == "train" and not reply.has_error():
            update = reply.content["update"]
            assert isinstance(update, ArrayRecord)
            name = sorted(update)[0]
            update[name] = Array(update[name].numpy() * np.float32(1.01))
        return reply

    setup = prepare_federation(
        root=tmp_path / "fed", sites=2, cases=12, size=32, rounds=1, local_epochs=1, min_sites=1
    )
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings,
        client_app=client_app,
    )

    assert result.status == "finished", result.reason
    events = (setup.workspace.root / "runs" / "demo" / "events.jsonl").read_text().splitlines()
    rejected = [json.loads(e) for e in events if '"site_rejected"' in e]
    assert [(e["site"], e["round"]) for e in rejected] == [("site-b", 1)]
    (reason,) = rejected[0]["reasons"]
    assert reason.startswith("the site's commit entry (seq ")
    assert "names the update " in reason and reason.endswith("was received")
    record = read_model(setup.workspace.root / "runs" / "demo" / "global" / "round-0001").metadata
    assert record["sites"] == ["site-a"] and list(record["updates"]) == ["site-a"]
