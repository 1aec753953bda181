"""Does training survive faults? Seeded short runs with NaN batches and a learning-rate spike.

    .venv/bin/python bench/stability.py                      # 10 seeds, synthetic corpus
    .venv/bin/python bench/stability.py --runs 3 --steps 120 --data /tmp/cache-en8

Every seed draws its own faults: three bursts of 1-3 NaN batches (a corrupt feature file) and
one optimiser step at 1000x the learning rate. Each seed is trained once per variant, on the
same data with the same faults:

- guarded: the trainer as it ships (step guard, rollback, stable adaptive mel weight);
- baseline: the same trainer with a guard that never skips and fixed loss weights, as the old
  system trained;
- nan_skip: skips non-finite steps only, no spike test and no rollback, to show what the
  spike test and the rollback add against the learning-rate spike.

One JSON line per run, then one summary line per variant with the finished / NaN /
rolled-back counts. A run is *finished* when it reached its last step with finite weights and
a finite validation loss; *nan* when its weights or last losses are not finite; *rolled_back*
when the guard restored a checkpoint at least once; *loss_fell* when its last 10 losses average
under 0.6x its first 10 (finite is not enough: a run can end finite with wrecked weights).

The faults go in through the trainer's `next_batch` and `lr_at`, so everything else is the
real loop. Without `--data` a corpus of harmonic "words" is synthesised and preprocessed into
a temporary folder first. On a shared CPU keep `--threads 1`: more threads than free cores
make every step many times slower.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from training.config import preset  # noqa: E402
from training.corpus import CorpusItem  # noqa: E402
from training.guard import StepGuard, Verdict  # noqa: E402
from training.preprocess import preprocess_corpus  # noqa: E402
from training.trainer import Callbacks, Trainer  # noqa: E402

SR = 22050
WORDS = {"sun": 180, "moon": 140, "red": 220, "blue": 160, "sea": 200, "tree": 120, "sky": 240}
LR_SPIKE = 1000.0
VARIANTS = ("guarded", "baseline", "nan_skip")
# "Learned": the mean loss of the last 10 steps is under this fraction of the first 10's.
LOSS_FELL = 0.6


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def synthetic_cache(root: Path, n: int = 48) -> Path:
    """Harmonic tones, one pitch per word, two voices: learnable in a few hundred steps."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        speaker = f"spk{i % 2}"
        words = list(rng.choice(list(WORDS), size=int(rng.integers(3, 6))))
        parts = [np.zeros(int(0.1 * SR))]
        for word in words:
            t = np.arange(int(0.22 * SR)) / SR
            f0 = WORDS[word] * (1.0 if speaker == "spk0" else 1.3)
            tone = sum((0.5 / k) * np.sin(2 * np.pi * f0 * k * t) for k in range(1, 6))
            envelope = np.sin(np.pi * t / t[-1]) ** 0.5
            parts += [0.3 * envelope * tone + 0.005 * rng.standard_normal(t.size)]
            parts += [np.zeros(int(0.04 * SR))]
        parts.append(np.zeros(int(0.1 * SR)))
        path = root / "wavs" / f"u{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.concatenate(parts).astype(np.float32), SR)
        items.append(CorpusItem(f"u{i:03d}", path, " ".join(words), speaker))
    preprocess_corpus(items, root / "cache", text_backend="chars")
    return root / "cache"


def draw_faults(seed: int, steps: int) -> dict:
    rng = random.Random(seed)
    nan_steps: set[int] = set()
    for _ in range(3):
        start = rng.randint(15, steps - 15)
        nan_steps.update(range(start, start + rng.randint(1, 3)))
    spike = rng.randint(int(steps * 0.4), int(steps * 0.7))
    nan_steps.discard(spike)
    return {"nan_steps": sorted(nan_steps), "lr_spike_step": spike}


class FaultyTrainer(Trainer):
    """The real trainer with faults injected at the seams where real ones come from."""

    faults: dict = {}

    def next_batch(self):
        batch = super().next_batch()
        if self.step + 1 in self.faults["nan_steps"]:
            batch["mels"] = batch["mels"] * float("nan")
        return batch

    def lr_at(self, step):
        lr = super().lr_at(step)
        return lr * LR_SPIKE if step + 1 == self.faults["lr_spike_step"] else lr


class NeverSkip(StepGuard):
    """The baseline: count what the guard would have seen, skip nothing, never roll back."""

    def check(self, loss, grad_norm=None) -> Verdict:
        super().check(loss, grad_norm)
        self.consecutive_skips = 0
        return Verdict(skip=False)


class Recorder(Callbacks):
    def __init__(self):
        self.losses: list[float] = []
        self.rollbacks = 0
        self.val_mel: float | None = None

    def on_step(self, metrics):
        self.losses.append(metrics["loss/total"])
        self.rollbacks += sum(e["kind"] == "rollback" for e in metrics["events"])

    def on_eval(self, metrics, samples):
        self.val_mel = metrics["val/mel"]


def run_one(variant: str, seed: int, faults: dict, args, data: Path, out: Path) -> dict:
    cfg = preset("tiny", "enhanced")
    cfg.seed = seed
    cfg.steps, cfg.batch_size, cfg.lr_warmup_steps = args.steps, args.batch_size, 20
    cfg.eval_every, cfg.checkpoint_every = args.steps, max(10, args.steps // 5)
    if variant == "baseline":
        cfg.loss.use_adaptive_weights = False
    FaultyTrainer.faults = faults
    recorder = Recorder()
    started = time.perf_counter()
    error = None
    trainer = FaultyTrainer(cfg, data, out / f"{variant}-{seed}", recorder)
    if variant == "baseline":
        trainer.guard = NeverSkip(
            cfg.loss.max_loss_spike_threshold,
            cfg.max_consecutive_skips,
            cfg.loss.loss_smoothing_factor,
        )
    elif variant == "nan_skip":
        trainer.guard = StepGuard(spike_threshold=1e30, max_consecutive_skips=10**9)
    try:
        result = trainer.run()
        reached = result.status == "finished" and result.step == args.steps
    except Exception as exc:  # a diverged baseline may crash at evaluation (NaN durations)
        reached, error = False, f"{type(exc).__name__}: {exc}"[:200]
    weights_finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    tail = recorder.losses[-10:]
    nan = not weights_finite or not tail or not all(math.isfinite(x) for x in tail)
    val_ok = recorder.val_mel is not None and math.isfinite(recorder.val_mel)
    finite_losses = [x for x in recorder.losses if math.isfinite(x)]
    record = {
        "variant": variant,
        "seed": seed,
        "steps": args.steps,
        **faults,
        "finished": bool(reached and weights_finite and val_ok),
        "nan": nan,
        "rolled_back": recorder.rollbacks > 0,
        "rollbacks": recorder.rollbacks,
        "skipped": int(trainer.guard.skipped) if variant != "baseline" else 0,
        "first_loss": float(np.mean(finite_losses[:10])) if finite_losses else None,
        "last_loss": float(np.mean(tail)) if tail and not nan else None,
        "loss_fell": bool(
            not nan and finite_losses and np.mean(tail) < LOSS_FELL * np.mean(finite_losses[:10])
        ),
        "val_mel": recorder.val_mel if val_ok else None,
        "mel_weight": trainer.loss_fn.weights["mel"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if error:
        record["error"] = error
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", type=Path, help="an existing feature cache (default: synthetic)")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to compare"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="stability-") as tmp:
        tmp = Path(tmp)
        data = args.data or synthetic_cache(tmp / "corpus")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        emit({"bench": "stability", "device": device, "data": str(args.data or "synthetic")})
        records = []
        for seed in range(args.runs):
            faults = draw_faults(seed, args.steps)
            for variant in args.variants:
                record = run_one(variant, seed, faults, args, data, tmp / "runs")
                records.append(record)
                emit(record)
        for variant in args.variants:
            mine = [r for r in records if r["variant"] == variant]
            emit(
                {
                    "summary": variant,
                    "runs": len(mine),
                    "finished": sum(r["finished"] for r in mine),
                    "nan": sum(r["nan"] for r in mine),
                    "rolled_back": sum(r["rolled_back"] for r in mine),
                    "loss_fell": sum(r["loss_fell"] for r in mine),
                    "mean_last_loss": (
                        float(np.mean([r["last_loss"] for r in mine if r["last_loss"] is not None]))
                        if any(r["last_loss"] is not None for r in mine)
                        else None
                    ),
                }
            )


if __name__ == "__main__":
    main()
