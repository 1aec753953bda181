"""One run on several processes (GPUs or machines), launched by torchrun.

    torchrun --nproc_per_node 2 -m training train --data CACHE --out RUN --device cpu

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in every process; the
trainer calls `setup()` and, when WORLD_SIZE is above 1, joins the process group: gloo on CPU,
NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK). Without those variables every helper here
answers as the only process of a one-process run, so single-process code pays nothing.

Every decision that changes the weights or the schedule (the step guard's skip and rollback,
the adaptive loss weights, the plateau breaker, stop requests) is taken from figures that were
all-reduced or broadcast first, so each rank reaches the same verdict and the replicas never
drift apart. Rank 0 alone writes files and talks to the outside world.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from training.device import select_device

# Long enough for rank 0 to write a checkpoint or render eval audio while the others wait in a
# barrier; short enough that a lost peer fails the run instead of hanging it for good.
TIMEOUT = datetime.timedelta(minutes=10)

_device: torch.device | None = None


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device_name: str | None = "auto") -> torch.device:
    """The device of this process; joins the process group first when torchrun started us.

    Idempotent: the CLI, the studio's rank entry point and the trainer may all call it.
    """
    global _device
    if env_world_size() <= 1:
        return select_device(device_name)
    if is_distributed():
        return _device or select_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = select_device(device_name)
    if wanted.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"rank {local_rank} has no GPU of its own: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = wanted, "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=TIMEOUT, **kwargs)
    _device = device
    return device


def cleanup() -> None:
    global _device
    if is_distributed():
        dist.destroy_process_group()
    _device = None


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return _device or torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """The mean over ranks of each figure, identical on every rank (a NaN anywhere stays NaN,
    so every rank sees a non-finite loss and skips together)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).tolist()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank (a stop request, the checkpoint chosen to resume)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[_collective_device().index or 0])
        else:
            dist.barrier()
