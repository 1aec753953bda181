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

Scale-out figures (issue 17), on a synthetic sharded cache (generated features, no audio):

    python bench/train_throughput.py synth --hours 200 --out /tmp/synth200      # ~10 GB
    python bench/train_throughput.py loader --data /tmp/synth200 --workers 1 2 --batch-size 32
    python bench/train_throughput.py ddp --data /tmp/synth1 --steps 30 --batch-size 8

`loader` reads the sharded store through persistent DataLoader workers (prefetch 4, length
buckets inside shards) and prints items/s, the `normal` model's step rate that rate can feed,
and the data-wait share of real training steps on it. `ddp` trains the same config as one
process with the global batch and as 2 gloo processes with half of it each (torchrun) and
prints both loss curves side by side (JSON lines; a PNG beside them when matplotlib is there).
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
    if len(sys.argv) > 1 and sys.argv[1] in SCALE_OUT:
        SCALE_OUT[sys.argv[1]](sys.argv[2:])
        return
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


# ----------------------------------------------------------------------------- scale out


FRAMES_PER_S = 22050 / 256


def synth(argv) -> None:
    """A synthetic sharded cache of `--hours` of speech: items, meta and shards, no audio."""
    import numpy as np

    from training.audio import DEFAULT
    from training.shards import SHARD_BYTES, _save_npy, write_manifest

    p = argparse.ArgumentParser(prog="train_throughput.py synth")
    p.add_argument("--hours", type=float, default=200)
    p.add_argument("--out", required=True)
    p.add_argument("--speakers", type=int, default=2456)  # LibriTTS's count
    p.add_argument("--shard-mb", type=int, default=SHARD_BYTES // 2**20)
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    symbols = ["<pad>", "<unk>", " "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    target = args.hours * 3600 * FRAMES_PER_S
    # Utterance lengths like LibriTTS's: 1-20 s, most around 5-8 s.
    frames_left, n = target, 0
    items = []
    while frames_left > 0:
        frames = int(
            np.clip(rng.gamma(4.0, 1.6) * FRAMES_PER_S, 0.8 * FRAMES_PER_S, 20 * FRAMES_PER_S)
        )
        items.append(
            {
                "id": f"u{n:07d}",
                "speaker": f"s{rng.integers(args.speakers):04d}",
                "text": "synthetic",
                "n_tokens": max(2, frames // 6),
                "n_frames": frames,
                "duration_s": round(frames / FRAMES_PER_S, 3),
                "feats": f"feats/u{n:07d}.pt",  # never written: the shards hold the features
                "split": "val" if n % 100 == 0 else "train",
            }
        )
        frames_left -= frames
        n += 1
    (out / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    meta = {
        "format_version": 1,
        "audio": DEFAULT.to_dict(),
        "language": "en",
        "text": {"lang": "en", "backend": "chars"},
        "symbols": symbols,
        "speakers": sorted({it["speaker"] for it in items}),
        "speaker_embeddings": {},
        "stats": {"pitch_mean": 180.0, "pitch_std": 60.0, "energy_mean": 28.0, "energy_std": 12.0},
        "val_fraction": 0.01,
        "counts": {"items": len(items)},
        "audio_seconds": round(sum(it["duration_s"] for it in items), 1),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    # One block of smooth random features, sliced per utterance: generating 10 GB of fresh
    # noise would measure the generator, not the loader.
    block_frames = 1 << 20
    base = rng.normal(-4.0, 1.5, size=(block_frames, 80)).astype(np.float16)
    pitch_block = np.where(rng.random(block_frames) < 0.7, rng.normal(180, 50, block_frames), 0)
    energy_block = rng.normal(28, 12, block_frames).astype(np.float32)
    per_frame = 80 * 2 + 8
    shard_frames = args.shard_mb * 2**20 // per_frame
    names, indexes, current, frames_in = [], [], [], 0
    started = time.perf_counter()

    def flush():
        s = len(names)
        folder = out / "shards" / f"{s:05d}"
        folder.mkdir(exist_ok=True)
        total = sum(it["n_frames"] for it in current)
        reps = -(-total // block_frames)
        _save_npy(folder / "mel.npy", np.tile(base, (reps, 1))[:total])
        _save_npy(folder / "pitch.npy", np.tile(pitch_block, reps)[:total].astype(np.float32))
        _save_npy(folder / "energy.npy", np.tile(energy_block, reps)[:total])
        ntok = sum(it["n_tokens"] for it in current)
        _save_npy(folder / "tokens.npy", rng.integers(3, len(symbols), ntok).astype(np.int32))
        _save_npy(
            folder / "spk_emb.npy", rng.normal(0, 0.06, (len(current), 256)).astype(np.float32)
        )
        index, f, t = [], 0, 0
        for it in sorted(current, key=lambda it: (it["split"], it["n_frames"])):
            index.append(
                {**it, "frame": f, "frames": it["n_frames"], "token": t, "tokens": it["n_tokens"]}
            )
            f, t = f + it["n_frames"], t + it["n_tokens"]
        names.append(f"{s:05d}")
        indexes.append(index)

    for it in items:
        current.append(it)
        frames_in += it["n_frames"]
        if frames_in >= shard_frames:
            flush()
            current, frames_in = [], 0
    if current:
        flush()
    write_manifest(out, names, indexes)
    size = sum(f.stat().st_size for f in (out / "shards").rglob("*.npy"))
    print(
        json.dumps(
            {
                "synthetic_cache": str(out),
                "hours": round(meta["audio_seconds"] / 3600, 1),
                "utterances": len(items),
                "speakers": len(meta["speakers"]),
                "shards": len(names),
                "gb_on_disk": round(size / 1e9, 2),
                "seconds_to_write": round(time.perf_counter() - started, 1),
            }
        ),
        flush=True,
    )


def loader(argv) -> None:
    from torch.utils.data import DataLoader

    from training.data import BucketBatchSampler, collate
    from training.shards import open_features

    p = argparse.ArgumentParser(prog="train_throughput.py loader")
    p.add_argument("--data", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--train-steps", type=int, default=8, help="real steps for data-wait share")
    p.add_argument("--sizes", nargs="+", default=["tiny", "normal"])
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--normal-steps-per-s",
        type=float,
        default=None,
        help="a measured GPU step rate of `normal` to compare with (e.g. from an H200)",
    )
    args = p.parse_args(argv)
    dataset = open_features(args.data, "train")
    groups = dataset.shard_groups() if hasattr(dataset, "shard_groups") else None
    sampler = BucketBatchSampler(dataset.lengths, args.batch_size, seed=0, groups=groups)
    order = sampler.batches(0)[: args.batches]
    for workers in args.workers:
        dl = DataLoader(
            dataset,
            batch_sampler=order,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        it = iter(dl)
        next(it)  # worker start-up is paid once per run, not per batch
        started, items, frames = time.perf_counter(), 0, 0
        for batch in it:
            items += batch["tokens"].shape[0]
            frames += int(batch["mel_lens"].sum())
        elapsed = time.perf_counter() - started
        rate = items / elapsed
        row = {
            "loader": "sharded mmap",
            "utterances": len(dataset),
            "workers": workers,
            "batch_size": args.batch_size,
            "items_per_s": round(rate, 1),
            "audio_hours_per_s": round(frames / FRAMES_PER_S / 3600 / elapsed, 3),
            "feeds_normal_steps_per_s_at_this_batch": round(rate / args.batch_size, 2),
        }
        if args.normal_steps_per_s:
            row["normal_needs_items_per_s"] = round(args.normal_steps_per_s * args.batch_size, 1)
        print(json.dumps(row), flush=True)
        del it, dl
    # Real training steps on the store: how much of each step waits for data.
    for size in args.sizes:
        cfg = preset(size, "basic")
        cfg.batch_size = min(args.batch_size, BATCH_RANGES[size][1])
        cfg.num_workers = max(args.workers)
        cfg.device = args.device
        cfg.steps = 10**6
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(cfg, args.data, out)
            trainer.train_step()  # warm-up: worker start, allocator
            rows = [trainer.train_step() for _ in range(args.train_steps)]
        step = sum(r["time/step"] for r in rows)
        print(
            json.dumps(
                {
                    "size": size,
                    "device": str(trainer.device),
                    "batch_size": cfg.batch_size,
                    "workers": cfg.num_workers,
                    "steps": len(rows),
                    "steps_per_s": round(len(rows) / step, 3),
                    "data_wait_share": round(sum(r["time/data"] for r in rows) / step, 4),
                }
            ),
            flush=True,
        )


def ddp(argv) -> None:
    import os
    import subprocess

    p = argparse.ArgumentParser(prog="train_throughput.py ddp")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="the global batch")
    p.add_argument("--size", default="tiny")
    p.add_argument("--out", default=None, help="folder for the runs, the JSON and the PNG")
    args = p.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="ddp-bench-"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["-m", "training", "train", "--data", args.data, "--size", args.size]
    common += ["--steps", str(args.steps), "--eval-every", str(args.steps), "--device", "cpu"]
    common += ["--checkpoint-every", str(args.steps), "--threads", "1", "--seed", "0"]
    curves, timing = {}, {}
    for name, ranks in (("1 process", 1), ("2 gloo processes", 2)):
        out = root / name.replace(" ", "-")
        batch = str(args.batch_size // ranks)
        launch = [sys.executable]
        if ranks > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        started = time.perf_counter()
        subprocess.run(
            [*launch, *common, "--out", str(out), "--batch-size", batch],
            env=env,
            check=True,
            capture_output=True,
        )
        timing[name] = time.perf_counter() - started
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curves[name] = {r["step"]: r["loss/total"] for r in lines if "loss/total" in r}
    names = list(curves)
    for step in sorted(curves[names[0]]):
        print(
            json.dumps(
                {"step": step, **{n: round(curves[n].get(step, float("nan")), 4) for n in names}}
            )
        )
    last = max(curves[names[0]])
    tail = {n: statistics.mean(v for s, v in curves[n].items() if s > last - 5) for n in names}
    print(
        json.dumps(
            {
                "compare": f"global batch {args.batch_size}: 1 process vs 2 gloo ranks x {args.batch_size // 2}",
                "mean_loss_last_5": {n: round(v, 4) for n, v in tail.items()},
                "wall_s": {n: round(t, 1) for n, t in timing.items()},
            }
        ),
        flush=True,
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        steps = sorted(curves[n])
        ax.plot(steps, [curves[n][s] for s in steps], label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (total)")
    ax.set_title(f"{args.size}, global batch {args.batch_size}: DDP (gloo) vs one process")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "ddp_loss.png", dpi=100)
    print(json.dumps({"picture": str(root / "ddp_loss.png")}), flush=True)


SCALE_OUT = {"synth": synth, "loader": loader, "ddp": ddp}


if __name__ == "__main__":
    main()
