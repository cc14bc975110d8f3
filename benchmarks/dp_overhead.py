"""What DP-SGD costs per training step for medfed's default networks, per Opacus mode.

    python benchmarks/dp_overhead.py [--size 64] [--size2d 256] [--batch 4] [--steps 7] [--quick]

One step is forward + DiceCE loss + backward + Adam step. For the default 3D network (size^3)
and 2D network (size2d^2), each configuration (no DP, and DP in each grad-sample mode) first has
its DP step checked against per-sample backward passes on a tiny float64 input, then is timed
with the same batch, warm-up steps excluded. Configurations are interleaved (ABC ABC ..., order
rotated each round) so that load from other processes hits all of them alike; ratios are the
median of per-round ratios to the non-DP step of the same round. Peak memory: on CPU a fresh
child process per configuration reports how far its resident set rose above the set-up during
three steps, and its overall peak; on CUDA torch.cuda.max_memory_allocated during one step.

Modes: hooks = Opacus hooks with medfed's registered rules (medfed.models.grad_samplers);
hooks-stock = Opacus' own rules (unfold convs, functorch for ConvTranspose/PReLU);
functorch, ew, ghost = Opacus modes (ghost with a per-sample DiceCE; ghost-dicece with MONAI's
DiceCELoss); vmap = the trainer's own whole-network torch.func mode (medfed.site.dp), one
forward and one backward pass, with Opacus' DPOptimizer clipping and adding the noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from dp_steps import MODES, check_mode, default_spec, make_batch, make_step

from medfed.models import build_model, memory_format_for, resolve_device


@dataclass
class Row:
    net: str
    layout: str
    mode: str
    ms: float | None = None
    ratio: float | None = None
    check: str = ""
    peak_mib: float | None = None
    step_mib: float | None = None


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:110]}"


def time_configs(
    args: argparse.Namespace, dims: int, layout: torch.memory_format, device: torch.device
) -> list[Row]:
    size = args.size if dims == 3 else args.size2d
    net, layout_name = f"{dims}D {size}^{dims}", _layout_name(layout)
    rows, steps = {}, {}
    for mode in args.modes:
        row = rows[mode] = Row(net=net, layout=layout_name, mode=mode)
        if mode != "none":
            try:
                error = check_mode(mode, dims, layout)
                row.check = f"ok ({error:.0e})" if error < 1e-6 else f"WRONG ({error:.1e})"
            except Exception as exc:
                row.check = f"fails: {_short(exc)}"
                continue
        images, labels = make_batch(dims, size, args.batch, torch.float32, device)
        torch.manual_seed(0)
        model = build_model(spec=default_spec(dims)).to(device).to(memory_format=layout)
        try:
            step = make_step(
                mode,
                model,
                images,
                labels,
                torch.optim.Adam(model.parameters()),
                noise=1.0,
                clip=1.0,
            )
            for _warm in range(args.warmup):
                step()
            steps[mode] = step
        except Exception as exc:
            row.check = f"fails: {_short(exc)}"
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    order = list(steps)
    for round_index in range(args.steps):
        shift = round_index % len(order)
        for mode in order[shift:] + order[:shift]:
            sync(device)
            start = time.perf_counter()
            steps[mode]()
            sync(device)
            times[mode].append(time.perf_counter() - start)
    for mode, samples in times.items():
        rows[mode].ms = 1000 * statistics.median(samples)
        if "none" in times:
            rows[mode].ratio = statistics.median(
                t / base for t, base in zip(samples, times["none"], strict=True)
            )
    return list(rows.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layout_name(layout: torch.memory_format) -> str:
    return "contiguous" if layout == torch.contiguous_format else "channels-last"


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def probe(args: argparse.Namespace) -> None:
    """Child process: set up one configuration, take a few steps, print its memory as JSON.

    VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (Linux keeps it
    across fork and exec), which hides every configuration behind the benchmark's own peak.
    """
    device = resolve_device(name=args.device, threads=args.threads)
    dims, mode = args.probe_dims, args.probe_mode
    layout = torch.channels_last_3d if dims == 3 else torch.channels_last
    layout = layout if args.probe_layout == "channels-last" else torch.contiguous_format
    size = args.size if dims == 3 else args.size2d
    images, labels = make_batch(dims, size, args.batch, torch.float32, device)
    model = build_model(spec=default_spec(dims)).to(device).to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters())
    step = make_step(mode, model, images, labels, optimizer, noise=1.0, clip=1.0)
    setup_peak, base = _status_mib("VmHWM"), _status_mib("VmRSS")
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS: the peak below is the steps' own
    for _ in range(3):
        step()
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": max(peak, setup_peak), "step_mib": peak - base}))


def measure_memory(args: argparse.Namespace, row: Row, dims: int) -> None:
    command = [
        sys.executable,
        __file__,
        "--probe-mode",
        row.mode,
        "--probe-dims",
        str(dims),
        "--probe-layout",
        row.layout,
        "--size",
        str(args.size),
        "--size2d",
        str(args.size2d),
        "--batch",
        str(args.batch),
        "--device",
        "cpu",
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        row.check += f"; memory probe failed: {done.stderr.strip().splitlines()[-1][:80]}"
        return
    result = json.loads(done.stdout.strip().splitlines()[-1])
    row.peak_mib, row.step_mib = result["peak_mib"], result["step_mib"]


def gpu_memory(
    args: argparse.Namespace, row: Row, dims: int, layout: torch.memory_format, device: torch.device
) -> None:
    size = args.size if dims == 3 else args.size2d
    images, labels = make_batch(dims, size, args.batch, torch.float32, device)
    model = build_model(spec=default_spec(dims)).to(device).to(memory_format=layout)
    step = make_step(
        row.mode, model, images, labels, torch.optim.Adam(model.parameters()), noise=1.0, clip=1.0
    )
    step()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    row.step_mib = torch.cuda.max_memory_allocated(device) / 2**20


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def table(rows: list[Row], memory_label: str) -> str:
    lines = [
        f"| network | layout | mode | ms/step | x non-DP | {memory_label} | DP step check |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        memory = _fmt(r.step_mib, "{:.0f}") + ("" if r.peak_mib is None else f" / {r.peak_mib:.0f}")
        lines.append(
            f"| {r.net} | {r.layout} | {r.mode} | {_fmt(r.ms, '{:.0f}')} | "
            f"{_fmt(r.ratio, '{:.2f}')} | {memory} | {r.check or '-'} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="3D input edge (voxels)")
    p.add_argument("--size2d", type=int, default=256, help="2D input edge (pixels)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=7, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--layouts", choices=("both", "contiguous", "channels-last"), default="both")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--quick", action="store_true", help="small inputs, few steps, no memory")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--probe-mode", help=argparse.SUPPRESS)
    p.add_argument("--probe-dims", type=int, help=argparse.SUPPRESS)
    p.add_argument("--probe-layout", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := set(args.modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}")
    if "none" not in args.modes:
        args.modes.insert(0, "none")
    if args.quick:
        args.size, args.size2d, args.steps, args.warmup = 32, 96, 3, 1
        args.no_memory = True
    return args


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and hook notices, once per config
    args = parse(argv)
    if args.probe_mode:
        probe(args)
        return
    device = resolve_device(name=args.device, threads=args.threads)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    rows: list[Row] = []
    for dims in (3, 2):
        spec = default_spec(dims)
        layouts = {
            "contiguous": torch.contiguous_format,
            "channels-last": memory_format_for(spec=spec, device=torch.device("cpu")),
        }
        chosen = list(layouts.values()) if args.layouts == "both" else [layouts[args.layouts]]
        for layout in chosen:
            load = os.getloadavg()[0]
            block = time_configs(args, dims, layout, device)
            for row in block:
                if args.no_memory or row.ms is None:
                    continue
                if device.type == "cuda":
                    gpu_memory(args, row, dims, layout, device)
                else:
                    measure_memory(args, row, dims)
            rows += block
            print(
                f"\n{block[0].net}, {block[0].layout}: load average "
                f"{load:.2f} -> {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    memory = "GPU MiB (step peak)" if device.type == "cuda" else "MiB step / peak RSS"
    print("\n" + table(rows, memory))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=1)


if __name__ == "__main__":
    main()
