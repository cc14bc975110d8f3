"""What privacy costs in segmentation quality: federated DP Dice against non-private baselines.

    python benchmarks/utility.py            # 3 sites x 24 cases at 32^3, epsilon 8 per site
    python benchmarks/utility.py --sites 3 --cases 24 --size 32 --cap 8 --rounds 80 \
        --local-epochs 1 --optimizer sgd --lr 1.0 --clip 0.5 --strategy fedadam \
        --server-lr 0.05 --channels 8,16 --central-epochs 100 --threads 1 --json out.json

One synthetic non-IID federation (`medfed.api.demo.prepare_federation`: a provisioned workspace and
one synthetic site per name) is trained three ways, each scored on the same validation patients
of every site (the manifests' split) with the same Dice, weighted by validation patients:

1. centralised, non-private: all sites' training patients pooled, no DP, the same network
   (`medfed.api.baselines.train_centralised`);
2. federated, non-private: the same rounds, local epochs and strategy with plain local training
   (`medfed.api.baselines.train_federated_nonprivate`);
3. federated with DP-SGD at every site: the real ServerApp round loop and ClientApp in this
   process (`medfed.transport.inprocess.run_in_process`), real Opacus steps and signed ledgers.
   The noise multiplier is planned so that the whole run spends at most ``--cap`` at the site
   with the fewest training patients (RDP, ``--delta``); the epsilon printed for each site is
   recomputed from its own ledger after the run.

The figure of merit is (3) / (1). The data are synthetic: the settings below were tuned on them,
which on real patients' data would itself spend privacy.

Recipes (the sites' settings, see README "Utility recipes"): ``--augmentation-multiplicity K``
averages K augmented views of each sampled patient before clipping; ``--adaptive-clipping``
clips at a DP estimate of the median gradient norm, starting from ``--clip``. ``--task brain``
trains gray/white-matter segmentation of nilearn's MNI152 template instead of the synthetic
shapes (``medfed data synth --task brain``). ``--runs K`` repeats everything with seeds
``seed .. seed+K-1``; ``--json`` then also holds one row per setting, averaged over the runs:
``{"rows": [{"task", "patients_per_site", "epsilon", "recipe", "dp_dice", "central_dice",
"ratio", "runs"}]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.api.demo import DemoSetup, prepare_federation
from medfed.config import SiteConfig, load_site_config
from medfed.config.loading import dump_site_config
from medfed.config.run import RunSettings
from medfed.config.site import AdaptiveClipping
from medfed.config.strategy import StrategySettings
from medfed.privacy import SiteLedger, noise_for_target_epsilon, plan_sampling
from medfed.run_events import RoundDone, RunEvent


@dataclass(frozen=True)
class Outcome:
    name: str
    dice: float
    dice_per_site: Mapping[str, float]
    seconds: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("federation")
    data.add_argument("--sites", type=int, default=3)
    data.add_argument("--cases", type=int, default=24, help="synthetic cases per site")
    data.add_argument("--size", type=int, default=32, help="volume edge (voxels)")
    data.add_argument("--seed", type=int, default=0, help="data and initial-model seed")
    data.add_argument(
        "--task",
        choices=("shapes", "brain"),
        default="shapes",
        help="synthetic lesions (shapes) or gray/white matter of the MNI152 template (brain)",
    )
    privacy = parser.add_argument_group("privacy")
    privacy.add_argument("--cap", type=float, default=8.0, help="epsilon cap per site")
    privacy.add_argument("--delta", type=float, default=1e-5)
    privacy.add_argument(
        "--share", type=float, default=1.0, help="share of the cap the planned run may spend"
    )
    privacy.add_argument("--clip", type=float, default=0.5, help="per-patient clipping norm")
    privacy.add_argument(
        "--distributed-noise",
        action="store_true",
        help="secure aggregation with distributed noise: each site adds 1/sqrt(sites) of the "
        "noise (the sites' policies allow it; one full-batch step per round)",
    )
    privacy.add_argument(
        "--adaptive-clipping",
        action="store_true",
        help="clip at a DP estimate of the median gradient norm, starting from --clip",
    )
    privacy.add_argument(
        "--count-noise-multiplier",
        type=float,
        default=None,
        help="adaptive clipping's count noise (default: the sites' own, 5x the noise)",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--rounds", type=int, default=80)
    train.add_argument("--local-epochs", type=int, default=1)
    train.add_argument(
        "--batch",
        type=int,
        default=None,
        help="expected patients per DP step (default: all of a site's, sample rate 1)",
    )
    train.add_argument("--lr", type=float, default=1.0, help="sites' learning rate under DP")
    train.add_argument(
        "--augmentation-multiplicity",
        type=int,
        default=1,
        metavar="K",
        help="augmented views per sampled patient, averaged before clipping",
    )
    train.add_argument("--optimizer", choices=("adam", "sgd"), default="sgd")
    train.add_argument("--channels", default="8,16", help="UNet channels per level")
    train.add_argument("--res-units", type=int, default=1)
    train.add_argument("--norm", choices=("instance", "group"), default="instance")
    train.add_argument("--strategy", choices=("fedavg", "fedprox", "fedadam"), default="fedadam")
    train.add_argument("--server-lr", type=float, default=5e-2, help="FedAdam's server rate")
    train.add_argument(
        "--server-lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="FedAdam's server rate over the rounds",
    )
    train.add_argument(
        "--server-lr-final",
        type=float,
        default=0.1,
        help="cosine: the last round's server rate, as a share of --server-lr",
    )
    train.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu")
    base = parser.add_argument_group("non-private baselines (their own, standard settings)")
    base.add_argument("--central-epochs", type=int, default=100)
    base.add_argument("--nonprivate-batch", type=int, default=2)
    base.add_argument("--nonprivate-lr", type=float, default=2e-3)
    base.add_argument("--nonprivate-optimizer", choices=("adam", "sgd"), default="adam")
    base.add_argument("--nonprivate-rounds", type=int, default=10)
    base.add_argument("--nonprivate-local-epochs", type=int, default=3)
    base.add_argument(
        "--only",
        choices=("all", "dp", "baselines"),
        default="all",
        help="run only the DP federation or only the baselines (for screening)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for training")
    parser.add_argument("--runs", type=int, default=1, help="repeat with seeds seed..seed+K-1")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.augmentation_multiplicity < 1:
        parser.error("--runs and --augmentation-multiplicity must be at least 1")
    if args.distributed_noise and (args.local_epochs != 1 or args.sites < 2):
        parser.error("--distributed-noise takes one local epoch and at least 2 sites")
    if args.server_lr_schedule != "constant" and args.strategy != "fedadam":
        parser.error("--server-lr-schedule sets FedAdam's server rate: use --strategy fedadam")
    return args


def recipe(args: argparse.Namespace) -> str:
    """The DP recipe's name in the rows: dp-sgd, plus each option that changes it."""
    parts = ["dp-sgd"]
    if args.augmentation_multiplicity > 1:
        parts.append(f"augmult-{args.augmentation_multiplicity}")
    if args.adaptive_clipping:
        parts.append("adaptive-clip")
    if args.distributed_noise:
        parts.append(f"distributed-noise-{args.sites}")
    if args.server_lr_schedule != "constant":
        parts.append(f"{args.server_lr_schedule}-server-lr-{args.server_lr_final:g}")
    return "+".join(parts)


def channels(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def run_settings(args: argparse.Namespace, base: RunSettings, noise: float) -> RunSettings:
    width = channels(args.channels)
    strategy: dict[str, Any] = {"name": args.strategy}
    if args.strategy == "fedprox":
        strategy["proximal_mu"] = args.proximal_mu
    if args.strategy == "fedadam":
        strategy["server_lr"] = args.server_lr
        strategy["server_lr_schedule"] = args.server_lr_schedule
        strategy["server_lr_final"] = args.server_lr_final
    return RunSettings.model_validate(
        {
            **base.model_dump(),
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "learning_rate": args.lr,
            "noise_multiplier": noise,
            "max_grad_norm": args.clip,
            "min_sites": args.sites,
            "model": {
                "channels": width,
                "strides": [2] * (len(width) - 1),
                "num_res_units": args.res_units,
                "norm": args.norm,
            },
            "strategy": strategy,
            **distributed_settings(args),
        }
    )


def distributed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings that turn distributed noise on: every site's share counted on."""
    if not args.distributed_noise:
        return {}
    return {"secure_aggregation": True, "distributed_noise": {"sites": args.sites}}


def planned_noise(args: argparse.Namespace, train_patients: Mapping[str, int]) -> float:
    """Noise with which the whole run spends ``share * cap`` at the smallest site, rounded up.

    The smallest site has the highest sample rate, hence the highest epsilon for given noise.
    """
    plan = plan_sampling(
        dataset_size=min(train_patients.values()),
        batch_size=args.batch,
        epochs=args.rounds * args.local_epochs,
    )
    noise = noise_for_target_epsilon(
        target_epsilon=args.share * args.cap,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=args.delta,
        accountant="rdp",
    )
    return math.ceil(noise * 100) / 100


def prepare(args: argparse.Namespace, root: Path) -> tuple[DemoSetup, dict[str, SiteConfig]]:
    """The demo federation, with each site's training settings set for this benchmark."""
    setup = prepare_federation(
        root=root,
        sites=args.sites,
        cases=args.cases,
        size=args.size,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        seed=args.seed,
    )
    if args.batch is None:
        # sample rate 1 at every site: each DP step sees every training patient once
        args.batch = max(setup.train_patients.values())
    configs: dict[str, SiteConfig] = {}
    for index, (site, path) in enumerate(setup.site_configs.items()):
        config = load_site_config(path)
        if args.task == "brain":
            config = brain_data(args, config, index=index)
        training = config.training.model_copy(
            update={
                "batch_size": args.batch,
                "threads": args.threads,
                "optimizer": args.optimizer,
                "augmentation_multiplicity": args.augmentation_multiplicity,
            }
        )
        adaptive = (
            AdaptiveClipping(count_noise_multiplier=args.count_noise_multiplier)
            if args.adaptive_clipping
            else None
        )
        privacy = config.privacy.model_copy(
            update={
                "epsilon_cap": args.cap,
                "delta": args.delta,
                "accountant": "rdp",
                "adaptive_clipping": adaptive,
            }
        )
        # The benchmark's sites agree to its run: as many rounds as it plans, and distributed
        # noise when it asks for it.
        distributed = config.policy.distributed_noise.model_copy(
            update={"allowed": args.distributed_noise, "min_sites": min(args.sites, 3)}
        )
        policy = config.policy.model_copy(
            update={"max_rounds_per_run": args.rounds, "distributed_noise": distributed}
        )
        config = config.model_copy(
            update={"training": training, "privacy": privacy, "policy": policy}
        )
        dump_site_config(config, path)
        configs[site] = load_site_config(path)
    return setup, configs


def brain_data(args: argparse.Namespace, config: SiteConfig, *, index: int) -> SiteConfig:
    """Replace a demo site's cases with synthetic brains: same patients, seeds and split.

    The site keeps its patient ids, its manifest's split and its released counts; only the
    image and label files change, and the classes (background, gray and white matter).
    """
    from medfed.data.synth import synthesize_site

    shift = -0.5 + index / (args.sites - 1) if args.sites > 1 else 0.0
    result = synthesize_site(
        out=config.data.manifest.parent,
        cases=args.cases,
        size=args.size,
        seed=args.seed + 101 * index,  # as medfed.api.sites.make_synthetic_sites
        site_shift=shift,
        site_id=config.site_id,
        overwrite=True,
        task="brain",
    )
    brain = load_site_config(result.config).data
    data = config.data.model_copy(update={"classes": brain.classes, "spacing": brain.spacing})
    return config.model_copy(update={"data": data})


def run_dp(
    args: argparse.Namespace, setup: DemoSetup, configs: Mapping[str, SiteConfig], noise: float
) -> tuple[Outcome, dict[str, float]]:
    from medfed.transport.inprocess import run_in_process

    settings = run_settings(args, setup.settings, noise)

    def progress(event: RunEvent) -> None:
        if not args.quiet and isinstance(event, RoundDone):
            print(
                f"  [dp] round {event.round}: dice before {event.dice_before}, "
                f"loss {event.loss}, {event.seconds} s",
                flush=True,
            )

    started = time.monotonic()
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=settings,
        on_event=progress,
    )
    seconds = time.monotonic() - started
    if result.status != "finished":
        raise SystemExit(f"the DP federation stopped: {result.reason}")
    per_site = {site["site_id"]: float(site["dice"]) for site in result.sites}
    epsilons = {}
    for site, config in configs.items():
        ledger = SiteLedger(path=config.ledger_path, key_path=config.signing_key_path, site_id=site)
        epsilons[site] = ledger.spent(delta=args.delta, accountant="rdp")
        if args.distributed_noise:
            local = ledger.spent(delta=args.delta, accountant="rdp", view="local")
            print(f"  {site}: epsilon {epsilons[site]:.3f} distributed, {local:.3f} local alone")
    outcome = Outcome(
        name="federated DP", dice=result.dice_final, dice_per_site=per_site, seconds=seconds
    )
    return outcome, epsilons


def run_baselines(
    args: argparse.Namespace, setup: DemoSetup, configs: Mapping[str, SiteConfig], noise: float
) -> list[Outcome]:
    from medfed.api.baselines import train_centralised, train_federated_nonprivate

    # The baselines train the DP run's network, with non-private training settings of their own:
    # the DP-tuned ones (huge batches, a plain-SGD step per round) would handicap them.
    base = run_settings(args, setup.settings, noise)
    settings = base.model_copy(
        update={
            "rounds": args.nonprivate_rounds,
            "local_epochs": args.nonprivate_local_epochs,
            "learning_rate": args.nonprivate_lr,
            "strategy": StrategySettings(name="fedavg"),
        }
    )
    ordered = []
    for site in sorted(configs):
        config = configs[site]
        training = config.training.model_copy(
            update={
                "optimizer": args.nonprivate_optimizer,
                "batch_size": args.nonprivate_batch,
                "learning_rate": args.nonprivate_lr,
            }
        )
        ordered.append(config.model_copy(update={"training": training, "model": base.model}))
    central = train_centralised(
        site_configs=ordered,
        epochs=args.central_epochs,
        seed=args.seed,
        threads=args.threads,
    )
    if not args.quiet:
        curve = ", ".join(f"{step.dice:.3f}" for step in central.history[4::5])
        print(f"  [centralised] Dice every 5 epochs: {curve}", flush=True)
    federated = train_federated_nonprivate(
        site_configs=ordered, settings=settings, threads=args.threads
    )
    return [
        Outcome("centralised non-private", central.dice, central.dice_per_site, central.seconds),
        Outcome(
            "federated non-private", federated.dice, federated.dice_per_site, federated.seconds
        ),
    ]


def report(
    args: argparse.Namespace,
    outcomes: list[Outcome],
    epsilons: Mapping[str, float],
    noise: float,
    train_patients: Mapping[str, int],
) -> dict[str, Any]:
    sites = sorted(train_patients)
    print()
    print(
        f"{args.sites} sites x {args.cases} cases at {args.size}^3 "
        f"(training patients {', '.join(str(train_patients[s]) for s in sites)}); "
        f"{args.rounds} rounds x {args.local_epochs} local epochs, batch {args.batch}, "
        f"lr {args.lr} ({args.optimizer}), clip {args.clip}, noise {noise}, "
        f"channels {args.channels}, {args.strategy}"
        + (f" (server lr {args.server_lr})" if args.strategy == "fedadam" else "")
    )
    if args.task != "shapes" or recipe(args) != "dp-sgd":
        print(f"task {args.task}, recipe {recipe(args)}, seed {args.seed}")
    print(
        f"baselines: {args.nonprivate_optimizer} lr {args.nonprivate_lr}, batch "
        f"{args.nonprivate_batch}; centralised {args.central_epochs} epochs; federated fedavg "
        f"{args.nonprivate_rounds} rounds x {args.nonprivate_local_epochs} local epochs"
    )
    print()
    header = f"| {'model':<26} | {'Dice':>6} | " + " | ".join(f"{s:>7}" for s in sites)
    print(header + " | seconds |")
    print("|" + "---|" * (3 + len(sites)))
    for outcome in outcomes:
        cells = " | ".join(f"{outcome.dice_per_site.get(s, math.nan):7.4f}" for s in sites)
        print(f"| {outcome.name:<26} | {outcome.dice:6.4f} | {cells} | {outcome.seconds:7.1f} |")
    if epsilons:
        print()
        print(
            "epsilon spent (from each site's ledger, RDP, delta "
            f"{args.delta:g}, cap {args.cap:g}): "
            + ", ".join(f"{s} {epsilons[s]:.3f}" for s in sorted(epsilons))
        )
    by_name = {outcome.name: outcome.dice for outcome in outcomes}
    ratios: dict[str, float] = {}
    central = by_name.get("centralised non-private")
    if central:
        for name in ("federated non-private", "federated DP"):
            if name in by_name:
                ratios[f"{name} / centralised"] = by_name[name] / central
    if "federated DP" in by_name and by_name.get("federated non-private"):
        ratios["federated DP / federated non-private"] = (
            by_name["federated DP"] / by_name["federated non-private"]
        )
    if ratios:
        print()
        for name, value in ratios.items():
            print(f"{name}: {value:.3f}")
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "noise_multiplier": noise,
        "train_patients": dict(train_patients),
        "outcomes": [
            {
                "name": o.name,
                "dice": o.dice,
                "dice_per_site": dict(o.dice_per_site),
                "seconds": o.seconds,
            }
            for o in outcomes
        ],
        "epsilon": dict(epsilons),
        "ratios": ratios,
    }


def rows(args: argparse.Namespace, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row for this setting: each Dice the mean over the runs that have it."""

    def mean_dice(name: str) -> float | None:
        values = [
            outcome["dice"]
            for summary in summaries
            for outcome in summary["outcomes"]
            if outcome["name"] == name
        ]
        return sum(values) / len(values) if values else None

    dp, central = mean_dice("federated DP"), mean_dice("centralised non-private")
    return [
        {
            "task": args.task,
            "patients_per_site": args.cases,
            "epsilon": args.cap,
            "recipe": recipe(args),
            "dp_dice": dp,
            "central_dice": central,
            "ratio": dp / central if dp is not None and central else None,
            "runs": len(summaries),
        }
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summaries: list[dict[str, Any]] = []
    first_seed = args.seed
    for run in range(args.runs):
        args.seed = first_seed + run
        with tempfile.TemporaryDirectory(prefix="medfed-utility-") as tmp:
            setup, configs = prepare(args, Path(tmp) / "federation")
            noise = planned_noise(args, setup.train_patients)
            outcomes: list[Outcome] = []
            epsilons: dict[str, float] = {}
            if args.only in ("all", "baselines"):
                outcomes += run_baselines(args, setup, configs, noise)
            if args.only in ("all", "dp"):
                dp, epsilons = run_dp(args, setup, configs, noise)
                outcomes.append(dp)
            summaries.append(report(args, outcomes, epsilons, noise, setup.train_patients))
    args.seed = first_seed
    summary = summaries[0] if len(summaries) == 1 else {"runs": summaries}
    summary["rows"] = rows(args, summaries)
    print()
    print(json.dumps({"rows": summary["rows"]}))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
