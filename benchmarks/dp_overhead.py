"""What DP-SGD costs per training step for medfed's default networks, per Opacus mode.

    python benchmarks/dp_overhead.py [--size 64] [--size2d 256] [--batch 4] [--steps 7] [--quick]
    python benchmarks/dp_overhead.py --noise-only [--noise-rounds 9] [--json out.json]

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

Noise (after the table, or alone with --noise-only): the cost of the Gaussian noise of one DP
step from Opacus' torch.Generator against medfed.site.noise.CsprngGaussian (ChaCha20 keyed by
os.urandom), plain and secure mode, for a 4.8M-parameter float32 set (--noise-params over
--noise-tensors tensors) and for the default 3D network, whose whole vmap DP step is also timed
with each noise source (CsprngDPOptimizer in place of Opacus' optimiser) to give the noise's
share of the step. Sources are interleaved per round like the configurations above.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from dp_steps import MODES, Step, check_mode, default_spec, make_batch, make_step

from medfed.models import build_model, memory_format_for, resolve_device
from medfed.site.dp import make_private
from medfed.site.noise import CsprngDPOptimizer, CsprngGaussian


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


# --- noise: torch.Generator against the CSPRNG ---------------------------------------------

#: The noise sources timed, in the JSON's names. torch_secure is Opacus' own secure mode (four
#: torch draws), for reference; the ratios reported are to ``torch``.
SOURCES = ("torch", "torch_secure", "csprng", "csprng_secure")
STEP_SOURCES = ("torch", "csprng", "csprng_secure")


def _noise_fn(source: str, device: torch.device) -> Callable[[list[torch.Tensor], float], None]:
    """One DP step's noise for every tensor of a parameter set, as ``add_noise`` draws it."""
    from opacus.optimizers.optimizer import _generate_noise

    if source.startswith("torch"):
        generator = torch.Generator(device=device).manual_seed(0)
        secure = source == "torch_secure"

        def opacus_noise(params: list[torch.Tensor], std: float) -> None:
            for p in params:
                _generate_noise(std=std, reference=p, generator=generator, secure_mode=secure)

        return opacus_noise
    gaussian, secure = CsprngGaussian(), source == "csprng_secure"

    def csprng_noise(params: list[torch.Tensor], std: float) -> None:
        gaussian.like_many(params, std=std, secure=secure)  # as CsprngDPOptimizer draws it

    return csprng_noise


def _dp_steps_by_source(args: argparse.Namespace, device: torch.device) -> dict[str, Step]:
    """The vmap DP step of the default 3D network (trainer's layout), once per noise source.

    The per-sample gradients are ``medfed.site.dp``'s vmap ones; the DP optimiser around Adam is
    built here, so that the steps differ in the noise alone, whatever optimiser ``make_private``
    itself wraps: Opacus' ``DPOptimizer`` with a torch.Generator for ``torch``,
    ``CsprngDPOptimizer`` (plain or secure mode) for the others.
    """
    from opacus.optimizers import DPOptimizer

    spec = default_spec(3)
    layout = memory_format_for(spec=spec, device=device)
    images, labels = make_batch(3, args.size, args.batch, torch.float32, device)
    settings: dict[str, Any] = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "expected_batch_size": args.batch,
        "loss_reduction": "mean",
    }
    steps: dict[str, Step] = {}
    for source in STEP_SOURCES:
        torch.manual_seed(0)
        model = build_model(spec=spec).to(device).to(memory_format=layout)
        gradients = make_private(
            model=model,
            optimizer=torch.optim.Adam(model.parameters()),  # make_private's own: not used
            num_classes=2,
            grad_sample_mode="vmap",
            secure_mode=False,
            **{k: v for k, v in settings.items() if k != "loss_reduction"},
        ).per_sample_gradients
        adam = torch.optim.Adam(model.parameters())
        optimizer: Any = (
            DPOptimizer(adam, generator=torch.Generator(device=device).manual_seed(0), **settings)
            if source == "torch"
            else CsprngDPOptimizer(adam, secure_mode=source == "csprng_secure", **settings)
        )

        def step(optimizer: Any = optimizer, gradients: Any = gradients) -> None:
            optimizer.zero_grad(set_to_none=True)
            gradients(images, labels)
            optimizer.step()

        steps[source] = step
    return steps


def _interleaved(
    jobs: dict[str, Callable[[], None]], rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every job, ``rounds`` rounds, the order rotated every round."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    order = list(jobs)
    for round_index in range(rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            sync(device)
            start = time.perf_counter()
            jobs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _summary(times: dict[str, list[float]]) -> dict[str, float]:
    median = {name: statistics.median(samples) for name, samples in times.items()}

    def ratio(name: str) -> float:
        pairs = zip(times[name], times["torch"], strict=True)
        return statistics.median(t / base for t, base in pairs)

    out = {f"{name}_s": value for name, value in median.items()}
    out |= {"csprng_over_torch": ratio("csprng"), "secure_over_torch": ratio("csprng_secure")}
    if "torch_secure" in times:
        out["torch_secure_over_torch"] = ratio("torch_secure")
    return out


def time_noise(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The ``noise`` object of the JSON: the 4.8M set at the top level, the network below it."""
    std = 1.0  # noise_multiplier * max_grad_norm; the cost does not depend on it
    per_tensor = args.noise_params // args.noise_tensors
    large = [
        torch.zeros(per_tensor, dtype=torch.float32, device=device)
        for _ in range(args.noise_tensors)
    ]
    torch.manual_seed(0)
    network = build_model(spec=default_spec(3)).to(device)
    small = [p.detach() for p in network.parameters() if p.requires_grad]
    jobs: dict[str, Callable[[], None]] = {}
    for source in SOURCES:
        noise = _noise_fn(source, device)
        jobs[f"large/{source}"] = functools.partial(noise, large, std)
        jobs[f"net/{source}"] = functools.partial(noise, small, std)
    steps = _dp_steps_by_source(args, device)
    for source, step in steps.items():
        jobs[f"step/{source}"] = step
    for job in jobs.values():  # warm-up, not timed
        for _ in range(max(1, args.warmup)):
            job()
    times = _interleaved(jobs, args.noise_rounds, device)

    def part(prefix: str) -> dict[str, list[float]]:
        return {k.split("/")[1]: v for k, v in times.items() if k.startswith(prefix + "/")}

    result: dict[str, Any] = _summary(part("large"))
    result |= {
        "params": per_tensor * len(large),
        "tensors": len(large),
        "rounds": args.noise_rounds,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    net: dict[str, Any] = dict(_summary(part("net")))
    step_times = part("step")
    for source in STEP_SOURCES:
        net[f"step_{source}_s"] = statistics.median(step_times[source])
        # The noise's share of a step that draws it: noise median over that step's median.
        net[f"share_{source}"] = net[f"{source}_s"] / net[f"step_{source}_s"]
    net |= {
        "name": f"3D {args.size}^3 default network, vmap DP step, batch {args.batch}",
        "params": sum(p.numel() for p in small),
        "tensors": len(small),
        "layout": _layout_name(memory_format_for(spec=default_spec(3), device=device)),
    }
    result["network"] = net
    return result


def noise_table(noise: dict[str, Any]) -> str:
    net = noise["network"]
    lines = [
        "| parameter set | params | tensors | torch.Generator ms | CSPRNG ms | CSPRNG secure ms "
        "| CSPRNG / torch | secure / torch | Opacus secure ms (torch) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in (
        (f"{noise['tensors']} x {noise['params'] // noise['tensors']:,} float32", noise),
        (f"default 3D network ({net['layout']})", net),
    ):
        lines.append(
            f"| {name} | {row['params']:,} | {row['tensors']} | {1000 * row['torch_s']:.2f} | "
            f"{1000 * row['csprng_s']:.2f} | {1000 * row['csprng_secure_s']:.2f} | "
            f"{row['csprng_over_torch']:.2f} | {row['secure_over_torch']:.2f} | "
            f"{1000 * row['torch_secure_s']:.2f} |"
        )
    lines += [
        "",
        f"DP step of the {net['name']} ({net['layout']}), median ms and the noise's share:",
        "",
        "| noise | ms/step | noise ms | noise share of the step |",
        "|---|---:|---:|---:|",
    ]
    for source, label in zip(
        STEP_SOURCES, ("torch.Generator (Opacus)", "CSPRNG", "CSPRNG secure"), strict=True
    ):
        lines.append(
            f"| {label} | {1000 * net[f'step_{source}_s']:.1f} | {1000 * net[f'{source}_s']:.2f} "
            f"| {100 * net[f'share_{source}']:.2f}% |"
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
    p.add_argument(
        "--json", default=None, help='also write {"rows": [...], "noise": {...}} to this file'
    )
    p.add_argument("--noise-only", action="store_true", help="only the noise measurement")
    p.add_argument("--no-noise", action="store_true", help="skip the noise measurement")
    p.add_argument("--noise-rounds", type=int, default=9, help="timed rounds of the noise part")
    p.add_argument("--noise-params", type=int, default=4_800_000, help="large set's parameters")
    p.add_argument("--noise-tensors", type=int, default=40, help="large set's tensors")
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
        args.noise_rounds = min(args.noise_rounds, 3)
    if args.noise_only and args.no_noise:
        p.error("--noise-only and --no-noise exclude each other")
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
    for dims in () if args.noise_only else (3, 2):
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
    if rows:
        memory = "GPU MiB (step peak)" if device.type == "cuda" else "MiB step / peak RSS"
        print("\n" + table(rows, memory))
    report: dict[str, Any] = {"rows": [asdict(r) for r in rows]}
    if not args.no_noise:
        load = os.getloadavg()[0]
        report["noise"] = time_noise(args, device)
        print(
            f"\nNoise, {args.noise_rounds} rounds: load average {load:.2f} -> "
            f"{os.getloadavg()[0]:.2f}\n\n" + noise_table(report["noise"])
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
