"""What a federated round costs beyond the sites' training: the real deployment vs. in-process.

    python benchmarks/round_overhead.py [--sites 3] [--cases 24] [--size 32] [--rounds 2]
        [--local-epochs 2] [--threads N] [--warm | --cold] [--skip-deployment] [--json PATH]

The same synthetic federation (`medfed.api.demo.prepare_federation`) runs twice, each in a fresh
temporary directory: once on the real deployment (`medfed.api.demo.run_deployed`: SuperLink and one
SuperNode per site as processes, TLS, node authentication; with `--warm`, the default, each
message's ClientApp forked from the site's warm worker, with `--cold` a new process per message)
and once in this process (`medfed.transport.inprocess.run_in_process`: the same ServerApp round
loop and ClientApp, called directly). Per round: the round's wall time (`round_done.seconds`),
the slowest site's compute and the sum over the sites (each site's own record of its round in
`<workdir>/federation/<run>/round-NNNN/reply.json`: its ClientApp's local training and its Dice
release, never sent to the aggregator), the orchestration overhead (round time -
slowest compute) and round time / slowest compute. Also timed: the cold start of a ClientApp
process (importing medfed's ClientApp, torch, MONAI and Opacus in a fresh interpreter), alone
and as many at once as there are sites, as the deployment starts them at the start of a round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _signals import unwind_on_signals

from medfed.api.demo import DemoSetup, prepare_federation, run_deployed
from medfed.config.loading import dump_site_config, load_site_config
from medfed.run_events import (
    Evaluation,
    RoundDone,
    RoundStarted,
    RunEvent,
    RunFailed,
    RunStarted,
    RunStopped,
    of_kind,
)
from medfed.tracking import default_tracking_uri
from medfed.transport.inprocess import run_in_process
from medfed.transport.processes import free_port

COLD_START = "import medfed.site.clientapp, torch, monai, opacus"


@dataclass(frozen=True)
class Round:
    index: int
    seconds: float  # round_done.seconds: sending the round's messages to the last reply
    slowest: float  # max of the sites' own round times
    total: float  # sum of the sites' own round times

    @property
    def overhead(self) -> float:
        return self.seconds - self.slowest

    @property
    def ratio(self) -> float:
        return self.seconds / self.slowest if self.slowest > 0 else float("nan")


@dataclass(frozen=True)
class Measured:
    runner: str
    rounds: list[Round]
    wall: float  # from calling the runner to its return (data preparation excluded)
    setup: float  # run_started -> round 1 started: waiting for sites, the INIT message
    evaluation: float  # last round_done -> evaluation: the final federated evaluation
    load: tuple[float, float]  # 1-minute load average before and after

    def mean(self, field: str) -> float:
        return statistics.fmean(getattr(r, field) for r in self.rounds)


def cold_start(repeats: int, at_once: int = 1) -> list[float]:
    """Wall time of ``at_once`` fresh interpreters importing what a ClientApp process needs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        children = [subprocess.Popen([sys.executable, "-c", COLD_START]) for _ in range(at_once)]
        try:
            if any(child.wait() != 0 for child in children):
                raise SystemExit(f"`python -c '{COLD_START}'` failed")
        finally:
            for child in children:
                child.kill()
                child.wait()
        times.append(time.perf_counter() - start)
    return times


def prepare(args: argparse.Namespace, root: Path) -> DemoSetup:
    setup = prepare_federation(
        root=root,
        sites=args.sites,
        cases=args.cases,
        size=args.size,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        seed=args.seed,
        port=free_port(),
    )
    for path in setup.site_configs.values():
        config = load_site_config(path)
        assert config.transport is not None
        transport = config.transport.model_copy(update={"warm_worker": args.warm})
        training = config.training.model_copy(
            update={"threads": args.threads or config.training.threads}
        )
        config = config.model_copy(update={"training": training, "transport": transport})
        dump_site_config(config, path)
    # every site in every round, so that both runners train the same rounds
    return dataclasses.replace(
        setup, settings=setup.settings.model_copy(update={"min_sites": args.sites})
    )


def measure(args: argparse.Namespace, runner: str) -> Measured:
    events: list[RunEvent] = []

    def on_event(event: RunEvent) -> None:
        events.append(event)
        if isinstance(event, RoundDone | Evaluation | RunFailed | RunStopped):
            print(f"  [{runner}] {event.kind} {getattr(event, 'round', '')}", flush=True)

    with tempfile.TemporaryDirectory(prefix=f"medfed-overhead-{runner}-") as tmp:
        setup = prepare(args, Path(tmp) / "federation")
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        if runner == "deployment":
            run_deployed(setup=setup, on_event=on_event)
        else:
            run_in_process(  # tracked like the deployment's ServerApp, to the same default
                workspace=setup.workspace,
                site_configs=setup.site_configs,
                settings=setup.settings,
                on_event=on_event,
                tracking_uri=default_tracking_uri(workspace_root=setup.workspace.root),
            )
        wall = time.perf_counter() - start
        seconds = site_seconds(setup)
    return summarise(runner, events, seconds, wall, (load_before, os.getloadavg()[0]))


def site_seconds(setup: DemoSetup) -> dict[int, list[float]]:
    """Each round's time at each site, from the sites' own records (a site reports no timing:
    its reply file, kept at the site, holds it)."""
    found: dict[int, list[float]] = {}
    for path in setup.site_configs.values():
        config = load_site_config(path)
        run_dir = config.paths.workdir / "federation" / setup.settings.run_name
        for reply in sorted(run_dir.glob("round-*/reply.json")):
            round_index = int(reply.parent.name.removeprefix("round-"))
            seconds = json.loads(reply.read_text(encoding="utf-8"))["site_seconds"]
            found.setdefault(round_index, []).append(float(seconds))
    return found


def summarise(
    runner: str,
    events: list[RunEvent],
    seconds: dict[int, list[float]],
    wall: float,
    load: tuple[float, float],
) -> Measured:
    def first(kind: type[RunEvent]) -> float:
        return next((e.time for e in events if isinstance(e, kind)), float("nan"))

    done_rounds = of_kind(events, RoundDone)
    rounds = []
    for done in done_rounds:
        computes = seconds.get(done.round, [])
        rounds.append(
            Round(
                index=done.round,
                seconds=float("nan") if done.seconds is None else done.seconds,
                slowest=max(computes, default=float("nan")),
                total=sum(computes),
            )
        )
    if not rounds:
        raise SystemExit(f"{runner}: no round finished ({[e.kind for e in events]})")
    last_done = max(done.time for done in done_rounds)
    return Measured(
        runner=runner,
        rounds=rounds,
        wall=wall,
        setup=first(RoundStarted) - first(RunStarted),
        evaluation=first(Evaluation) - last_done,
        load=load,
    )


def table(m: Measured) -> str:
    lines = [
        f"{m.runner}: whole run {m.wall:.1f} s, start-up to round 1 {m.setup:.1f} s, final "
        f"evaluation {m.evaluation:.1f} s, load average {m.load[0]:.2f} -> {m.load[1]:.2f}",
        "",
        "| round | round s | slowest site s | sum of sites s | overhead s | round / slowest |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in m.rounds:
        lines.append(
            f"| {r.index} | {r.seconds:.1f} | {r.slowest:.1f} | {r.total:.1f} | "
            f"{r.overhead:.1f} | {r.ratio:.2f} |"
        )
    return "\n".join(lines)


def summary(results: dict[str, Measured]) -> str:
    lines = [
        "| runner | round s | slowest site s | sum of sites s | overhead s | overhead / slowest |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in results.values():
        lines.append(
            f"| {m.runner} | {m.mean('seconds'):.1f} | {m.mean('slowest'):.1f} | "
            f"{m.mean('total'):.1f} | {m.mean('overhead'):.1f} | "
            f"{m.mean('overhead') / m.mean('slowest'):.2f} |"
        )
    if len(results) == 2:
        dep, inp = results["deployment"], results["in-process"]
        lines += [
            "",
            f"deployment round / in-process round: {dep.mean('seconds') / inp.mean('seconds'):.2f}",
            f"deployment round / in-process sum of sites: "
            f"{dep.mean('seconds') / inp.mean('total'):.2f}",
            f"deployment overhead / deployment slowest compute: "
            f"{dep.mean('overhead') / dep.mean('slowest'):.2f}",
            f"in-process round - its sum of sites (its own orchestration): "
            f"{inp.mean('seconds') - inp.mean('total'):.1f} s",
        ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--cases", type=int, default=24, help="synthetic cases per site")
    p.add_argument("--size", type=int, default=32, help="volume edge (voxels)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="training threads per site")
    p.add_argument("--cold-starts", type=int, default=3, help="cold starts to time, 0: none")
    p.add_argument("--skip-deployment", action="store_true", help="only the in-process runner")
    worker = p.add_mutually_exclusive_group()
    worker.add_argument(
        "--warm", dest="warm", action="store_true", default=True, help="site warm worker (default)"
    )
    worker.add_argument("--cold", dest="warm", action="store_false", help="a process per message")
    p.add_argument("--json", type=Path, default=None, help="write the means per round here")
    return p.parse_args(argv)


def as_json(results: dict[str, Measured], *, warm: bool) -> dict[str, object]:
    """Means per round: the keys the round-overhead issue names, and the start-up and final
    evaluation of the deployment."""
    out: dict[str, object] = {"worker": "warm" if warm else "cold"}
    dep = results.get("deployment")
    inp = results["in-process"]
    if dep is not None:
        out["deployment"] = {
            "round_s": dep.mean("seconds"),
            "overhead_s": dep.mean("overhead"),
            "overhead_fraction": dep.mean("overhead") / dep.mean("seconds"),
            "start_to_round_1_s": dep.setup,
            "final_evaluation_s": dep.evaluation,
        }
        out["deployed_over_in_process"] = dep.mean("seconds") / inp.mean("seconds")
    out["in_process"] = {"round_s": inp.mean("seconds")}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    unwind_on_signals()
    print(
        f"{args.sites} sites x {args.cases} cases at {args.size}^3, {args.rounds} rounds x "
        f"{args.local_epochs} local epochs, {os.cpu_count()} CPUs, training threads per site: "
        f"{args.threads or 'the demo default'}, site worker: {'warm' if args.warm else 'cold'}",
        flush=True,
    )
    for at_once in sorted({1, args.sites}) if args.cold_starts > 0 else []:
        starts = cold_start(args.cold_starts, at_once)
        print(
            f"ClientApp cold start, {at_once} at once (`python -c '{COLD_START}'`): "
            + ", ".join(f"{s:.1f}" for s in starts)
            + f" s (median {statistics.median(starts):.1f} s)",
            flush=True,
        )
    print(flush=True)
    runners = ["in-process"] if args.skip_deployment else ["deployment", "in-process"]
    results = {runner: measure(args, runner) for runner in runners}
    for m in results.values():
        print("\n" + table(m))
    print("\nMean per round:\n\n" + summary(results))
    if "deployment" in results:
        dep = results["deployment"]
        print(
            f"deployment orchestration / deployment round: "
            f"{dep.mean('overhead') / dep.mean('seconds'):.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(results, warm=args.warm), indent=2) + "\n")
        print(f"wrote {args.json}")
    print(
        f"\nNote: on one machine with {os.cpu_count()} cores the deployment trains its sites "
        "concurrently (one ClientApp process each, competing for the cores), the in-process "
        "runner one after another: its round time is close to the *sum* of the sites' compute, "
        "so compare the deployment's round time with that sum too. Each site's compute includes "
        "loading its data and its Dice release."
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: processes stopped, temporary directories removed")
