"""How the real deployment grows with its sites: 2 to 20 sites on one machine.

    python benchmarks/scale.py [--sites 2,5,20] [--rounds 2] [--cases 8] [--size 16]
        [--local-epochs 1] [--round-timeout 240] [--sites-nice N] [--cold] [--json PATH]

For each site count a fresh synthetic federation (`medfed.api.demo.prepare_federation`, 3-D
cases of --size^3 voxels, a tiny UNet) runs on the real deployment
(`medfed.api.demo.run_deployed`: SuperLink and one SuperNode per site as processes, TLS, node
keys, signed ledgers, MLflow in the workspace's SQLite store), each site with its warm worker
unless --cold. Measured per site count:

* round_s: the round's wall time at the aggregator (`round_done.seconds`), mean over the rounds
  after the first (the first also pays the sites' cold caches); first_round_s beside it;
* overhead_s / overhead_fraction: round minus the slowest site's own time for it (each site's
  `<workdir>/federation/<run>/round-NNNN/reply.json`, as in round_overhead.py), and its share of
  the round;
* aggregator_peak_rss_mib: the ServerApp process' (`flwr-serverapp`) peak resident memory, its
  VmHWM in /proc read twice a second while it lives; beside it the peak memory (PSS: shared
  pages split among the processes sharing them) of the SuperLink, of every site-side process
  together (SuperNodes, warm workers, ClientApps), and of the warm workers alone;
* mlflow_s: the time the MLflow tracker takes for the run: the run's own events replayed through
  `medfed.tracking.tracker.FederationTracker` into a new SQLite store after the run (the tracker
  times nothing itself, and inside the ServerApp it cannot be timed from outside); and
  mlflow_tail_s: from the run's last event to the ServerApp's exit, the part of the live run
  that only uploads the report and the model;
* verify_s: `medfed.audit.verify.verify_workspace` of the run after it ended (every ledger copy:
  chain, signatures, two accounting libraries, caps, the run's summary and MLflow numbers),
  with what it found (audit_findings);
* start_s: from starting the SuperLink until every SuperNode is connected;
* replies_missing: requests of the rounds that got no reply within --round-timeout (a round
  then ends at its timeout; half the sites must answer for the run to go on).

On one machine the sites' training competes with the aggregator for the same cores, which a
deployment's sites, each on its own host, never do; --sites-nice N runs every site-side process
(SuperNode, its SuperExec, warm worker, ClientApps) at that niceness, so that the SuperLink and
the ServerApp get a core when they need one (default 0: no change). A run that fails is
reported with what was measured until then and why it ended.

For each quantity a power law is fitted over the site counts (least squares on log-log); it is
called at most linear when its exponent is at most 1.15 (the slack covers timing noise on a
shared machine). The load average before and after each run is printed with it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from _signals import unwind_on_signals

from medfed.api.demo import DemoSetup, prepare_federation, run_deployed
from medfed.config.loading import dump_site_config, load_site_config
from medfed.config.site import ModelSection
from medfed.errors import MedfedError
from medfed.run_events import RoundDone, RunEnded, read_events
from medfed.transport.processes import free_port
from medfed.transport.simulation_memory import process_tree, pss_kib, status_kib

TINY_MODEL = ModelSection(channels=[4, 8], strides=[2], num_res_units=1)
LINEAR_SLACK = 1.15
QUANTITIES = (
    "round_s",
    "overhead_s",
    "aggregator_peak_rss_mib",
    "sites_peak_pss_mib",
    "mlflow_s",
    "verify_s",
    "start_s",
)


def category(pid: int) -> str:
    """What a process of the deployment is, from its command line (a fork server's children
    have its command line: :class:`Sampler` tells them apart by their parent)."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = " ".join(a.decode(errors="replace") for a in argv)
    if "flwr-serverapp" in text:
        return "serverapp"
    if "flower-superlink" in text:
        return "superlink"
    if "medfed.site.warm_worker serve" in text:
        return "warm_worker"
    if "flower-supernode" in text or "warm_worker supervise" in text:
        return "supernode"
    if "flwr-clientapp" in text:
        return "clientapp"
    if "flower-superexec" in text:
        return "superexec"
    return "other"


class Sampler:
    """Memory of the deployment's processes by kind, twice a second: the sum of their
    proportional set sizes (PSS: a page shared by a warm worker and its forks counts once in
    all), and the ServerApp's own peak resident set (VmHWM). With ``nice``, every site-side
    process it sees is given that niceness."""

    SITE_SIDE = ("supernode", "warm_worker", "clientapp")

    def __init__(self, *, nice: int = 0) -> None:
        self._nice = nice
        self._reniced: set[int] = set()
        self.peak_mib: dict[str, float] = {}
        self.serverapp_hwm_mib = 0.0
        self.serverapp_last_seen = math.nan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.5):
            kinds = {pid: category(pid) for pid in process_tree(me)[1:]}
            for pid, kind in list(kinds.items()):
                parent = kinds.get(_ppid(pid))
                # a ClientApp forked by a warm worker; a SuperNode's SuperExec
                if kind == "warm_worker" and parent == "warm_worker":
                    kinds[pid] = "clientapp"
                elif kind == "superexec" and parent == "supernode":
                    kinds[pid] = "supernode"
            if self._nice:
                self._renice(pid for pid, kind in kinds.items() if kind in self.SITE_SIDE)
            sums: dict[str, float] = {}
            for pid, kind in kinds.items():
                sums[kind] = sums.get(kind, 0.0) + pss_kib(pid) / 1024.0
                if kind == "serverapp":
                    hwm = status_kib(pid, "VmHWM") / 1024.0
                    self.serverapp_hwm_mib = max(self.serverapp_hwm_mib, hwm)
                    self.serverapp_last_seen = time.time()
            sums["sites"] = sum(sums.get(k, 0.0) for k in self.SITE_SIDE)
            sums["all"] = sum(v for k, v in sums.items() if k != "sites")
            for kind, value in sums.items():
                self.peak_mib[kind] = max(self.peak_mib.get(kind, 0.0), value)

    def _renice(self, pids: Iterable[int]) -> None:
        for pid in pids:
            if pid not in self._reniced:
                self._reniced.add(pid)
                with contextlib.suppress(OSError):  # it may have exited
                    os.setpriority(os.PRIO_PROCESS, pid, self._nice)


def _ppid(pid: int) -> int:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text(errors="replace")
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def prepare(args: argparse.Namespace, sites: int, root: Path) -> DemoSetup:
    setup = prepare_federation(
        root=root,
        sites=sites,
        cases=args.cases,
        size=args.size,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        port=free_port(),
        min_sites=max(1, sites // 2),
    )
    for path in setup.site_configs.values():
        config = load_site_config(path)
        assert config.transport is not None
        transport = config.transport.model_copy(update={"warm_worker": not args.cold})
        dump_site_config(config.model_copy(update={"transport": transport}), path)
    settings = setup.settings.model_copy(
        update={"model": TINY_MODEL, "round_timeout_s": float(args.round_timeout)}
    )
    return dataclasses.replace(setup, settings=settings)


def site_seconds(setup: DemoSetup) -> dict[int, list[float]]:
    """Each round's time at each site, from the sites' own records of their rounds."""
    found: dict[int, list[float]] = {}
    for path in setup.site_configs.values():
        run_dir = load_site_config(path).paths.workdir / "federation" / setup.settings.run_name
        for reply in sorted(run_dir.glob("round-*/reply.json")):
            index = int(reply.parent.name.removeprefix("round-"))
            seconds = float(json.loads(reply.read_text(encoding="utf-8"))["site_seconds"])
            found.setdefault(index, []).append(seconds)
    return found


def mlflow_seconds(run_dir: Path) -> float:
    """The tracker's time for the run's events, replayed into a new SQLite store."""
    from medfed.tracking.tracker import FederationTracker
    from medfed.tracking.uri import prepare_store

    events, _ = read_events(run_dir / "events.jsonl")
    with tempfile.TemporaryDirectory(prefix="medfed-scale-mlflow-") as tmp:
        copy = Path(tmp) / run_dir.name
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("mlflow*"))
        uri = f"sqlite:///{tmp}/mlflow.db"
        prepare_store(uri=uri)  # the store's creation is not the run's logging
        tracker = FederationTracker(tracking_uri=uri, run_dir=copy)
        start = time.perf_counter()
        for event in events:
            tracker.on_event(event)
        tracker.close()
        return time.perf_counter() - start


def verify_seconds(setup: DemoSetup) -> tuple[float, list[str]]:
    """How long the auditor's verification of the run takes, and what it found."""
    from medfed.audit.verify import verify_workspace

    start = time.perf_counter()
    result = verify_workspace(workspace=setup.workspace.root, run_name=setup.settings.run_name)
    seconds = time.perf_counter() - start
    return seconds, [finding.one_line() for finding in result.findings]


def measure(args: argparse.Namespace, sites: int) -> dict[str, Any]:
    phases: dict[str, float] = {}

    def on_phase(text: str) -> None:
        phases.setdefault(text.split(" ")[0] + " " + text.split(" ")[1], time.time())
        print(f"  [{sites} sites] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix=f"medfed-scale-{sites}-") as tmp:
        setup = prepare(args, sites, Path(tmp) / "federation")
        load_before = os.getloadavg()[0]
        failure = None
        with Sampler(nice=args.sites_nice) as sampler:
            try:
                run_deployed(setup=setup, on_phase=on_phase)
            except MedfedError as exc:
                failure = exc.one_line()
                print(f"  [{sites} sites] FAILED: {failure}", flush=True)
        load_after = os.getloadavg()[0]
        run_dir = setup.workspace.layout.run(setup.settings.run_name).directory
        events, _ = read_events(run_dir / "events.jsonl")
        computes = site_seconds(setup)
        verify_s, findings = (math.nan, []) if failure else verify_seconds(setup)
        mlflow_s = math.nan if failure else mlflow_seconds(run_dir)
    done = [e for e in events if isinstance(e, RoundDone) and e.seconds is not None]
    ended = next((e for e in events if isinstance(e, RunEnded)), None)
    steady = done[1:] or done
    rounds = [float(e.seconds or 0.0) for e in steady] or [math.nan]
    slowest = [max(computes.get(e.round, [math.nan])) for e in steady] or [math.nan]
    overheads = [r - s for r, s in zip(rounds, slowest, strict=True)]
    peaks = sampler.peak_mib
    return {
        "sites": sites,
        "round_s": statistics.fmean(rounds),
        "first_round_s": float(done[0].seconds or 0.0) if done else math.nan,
        "slowest_site_s": statistics.fmean(slowest),
        "overhead_s": statistics.fmean(overheads),
        "overhead_fraction": statistics.fmean(overheads) / statistics.fmean(rounds),
        "aggregator_peak_rss_mib": sampler.serverapp_hwm_mib,
        "superlink_peak_pss_mib": peaks.get("superlink", 0.0),
        "sites_peak_pss_mib": peaks.get("sites", 0.0),
        "warm_workers_peak_pss_mib": peaks.get("warm_worker", 0.0),
        "all_processes_peak_pss_mib": peaks.get("all", 0.0),
        "mlflow_s": mlflow_s,
        "mlflow_tail_s": math.nan if ended is None else sampler.serverapp_last_seen - ended.time,
        "verify_s": verify_s,
        "audit_findings": findings,
        "start_s": phases.get("submitting the", math.nan) - phases["starting the"],
        "rounds_done": len(done),
        "replies_missing": sum(e.sites_asked - e.sites_answered for e in done),
        "end": failure or ("no last event" if ended is None else f"{ended.kind}: {ended.reason}"),
        "sites_nice": args.sites_nice,
        "load_before": load_before,
        "load_after": load_after,
    }


def growth(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fitted power-law exponent of each quantity over the site counts, and the verdict."""
    out: dict[str, dict[str, Any]] = {}
    for name in QUANTITIES:
        points = [(r["sites"], r[name]) for r in runs if r[name] > 0]  # NaN > 0 is False
        if len(points) < 2 or len({n for n, _ in points}) < 2:
            out[name] = {"exponent": None, "at_most_linear": None}
            continue
        xs = [math.log(n) for n, _ in points]
        ys = [math.log(v) for _, v in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        exponent = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        out[name] = {"exponent": exponent, "at_most_linear": exponent <= LINEAR_SLACK}
    return out


def tables(runs: list[dict[str, Any]], fits: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| sites | round s | first round s | slowest site s | overhead s | overhead share "
        "| ServerApp peak RSS MiB | SuperLink PSS MiB | site processes PSS MiB | warm workers "
        "PSS MiB | MLflow s | MLflow tail s | verify s | start s | replies missing | load "
        "before/after |",
        "|---:" * 16 + "|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['sites']} | {r['round_s']:.1f} | {r['first_round_s']:.1f} | "
            f"{r['slowest_site_s']:.1f} | {r['overhead_s']:.1f} | {r['overhead_fraction']:.2f} | "
            f"{r['aggregator_peak_rss_mib']:.0f} | {r['superlink_peak_pss_mib']:.0f} | "
            f"{r['sites_peak_pss_mib']:.0f} | {r['warm_workers_peak_pss_mib']:.0f} | "
            f"{r['mlflow_s']:.1f} | {r['mlflow_tail_s']:.1f} | {r['verify_s']:.1f} | "
            f"{r['start_s']:.1f} | {r['replies_missing']} | {r['load_before']:.1f} / "
            f"{r['load_after']:.1f} |"
        )
    lines += [
        "",
        "| quantity | exponent (y ~ sites^k) | at most linear (k <= 1.15) |",
        "|---|---:|---|",
    ]
    for name, fit in fits.items():
        k = fit["exponent"]
        verdict = "n/a" if k is None else ("yes" if fit["at_most_linear"] else "no")
        lines.append(f"| {name} | {'n/a' if k is None else f'{k:.2f}'} | {verdict} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="2,5,20", help="comma-separated site counts (2 to 26)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", type=int, default=8, help="synthetic cases per site")
    p.add_argument("--size", type=int, default=16, help="volume edge (voxels)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument(
        "--round-timeout", type=float, default=240.0, help="seconds a round waits for replies"
    )
    p.add_argument(
        "--sites-nice", type=int, default=0, help="niceness of every site-side process (0-19)"
    )
    p.add_argument("--cold", action="store_true", help="sites without their warm worker")
    p.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = p.parse_args(argv)
    args.counts = sorted({int(item) for item in args.sites.split(",") if item.strip()})
    if not args.counts or min(args.counts) < 2 or max(args.counts) > 26:
        p.error("--sites takes counts between 2 and 26, e.g. 2,5,20")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    unwind_on_signals()
    print(
        f"sites {args.counts}: {args.cases} cases of {args.size}^3 each, {args.rounds} rounds x "
        f"{args.local_epochs} local epochs, tiny UNet {TINY_MODEL.channels}, {os.cpu_count()} "
        f"CPUs, warm workers {'off' if args.cold else 'on'}, site processes at nice "
        f"{args.sites_nice}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    for count in args.counts:
        runs.append(measure(args, count))
        print(json.dumps(runs[-1]), flush=True)
        fits = growth(runs)
        if args.json is not None:  # after every count: a long series keeps what it measured
            report = {"cpus": os.cpu_count(), "warm_worker": not args.cold, "runs": runs}
            args.json.write_text(json.dumps({**report, "growth": fits}, indent=2) + "\n")
    print("\n" + tables(runs, growth(runs)))
    if args.json is not None:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: processes stopped, temporary directories removed")
