"""How the Dice ratio under DP closes as sites grow: utility.py at several sizes and epsilons.

    python benchmarks/utility_curve.py        # 24, 48, 96, 192 patients per site; eps 8 and 2
    python benchmarks/utility_curve.py --patients 24,48 --epsilons 8 --runs 1 --jobs 2 \
        --json curve.json --plot curve.png
    python benchmarks/utility_curve.py --patients 12 --epsilons 8 --rounds 2 \
        --central-epochs 2 --nonprivate-rounds 1                          # quick

For each number of patients per site, ``utility.py --only baselines`` trains the centralised
non-private model once (it does not depend on epsilon) and ``utility.py --only dp`` runs the
DP federation once per epsilon, each as its own process (``--jobs`` at a time), with the same
data seeds. The ratio is federated DP Dice over centralised non-private Dice, each the mean of
``--runs`` seeds; its range is the lowest and highest of the seeds' own ratios. The table says
from how many patients per site the ratio reaches ``--target`` (0.95) at each epsilon, when it
does within the measured range; ``--plot`` draws the curve (matplotlib), and ``--json`` writes
``{"rows": [{"task", "patients_per_site", "epsilon", "recipe", "dp_dice", "central_dice",
"ratio", "runs", "ratio_low", "ratio_high"}], "passes": {"<epsilon>": patients or null}}``.
``--previous`` adds the rows of an earlier run's ``--json`` for the points this run does not
measure, so that a curve can grow one size at a time (``benchmarks/utility_curve.json`` holds
the one in ``benchmarks/README.md``).
Every other option goes to utility.py unchanged (``--size``, ``--rounds``,
``--distributed-noise``...).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def numbers(text: str, kind: type) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", default="24,48,96,192", help="patients per site (cases)")
    parser.add_argument("--epsilons", default="8,2", help="epsilon caps per site")
    parser.add_argument("--runs", type=int, default=1, help="seeds per point")
    parser.add_argument("--jobs", type=int, default=2, help="utility.py processes at a time")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--plot", type=Path, help="draw the curve here (PNG)")
    parser.add_argument(
        "--previous",
        type=Path,
        help="the --json of an earlier run: its rows join the table, the file and the plot "
        "wherever this run does not measure the same point",
    )
    args, rest = parser.parse_known_args(argv)
    if args.runs < 1 or args.jobs < 1:
        parser.error("--runs and --jobs must be at least 1")
    return args, rest


def run_one(command: list[str], out: Path) -> dict[str, Any]:
    """One utility.py run; its JSON rows (the run's output goes to a log beside them)."""
    started = time.monotonic()
    log = out.with_suffix(".log")
    with log.open("w", encoding="utf-8") as stream:
        done = subprocess.run(
            [sys.executable, str(HERE / "utility.py"), *command, "--json", str(out), "--quiet"],
            stdout=stream,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8").splitlines()[-5:]
        raise SystemExit(f"utility.py {' '.join(command)} failed:\n" + "\n".join(tail))
    print(f"  done in {time.monotonic() - started:.0f} s: {' '.join(command)}", flush=True)
    summary = json.loads(out.read_text(encoding="utf-8"))
    row: dict[str, Any] = summary["rows"][0]
    row["per_seed"] = per_seed(summary)
    return row


def per_seed(summary: dict[str, Any]) -> dict[str, float]:
    """Each seed's Dice of the one model the run trained (DP or centralised), by seed."""
    found: dict[str, float] = {}
    for run in summary.get("runs", [summary]):
        for outcome in run["outcomes"]:
            if outcome["name"] in ("federated DP", "centralised non-private"):
                found[str(run["args"]["seed"])] = outcome["dice"]
    return found


def with_previous(
    rows: list[dict[str, Any]], previous: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``rows`` and the earlier rows of the points (task, patients, epsilon) they do not cover."""

    def point(row: dict[str, Any]) -> tuple[str, int, float]:
        return row.get("task", "shapes"), row["patients_per_site"], row["epsilon"]

    measured = {point(row) for row in rows}
    return [row for row in previous if point(row) not in measured] + rows


def passes(rows: list[dict[str, Any]], epsilon: float, target: float) -> int | None:
    """The fewest patients per site from which every measured ratio reaches ``target``."""
    points = sorted((r["patients_per_site"], r["ratio"]) for r in rows if r["epsilon"] == epsilon)
    for index, (patients, _ratio) in enumerate(points):
        if all(ratio is not None and ratio >= target for _p, ratio in points[index:]):
            return int(patients)
    return None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| patients per site | epsilon | federated DP Dice | centralised Dice | ratio | "
        "ratio range | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (-r["epsilon"], r["patients_per_site"])):
        low, high = row.get("ratio_low"), row.get("ratio_high")
        # an earlier run's row may not have its seeds' ratios
        spread = "-" if low is None or high is None or row["runs"] == 1 else f"{low:.3f}-{high:.3f}"
        lines.append(
            f"| {row['patients_per_site']} | {row['epsilon']:g} | {row['dp_dice']:.3f} | "
            f"{row['central_dice']:.3f} | {row['ratio']:.3f} | {spread} | {row['runs']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(5.5, 3.5))
    for epsilon in sorted({r["epsilon"] for r in rows}, reverse=True):
        points = sorted(
            (
                r["patients_per_site"],
                r["ratio"],
                # at least 0: the mean's ratio can pass a seed's by a rounding error
                max(0.0, r["ratio"] - (r.get("ratio_low") or r["ratio"])),
                max(0.0, (r.get("ratio_high") or r["ratio"]) - r["ratio"]),
            )
            for r in rows
            if r["epsilon"] == epsilon
        )
        patients, ratios, below, above = zip(*points, strict=True)
        axes.errorbar(
            patients,
            ratios,
            yerr=[below, above],
            marker="o",
            capsize=3,
            label=f"epsilon {epsilon:g}",
        )
    axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"{target:g}")
    axes.set_xscale("log", base=2)
    patients = sorted({r["patients_per_site"] for r in rows})
    axes.set_xticks(patients, [str(p) for p in patients])
    axes.set_xlabel("patients per site (3 sites)")
    axes.set_ylabel("federated DP / centralised Dice")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    patients = numbers(args.patients, int)
    epsilons = numbers(args.epsilons, float)
    runs = ["--runs", str(args.runs)]
    with tempfile.TemporaryDirectory(prefix="medfed-curve-") as tmp:
        jobs: dict[tuple[int, float | None], tuple[list[str], Path]] = {}
        for count in patients:
            base = [*rest, *runs, "--cases", str(count)]
            jobs[(count, None)] = ([*base, "--only", "baselines"], Path(tmp) / f"b{count}.json")
            for epsilon in epsilons:
                command = [*base, "--only", "dp", "--cap", f"{epsilon:g}"]
                jobs[(count, epsilon)] = (command, Path(tmp) / f"d{count}-{epsilon:g}.json")
        # the largest first, so that the longest runs do not start last
        order = sorted(jobs, key=lambda key: -key[0])
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {key: pool.submit(run_one, *jobs[key]) for key in order}
            results = {key: future.result() for key, future in futures.items()}
    rows = []
    for count in patients:
        central = results[(count, None)]["central_dice"]
        for epsilon in epsilons:
            dp = results[(count, epsilon)]
            centrals = results[(count, None)]["per_seed"]
            ratios = [value / centrals[seed] for seed, value in dp["per_seed"].items()]
            rows.append(
                {
                    "task": dp["task"],
                    "patients_per_site": count,
                    "epsilon": epsilon,
                    "recipe": dp["recipe"],
                    "dp_dice": dp["dp_dice"],
                    "central_dice": central,
                    "ratio": dp["dp_dice"] / central if central else None,
                    "runs": args.runs,
                    # each seed's DP Dice over the centralised Dice of the same data
                    "ratio_low": min(ratios),
                    "ratio_high": max(ratios),
                }
            )
    if args.previous is not None:
        rows = with_previous(rows, json.loads(args.previous.read_text(encoding="utf-8"))["rows"])
    print()
    print(table(rows))
    reached = {f"{e:g}": passes(rows, e, args.target) for e in epsilons}
    for epsilon, count in reached.items():
        where = f"from {count} patients per site" if count else "not within the measured range"
        print(f"epsilon {epsilon}: the ratio reaches {args.target:g} {where}")
    if args.json is not None:
        summary = {"args": sys.argv[1:], "rows": rows, "passes": reached}
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.plot is not None:
        plot(rows, args.plot, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
