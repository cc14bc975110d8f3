"""What crosses from a site to the aggregator is covered by the site's ledger: every finding of
the privacy review, tried against the real site code with real NIfTI files and real DP-SGD.

Each test plays the curious aggregator: it chooses the global model (a crafted one that
predicts foreground everywhere, so that a patient's loss and Dice follow the size of its
lesion), the run's settings, and reads every reply.
"""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from flwr.app import Context, Message
from site_support import round_request

from medfed.config import SiteConfig, load_site_config
from medfed.config.loading import dump_site_config
from medfed.envelope import RoundRequest, reply_content
from medfed.errors import DataError, LedgerError, PolicyError, PrivacyUnitError
from medfed.privacy import ReleaseEntry, ReserveEntry, SiteLedger, compute_epsilon
from medfed.privacy.entry_format import parse_entry
from medfed.site import release
from medfed.site.federated import evaluate_round, train_from_request, train_round
from medfed.site.secure_round import state_dir

pytestmark = pytest.mark.slow

SIZE = 16
SMALL_UNET = {"network": "unet", "channels": [4, 8], "strides": [2]}


def _write_site(
    root: Path,
    *,
    train_lesions: Sequence[int],
    val_lesions: Sequence[int],
    **sections: Any,
) -> SiteConfig:
    """A site whose patients have cubic lesions of the given voxel counts."""
    root.mkdir(parents=True)
    rows = ["patient_id,image,label,split"]
    for dirname in ("images", "labels"):
        (root / dirname).mkdir()
    cases = [("train", n) for n in train_lesions] + [("val", n) for n in val_lesions]
    for index, (split, voxels) in enumerate(cases):
        label = np.zeros((SIZE, SIZE, SIZE), np.uint8)
        label.reshape(-1)[:voxels] = 1  # exactly `voxels` foreground voxels
        rng = np.random.default_rng(index)
        image = (rng.normal(size=label.shape) + 2.0 * label).astype(np.float32)
        name = f"p{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "images" / name)
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labels" / name)
        rows.append(f"p{index:03d},images/{name},labels/{name},{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data: dict[str, Any] = {
        "site_id": "site-a",
        "data": {"manifest": "manifest.csv", "patch_size": [SIZE] * 3, "allow_empty_labels": True},
        "model": SMALL_UNET,
        "training": {"epochs": 1, "batch_size": 1, "threads": 1},
        "privacy": {"noise_multiplier": 1.0, "epsilon_cap": 50.0},
        "paths": {"workdir": "work"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    config = SiteConfig.model_validate(data)
    dump_site_config(config, root / "site.yaml")
    return load_site_config(root / "site.yaml")


def _crafted_model(config: SiteConfig) -> dict[str, np.ndarray]:
    """A global model that calls every voxel foreground: its loss and Dice grow with how
    little lesion a patient has, which is what an attacker reads a lesion size from."""
    import torch

    from medfed.models import build_model, spec_from_config
    from medfed.models.checkpoint import model_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = model_weights(build_model(spec=spec_from_config(config)))
    last = [name for name in weights if name.endswith("bias") and weights[name].shape == (2,)][-1]
    weights[last.replace("bias", "weight")] *= 0
    weights[last] = np.array([-10.0, 10.0], dtype=np.float32)
    return weights


def _request(config: SiteConfig, **changes: Any) -> RoundRequest:
    values: dict[str, Any] = {
        "model": SMALL_UNET,
        "local_epochs": 1,
        "weights": _crafted_model(config),
        "planned_rounds": 3,
    }
    values.update(changes)
    return round_request(**values)


def _ledger(config: SiteConfig) -> SiteLedger:
    return SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )


def _releases(config: SiteConfig, quantity: str) -> tuple[ReleaseEntry, ...]:
    return _ledger(config).verify().releases_of(quantity=quantity)


def _raw_losses(config: SiteConfig, weights: dict[str, np.ndarray]) -> list[float]:
    """What the old reply sent: each training patient's DiceCE loss under the crafted model."""
    import torch

    from medfed.data import build_datasets
    from medfed.models import build_model, spec_from_config
    from medfed.models.checkpoint import load_weights_into
    from medfed.site.dp import segmentation_loss

    model = build_model(spec=spec_from_config(config))
    load_weights_into(model=model, weights=weights)
    dataset = build_datasets(config).train
    loss_fn = segmentation_loss(onehot_targets=False)
    with torch.no_grad():
        return [
            float(loss_fn(model(item["image"][None]), item["label"][None]))
            for item in (dataset[i] for i in range(len(dataset)))
        ]


# 1. The training loss -------------------------------------------------------------------------


def test_the_crafted_model_loss_attack_reads_noise(tmp_path: Path) -> None:
    """One patient per site, a crafted model, sigma 5: the old reply gave losses 41.27, 39.14
    and 24.99 for 0, 13 and 100 lesion voxels. Now the loss is clipped per patient and rides
    in the DP-SGD step: its noise dwarfs anything one patient can change in it."""
    released = []
    for voxels in (0, 13, 100):
        config = _write_site(
            tmp_path / f"site-{voxels}",
            train_lesions=[voxels],
            val_lesions=[50],
            release={"patient_counts": "public", "public_reason": "test data"},
        )
        request = _request(config, noise_multiplier=5.0, local_epochs=4)
        raw = _raw_losses(config, dict(request.weights or {}))
        assert raw[0] > config.release.loss_clip  # the signal the old reply leaked

        reply = train_round(config=config, request=request)
        content = reply_content(reply)
        assert set(content) == {"update", "site"}  # no metric record besides the ledger
        (loss,) = _releases(config, "train_loss")
        assert loss.mechanism == "dp-sgd" and loss.reservation_seq is not None
        assert loss.noise_std is not None
        # A patient moves the clipped loss by at most loss_clip; the noise is far larger.
        assert loss.noise_std >= 5 * config.release.loss_clip
        assert loss.values["loss"] not in raw
        released.append((loss.values["loss"], loss.noise_std))
    # The three releases are each within a few noise widths of the clipped truth (<= 2).
    for value, std in released:
        assert abs(value) <= config.release.loss_clip + 6 * std


# 2. The validation Dice -----------------------------------------------------------------------


def test_a_small_validation_split_releases_no_dice(tmp_path: Path) -> None:
    config = _write_site(tmp_path / "s", train_lesions=[40, 40], val_lesions=[10])
    request = _request(config)
    train_round(config=config, request=request)
    assert _releases(config, "validation_dice") == ()  # one validation patient: withheld
    evaluate_round(config=config, request=_request(config, round=3))
    assert _releases(config, "validation_dice") == ()


def test_the_crafted_model_dice_attack_reads_noise(tmp_path: Path) -> None:
    """The old reply gave the exact Dice of any model for the validation patients, which
    never train; with a crafted model that recovered lesion volumes of 10, 57 and 200 voxels.
    Now the Dice sum gets Gaussian noise of four patients' worth, and each model of a run is
    evaluated once."""
    val = [10, 57, 200] + [30] * 19
    config = _write_site(
        tmp_path / "s",
        train_lesions=[40, 40],
        val_lesions=val,
        release={"patient_counts": "public", "public_reason": "test data"},
    )
    request = _request(config)
    train_round(config=config, request=request)
    (dice,) = _releases(config, "validation_dice")
    assert dice.mechanism == "gaussian" and dice.sensitivity == 1.0
    assert dice.noise_multiplier == config.release.dice_noise_multiplier
    # One patient moves the mean by at most 1/N; the noise is four times that.
    assert dice.noise_std == pytest.approx(4.0 / len(val))
    charged = _ledger(config).verify().charges
    assert [c.kind for c in charged] == ["reserve", "release"]  # the Dice costs privacy

    # The same model again: the same release, nothing new is spent.
    entries = len(_ledger(config).verify().entries)
    evaluate_round(config=config, request=_request(config, round=1))
    assert len(_ledger(config).verify().entries) == entries
    # A run gets at most max_evaluations_per_run Dice releases.
    for shift in (2, 3, 4, 5):
        other = _crafted_model(config)
        other[next(iter(other))] += shift  # another model each time
        evaluate_round(config=config, request=_request(config, round=3, weights=other))
    assert len(_releases(config, "validation_dice")) == config.release.max_evaluations_per_run


def test_only_a_run_the_site_trained_in_is_evaluated(tmp_path: Path) -> None:
    config = _write_site(tmp_path / "s", train_lesions=[40], val_lesions=[10])
    with pytest.raises(PolicyError, match="has no round of run 'study'"):
        evaluate_round(config=config, request=_request(config))
    assert not config.ledger_path.exists()


# 3. The patient count -------------------------------------------------------------------------


def test_no_exact_patient_count_leaves_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q and T are planned from a noisy count released once; N itself is never written."""
    monkeypatch.setattr(release, "_gaussian", lambda count, std: [3.2, -1.7][:count])
    config = _write_site(
        tmp_path / "s", train_lesions=[40] * 39, val_lesions=[30] * 3, training={"batch_size": 4}
    )
    request = _request(config, planned_rounds=5)
    train_round(config=config, request=request)
    report = _ledger(config).verify()
    (counts,) = report.releases_of(quantity="patients")
    assert counts.values == {"train": 42.0, "validation": 1.0}  # 39 + 3.2 and 3 - 1.7, rounded
    assert counts.mechanism == "gaussian" and counts.noise_std == 5.0
    (reserve,) = [e for e in report.entries if isinstance(e, ReserveEntry)]
    assert reserve.sample_rate == pytest.approx(4 / 42) and reserve.steps == 10
    for line in config.ledger_path.read_text(encoding="ascii").splitlines():
        assert "dataset_size" not in line and '"train":39' not in line
    # The same patients again: the same release, nothing spent for it.
    train_round(config=config, request=_request(config, planned_rounds=5, round=2))
    assert len(_ledger(config).verify().releases_of(quantity="patients")) == 1


def test_under_secure_aggregation_the_count_is_sealed_and_plans_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count's release records its cost and a commitment; the values stay at the site, and
    the sample rate is the full batch, not B / N (which would show N in the reservation)."""
    monkeypatch.setattr(release, "_gaussian", lambda count, std: [3.2, -1.7][:count])
    config = _write_site(
        tmp_path / "s", train_lesions=[40] * 39, val_lesions=[30] * 3, training={"batch_size": 4}
    )
    train_from_request(config, _request(config, planned_rounds=5), sealed_counts=True)
    report = _ledger(config).verify()
    (counts,) = report.releases_of(quantity="patients")
    assert counts.values == {} and counts.sealed is not None and counts.noise_std == 5.0
    assert release.opened(config, counts) == {"train": 42.0, "validation": 1.0}
    (reserve,) = [e for e in report.entries if isinstance(e, ReserveEntry)]
    assert reserve.sample_rate == 1.0 and reserve.steps == 1
    text = config.ledger_path.read_text(encoding="ascii")
    assert '"train":' not in text and '"validation":' not in text
    kept = config.paths.workdir / "releases" / "sealed.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    # The same patients again: the same sealed release, nothing spent for it.
    train_from_request(config, _request(config, planned_rounds=5, round=2), sealed_counts=True)
    assert len(_ledger(config).verify().releases_of(quantity="patients")) == 1
    # A plain run cannot weight an update by a sealed count: it releases one in the clear.
    train_round(config=config, request=_request(config, run_name="plain", planned_rounds=5))
    later = _ledger(config).verify().releases_of(quantity="patients")
    assert len(later) == 2 and later[-1].sealed is None and later[-1].values["train"] == 42.0


def test_a_sealed_count_whose_kept_values_do_not_open_it_is_released_anew(
    tmp_path: Path,
) -> None:
    config = _write_site(
        tmp_path / "s",
        train_lesions=[40] * 8,
        val_lesions=[30],
        training={"sample_rate": 0.5},
    )
    train_from_request(config, _request(config), sealed_counts=True)
    (reserve,) = [e for e in _ledger(config).verify().entries if isinstance(e, ReserveEntry)]
    assert reserve.sample_rate == 0.5 and reserve.steps == 2  # the site's own rate
    kept = config.paths.workdir / "releases" / "sealed.json"
    values = json.loads(kept.read_text(encoding="utf-8"))
    for entry in values.values():
        entry["values"]["train"] += 1  # what an attacker at the site would like to change
    kept.write_text(json.dumps(values), encoding="utf-8")
    (counts,) = _releases(config, "patients")
    assert release.opened(config, counts) is None
    train_from_request(config, _request(config, round=2), sealed_counts=True)
    assert len(_releases(config, "patients")) == 2


def test_a_run_under_secure_aggregation_gets_no_plain_round_or_evaluation(
    tmp_path: Path,
) -> None:
    config = _write_site(tmp_path / "s", train_lesions=[40] * 4, val_lesions=[30])
    state_dir(config, "study").mkdir(parents=True)  # the site took part in its key exchange
    for answer in (train_round, evaluate_round):
        with pytest.raises(PolicyError, match="under secure aggregation"):
            answer(config=config, request=_request(config))
    assert not config.ledger_path.exists()


def test_a_delta_not_below_one_over_the_count_is_refused(tmp_path: Path) -> None:
    config = _write_site(
        tmp_path / "s",
        train_lesions=[40] * 4,
        val_lesions=[30],
        privacy={"delta": 0.25},
        release={"patient_counts": "public", "public_reason": "test data"},
    )
    with pytest.raises(PolicyError, match=r"privacy.delta 0.25 is not below 1 / 5"):
        train_round(config=config, request=_request(config))
    assert _ledger(config).verify().reservations == ()


# 4. A run cannot lift the site's limits -------------------------------------------------------


def test_a_run_cannot_override_the_sites_per_round_target(tmp_path: Path) -> None:
    """Finding: a site with a target of 0.5 per round accepted sigma 0.55 x 20 epochs as
    "round 7 of planned 1", and one reservation spent 7.9 of a cap of 8."""
    config = _write_site(
        tmp_path / "s",
        train_lesions=[40] * 8,
        val_lesions=[30],
        training={"batch_size": 2},
        privacy={"noise_multiplier": None, "target_epsilon_per_round": 0.5, "epsilon_cap": 8.0},
        policy={"max_local_epochs": 20},
        release={"patient_counts": "public", "public_reason": "test data"},
    )
    with pytest.raises(PolicyError, match="round 7 is outside the run's planned rounds 1 to 1"):
        train_round(
            config=config, request=_request(config, round=7, planned_rounds=1, local_epochs=20)
        )
    with pytest.raises(PolicyError, match=r"less than the site's noise .*target_epsilon_per_round"):
        train_round(
            config=config,
            request=_request(config, planned_rounds=1, local_epochs=20, noise_multiplier=0.55),
        )
    assert _ledger(config).verify().reservations == ()
    # Without the run's noise the site's own target holds.
    train_round(config=config, request=_request(config, planned_rounds=1, local_epochs=20))
    report = _ledger(config).verify()
    (reservation,) = report.reservations
    alone = compute_epsilon(history=[reservation.dp_steps], delta=1e-5, accountant="rdp")
    assert alone <= 0.5
    # The run's one round is spent: the count comes from the ledger, not from the request.
    with pytest.raises(PolicyError, match="round 2 is outside"):
        train_round(
            config=config, request=_request(config, round=2, planned_rounds=1, local_epochs=1)
        )
    with pytest.raises(PolicyError, match="started with 1 planned rounds and now asks for 9"):
        train_round(
            config=config, request=_request(config, round=2, planned_rounds=9, local_epochs=1)
        )


def test_the_default_policy_limits_one_round_to_a_quarter_of_the_cap(tmp_path: Path) -> None:
    config = _write_site(
        tmp_path / "s",
        train_lesions=[40] * 8,
        val_lesions=[30],
        training={"batch_size": 2},
        privacy={"noise_multiplier": 0.6, "epsilon_cap": 8.0},
        release={"patient_counts": "public", "public_reason": "test data"},
    )
    with pytest.raises(PolicyError, match=r"above policy.max_epsilon_per_round 2"):
        train_round(config=config, request=_request(config, local_epochs=20))
    assert _ledger(config).verify().reservations == ()


def test_a_round_answered_for_one_model_is_not_trained_again_for_another(tmp_path: Path) -> None:
    config = _write_site(tmp_path / "s", train_lesions=[40, 40], val_lesions=[10])
    request = _request(config)
    first = train_round(config=config, request=request)
    again = train_round(config=config, request=request)  # replayed, nothing spent
    assert again.ledger_lines == first.ledger_lines
    other = dict(request.weights or {})
    other[next(iter(other))] = other[next(iter(other))] + 1.0
    with pytest.raises(PolicyError, match="answered round 1 of run 'study' already"):
        train_round(config=config, request=_request(config, weights=other))
    assert len(_ledger(config).verify().reservations) == 1


# 5. The noise generator -----------------------------------------------------------------------


def test_the_dp_noise_comes_from_the_csprng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    config = _write_site(tmp_path / "s", train_lesions=[40, 40], val_lesions=[10])
    calls: list[str] = []

    def watch(name: str) -> Any:
        original = getattr(torch, name)

        def watched(*args: object, **kwargs: object) -> Any:
            calls.append(name)
            return original(*args, **kwargs)

        return watched

    from medfed.site import noise

    draws: list[int] = []
    real = noise.CsprngGaussian.like_many

    def counted(self: noise.CsprngGaussian, *args: Any, **kwargs: Any) -> Any:
        draws.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(noise.CsprngGaussian, "like_many", counted)
    for name in ("normal", "randn", "randn_like"):
        monkeypatch.setattr(torch, name, watch(name))
    train_round(config=config, request=_request(config))
    (reservation,) = _ledger(config).verify().reservations
    assert len(draws) == reservation.committed_steps and calls == []


# 6. Accountant, cap and delta are the ledger's ------------------------------------------------


def test_a_larger_delta_in_the_config_is_refused(tmp_path: Path) -> None:
    config = _write_site(tmp_path / "s", train_lesions=[40, 40], val_lesions=[10])
    train_round(config=config, request=_request(config))
    entries = config.ledger_path.read_bytes()
    raised = config.model_copy(
        update={"privacy": config.privacy.model_copy(update={"delta": 1e-3})}
    )
    with pytest.raises(LedgerError, match=r"delta 0.001 is larger than the delta 1e-05"):
        train_round(config=raised, request=_request(raised, round=2))
    assert config.ledger_path.read_bytes() == entries


# 7. Smaller releases --------------------------------------------------------------------------


def test_a_patient_with_nan_voxels_changes_neither_steps_nor_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The screen refuses such a case before training (tests/integration/test_bad_data.py);
    past it, the DP step's own defence still keeps the steps and the messages unchanged."""
    from medfed.data.screen import Screened

    monkeypatch.setattr(
        "medfed.data.dataset.screen_cases",
        lambda cases, **_: Screened(cases=tuple(cases), excluded=(), warnings=()),
    )
    config = _write_site(
        tmp_path / "s",
        train_lesions=[40, 40, 40],
        val_lesions=[10],
        release={"patient_counts": "public", "public_reason": "test data"},
    )
    image = tmp_path / "s" / "images" / "p001.nii.gz"
    data = np.asanyarray(nib.load(image).dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), image)

    train_round(config=config, request=_request(config, local_epochs=3))
    (reservation,) = _ledger(config).verify().reservations
    assert reservation.committed_steps == reservation.reserved_steps
    (loss,) = _releases(config, "train_loss")
    assert math.isfinite(loss.values["loss"])


@pytest.mark.usefixtures("task_identity")
def test_refusals_carry_no_patient_ids_or_paths(tmp_path: Path) -> None:
    from medfed.site import clientapp

    config = _write_site(tmp_path / "s", train_lesions=[40], val_lesions=[10])
    for error in (
        PrivacyUnitError("patients p007 and p012 were sampled twice"),
        DataError(f"{tmp_path}/images/p007.nii.gz: all voxels are zero"),
        RuntimeError("expected input[2, 3, 16, 16, 16] to have 1 channels (p007)"),
    ):

        def work(site: SiteConfig, message: Message, error: Exception = error) -> Any:
            raise error

        reply = clientapp._handle(_message(), _context(config), work)
        assert reply.has_error()
        assert "p007" not in reply.error.reason and str(tmp_path) not in reply.error.reason


def test_every_reply_path_goes_through_the_release_policy(tmp_path: Path) -> None:
    """Train, evaluate, initialise, decline and fail: nothing in any reply but the weights,
    the site's id and round, and signed ledger lines whose every number has a mechanism."""
    from medfed.api.demo import prepare_federation
    from medfed.site.clientapp import app
    from medfed.transport.inprocess import run_in_process

    setup = prepare_federation(
        root=tmp_path / "fed", sites=3, cases=8, size=16, rounds=2, local_epochs=1, min_sites=2
    )
    # site-c's policy accepts no run of this name: declines on the way.
    refusing = load_site_config(setup.site_configs["site-c"])
    policy = refusing.policy.model_copy(update={"accepted_runs": ["another-run"]})
    dump_site_config(refusing.model_copy(update={"policy": policy}), setup.site_configs["site-c"])
    replies: list[Message] = []

    def capturing(message: Message, context: Context) -> Message:
        reply = app(message, context)
        replies.append(reply)
        return reply

    # site-b's policy refuses the second round's request: a decline on the way.
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings,
        client_app=capturing,
    )
    assert result.status == "finished", result.reason
    kinds = set()
    declines = 0
    for reply in replies:
        kinds.add(reply.metadata.message_type)
        if reply.has_error():
            declines += 1
            assert reply.error.reason.startswith("error[policy]: site site-c declines")
            continue
        content = reply.content
        if reply.metadata.message_type == "query.init":
            assert set(content) == {"global", "site"}
            assert set(content["site"]) == {"site_id", "spec"}
            continue
        assert set(content) <= {"update", "site"}
        site = content["site"]
        assert set(site) <= {"site_id", "round", "ledger_first_seq", "ledger_lines"}
        for line in site["ledger_lines"]:
            entry = parse_entry(json.loads(line))
            if isinstance(entry, ReleaseEntry):
                assert entry.mechanism in ("gaussian", "dp-sgd", "public")
                if entry.mechanism == "public":
                    assert entry.reason
    # site-c declined its first round and was not asked again.
    assert kinds == {"query.init", "train", "evaluate"} and declines == 1


def _message() -> Message:
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict({"config": ConfigRecord({"run_name": "study", "round": 1})})
    return Message(content, dst_node_id=1, message_type="train")


def _context(config: SiteConfig) -> Context:
    from flwr.app import RecordDict

    path = config.paths.workdir.parent / "site.yaml"
    return Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(path)},
        state=RecordDict(),
        run_config={},
    )
