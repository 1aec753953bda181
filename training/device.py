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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype of a device: bf16 where the GPU has it, else fp16 (which needs
    a GradScaler: its narrow exponent underflows small gradients); None (fp32) on CPU, where
    autocast is slower than plain fp32 for models of this size."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
