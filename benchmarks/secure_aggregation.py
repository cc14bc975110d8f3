"""Secure aggregation's core: the cost of encoding and masking an update, and of unmasking a sum.

``--core`` measures the protocol core (:mod:`medfed.secagg`) in one process, with no network:
for an update of ``--parameters`` float32 values and each site count of ``--sites``, every site
agrees keys and distributes shares once (not timed), then a round is timed stage by stage:

- encode: one site's ``encode_weighted`` (fixed point modulo 2^32, weight and one extra value);
- mask: one site's ``mask_input`` (its self-mask and one pairwise mask per other site);
- unmask: the aggregator's ``unmask_sum`` over every site's masked input, and again with one site
  dropped before sending (its pairwise masks come from the survivors' round keys).

Each figure is the median of ``--repeats`` runs. Upload: the masked vector's bytes over the
float32 update's (the target is at most 1.1x); once per key epoch each site also sends its
encrypted shares, and once per round each survivor answers with shares and round keys.

``--in-process`` runs whole federations through the real ServerApp round loop and ClientApp
(the in-process grid, no network); ``--deployed`` runs them on the real deployment (SuperLink
with its state in memory and one SuperNode per site, over TLS with node keys, each site with its
warm worker, every process stopped at the end: ``medfed.api.demo.run_deployed``). Both run, for
each site count, a plain and a secure federation alternately on the same synthetic patients
(``--cases`` per site, volumes of 32^3, ``--rounds`` rounds of one local epoch) with the
``--network`` UNet: ``demo`` (the demo's, 5,527 parameters) or ``4.8m`` (channels 16-256, four
stride-2 levels, two residual units: 4,808,917 parameters; at 16^3 its bottom layer would be one
voxel, on which instance norm cannot train). Few patients keep training short, so that a round
shows what secure aggregation changes. From the run's events (:func:`summarise`), per run: the
median round time of the rounds after the first (the first holds cold caches and, secure, the
key epoch, shown apart: keys, shares and open stages), and per site the array bytes of one
upload as the aggregator counted them (the masked uint32 vector, or the float32 weights); then
the ratios secure / plain (targets: round time at most 1.5x, upload at most 1.1x). In-process,
each site's ClientApp also counts its upload's array data and the secure stages' JSON bytes.

    python benchmarks/secure_aggregation.py --core                       # 4.8M, 3/5/10 sites
    python benchmarks/secure_aggregation.py --core --json secagg.json
    python benchmarks/secure_aggregation.py --core --parameters 100000 --sites 3   # quick
    python benchmarks/secure_aggregation.py --in-process --network 4.8m --sites 3,5,10
    python benchmarks/secure_aggregation.py --deployed --network 4.8m --sites 3,5 --json d.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.api.demo import DEMO_MODEL, DemoSetup, prepare_federation
from medfed.config.site import ModelSection
from medfed.run_events import (
    ModelInitialised,
    RoundDone,
    RoundStarted,
    RunEvent,
    SecureEpochStarted,
)
from medfed.secagg import (
    HeldShares,
    KeyRoster,
    MaskedInput,
    Revealed,
    SiteSecrets,
    UnmaskAnswer,
    UnmaskRequest,
    advertise,
    answer_unmasking,
    choose_scale,
    distribute_shares,
    encode_weighted,
    mask_input,
    new_site_secrets,
    open_shares,
    unmask_sum,
    verify_bundles,
)
from medfed.secagg.shamir import SHARE_BYTES

RUN = "benchmark"
MAX_WEIGHT = 1000
BOUND = 1.0
KEY_BYTES = 32
# The federations' networks: the demo's, and one of the 4.8M parameters issue 16 names.
NETWORKS: dict[str, ModelSection] = {
    "demo": DEMO_MODEL,
    "4.8m": ModelSection(channels=[16, 32, 64, 128, 256], strides=[2, 2, 2, 2], num_res_units=2),
}
# The smallest volume both networks train on (4.8m's strides need 32 with instance norm).
VOLUME = 32


@dataclass
class Epoch:
    """Every site's keys and shares after the (untimed) key agreement and share distribution."""

    sites: list[str]
    roster: KeyRoster
    secrets: dict[str, SiteSecrets]
    held: dict[str, HeldShares]
    share_bytes: int


def agree(sites: int, rounds: int) -> Epoch:
    names = [f"site-{i:02d}" for i in range(sites)]
    ledger = {name: Ed25519PrivateKey.generate() for name in names}
    secrets = {
        name: new_site_secrets(site_id=name, run_id=RUN, epoch=1, rounds=range(1, rounds + 1))
        for name in names
    }
    bundles = [advertise(secrets=secrets[n], ledger_key=ledger[n]) for n in names]
    public = {name: key.public_key() for name, key in ledger.items()}
    roster = verify_bundles(bundles=bundles, ledger_keys=public, run_id=RUN, epoch=1)
    sent = {name: distribute_shares(secrets=secrets[name], roster=roster) for name in names}
    held = {
        name: open_shares(
            secrets=secrets[name],
            roster=roster,
            own=sent[name].own,
            incoming=[i for d in sent.values() for i in d.outgoing if i.recipient == name],
        )
        for name in names
    }
    share_bytes = sum(len(i.ciphertext) + len(i.nonce) for i in sent[names[0]].outgoing)
    return Epoch(sites=names, roster=roster, secrets=secrets, held=held, share_bytes=share_bytes)


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def answers_for(epoch: Epoch, request: UnmaskRequest) -> list[UnmaskAnswer]:
    return [
        answer_unmasking(
            secrets=epoch.secrets[s],
            roster=epoch.roster,
            held=epoch.held[s],
            request=request,
            revealed=Revealed(),
        )[0]
        for s in request.survivors
    ]


def answer_bytes(answer: UnmaskAnswer) -> int:
    shares = len(answer.self_seed_shares) + len(answer.mask_key_shares)
    return shares * SHARE_BYTES + len(answer.pair_keys) * KEY_BYTES


def measure(sites: int, args: argparse.Namespace) -> dict[str, float]:
    epoch = agree(sites, rounds=args.rounds_per_epoch)
    point = choose_scale(sites=sites, max_weight=MAX_WEIGHT, max_abs=BOUND, max_error=1e-3)
    rng = np.random.default_rng(sites)
    updates = {
        s: np.clip(rng.standard_normal(args.parameters, dtype=np.float32) * 0.01, -BOUND, BOUND)
        for s in epoch.sites
    }
    first = epoch.sites[0]

    def encode(site: str) -> np.ndarray:
        return encode_weighted(
            point=point, weight=MAX_WEIGHT // 2, update=updates[site], extras=(0.5,)
        )

    encoded = {s: encode(s) for s in epoch.sites}

    def mask(site: str, round_id: int) -> MaskedInput:
        return mask_input(
            secrets=epoch.secrets[site],
            roster=epoch.roster,
            held=epoch.held[site],
            round_id=round_id,
            encoded=encoded[site],
        )

    encode_s = median_seconds(lambda: encode(first), args.repeats)
    mask_s = median_seconds(lambda: mask(first, 1), args.repeats)
    masked = [mask(s, 1) for s in epoch.sites]
    full = UnmaskRequest(run_id=RUN, epoch=1, round=1, survivors=tuple(epoch.sites), dropped=())
    answers = answers_for(epoch, full)
    unmask_s = median_seconds(
        lambda: unmask_sum(roster=epoch.roster, request=full, masked=masked, answers=answers),
        args.repeats,
    )
    result = unmask_sum(roster=epoch.roster, request=full, masked=masked, answers=answers)
    check_sum(result.total, encoded)
    survivors = tuple(epoch.sites[1:])
    dropped_masked = [mask(s, 2) for s in survivors]
    dropout = UnmaskRequest(run_id=RUN, epoch=1, round=2, survivors=survivors, dropped=(first,))
    dropout_answers = answers_for(epoch, dropout)
    dropout_s = median_seconds(
        lambda: unmask_sum(
            roster=epoch.roster, request=dropout, masked=dropped_masked, answers=dropout_answers
        ),
        args.repeats,
    )
    return {
        "encode_seconds": encode_s,
        "mask_seconds": mask_s,
        "unmask_seconds": unmask_s,
        "unmask_one_dropped_seconds": dropout_s,
        "masked_bytes": float(masked[0].vector.nbytes),
        "share_bytes_per_epoch": float(epoch.share_bytes),
        "answer_bytes_per_round": float(answer_bytes(answers[0])),
        "scale": point.scale,
        "max_sum_error": point.max_sum_error,
    }


def check_sum(total: np.ndarray, encoded: dict[str, np.ndarray]) -> None:
    expected = np.zeros_like(total)
    for vector in encoded.values():
        expected += vector
    if not np.array_equal(total, expected):
        raise SystemExit("the unmasked sum differs from the plain sum: the benchmark is invalid")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--core", action="store_true", help="measure the protocol core")
    p.add_argument("--in-process", action="store_true", help="measure whole in-process federations")
    p.add_argument("--deployed", action="store_true", help="measure whole deployed federations")
    p.add_argument(
        "--network", choices=sorted(NETWORKS), default="demo", help="federations: the UNet"
    )
    p.add_argument("--cases", type=int, default=6, help="federations: patients per site")
    p.add_argument("--rounds", type=int, default=2, help="federations: rounds per run (>= 2)")
    p.add_argument(
        "--round-timeout", type=float, default=600.0, help="--deployed: seconds a round waits"
    )
    p.add_argument("--parameters", type=int, default=4_800_000, help="float32 values per update")
    p.add_argument("--sites", default="3,5,10", help="site counts, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--rounds-per-epoch", type=int, default=10, help="rounds one key epoch covers")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.core + args.in_process + args.deployed != 1:
        p.error(
            "give one of --core (the protocol core), --in-process (whole federations in this "
            "process) and --deployed (whole federations over SuperLink and SuperNodes)"
        )
    if not args.core and args.rounds < 2:
        p.error("--rounds must be at least 2: the upload is counted in the rounds after the first")
    return args


def summarise(events: Sequence[RunEvent]) -> dict[str, Any]:
    """A run's round times, per-site upload and key epoch, from its events alone.

    Rounds after the first give the round time and the upload: the first round's time also
    holds the sites' cold caches (and, secure, the key epoch), and the aggregator's byte count
    before it also holds the initial weights one site sent. The upload is the growth of the
    aggregator's count of array bytes received over a round, per site that answered: the TRAIN
    replies' arrays (a secure round's other messages carry no arrays). The key epoch is the time
    from the initial model to the first round's start: the keys, shares and open stages.
    """
    done = [e for e in events if isinstance(e, RoundDone)]
    if len(done) < 2:
        raise SystemExit(f"a run completed {len(done)} round(s); the figures need 2 or more")
    seconds = [float(e.seconds or 0.0) for e in done]
    uploads = [
        (after.bytes_received - before.bytes_received) / after.sites_answered
        for before, after in itertools.pairwise(done)
        if after.sites_answered
    ]
    initialised = next(e for e in events if isinstance(e, ModelInitialised))
    started = next(e for e in events if isinstance(e, RoundStarted))
    secure = any(isinstance(e, SecureEpochStarted) for e in events)
    return {
        "first_round_seconds": seconds[0],
        "round_seconds": statistics.median(seconds[1:]),
        "upload_bytes": statistics.median(uploads),
        "key_epoch_seconds": started.time - initialised.time if secure else None,
    }


def network_parameters(setup: DemoSetup) -> int:
    """Trainable parameters of the run's network as the first site builds it."""
    from medfed.config.loading import load_site_config
    from medfed.site.federated import trainable_parameters

    path = next(iter(setup.site_configs.values()))
    config = load_site_config(path).model_copy(update={"model": setup.settings.model})
    return trainable_parameters(config)


def prepare(root: Path, sites: int, args: argparse.Namespace, *, secure: bool) -> DemoSetup:
    """A fresh synthetic federation: the same seed gives a plain and a secure run the same
    patients; two runs in one workspace would spend the sites' cap twice."""
    from medfed.transport.processes import free_port

    setup = prepare_federation(
        root=root,
        sites=sites,
        cases=args.cases,
        size=VOLUME,
        rounds=args.rounds,
        local_epochs=1,
        port=free_port() if args.deployed else None,
    )
    update = {
        "secure_aggregation": secure,
        "model": NETWORKS[args.network],
        "round_timeout_s": args.round_timeout,
    }
    return dataclasses.replace(setup, settings=setup.settings.model_copy(update=update))


def in_process_run(setup: DemoSetup) -> tuple[list[RunEvent], dict[str, Any]]:
    """One in-process run: its events, and what each site's ClientApp sent beside them."""
    from flwr.app import Context, Message

    from medfed.site.clientapp import app
    from medfed.transport.inprocess import run_in_process

    uploads: list[int] = []
    stages: dict[str, list[int]] = {}

    def client_app(message: Message, context: Context) -> Message:
        reply = app(message, context)
        kind = message.metadata.message_type
        if reply.has_error() or not reply.has_content():
            return reply
        if kind == "train":
            records = reply.content.array_records.values()
            uploads.append(sum(len(a.data) for record in records for a in record.values()))
        elif kind.startswith("query.secagg_"):
            text = dict(reply.content["site"]).get("secagg", "")
            request = dict(message.content["config"]).get("secagg", "")
            stages.setdefault(kind.removeprefix("query.secagg_"), []).append(
                len(str(text)) + len(str(request))
            )
        return reply

    events: list[RunEvent] = []
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings,
        client_app=client_app,
        on_event=events.append,
    )
    if result.rounds_completed != setup.settings.rounds:
        raise SystemExit(f"a {len(setup.site_configs)}-site run stopped: {result.reason}")
    return events, {
        "array_data_bytes": statistics.median(uploads),
        "stage_bytes": {k: statistics.median(v) for k, v in sorted(stages.items())},
    }


def deployed_run(setup: DemoSetup) -> tuple[list[RunEvent], dict[str, Any]]:
    """One run on the real deployment (SuperLink and SuperNodes over TLS, every process
    stopped when it returns): its events."""
    from medfed.api.demo import run_deployed
    from medfed.errors import MedfedError

    sites = len(setup.site_configs)
    events: list[RunEvent] = []
    try:
        run_deployed(
            setup=setup,
            on_event=events.append,
            on_phase=lambda text: print(f"  [{sites} sites] {text}", flush=True),
        )
    except MedfedError as exc:
        raise SystemExit(f"a {sites}-site deployed run failed: {exc.one_line()}") from None
    return events, {}


def federation(sites: int, args: argparse.Namespace, *, secure: bool) -> dict[str, Any]:
    """One run of ``sites`` synthetic sites, plain or secure: its figures."""
    with tempfile.TemporaryDirectory(prefix="medfed-secagg-") as root:
        setup = prepare(Path(root), sites, args, secure=secure)
        parameters = network_parameters(setup)
        load_before = os.getloadavg()[0]
        events, extra = (deployed_run if args.deployed else in_process_run)(setup)
        load_after = os.getloadavg()[0]
    figures = summarise(events)
    print(
        f"  [{sites} sites, {'secure' if secure else 'plain'}] rounds "
        f"{figures['first_round_seconds']:.1f} then {figures['round_seconds']:.1f} s, upload "
        f"{figures['upload_bytes']:,.0f} B, load {load_before:.1f} -> {load_after:.1f}",
        flush=True,
    )
    return {**figures, **extra, "parameters": parameters, "load": [load_before, load_after]}


def ratio(secure: float, plain: float) -> float:
    return secure / plain if plain else math.nan


def row(mode: str, sites: int, plain: dict[str, Any], secure: dict[str, Any]) -> dict[str, Any]:
    """The comparison of one site count, in the keys the JSON report promises."""
    return {
        "mode": mode,
        "sites": sites,
        "parameters": secure["parameters"],
        "round_s_plain": plain["round_seconds"],
        "round_s_secure": secure["round_seconds"],
        "round_ratio": ratio(secure["round_seconds"], plain["round_seconds"]),
        "upload_bytes_plain": plain["upload_bytes"],
        "upload_bytes_secure": secure["upload_bytes"],
        "upload_ratio": ratio(secure["upload_bytes"], plain["upload_bytes"]),
        "key_epoch_s": secure["key_epoch_seconds"],
        "first_round_s_plain": plain["first_round_seconds"],
        "first_round_s_secure": secure["first_round_seconds"],
        "load_average": [min(plain["load"] + secure["load"]), max(plain["load"] + secure["load"])],
    }


def federations_main(args: argparse.Namespace) -> dict[str, Any]:
    """Plain and secure runs alternately for every site count, in-process or deployed."""
    mode = "deployed" if args.deployed else "in-process"
    if args.deployed:
        from _signals import unwind_on_signals

        unwind_on_signals()  # a killed benchmark still stops its SuperLink and SuperNodes
    counts = [int(n) for n in args.sites.split(",")]
    runs: dict[int, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for n in counts:
        plain = federation(n, args, secure=False)
        secure = federation(n, args, secure=True)
        runs[n] = {"plain": plain, "secure": secure}
        rows.append(row(mode, n, plain, secure))
    parameters = rows[0]["parameters"]
    print(
        f"\n{date.today()}, {os.cpu_count()} CPUs, {mode}, network {args.network} "
        f"({parameters:,} trainable parameters, {VOLUME}^3 volumes), {args.cases} patients per "
        f"site, {args.rounds} rounds of one local epoch\n"
    )
    print(
        "| sites | round s plain | round s secure | secure / plain | first round s plain / "
        "secure (key epoch s) | upload B plain | upload B secure | secure / plain | load |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['sites']} | {r['round_s_plain']:.2f} | {r['round_s_secure']:.2f} | "
            f"{r['round_ratio']:.2f} | {r['first_round_s_plain']:.2f} / "
            f"{r['first_round_s_secure']:.2f} ({r['key_epoch_s']:.2f}) | "
            f"{r['upload_bytes_plain']:,.0f} | {r['upload_bytes_secure']:,.0f} | "
            f"{r['upload_ratio']:.4f} | {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |"
        )
    report = {
        "mode": mode,
        "network": args.network,
        "parameters": parameters,
        "sites": counts,
        "runs": {str(n): r for n, r in runs.items()},
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.in_process or args.deployed:
        return federations_main(args)
    counts = [int(n) for n in args.sites.split(",")]
    load_before = os.getloadavg()[0]
    rows = {n: measure(n, args) for n in counts}
    load_after = os.getloadavg()[0]
    update_bytes = 4 * args.parameters
    upload_ratio = rows[counts[0]]["masked_bytes"] / update_bytes

    print(
        f"\n{date.today()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"numpy {np.__version__}, load average {load_before:.2f} -> {load_after:.2f}"
    )
    print(
        f"{args.parameters:,} float32 parameters ({update_bytes / 2**20:.1f} MiB), weight and one "
        f"extra value, median of {args.repeats}; upload {upload_ratio:.6f}x the float32 update\n"
    )
    print(
        "| sites | encode s | mask s | mask / encode | unmask s | unmask, 1 dropped s | "
        "upload x | shares B/epoch | answer B/round |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, row in rows.items():
        print(
            f"| {n} | {row['encode_seconds']:.3f} | {row['mask_seconds']:.3f} | "
            f"{row['mask_seconds'] / row['encode_seconds']:.2f} | {row['unmask_seconds']:.3f} | "
            f"{row['unmask_one_dropped_seconds']:.3f} | "
            f"{row['masked_bytes'] / update_bytes:.6f} | {row['share_bytes_per_epoch']:.0f} | "
            f"{row['answer_bytes_per_round']:.0f} |"
        )

    report: dict[str, Any] = {
        "parameters": args.parameters,
        "sites": counts,
        "mask_seconds": {str(n): row["mask_seconds"] for n, row in rows.items()},
        "upload_ratio": upload_ratio,
        "encode_seconds": {str(n): row["encode_seconds"] for n, row in rows.items()},
        "unmask_seconds": {str(n): row["unmask_seconds"] for n, row in rows.items()},
        "unmask_one_dropped_seconds": {
            str(n): row["unmask_one_dropped_seconds"] for n, row in rows.items()
        },
        "share_bytes_per_epoch": {str(n): row["share_bytes_per_epoch"] for n, row in rows.items()},
        "answer_bytes_per_round": {
            str(n): row["answer_bytes_per_round"] for n, row in rows.items()
        },
        "settings": {
            "repeats": args.repeats,
            "rounds_per_epoch": args.rounds_per_epoch,
            "max_weight": MAX_WEIGHT,
            "bound": BOUND,
            "cpus": os.cpu_count(),
            "load_average": [load_before, load_after],
        },
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
