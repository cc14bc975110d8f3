"""Secure aggregation through the real ServerApp round loop and ClientApp, in one process.

Three synthetic sites, a tiny UNet, one round: what the aggregator receives from a site is a
uniformly random vector and signed ledger lines without a loss or a Dice; the global model is
plain FedAvg of the sites' trained models within the encoding's bound; a silent site is
recovered, two silent sites abandon the round, and a forged key bundle is excluded and named.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message
from scipy import stats

from medfed.aggregator.federation import run_federation
from medfed.aggregator.outcome import FederationResult
from medfed.aggregator.strategies import fedavg
from medfed.api.demo import DemoSetup, prepare_federation
from medfed.audit import build_report, verify_workspace
from medfed.config import load_site_config
from medfed.config.loading import dump_site_config
from medfed.envelope import SECAGG_KEYS, TRAIN, read_secure
from medfed.model_files import read_arrays
from medfed.privacy import ReleaseEntry
from medfed.secagg.update import run_encoding
from medfed.site import release
from medfed.site.clientapp import app as medfed_client_app
from medfed.site.ledger_of import ledger_of
from medfed.site.release import opened
from medfed.transport.inprocess import (
    InProcessGrid,
    _task_identity,
    in_process_nodes,
    run_in_process,
)
from medfed.types import SiteUpdate, weights_digest

pytestmark = pytest.mark.slow


def _setup(tmp_path: Path, *, dp_releases: bool = False) -> DemoSetup:
    setup = prepare_federation(
        root=tmp_path / "fed", sites=3, cases=12, size=32, rounds=1, local_epochs=1
    )
    if dp_releases:
        for path in setup.site_configs.values():
            _release_with_dp(path)
    return setup


def _release_with_dp(path: Path) -> None:
    """The site releases its counts and Dice through Gaussian noise, as a hospital would (the
    synthetic sites declare theirs public), and has released no counts yet."""
    config = load_site_config(path)
    release = config.release.model_copy(
        update={"patient_counts": "dp", "validation_dice": "dp", "min_validation_patients": 1}
    )
    dump_site_config(config.model_copy(update={"release": release}), path)
    (config.paths.workdir / "releases" / "patients.json").unlink()


def _secure(setup: DemoSetup, **changes: Any) -> Any:
    return setup.settings.model_copy(update={"secure_aggregation": True, **changes})


def _events(setup: DemoSetup) -> list[dict[str, Any]]:
    path = setup.workspace.root / "runs" / setup.settings.run_name / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _global(setup: DemoSetup, round_index: int) -> dict[str, np.ndarray]:
    run_dir = setup.workspace.root / "runs" / setup.settings.run_name
    return read_arrays(run_dir / "global" / f"round-{round_index:04d}" / "model.safetensors")


def _plain_fedavg(setup: DemoSetup, sites: Iterable[str]) -> tuple[dict[str, np.ndarray], int]:
    """FedAvg of the models the sites trained (kept in their checkpoints), weighted by their
    released counts: what the round would have given without secure aggregation."""
    updates = []
    for site in sites:
        config = load_site_config(setup.site_configs[site])
        weights = read_arrays(
            config.paths.workdir / "checkpoints" / setup.settings.run_name / "model.safetensors"
        )
        patients = ledger_of(config).verify().latest_release("patients")
        assert patients is not None
        kept = opened(config, patients)  # sealed ones as the site keeps them
        assert kept is not None
        count = int(kept["train"])
        updates.append(SiteUpdate(site_id=site, round=1, weights=weights, num_patients=count))
    return fedavg(updates=updates), sum(u.num_patients for u in updates)


def _assert_within_bound(
    setup: DemoSetup, secure: dict[str, np.ndarray], sites: tuple[str, ...], members: int
) -> None:
    plain, total = _plain_fedavg(setup, sites)
    settings = setup.settings
    point = run_encoding(
        sites=members,
        max_weight=settings.secure_aggregation_max_weight,
        bound=settings.secure_aggregation_bound,
    )
    # The bound of medfed.secagg.encoding for a sum of len(sites) inputs, over the total weight,
    # plus float32 rounding of both results.
    bound = len(sites) / (2 * point.scale) / total
    assert set(secure) == set(plain)
    for name, value in secure.items():
        slack = 2 * np.spacing(np.abs(plain[name]).astype(np.float32)).astype(np.float64)
        difference = np.abs(value.astype(np.float64) - plain[name].astype(np.float64))
        assert np.all(difference <= bound + slack), (name, float(difference.max()), bound)
    assert any(np.any(secure[n] != _global(setup, 0)[n]) for n in secure)  # it trained


def _site_of(context: Context) -> str:
    return load_site_config(Path(str(context.node_config["site-config"]))).site_id


def test_the_aggregator_sees_a_uniform_vector_and_the_sum_is_fedavg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = _setup(tmp_path, dp_releases=True)
    # The counts' and the Dice's noise drawn as 0: with two validation patients a site's noisy
    # count would otherwise fall below its minimum often enough that no site had a Dice to sum.
    monkeypatch.setattr(release, "_gaussian", lambda count, std: [0.0] * count)
    seen: dict[str, Message] = {}

    def client_app(message: Message, context: Context) -> Message:
        reply = medfed_client_app(message, context)
        if message.metadata.message_type == TRAIN:
            seen.setdefault(_site_of(context), reply)  # the round; the evaluation comes after
        return reply

    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=_secure(setup),
        client_app=client_app,
    )

    assert result.status == "finished" and result.rounds_completed == 1, result.reason
    summary = json.loads((result.directory / "summary.json").read_text(encoding="utf-8"))
    assert summary["secure_aggregation"] is True
    _assert_within_bound(setup, _global(setup, 1), ("site-a", "site-b", "site-c"), 3)
    for site, reply in seen.items():
        assert not reply.has_error(), reply.error
        assert set(reply.content.array_records) == {"masked"}
        received = read_secure(reply.content)
        vector = received.masked
        assert vector is not None and vector.dtype == np.uint32
        # Uniform on [0, 2^32): Kolmogorov-Smirnov on the words, chi-square on the top bytes.
        assert stats.kstest(vector / 2.0**32, "uniform").pvalue > 1e-4
        top = np.bincount(vector >> 24, minlength=256)
        assert stats.chisquare(top).pvalue > 1e-4
        config = load_site_config(setup.site_configs[site])
        count = ledger_of(config).verify().latest_release("patients")
        assert count is not None and count.sealed is not None
        kept = opened(config, count)
        assert kept is not None and int(vector[0]) != int(kept["train"])
        # The ledger lines hold no loss or Dice of the round, only its reservation and commit,
        # and the counts' release is sealed: its cost, not its values.
        lines = [json.loads(line) for line in received.ledger_lines]
        run_lines = [x for x in lines if x.get("run_id") == setup.settings.run_name]
        assert {x["kind"] for x in run_lines} <= {"reserve", "release"}
        releases = [x for x in run_lines if x["kind"] == "release"]
        assert releases and all(x["quantity"] == "patients" for x in releases)
        assert all(x["values"] == {} and len(x["sealed"]) == 64 for x in releases)
        # the sample rate is the site's full batch, not one computed from its count
        reserve = next(x for x in run_lines if x["kind"] == "reserve")
        assert reserve["sample_rate"] == 1.0
        assert isinstance(reply.content["site"], ConfigRecord)
        text = json.dumps(dict(received.payload))
        assert "dice" not in text and "loss" not in text
    events = _events(setup)
    epoch = next(e for e in events if e["event"] == "secure_epoch")
    assert epoch["sites"] == ["site-a", "site-b", "site-c"] and epoch["excluded"] == {}
    updates = [e for e in events if e["event"] == "site_update"]
    assert {e["site"] for e in updates} == {"site-a", "site-b", "site-c"}
    assert all(e["patients"] == 0 and e["loss"] is None for e in updates)
    done = next(e for e in events if e["event"] == "round_done")
    assert done["loss"] is not None and done["sites_answered"] == 3
    # No release of this run holds a training round's loss or Dice; the final model's Dice
    # is released sealed at each site, and the aggregator learns only the count-weighted mean.
    final = weights_digest(_global(setup, 1))
    dice_sum = weight = 0.0
    for site in setup.site_configs:
        config = load_site_config(setup.site_configs[site])
        report = ledger_of(config).verify()
        released = [
            e
            for e in report.entries
            if isinstance(e, ReleaseEntry)
            and e.run_id == setup.settings.run_name
            and e.quantity != "patients"
        ]
        if not released:  # its noisy validation count is below its minimum: no Dice
            continue
        assert [(e.quantity, e.model_sha256) for e in released] == [("validation_dice", final)]
        assert released[0].sealed is not None and not released[0].values
        latest = report.latest_release("patients")
        assert latest is not None
        dice, counts = opened(config, released[0]), opened(config, latest)
        assert dice is not None and counts is not None
        dice_sum += min(max(dice["dice"], 0.0), 1.0) * counts["validation"]
        weight += counts["validation"]
    evaluation = next(e for e in events if e["event"] == "evaluation")
    assert evaluation["sites"] == {} and evaluation["releases"] == {}
    # within the encoding's bound on the sum (medfed.secagg.encoding), over the bound and weight
    settings = setup.settings
    point = run_encoding(
        sites=3,
        max_weight=settings.secure_aggregation_max_weight,
        bound=settings.secure_aggregation_bound,
    )
    error = 3 / (2 * point.scale) / settings.secure_aggregation_bound / weight
    assert evaluation["dice"] == pytest.approx(dice_sum / weight, abs=error)
    assert summary["dice_final"] == pytest.approx(dice_sum / weight, abs=error)
    # the auditor recomputes the sealed releases' cost and shows them as sealed
    audit = verify_workspace(workspace=setup.workspace.root, run_name=setup.settings.run_name)
    assert audit.passed, [f.one_line() for f in audit.findings]
    html = build_report(workspace=setup.workspace.root, run_name=setup.settings.run_name).to_html()
    assert "sealed at the site" in html


class SilentGrid(InProcessGrid):
    """Sites that train but whose replies to ``kind`` never arrive: silent after key sharing."""

    def __init__(self, *, silent: set[int], kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._silent = silent
        self._kind = kind

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, message_id in zip(messages, ids, strict=True):
            metadata = message.metadata
            if metadata.message_type == self._kind and metadata.dst_node_id in self._silent:
                self._replies.pop(message_id, None)
        return ids


def _run_with_silent(setup: DemoSetup, silent: set[str]) -> FederationResult:
    nodes = in_process_nodes(workspace=setup.workspace, site_configs=setup.site_configs)
    grid = SilentGrid(
        nodes=nodes,
        client_app=medfed_client_app,
        silent={n.node_id for n in nodes if n.site_id in silent},
        kind=TRAIN,
    )
    settings = _secure(setup, round_timeout_s=3.0, wait_for_sites_s=1.0, min_sites=1)
    with _task_identity(run_id=grid.run.run_id):
        return run_federation(grid=grid, settings=settings, workspace=setup.workspace)


def test_one_silent_site_is_recovered_exactly_two_abandon_the_round(tmp_path: Path) -> None:
    setup = _setup(tmp_path / "one")
    result = _run_with_silent(setup, {"site-c"})
    assert result.status == "finished" and result.rounds_completed == 1, result.reason
    _assert_within_bound(setup, _global(setup, 1), ("site-a", "site-b"), 3)
    events = _events(setup)
    assert [e["site"] for e in events if e["event"] == "site_timeout"] == ["site-c"]
    assert not [e for e in events if e["event"] == "secure_round_abandoned"]

    setup = _setup(tmp_path / "two")
    result = _run_with_silent(setup, {"site-b", "site-c"})
    assert result.rounds_completed == 0
    events = _events(setup)
    (abandoned,) = [e for e in events if e["event"] == "secure_round_abandoned"]
    assert abandoned["round"] == 1
    assert "1 of 3 sites sent a masked update, 2 needed" in abandoned["reason"]
    run_dir = setup.workspace.root / "runs" / setup.settings.run_name
    assert not (run_dir / "global" / "round-0001").exists()
    assert not [e for e in events if e["event"] == "round_done"]


def test_a_forged_key_bundle_is_excluded_and_named(tmp_path: Path) -> None:
    setup = _setup(tmp_path)

    def client_app(message: Message, context: Context) -> Message:
        reply = medfed_client_app(message, context)
        if message.metadata.message_type == SECAGG_KEYS and _site_of(context) == "site-c":
            # on its way, site-c's mask key is swapped for another (as a dishonest router would)
            site = reply.content["site"]
            assert isinstance(site, ConfigRecord)
            payload = json.loads(str(site["secagg"]))
            key = bytes.fromhex(payload["bundle"]["mask_public"])
            payload["bundle"]["mask_public"] = key[::-1].hex()
            site["secagg"] = json.dumps(payload)
        return reply

    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=_secure(setup),
        client_app=client_app,
    )

    assert result.status == "finished" and result.rounds_completed == 1, result.reason
    epoch = next(e for e in _events(setup) if e["event"] == "secure_epoch")
    assert epoch["sites"] == ["site-a", "site-b"]
    assert list(epoch["excluded"]) == ["site-c"]
    assert "signature does not verify" in epoch["excluded"]["site-c"]
    started = next(e for e in _events(setup) if e["event"] == "round_started")
    assert started["sites"] == ["site-a", "site-b"]
    _assert_within_bound(setup, _global(setup, 1), ("site-a", "site-b"), 2)
