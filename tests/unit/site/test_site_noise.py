"""DP-SGD noise from ChaCha20 keystreams keyed by os.urandom (medfed.site.noise)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn

from medfed import csprng
from medfed.csprng import uniform53
from medfed.site.dp import prepare_empty_step
from medfed.site.noise import CsprngDPOptimizer, CsprngGaussian

CPU = torch.device("cpu")
SAMPLES = 200_000
URANDOM = "medfed.csprng.os.urandom"  # os.urandom, reached the way the module calls it


def _fixed_urandom(calls: list[int]) -> Any:
    """A stand-in for os.urandom that always answers the same bytes, and records the sizes."""

    def urandom(size: int) -> bytes:
        calls.append(size)
        return bytes((7 * i + 3) % 256 for i in range(size))

    return urandom


def _check_standard_normal(z: np.ndarray[Any, Any]) -> None:
    n = len(z)
    # 5-sigma bounds: the mean's sd is 1/sqrt(n), the sample variance's sqrt(2/n).
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("std", [1.0, 2.5])
def test_draws_are_normal_with_the_requested_std(secure: bool, std: float) -> None:
    z = CsprngGaussian().normal(
        shape=(SAMPLES,), std=std, dtype=torch.float64, device=CPU, secure=secure
    )
    _check_standard_normal(z.numpy() / std)
    # The scale itself, tighter than the variance bound above allows to miss: a secure sum of
    # four terms scaled by std (not std / 2) would give 2 * std.
    assert z.std().item() == pytest.approx(std, rel=0.02)


def test_chunked_and_threaded_draws_fill_every_element() -> None:
    """Many small chunks over two threads, a length that is no multiple of the chunk."""
    gaussian = CsprngGaussian(chunk=1000, threads=2)
    z = gaussian.normal(shape=(37, 1001), std=1.0, dtype=torch.float64, device=CPU)
    assert z.shape == (37, 1001)
    values = z.flatten().numpy()
    # Continuous samples never repeat: an element left unwritten, or a chunk written twice
    # from the same stream position, would.
    assert len(np.unique(values)) == values.size
    _check_standard_normal(values)
    secure = gaussian.normal(shape=(20_001,), std=1.0, dtype=torch.float64, device=CPU, secure=True)
    _check_standard_normal(secure.numpy())


def test_uniforms_have_53_bits_and_never_reach_zero() -> None:
    words = np.array([0, 1, 2047, 2048, 2**63, 2**64 - 1], dtype=np.uint64)
    u = uniform53(words)
    assert u.tolist() == [2.0**-53, 2.0**-53, 2.0**-53, 2.0**-52, 0.5 + 2.0**-53, 1.0]
    random = uniform53(np.random.default_rng(0).integers(0, 2**64, 100_000, dtype=np.uint64))
    assert (random > 0).all()
    assert (random <= 1).all()
    scaled = random * 2.0**53  # exact: every uniform is an integer number of 2**-53 steps
    assert (scaled == np.round(scaled)).all()


def test_two_draws_differ() -> None:
    gaussian = CsprngGaussian()
    first = gaussian.normal(shape=(1000,), std=1.0, dtype=torch.float64, device=CPU)
    second = gaussian.normal(shape=(1000,), std=1.0, dtype=torch.float64, device=CPU)
    assert not torch.equal(first, second)
    # Each worker thread of one draw has its own key: the two halves are unrelated.
    split = CsprngGaussian(chunk=100, threads=2)
    z = split.normal(shape=(400,), std=1.0, dtype=torch.float64, device=CPU)
    assert not torch.equal(z[:200], z[200:])


@pytest.mark.parametrize("secure", [False, True])
def test_os_urandom_is_the_only_source(monkeypatch: pytest.MonkeyPatch, secure: bool) -> None:
    calls: list[int] = []
    monkeypatch.setattr(URANDOM, _fixed_urandom(calls))
    gaussian = CsprngGaussian()
    kwargs: dict[str, Any] = {"shape": (5000,), "std": 1.5, "dtype": torch.float64, "device": CPU}
    first = gaussian.normal(**kwargs, secure=secure)
    torch.manual_seed(1234)  # torch's global generator is no input either
    second = gaussian.normal(**kwargs, secure=secure)
    assert torch.equal(first, second)
    assert calls == [32, 16, 32, 16]  # a fresh key and nonce for each draw, nothing else


def test_secure_mode_sums_four_draws_of_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the key known, both modes are exactly the documented functions of the stream."""
    monkeypatch.setattr(URANDOM, _fixed_urandom([]))
    count, std = 3000, 1.5
    stream = csprng.Keystream()
    terms = [csprng.standard_normals(stream, count) for _ in range(4)]
    gaussian = CsprngGaussian()
    plain = gaussian.normal(shape=(count,), std=std, dtype=torch.float64, device=CPU)
    secure = gaussian.normal(shape=(count,), std=std, dtype=torch.float64, device=CPU, secure=True)
    np.testing.assert_array_equal(plain.numpy(), terms[0] * std)
    expected = (((terms[0] + terms[1]) + terms[2]) + terms[3]) * (std / 2)
    np.testing.assert_array_equal(secure.numpy(), expected)


def _counting_urandom(calls: list[int]) -> Any:
    real = os.urandom

    def urandom(size: int) -> bytes:
        calls.append(size)
        return real(size)

    return urandom


def test_like_many_draws_once_per_dtype_and_keeps_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(URANDOM, _counting_urandom(calls))
    references = [
        torch.zeros(3, 4),
        torch.zeros(5, dtype=torch.float64),
        torch.zeros(0),
        torch.zeros(2, 2),
    ]
    noise_parts = CsprngGaussian().like_many(references, std=1.0)
    assert [(n.shape, n.dtype) for n in noise_parts] == [(r.shape, r.dtype) for r in references]
    assert calls == [32, 16, 32, 16]  # one key for the float32 tensors, one for the float64
    joined = torch.cat([noise_parts[0].flatten(), noise_parts[3].flatten()])
    assert len(set(joined.tolist())) == joined.numel()  # the parts are not copies of each other


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_device_follow_the_reference(dtype: torch.dtype) -> None:
    reference = torch.zeros(3, 4, 5, dtype=dtype)
    z = CsprngGaussian().like(reference, std=1.0)
    assert z.dtype == dtype
    assert z.device == reference.device
    assert z.shape == reference.shape
    assert torch.isfinite(z).all()
    moved = CsprngGaussian().normal(
        shape=(3,), std=1.0, dtype=torch.float32, device=torch.device("meta")
    )
    assert moved.device.type == "meta"
    assert moved.dtype == torch.float32


def test_edge_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    gaussian = CsprngGaussian()
    assert gaussian.normal(shape=(), std=1.0, dtype=torch.float32, device=CPU).shape == ()
    assert gaussian.normal(shape=(0, 3), std=1.0, dtype=torch.float32, device=CPU).numel() == 0
    with pytest.raises(ValueError, match="finite and >= 0"):
        gaussian.normal(shape=(2,), std=-1.0, dtype=torch.float32, device=CPU)
    with pytest.raises(ValueError, match="finite and >= 0"):
        gaussian.normal(shape=(2,), std=math.nan, dtype=torch.float32, device=CPU)
    with pytest.raises(TypeError, match="floating-point"):
        gaussian.normal(shape=(2,), std=1.0, dtype=torch.int64, device=CPU)

    def no_entropy(size: int) -> bytes:
        raise AssertionError("a zero std must not draw")

    monkeypatch.setattr(URANDOM, no_entropy)
    for secure in (False, True):
        zeros = gaussian.normal(shape=(4,), std=0.0, dtype=torch.float32, device=CPU, secure=secure)
        assert torch.equal(zeros, torch.zeros(4))


# --- the DP optimiser -------------------------------------------------------------------


@pytest.fixture
def no_torch_rng(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every torch sampling entry point Opacus could use for noise raises."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch's generator was used for noise")

    for name in ("normal", "randn", "randn_like"):
        monkeypatch.setattr(torch, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "normal_", forbidden)
    yield


def _optimizer(
    model: nn.Module,
    *,
    cls: type[DPOptimizer] = CsprngDPOptimizer,
    noise_multiplier: float = 2.0,
    reduction: str = "mean",
    secure: bool = False,
) -> Any:
    return cls(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=0.75,
        expected_batch_size=4,
        loss_reduction=reduction,
        secure_mode=secure,
    )


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize(("reduction", "divisor"), [("mean", 4), ("sum", 1)])
def test_optimizer_adds_noise_of_the_right_std(
    no_torch_rng: None, secure: bool, reduction: str, divisor: int
) -> None:
    model = nn.Linear(300, 100)  # 30,100 noised coordinates
    optimizer = _optimizer(model, reduction=reduction, secure=secure)
    optimizer.zero_grad(set_to_none=True)
    prepare_empty_step(model)  # an empty Poisson draw: the gradient is the noise alone
    optimizer.step()
    expected_std = 2.0 * 0.75 / divisor  # noise_multiplier * max_grad_norm / batch for "mean"
    for parameter in model.parameters():
        assert parameter.grad is not None
        assert parameter.grad.dtype == torch.float32
        assert parameter.grad.shape == parameter.shape
    weight = model.weight.grad
    assert weight is not None
    assert weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert abs(weight.mean().item()) < 5 * expected_std / math.sqrt(weight.numel())
    assert stats.kstest(weight.double().flatten().numpy() / expected_std, "norm").pvalue > 1e-4


def test_optimizer_keys_each_step_from_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(URANDOM, _counting_urandom(calls))
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    optimizer = _optimizer(model)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        prepare_empty_step(model)
        optimizer.step()
    assert calls == [32, 16] * 3  # a fresh key and nonce per step, for all four tensors


def test_optimizer_adds_the_noise_to_the_clipped_sum(no_torch_rng: None) -> None:
    model = nn.Linear(200, 50)
    rows = torch.full((3, 50, 200), 0.001)  # per-sample norm 0.1: under the clip of 0.75
    bias_rows = torch.zeros(3, 50)
    optimizer = _optimizer(model)
    optimizer.zero_grad(set_to_none=True)
    model.weight.grad_sample = rows  # type: ignore[attr-defined]
    model.bias.grad_sample = bias_rows  # type: ignore[attr-defined]
    optimizer.step()
    assert model.weight.grad is not None
    residual = model.weight.grad - rows.sum(0) / 4
    assert residual.std().item() == pytest.approx(2.0 * 0.75 / 4, rel=0.03)
    assert abs(residual.mean().item()) < 5 * (2.0 * 0.75 / 4) / math.sqrt(residual.numel())

    noiseless = _optimizer(model, noise_multiplier=0.0)
    noiseless.zero_grad(set_to_none=True)
    # Fresh tensors: Opacus marks per-sample gradients it has used and refuses them again.
    model.weight.grad_sample = rows.clone()  # type: ignore[attr-defined]
    model.bias.grad_sample = bias_rows.clone()  # type: ignore[attr-defined]
    noiseless.step()
    torch.testing.assert_close(model.weight.grad, rows.sum(0) / 4)
    assert model.bias.grad is not None
    assert torch.equal(model.bias.grad, torch.zeros(50))


def test_the_rng_guard_catches_opacus_own_noise(no_torch_rng: None) -> None:
    """Control: the patched entry points are the ones stock Opacus draws its noise from."""
    for secure in (False, True):
        model = nn.Linear(4, 2)
        optimizer = _optimizer(model, cls=DPOptimizer, secure=secure)
        optimizer.zero_grad(set_to_none=True)
        prepare_empty_step(model)
        with pytest.raises(AssertionError, match="torch's generator"):
            optimizer.step()


def test_optimizer_keeps_opacus_checks_and_refuses_a_generator() -> None:
    model = nn.Linear(4, 2)
    optimizer = _optimizer(model)
    assert optimizer.generator is None
    optimizer.zero_grad(set_to_none=True)
    prepare_empty_step(model)
    optimizer.clip_and_accumulate()
    optimizer.add_noise()
    with pytest.raises(ValueError, match="zero_grad"):
        optimizer.add_noise()  # the same summed gradient twice
    with pytest.raises(ValueError, match="no torch generator"):
        CsprngDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=1.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            generator=torch.Generator(),  # type: ignore[arg-type]
        )
