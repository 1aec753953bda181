"""Training throughput per model size on this machine: steps/s, samples/s, data-wait share.

    python bench/train_throughput.py --data /tmp/cache-en8 [--sizes tiny small] [--steps 20]

Runs the real training step (Trainer.train_step: loader, autocast, backward, clipping, guard,
optimiser) for each size in three data set-ups, printing one JSON line per measurement and one
comparing them:

- baseline: no worker processes, every batch read from disk in the training process;
- preloaded: no worker processes, the cache read into memory first (what the trainer does for
  caches under 3 h of audio);
- workers: `--workers` loader processes (pinned memory on a GPU), batches prepared in parallel.

The data-wait share is the fraction of step time spent waiting for the next batch; on a GPU it
must stay under 5 %. The first `--warmup` steps (allocator, numba and cuDNN warm-up) are not
counted. Nothing is written except a throw-away run folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import training.trainer
from training.config import BATCH_RANGES, preset
from training.trainer import Trainer

PRELOAD_LIMIT = training.trainer.PRELOAD_MAX_AUDIO_S


def measure(
    data: Path,
    size: str,
    batch: int,
    workers: int,
    steps: int,
    warmup: int,
    device,
    preload: bool = True,
):
    training.trainer.PRELOAD_MAX_AUDIO_S = PRELOAD_LIMIT if preload else 0
    cfg = preset(size, "basic")
    cfg.batch_size = batch
    cfg.num_workers = workers
    cfg.device = device
    cfg.steps = 10**6  # the schedule's length does not matter here
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, data, out)
        for _ in range(warmup):
            trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        rows = [trainer.train_step() for _ in range(steps)]
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        samples = sum(r["samples_per_s"] * r["time/step"] for r in rows)
        return {
            "size": size,
            "device": str(trainer.device),
            "params": trainer.param_count,
            "batch_size": batch,
            "workers": workers,
            "pin_memory": trainer.device.type == "cuda",
            "steps": steps,
            "steps_per_s": round(steps / elapsed, 4),
            "samples_per_s": round(samples / elapsed, 2),
            "data_wait_share": round(sum(r["time/data"] for r in rows) / elapsed, 4),
            "median_step_s": round(statistics.median(r["time/step"] for r in rows), 4),
            "torch_threads": torch.get_num_threads(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", required=True, help="feature cache (python -m training preprocess)"
    )
    parser.add_argument(
        "--sizes", nargs="+", default=None, help="default: all on GPU, tiny small on CPU"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="default: the low end of each size's range")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    sizes = args.sizes or (["tiny", "small", "normal", "big"] if on_gpu else ["tiny", "small"])
    for size in sizes:
        batch = args.batch_size or BATCH_RANGES[size][0]
        common = (Path(args.data), size, batch)
        rows = {}
        for variant, workers, preload in (
            ("baseline", 0, False),
            ("preloaded", 0, True),
            ("workers", args.workers, False),
        ):
            rows[variant] = measure(*common, workers, args.steps, args.warmup, args.device, preload)
            print(json.dumps({**rows[variant], "variant": variant}), flush=True)
        base = rows["baseline"]
        print(
            json.dumps(
                {
                    "size": size,
                    "compare": "vs baseline (workers=0, read from disk)",
                    "speedup": {
                        v: round(r["steps_per_s"] / base["steps_per_s"], 3) for v, r in rows.items()
                    },
                    "data_wait_share": {v: r["data_wait_share"] for v, r in rows.items()},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
