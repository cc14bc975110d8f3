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
(the in-process grid, no network) on synthetic sites of ``--cases`` patients, ``--rounds``
rounds of one local epoch, with and without secure aggregation, alternately. Per run it reports
the median round time (the first secure round includes the key epoch's three stages, so it is
shown apart), and per site the bytes of one upload (array data: the masked uint32 vector, or the
float32 weights) and of the secure stages' JSON (keys, shares, open once per run; unmask per
round). Training dominates these round times; on a shared machine they move by seconds.

    python benchmarks/secure_aggregation.py --core                       # 4.8M, 3/5/10 sites
    python benchmarks/secure_aggregation.py --core --json secagg.json
    python benchmarks/secure_aggregation.py --core --parameters 100000 --sites 3   # quick
    python benchmarks/secure_aggregation.py --in-process --sites 3 --cases 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    p.add_argument("--cases", type=int, default=8, help="--in-process: patients per site")
    p.add_argument("--rounds", type=int, default=2, help="--in-process: rounds per run")
    p.add_argument("--parameters", type=int, default=4_800_000, help="float32 values per update")
    p.add_argument("--sites", default="3,5,10", help="site counts, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--rounds-per-epoch", type=int, default=10, help="rounds one key epoch covers")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.core == args.in_process:
        p.error("give one of --core (the protocol core) and --in-process (whole federations)")
    return args


def federation(sites: int, args: argparse.Namespace, *, secure: bool) -> dict[str, Any]:
    """One in-process run: its round times and each site's upload and stage bytes."""
    import tempfile

    from flwr.app import Context, Message

    from medfed.api.demo import prepare_federation
    from medfed.run_events import RoundDone, RunEvent
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
    with tempfile.TemporaryDirectory() as root:
        setup = prepare_federation(
            root=Path(root),
            sites=sites,
            cases=args.cases,
            size=32,
            rounds=args.rounds,
            local_epochs=1,
        )
        settings = setup.settings.model_copy(update={"secure_aggregation": secure})
        result = run_in_process(
            workspace=setup.workspace,
            site_configs=setup.site_configs,
            settings=settings,
            client_app=client_app,
            on_event=events.append,
        )
    if result.rounds_completed != args.rounds:
        raise SystemExit(f"a {sites}-site run stopped: {result.reason}")
    seconds = [e.seconds or 0.0 for e in events if isinstance(e, RoundDone)]
    return {
        "first_round_seconds": seconds[0],
        "round_seconds": statistics.median(seconds[1:] or seconds),
        "upload_bytes": statistics.median(uploads),
        "stage_bytes": {k: statistics.median(v) for k, v in sorted(stages.items())},
    }


def in_process_main(args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(n) for n in args.sites.split(",")]
    rows: dict[int, dict[str, Any]] = {}
    for n in counts:
        plain = federation(n, args, secure=False)
        secure = federation(n, args, secure=True)
        rows[n] = {"plain": plain, "secure": secure}
    print(
        f"\n{date.today()}, {os.cpu_count()} CPUs, in-process, {args.cases} patients per site, "
        f"{args.rounds} rounds of one local epoch, load average {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| sites | round s plain | round s secure | first round s plain / secure | "
        "upload B plain | upload B secure | stage bytes per site (secure) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for n, row in rows.items():
        plain, secure = row["plain"], row["secure"]
        stage_text = ", ".join(f"{k} {v:.0f}" for k, v in secure["stage_bytes"].items())
        print(
            f"| {n} | {plain['round_seconds']:.2f} | {secure['round_seconds']:.2f} | "
            f"{plain['first_round_seconds']:.2f} / {secure['first_round_seconds']:.2f} | "
            f"{plain['upload_bytes']:.0f} | {secure['upload_bytes']:.0f} | {stage_text} |"
        )
    report = {"mode": "in-process", "sites": counts, "rows": {str(n): r for n, r in rows.items()}}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.in_process:
        return in_process_main(args)
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
