"""Which devices a run may use: ``auto`` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from search.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a user's --device into a torch.device, refusing CUDA where none is visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise UserError(f"--device: unsupported device '{name}'; use auto, cpu, cuda or cuda:N")
    return device


def visible_gpus() -> list[int]:
    """Indices of the CUDA devices this process can see."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
