"""resolve_device: auto/cpu/cuda, CPU threads, one log line per choice."""

from __future__ import annotations

import logging

import pytest
import torch

from medfed.errors import DeviceError
from medfed.models import device as device_module
from medfed.models import resolve_device


@pytest.fixture
def restore_threads() -> object:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_logged", set())


@pytest.mark.usefixtures("restore_threads", "no_cuda")
def test_cpu_sets_the_requested_threads() -> None:
    assert resolve_device(name="cpu", threads=1) == torch.device("cpu")
    assert torch.get_num_threads() == 1


@pytest.mark.usefixtures("restore_threads", "no_cuda")
def test_default_threads_are_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device_module, "available_cpus", lambda: 1)
    resolve_device(name="cpu", threads=None)
    assert torch.get_num_threads() == 1
    assert 1 <= device_module.available_cpus() <= (torch.get_num_threads() or 1) + 4096


@pytest.mark.usefixtures("restore_threads", "no_cuda")
def test_auto_without_cuda_is_cpu_and_says_why_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="medfed.models"):
        assert resolve_device(name="auto", threads=1).type == "cpu"
        assert resolve_device(name="auto", threads=1).type == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "medfed.models"]
    assert lines == ["device: cpu (auto: no CUDA GPU available), 1 threads"]


@pytest.mark.usefixtures("no_cuda")
def test_cuda_without_a_gpu_is_a_device_error_with_a_hint() -> None:
    with pytest.raises(DeviceError, match="no usable CUDA GPU") as info:
        resolve_device(name="cuda", threads=None)
    assert info.value.hint is not None and "device: auto or cpu" in info.value.hint
    assert info.value.code == "device"


def test_unknown_device_and_bad_threads_are_device_errors() -> None:
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device(name="tpu", threads=None)  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="at least 1"):
        resolve_device(name="cpu", threads=0)


def test_cgroup_quota_caps_available_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "_cgroup_cpu_limit", lambda: 1)
    assert device_module.available_cpus() == 1
    monkeypatch.setattr(device_module, "_cgroup_cpu_limit", lambda: None)
    assert device_module.available_cpus() >= 1
