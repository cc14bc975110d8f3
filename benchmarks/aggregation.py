"""Streaming aggregation: every strategy's effective bandwidth against a plain copy.

One round of ``--sites`` updates of ``--parameters`` float32 parameters in ``--tensors``
tensors, aggregated by every strategy of ``medfed.aggregator.strategies`` through
``RoundAggregation`` (the aggregator's own path: each update added as it arrives), by Flower's
``aggregate_arrayrecords`` (what Flower's FedAvg runs), by an unweighted in-place add loop into
preallocated sums (``np.add(sums, x, out=sums)``: the least work any streaming fold does with
numpy, for reference), and copied with numpy, all in the same run. The weighted means fold
each update with BLAS ``saxpy`` on one thread (``medfed.aggregator.accumulate``); the BLAS
libraries loaded and their thread counts outside the fold are printed with the figures.

Effective bandwidth counts the bytes an aggregation must move at least: every update read once
and the result written once, ``(sites + 1) * model bytes``, over the time. The copy's is its
own bytes read and written, ``2 * sites * model bytes``: every tensor of every update copied
with ``np.copyto`` into one preallocated model-sized output. Timing is interleaved: in each of
``--rounds`` rounds every candidate runs once, in an order rotated round by round; the figure is
the median time, and "x copy" the median over rounds of the bandwidth over the copy's bandwidth
in the same round, so load from other processes largely cancels out.

Memory: each strategy runs one round in a fresh child process (so peaks do not mix) that
generates the updates one at a time, as replies arrive, hands each to ``RoundAggregation`` and
drops it. The child reports its peak RSS (VmHWM) and that peak minus its RSS just before the
round (interpreter, numpy, scipy's BLAS, medfed and the global model): what the round itself
holds. The scaling part repeats this for FedAvg and the median at each of ``--scaling-sites``.

    python benchmarks/aggregation.py                    # 10 sites, 5M parameters, ~1 min
    python benchmarks/aggregation.py --json out.json --scaling-sites 10,40
    python benchmarks/aggregation.py --parameters 500000 --rounds 3 --no-memory   # quick
    python benchmarks/aggregation.py --strategies fedavg,fedprox --no-memory --no-flower
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from medfed.aggregator.strategies import RoundAggregation
from medfed.config.strategy import StrategySettings
from medfed.types import SiteUpdate

STRATEGIES = ("fedavg", "fedprox", "fedadam", "median", "trimmed_mean")
ADD_LOOP = "add_loop"
HOLDS = {
    "fedavg": "running sum (1 model)",
    "fedprox": "running sum (1 model)",
    "fedadam": "running sum (1 model) + float64 moments",
    "median": "every update (n models)",
    "trimmed_mean": "every update (n models)",
    "flower": "every reply (n records)",
    ADD_LOOP: "preallocated sums (1 model)",
}
MIB = 1024 * 1024


def settings_for(name: str) -> StrategySettings:
    return StrategySettings.model_validate(
        {"name": name, "proximal_mu": 0.01 if name == "fedprox" else 0.0, "trim_fraction": 0.1}
    )


def layout_of(parameters: int, tensors: int) -> dict[str, tuple[int, ...]]:
    """``tensors`` 2-D arrays of about equal size holding ``parameters`` values in all."""
    sizes = [parameters // tensors + (1 if i < parameters % tensors else 0) for i in range(tensors)]
    layout: dict[str, tuple[int, ...]] = {}
    for i, size in enumerate(sizes):
        rows = next(r for r in (500, 250, 100, 50, 10, 5, 2, 1) if size % r == 0)
        layout[f"layer{i:03d}.weight"] = (rows, size // rows)
    return layout


def global_model(layout: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in layout.items()}


def make_update(
    index: int, global_weights: dict[str, np.ndarray], rng: np.random.Generator
) -> SiteUpdate:
    """Site ``index``'s update: the global model plus a small step, 20-200 patients."""
    weights = {}
    for name, base in global_weights.items():
        step = rng.standard_normal(base.shape, dtype=np.float32)
        step *= np.float32(0.01)
        step += base
        weights[name] = step
    patients = 20 + (37 * index) % 181
    return SiteUpdate(site_id=f"site-{index:03d}", round=1, weights=weights, num_patients=patients)


def blas_description() -> str:
    """The BLAS libraries loaded (scipy's does the fold), e.g. ``openblas 0.3.30 (2 threads)``."""
    import scipy.linalg.blas  # noqa: F401  (the first fold loads it; listed here either way)
    from threadpoolctl import threadpool_info

    return ", ".join(
        f"{info['internal_api']} {info['version']} ({info['num_threads']} threads)"
        for info in threadpool_info()
        if info["user_api"] == "blas"
    )


def _status_mib(field_name: str) -> float:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith(field_name + ":"))
    return int(line.split()[1]) / 1024


def probe(args: argparse.Namespace) -> None:
    """Child process: one streamed round of one strategy; print its memory as JSON.

    VmHWM, reset just before the round, not ru_maxrss: a child's ru_maxrss starts at its
    parent's peak (Linux keeps it across fork and exec). The libraries the fold loads on first
    use (scipy's BLAS, about 20 MiB) are loaded before the baseline, as they are in an
    aggregator after its first round: they are not what a round holds.
    """
    blas_description()
    layout = layout_of(args.parameters, args.tensors)
    global_weights = global_model(layout)
    rng = np.random.default_rng(1)
    gc.collect()
    base = _status_mib("VmRSS")
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS: the peak below is the round's own
    aggregation = RoundAggregation(
        settings=settings_for(args.probe_strategy), global_weights=global_weights
    )
    for index in range(args.probe_sites):
        update = make_update(index, global_weights, rng)
        aggregation.add(update=update)
        del update
    result = aggregation.finish(state=None)
    peak = _status_mib("VmHWM")
    held = aggregation.nbytes / MIB
    del result
    print(json.dumps({"peak_mib": peak, "round_mib": peak - base, "held_mib": held}))


def measure_memory(args: argparse.Namespace, strategy: str, sites: int) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--probe-strategy",
        strategy,
        "--probe-sites",
        str(sites),
        "--parameters",
        str(args.parameters),
        "--tensors",
        str(args.tensors),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory probe of {strategy} failed: {done.stderr.strip()[-400:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@dataclass
class Candidate:
    name: str
    run: Callable[[], object]
    nbytes: int
    times: list[float] = field(default_factory=list)


def flower_records(updates: list[SiteUpdate]) -> list[Any]:
    """The updates as Flower reply contents: an ArrayRecord and the weighting MetricRecord."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    return [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in u.weights.items()}),
                "metrics": MetricRecord({"num-examples": u.num_patients}),
            }
        )
        for u in updates
    ]


def candidates(args: argparse.Namespace) -> tuple[list[Candidate], int]:
    layout = layout_of(args.parameters, args.tensors)
    global_weights = global_model(layout)
    rng = np.random.default_rng(1)
    updates = [make_update(i, global_weights, rng) for i in range(args.sites)]
    model_bytes = sum(a.nbytes for a in global_weights.values())
    copy_bytes = 2 * args.sites * model_bytes
    useful = (args.sites + 1) * model_bytes
    out = {name: np.empty(shape, dtype=np.float32) for name, shape in layout.items()}

    def copy() -> None:
        for update in updates:
            for name, target in out.items():
                np.copyto(target, update.weights[name])

    def strategy(name: str) -> Callable[[], object]:
        settings = settings_for(name)

        def run() -> object:
            aggregation = RoundAggregation(settings=settings, global_weights=global_weights)
            for update in updates:
                aggregation.add(update=update)
            return aggregation.finish(state=None)

        return run

    sums = {name: np.empty(shape, dtype=np.float32) for name, shape in layout.items()}

    def add_loop() -> None:
        for name, target in sums.items():
            np.copyto(target, updates[0].weights[name])
        for update in updates[1:]:
            for name, target in sums.items():
                np.add(target, update.weights[name], out=target)

    found = [Candidate("copy", copy, copy_bytes), Candidate(ADD_LOOP, add_loop, useful)]
    found += [Candidate(name, strategy(name), useful) for name in args.strategies]
    if not args.no_flower:
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

        records = flower_records(updates)
        found.append(
            Candidate("flower", lambda: aggregate_arrayrecords(records, "num-examples"), useful)
        )
    check_results(updates, global_weights)
    return found, model_bytes


def check_results(updates: list[SiteUpdate], global_weights: dict[str, np.ndarray]) -> None:
    """The streamed FedAvg against a float64 reference, before anything is timed."""
    aggregation = RoundAggregation(settings=settings_for("fedavg"), global_weights=global_weights)
    for update in updates:
        aggregation.add(update=update)
    streamed = aggregation.finish(state=None).weights
    total = sum(u.num_patients for u in updates)
    worst = 0.0
    for name in global_weights:
        reference = np.zeros(global_weights[name].shape, dtype=np.float64)
        for update in updates:
            reference += update.num_patients * update.weights[name].astype(np.float64)
        reference /= total
        scale = np.abs(reference).max()
        worst = max(worst, float(np.abs(streamed[name] - reference).max() / scale))
    print(f"FedAvg (float32 running sum) vs float64 reference: max error {worst:.2e} of max |w|")


def time_all(found: list[Candidate], rounds: int) -> None:
    for candidate in found:  # warm-up: first-touch page faults, imports, caches
        candidate.run()
    for round_index in range(rounds):
        shift = round_index % len(found)
        for candidate in found[shift:] + found[:shift]:
            gc.collect()
            started = time.perf_counter()
            candidate.run()
            candidate.times.append(time.perf_counter() - started)


def summarise(found: list[Candidate]) -> dict[str, dict[str, float]]:
    copy = found[0]
    rows = {}
    for candidate in found:
        ratios = [
            (candidate.nbytes / t) / (copy.nbytes / c)
            for t, c in zip(candidate.times, copy.times, strict=True)
        ]
        seconds = float(np.median(candidate.times))
        rows[candidate.name] = {
            "ms": seconds * 1e3,
            "gbps": candidate.nbytes / seconds / 1e9,
            "fraction_of_copy": float(np.median(ratios)),
        }
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=10, help="updates per round")
    p.add_argument("--parameters", type=int, default=5_000_000, help="float32 values per update")
    p.add_argument("--tensors", type=int, default=40, help="tensors per update")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs every candidate)")
    p.add_argument("--scaling-sites", default="10,40", help="site counts of the memory scaling")
    p.add_argument(
        "--strategies",
        type=lambda text: tuple(text.split(",")),
        default=STRATEGIES,
        help=f"comma-separated subset of {','.join(STRATEGIES)} (default: all)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory probes")
    p.add_argument("--no-flower", action="store_true", help="skip Flower's aggregate_arrayrecords")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    p.add_argument("--probe-strategy", help=argparse.SUPPRESS)
    p.add_argument("--probe-sites", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.probe_strategy:
        probe(args)
        return
    load_before = os.getloadavg()[0]
    found, model_bytes = candidates(args)
    time_all(found, args.rounds)
    rows = summarise(found)
    memory: dict[str, dict[str, float]] = {}
    scaling: dict[str, dict[int, dict[str, float]]] = {}
    if not args.no_memory:
        memory = {name: measure_memory(args, name, args.sites) for name in args.strategies}
        for name in ("fedavg", "median"):
            if name not in args.strategies:
                continue
            scaling[name] = {
                n: measure_memory(args, name, n) for n in map(int, args.scaling_sites.split(","))
            }
    load_after = os.getloadavg()[0]

    print(
        f"\n{date.today()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"numpy {np.__version__}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}, "
        f"load average {load_before:.2f} -> {load_after:.2f}"
    )
    print(f"BLAS: {blas_description()}; the weighted fold runs on 1 thread")
    print(
        f"{args.sites} updates of {args.parameters:,} float32 parameters in {args.tensors} "
        f"tensors ({model_bytes / MIB:.1f} MiB each), {args.rounds} interleaved rounds\n"
    )
    print("| aggregation | holds | ms | GB/s | x copy | peak RSS MiB | round MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        mem = memory.get(name)
        peak = f"{mem['peak_mib']:.0f}" if mem else "-"
        held = f"{mem['round_mib']:.0f}" if mem else "-"
        label = {
            "copy": "numpy copy (reference)",
            ADD_LOOP: "unweighted in-place add loop (reference)",
            "flower": "Flower aggregate_arrayrecords",
        }
        print(
            f"| {label.get(name, name)} | {HOLDS.get(name, '-')} | {row['ms']:.1f} | "
            f"{row['gbps']:.2f} | {row['fraction_of_copy']:.2f} | {peak} | {held} |"
        )
    if scaling:
        print("\nStreamed rounds (updates generated one at a time), peak RSS above the start of")
        print("the round:\n")
        counts = list(next(iter(scaling.values())))
        print("| strategy | " + " | ".join(f"{n} sites MiB" for n in counts) + " |")
        print("|---|" + "---:|" * len(counts))
        for name, by_count in scaling.items():
            cells = " | ".join(f"{by_count[n]['round_mib']:.0f}" for n in counts)
            print(f"| {name} | {cells} |")

    if args.json:
        copy = rows["copy"]
        report: dict[str, Any] = {
            "copy_gbps": copy["gbps"],
            "strategies": {
                name: {
                    "gbps": rows[name]["gbps"],
                    "fraction_of_copy": rows[name]["fraction_of_copy"],
                    "ms": rows[name]["ms"],
                    "holds": HOLDS[name],
                    "peak_rss_mib": memory[name]["peak_mib"] if memory else None,
                    "round_rss_mib": memory[name]["round_mib"] if memory else None,
                }
                for name in args.strategies
            },
            "scaling_round_rss_mib": {
                name: {str(n): m["round_mib"] for n, m in by_count.items()}
                for name, by_count in scaling.items()
            },
            "settings": {
                "sites": args.sites,
                "parameters": args.parameters,
                "tensors": args.tensors,
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "blas": blas_description(),
                "fold_blas_threads": 1,
                "load_average": [load_before, load_after],
            },
        }
        report["add_loop"] = {
            "gbps": rows[ADD_LOOP]["gbps"],
            "fraction_of_copy": rows[ADD_LOOP]["fraction_of_copy"],
        }
        if "flower" in rows:
            report["flower"] = {
                "gbps": rows["flower"]["gbps"],
                "fraction_of_copy": rows["flower"]["fraction_of_copy"],
            }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
