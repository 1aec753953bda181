"""Checkpoints on disk: written atomically, read without unpickling code.

A checkpoint is a plain dict of tensors, lists, dicts, numbers and strings (the key list is in
``CHECKPOINT_KEYS``), so ``torch.load(weights_only=True)`` reads it and a checkpoint from an
untrusted upload cannot run code. Writing goes to a temporary file in the same directory and
is renamed over the target, so a crash mid-write never leaves a truncated checkpoint where a
good one was.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
# A run folder keeps its checkpoints as checkpoints/step_0001234.pt (and best.pt beside them).
STEP_FILE = re.compile(r"step_(\d+)\.pt$")

CHECKPOINT_KEYS = (
    "format_version",
    "model",
    "model_config",
    "size",
    "optimizer",
    "scheduler",
    "step",
    "loss_state",
    "guard_state",
    "rng",
    "config",
    "symbols",
    "audio",
    "text",
    "stats",
    "val_loss",
    "speakers",
    "ema",  # the weight average synthesis uses (training.model.WeightAverage), when kept
)


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this project; the message says why."""


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temp file in the same directory + os.replace)."""
    path = Path(path)
    ckpt = {"format_version": FORMAT_VERSION, **ckpt}
    _check_plain(ckpt, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device)


def _check_plain(value, where: str) -> None:
    """Refuse, before writing, anything that weights_only loading would later refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise CheckpointError(f"{where} has a {type(key).__name__} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise CheckpointError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a checkpoint "
            "holds only tensors, lists, dicts, numbers and strings so it loads with weights_only"
        )


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; anything else raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        blocked = _blocked_global(exc)
        if blocked:
            # weights_only refuses any global outside torch's allow-list: a pickled class or
            # function, i.e. a file that would run code if loaded the old way.
            raise CheckpointError(
                f"{path}: refused, the file carries a pickled Python object that is not plain "
                f"tensors and data, so it is not a checkpoint of this studio ({blocked})"
            ) from exc
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, or not a torch file)"
        ) from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format_version" not in ckpt:
        raise CheckpointError(
            f"{path}: a torch file but not a checkpoint of this studio "
            "(expected a dict with 'format_version' and 'model')"
        )
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {ckpt['format_version']} is newer than this code "
            f"reads ({FORMAT_VERSION}); update the studio"
        )
    return ckpt


def _blocked_global(exc: BaseException) -> str | None:
    """The line of torch's weights_only refusal that names a blocked global, if it has one."""
    if not isinstance(exc, pickle.UnpicklingError):
        return None
    for line in str(exc).splitlines():
        if "GLOBAL" in line:
            return line.strip()
    return None


def step_checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a run folder keeps its checkpoint of `step`."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"


def step_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The step checkpoints of a run folder, oldest first (by step, not by name or time)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := STEP_FILE.search(p.name))
    ]
    return [p for _, p in sorted(found)]
