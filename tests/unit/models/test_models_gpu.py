"""On a CUDA GPU: the default 3D network takes a DP-SGD step, with the CPU's per-sample grads."""

from __future__ import annotations

import pytest
import torch
from models_support import default_spec, dice_ce, opacus_grad_samples, tiny_batch

from medfed.models import build_model, place_model, resolve_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_default_3d_network_dp_step_on_cuda_matches_cpu(mode: str) -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    device = resolve_device(name="cuda", threads=None)
    spec = default_spec(3)
    torch.manual_seed(0)
    cpu_model = build_model(spec=spec).to(torch.float64)
    gpu_model = place_model(model=build_model(spec=spec), spec=spec, device=device)
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model = gpu_model.to(torch.float64)
    images, labels = tiny_batch(3)

    expected = opacus_grad_samples(cpu_model, images, labels, dice_ce(), mode=mode)
    actual = opacus_grad_samples(
        gpu_model, images.to(device), labels.to(device), dice_ce(), mode=mode
    )
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].cpu(), value, rtol=1e-6, atol=1e-9, msg=name)

    wrapped = GradSampleModule(
        gpu_model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
    )
    optimizer = DPOptimizer(
        torch.optim.Adam(wrapped.parameters(), lr=1e-3),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=3,
    )
    before = {k: v.detach().clone() for k, v in gpu_model.state_dict().items()}
    torch.autograd.backward(dice_ce()(wrapped(images.to(device)), labels.to(device)))
    optimizer.step()
    after = gpu_model.state_dict()
    assert all(after[k].device.type == "cuda" for k in after)
    assert all(torch.isfinite(after[k]).all() for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after)
