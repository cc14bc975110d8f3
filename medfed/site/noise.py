"""Gaussian noise for DP-SGD drawn from a cryptographically secure stream, not a torch generator.

Opacus draws its noise with ``torch.normal(generator=...)``: a Mersenne Twister on the CPU (or
Philox on CUDA), which is not a cryptographic generator: its state, hence all of its past and
future output, follows from its 64-bit seed or from enough of its output. Here every draw comes
from :mod:`medfed.csprng` (ChaCha20 keyed from ``os.urandom`` at every call) in float64 on the
CPU, and is then cast to the reference's dtype and moved to its device; no CUDA generator is
ever involved. ``secure=True`` adds the floating-point defence of Opacus' ``secure_mode``
(Holohan & Braghin 2021, arXiv 2107.10138, section 5.1), with every draw from the stream.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from medfed.csprng import DEFAULT_CHUNK, SECURE_TERMS, Keystream, standard_normals

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


class CsprngGaussian:
    """Gaussian noise tensors from ChaCha20 keystreams keyed by ``os.urandom`` at every call.

    ``normal`` returns ``std`` times a standard normal per element; with ``secure=True`` the
    sum of four independent standard normals times ``std / 2`` (same variance), which is Opacus'
    defence against floating-point attacks that recover the underlying uniforms from the low
    bits of a Gaussian sample (Holohan & Braghin 2021, arXiv 2107.10138, section 5.1: summing
    2n samples, n = 2, raises the attack's cost from 2**53 to 2**159). Unlike Opacus' secure
    mode, all four terms come from the CSPRNG rather than from a torch generator.

    Everything is computed on the CPU in float64, ``chunk`` elements per vectorised pass (memory
    stays at a few MiB of temporaries beyond the output, whatever the tensor's size), and only
    then rounded to ``dtype`` and moved to ``device``. A tensor of at least two chunks per
    thread is split over up to ``threads`` threads (default: torch's intra-op thread count, i.e.
    the site's ``training.threads``), each with its own key and nonce from ``os.urandom``: numpy
    and OpenSSL release the GIL, and the noise is drawn in the optimiser step, when the cores
    are otherwise idle (2 threads: 1.5x faster than one on 2 cores).
    """

    def __init__(self, *, chunk: int = DEFAULT_CHUNK, threads: int | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be positive, not {chunk}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be positive, not {threads}")
        self.chunk = chunk
        self.threads = threads

    def normal(
        self,
        *,
        shape: tuple[int, ...],
        std: float,
        dtype: torch.dtype,
        device: torch.device,
        secure: bool = False,
    ) -> torch.Tensor:
        """A tensor of ``shape`` with independent N(0, std^2) entries, as ``dtype`` on ``device``.

        A ``std`` of 0 gives zeros without touching the stream, as in Opacus; a negative or
        non-finite one is refused rather than silently producing no privacy.
        """
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"the noise's standard deviation must be finite and >= 0, not {std}")
        if not dtype.is_floating_point:
            raise TypeError(f"Gaussian noise needs a floating-point dtype, not {dtype}")
        if std == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        result = torch.empty(shape, dtype=dtype, device="cpu")
        flat = result.view(-1)
        terms, scale = (SECURE_TERMS, std / 2) if secure else (1, std)
        chunks = -(-flat.numel() // self.chunk)
        threads = self.threads if self.threads is not None else torch.get_num_threads()
        workers = max(1, min(threads, chunks // 2))
        # Whole chunks per worker, so that the split never changes how a chunk is drawn.
        bounds = [
            min(flat.numel(), self.chunk * (chunks * i // workers)) for i in range(workers + 1)
        ]
        if workers == 1:
            self._fill(flat, 0, flat.numel(), terms=terms, scale=scale)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pending = [
                    pool.submit(self._fill, flat, lo, hi, terms=terms, scale=scale)
                    for lo, hi in itertools.pairwise(bounds)
                ]
                for done in pending:
                    done.result()  # re-raises a worker's exception
        return result.to(device)

    def _fill(self, flat: torch.Tensor, start: int, stop: int, *, terms: int, scale: float) -> None:
        """Write ``scale`` * (sum of ``terms`` standard normals) into ``flat[start:stop]``."""
        stream = Keystream()  # a key of its own for every call, and for every worker of a call
        # numpy writes float16/32/64 in place, scaling and rounding in one pass; bfloat16, which
        # numpy lacks, goes through torch's copy.
        target = flat.numpy() if flat.dtype in _NUMPY_FLOATS else None
        for lo in range(start, stop, self.chunk):
            count = min(self.chunk, stop - lo)
            values = standard_normals(stream, count)
            for _term in range(terms - 1):
                values += standard_normals(stream, count)
            if target is not None:
                np.multiply(values, scale, out=target[lo : lo + count], casting="same_kind")
            else:
                values *= scale
                flat[lo : lo + count].copy_(torch.from_numpy(values))

    def like(self, reference: torch.Tensor, *, std: float, secure: bool = False) -> torch.Tensor:
        """Noise with ``reference``'s shape, dtype and device."""
        return self.normal(
            shape=tuple(reference.shape),
            std=std,
            dtype=reference.dtype,
            device=reference.device,
            secure=secure,
        )

    def like_many(
        self, references: Sequence[torch.Tensor], *, std: float, secure: bool = False
    ) -> list[torch.Tensor]:
        """Noise for every tensor of ``references`` (one per parameter), in their order.

        One draw per (dtype, device) group, split into views: a network has dozens of small
        parameter tensors, and a key, a cipher and a vectorised pass per tensor cost more than
        the noise itself (the default 3D network's 38 tensors: 5.8x Opacus' noise time with a
        draw per tensor, about 2.3x with one draw; benchmarks/README.md). The parts of one draw
        are as independent as separate draws would be.
        """
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for index, reference in enumerate(references):
            groups.setdefault((reference.dtype, reference.device), []).append(index)
        noise: list[torch.Tensor | None] = [None] * len(references)
        for (dtype, device), members in groups.items():
            sizes = [references[i].numel() for i in members]
            flat = self.normal(
                shape=(sum(sizes),), std=std, dtype=dtype, device=device, secure=secure
            )
            for i, part in zip(members, torch.split(flat, sizes), strict=True):
                noise[i] = part.view(references[i].shape)
        return [n for n in noise if n is not None]


class CsprngDPOptimizer(DPOptimizer):  # type: ignore[misc]  # opacus is untyped
    """Opacus' ``DPOptimizer`` with the noise drawn by ``CsprngGaussian`` instead of torch.

    Clipping, accumulation, the processed-gradient checks and the ``loss_reduction`` scaling are
    Opacus' own; only ``add_noise`` changes. ``secure_mode`` selects the four-term sum. No torch
    generator is used, so ``generator`` must stay ``None``: one passed by a caller would be
    silently ignored otherwise, and the caller would believe the noise comes from it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int | None,
        loss_reduction: str = "mean",
        generator: None = None,
        secure_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        if generator is not None:
            raise ValueError(
                "CsprngDPOptimizer draws its noise from a ChaCha20 stream keyed by os.urandom; "
                "it takes no torch generator"
            )
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=None,
            secure_mode=secure_mode,
            **kwargs,
        )
        self.gaussian = CsprngGaussian()

    def add_noise(self) -> None:
        """``p.grad = p.summed_grad + N(0, (noise_multiplier * max_grad_norm)^2)`` per parameter.

        As Opacus' ``add_noise``: refuses gradients already used by a step (``zero_grad`` was
        not called), here before any parameter is changed, and marks these as used. The noise
        of all parameters comes from one draw (one key from ``os.urandom``) per step.
        """
        params = list(self.params)
        for p in params:
            _check_processed_flag(p.summed_grad)
        noise = self.gaussian.like_many(
            [p.summed_grad for p in params],
            std=self.noise_multiplier * self.max_grad_norm,
            secure=self.secure_mode,
        )
        for p, p_noise in zip(params, noise, strict=True):
            p.grad = (p.summed_grad + p_noise).view_as(p)
            _mark_as_processed(p.summed_grad)
