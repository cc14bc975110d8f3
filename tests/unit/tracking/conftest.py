"""Fixtures of the tracking tests: a fake run's workspace and a real tiny checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tracking_support import ROUNDS, SITES, FakeRun

from medfed.aggregator.run_store import RunStore
from medfed.config.run import RunSettings
from medfed.workspace import RunPaths


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in a scratch directory: anything MLflow writes relative to the cwd lands there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (small, 2D) medfed checkpoint: what the aggregator saves after each round."""
    from medfed.models import ModelSpec, build_model, save_checkpoint

    spec = ModelSpec(
        network="unet",
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(4, 8),
        strides=(2,),
        num_res_units=0,
        norm="instance",
    )
    directory = tmp_path_factory.mktemp("checkpoint") / "round-0002"
    return save_checkpoint(directory=directory, model=build_model(spec=spec), spec=spec)


@pytest.fixture
def fake_run(tmp_path: Path, tiny_checkpoint: Path) -> Callable[..., FakeRun]:
    def make(name: str = "trial") -> FakeRun:
        workspace = tmp_path / f"workspace-{name}"
        (workspace / "ledgers").mkdir(parents=True)
        for site in SITES:
            (workspace / "ledgers" / f"{site}.ledger.jsonl").write_bytes(
                f'{{"site": "{site}", "signed": true}}\n'.encode()
            )
        run_dir = workspace / "runs" / name
        settings = RunSettings(run_name=name, rounds=ROUNDS, sites=list(SITES), seed=3)
        return FakeRun(
            workspace=workspace,
            run_dir=run_dir,
            settings=settings,
            store=RunStore(paths=RunPaths(directory=run_dir)),
            checkpoint=tiny_checkpoint,
        )

    return make
