"""Which torch device a job runs on: one rule for training and synthesis alike."""

from __future__ import annotations

import torch


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """cuda when there is one and nothing else was asked for; a named device must exist."""
    if name is None or str(name) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but this machine has no usable CUDA GPU")
    return device
