"""Which training recipe the demo should use: its final Dice under each candidate, paired by seed.

    python benchmarks/demo_recipe.py                                  # K = 1, 2, 4; seeds 0-7
    python benchmarks/demo_recipe.py --multiplicities 1,2 --seeds 0-3 --ema 0.5 --json out.json
    python benchmarks/demo_recipe.py --cases 8 --size 16 --rounds 1 --local-epochs 1 --seeds 0

Each run is ``medfed demo --in-process`` as the demo sets it up (``prepare_federation``: its
sites, noise, learning rate and network), with every site's ``training.augmentation_multiplicity``
set to K and, with ``--ema``, the run's final model the moving average of its rounds' models. The
same seed gives the same synthetic patients and initial model under every setting, so the table
compares each setting with the first one seed by seed: the mean difference and its standard
error. ``--json`` writes ``{"runs": [{"setting", "seed", "dice_initial", "dice_final",
"seconds"}], "settings": [{"setting", "runs", "mean", "sd", "paired_gain", "paired_se"}]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _signals import unwind_on_signals


def seeds_of(text: str) -> list[int]:
    """``0-7`` or ``0,2,5``."""
    if "-" in text:
        first, last = (int(part) for part in text.split("-", 1))
        return list(range(first, last + 1))
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multiplicities", default="1,2,4", help="augmentation multiplicities K")
    parser.add_argument("--ema", type=float, help="also run K = 1 with this EMA decay")
    parser.add_argument("--seeds", default="0-7", help="seeds, as 0-7 or 0,2,5")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases", type=int, default=30, help="synthetic cases per site")
    parser.add_argument("--size", type=int, default=32, help="volume edge (voxels)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the runs and the table here")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> list[tuple[str, int, float | None]]:
    """(name, K, EMA decay) per setting; the first is the one the others are compared with."""
    found = [(f"K = {k}", k, None) for k in (int(p) for p in args.multiplicities.split(","))]
    if args.ema is not None:
        found.append((f"EMA {args.ema:g}", 1, args.ema))
    return found


def run_one(args: argparse.Namespace, *, k: int, ema: float | None, seed: int) -> dict[str, Any]:
    """One in-process demo run with every site's multiplicity at ``k``."""
    from medfed.api.demo import prepare_federation
    from medfed.config import load_site_config
    from medfed.config.loading import dump_site_config
    from medfed.transport.inprocess import run_in_process

    with tempfile.TemporaryDirectory(prefix="medfed-demo-recipe-") as tmp:
        setup = prepare_federation(
            root=Path(tmp) / "fed",
            sites=args.sites,
            cases=args.cases,
            size=args.size,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            seed=seed,
        )
        for path in setup.site_configs.values():
            config = load_site_config(path)
            training = config.training.model_copy(update={"augmentation_multiplicity": k})
            dump_site_config(config.model_copy(update={"training": training}), path)
        settings = setup.settings
        if ema is not None:
            settings = type(settings).model_validate(
                {**settings.model_dump(), "ema": {"decay": ema}}
            )
        started = time.monotonic()
        result = run_in_process(
            workspace=setup.workspace, site_configs=setup.site_configs, settings=settings
        )
        if result.status != "finished":
            raise SystemExit(f"seed {seed}, K = {k}: the run {result.status}: {result.reason}")
        return {
            "dice_initial": result.dice_initial,
            "dice_final": result.dice_final,
            "seconds": time.monotonic() - started,
        }


def summarise(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per setting: mean and sd of the final Dice, and its gain over the first setting paired by
    seed (mean difference and standard error; None with fewer than two seeds)."""
    first = {r["seed"]: r["dice_final"] for r in runs if r["setting"] == names[0]}
    rows = []
    for name in names:
        mine = [r for r in runs if r["setting"] == name]
        dice = [r["dice_final"] for r in mine]
        gains = [r["dice_final"] - first[r["seed"]] for r in mine if r["seed"] in first]
        rows.append(
            {
                "setting": name,
                "runs": len(mine),
                "mean": statistics.mean(dice),
                "sd": statistics.stdev(dice) if len(dice) > 1 else None,
                "seconds": statistics.mean(r["seconds"] for r in mine),
                "paired_gain": statistics.mean(gains) if gains else None,
                "paired_se": statistics.stdev(gains) / math.sqrt(len(gains))
                if len(gains) > 1
                else None,
            }
        )
    return rows


def _text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    unwind_on_signals()
    args = parse_args(argv)
    settings = settings_of(args)
    runs = []
    for seed in seeds_of(args.seeds):
        for name, k, ema in settings:
            outcome = run_one(args, k=k, ema=ema, seed=seed)
            runs.append({"setting": name, "seed": seed, **outcome})
            print(f"seed {seed}, {name}: final Dice {outcome['dice_final']:.3f}", flush=True)
    table = summarise(runs, [name for name, _, _ in settings])
    print(f"\n| demo run with | runs | final Dice mean (sd) | gain over {settings[0][0]} | s |")
    print("|---|---:|---:|---:|---:|")
    for row in table:
        gain = f"{_text(row['paired_gain'])} (se {_text(row['paired_se'])})"
        print(
            f"| {row['setting']} | {row['runs']} | {row['mean']:.3f} ({_text(row['sd'])}) "
            f"| {gain} | {row['seconds']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "settings": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
