"""The studio's Celery app with faults injected into the trainer, for real-worker chaos tests.

Start a worker with `celery -A tests.chaos_app worker ...` (start_worker(app="tests.chaos_app"))
and choose the faults with environment variables of that worker:

    CHAOS_OOM_AT_STEP=N    the step that would become step N raises CUDA's out-of-memory error,
                           once per process (the trainer's own recovery then takes over)
    CHAOS_KILL_AT_STEP=N   the training process SIGKILLs itself before step N, on every
                           attempt: a run that kills its worker whenever it runs

The faults go in through `Trainer.train_step`, the same seam tests/test_trainer.py overrides,
patched here before the prefork pool forks, so everything else is the real worker.
"""

from __future__ import annotations

import os
import signal

import torch

from studio.celery import app
from training.trainer import Trainer

__all__ = ["app"]

OOM_AT = int(os.environ.get("CHAOS_OOM_AT_STEP") or 0)
KILL_AT = int(os.environ.get("CHAOS_KILL_AT_STEP") or 0)
_real_train_step = Trainer.train_step


def _train_step(self: Trainer) -> dict:
    upcoming = self.step + 1
    if KILL_AT and upcoming == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    if OOM_AT and upcoming == OOM_AT and not self.oom_recoveries:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    return _real_train_step(self)


if OOM_AT or KILL_AT:
    Trainer.train_step = _train_step
