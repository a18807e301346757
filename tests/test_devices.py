"""search.devices: --device resolved to a torch device, CUDA refused in one line where none is visible."""

from __future__ import annotations

import pytest
import torch

from search.devices import resolve_device, visible_gpus
from search.errors import UserError


def test_cpu_and_auto_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    assert visible_gpus() == []


def test_cuda_is_refused_where_none_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(
            UserError, match=rf"^--device {name}: no CUDA GPU is visible here; use --device cpu$"
        ):
            resolve_device(name)


def test_a_gpu_index_past_the_visible_ones_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before a worker starts on it: torch would fail only at the first tensor moved there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert visible_gpus() == [0, 1]
    with pytest.raises(UserError, match=r"^--device cuda:2: only 2 GPU\(s\) visible$"):
        resolve_device("cuda:2")


def test_unknown_and_unsupported_devices_name_the_choices() -> None:
    with pytest.raises(UserError, match="unknown device 'gpu'; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="unsupported device 'meta'; use auto, cpu, cuda or cuda:N"):
        resolve_device("meta")
