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

Two more cases (`--case`):

    .venv/bin/python bench/stability.py --case early-rollback   # 10 seeds, 300 steps
    .venv/bin/python bench/stability.py --case chaos            # real worker, about 5 minutes

- early-rollback: the spike comes before the first checkpoint (`tiny`, `enhanced`, 1000x the
  learning rate at step 150, a checkpoint every 1000 steps), so the guard can only go back to
  the starting weights. Per seed: finished, rollbacks, the learning-rate scale at the end, the
  loss before the fault and at the end; loss_fell as above.
- chaos: the studio's own training task on a real Celery worker (tests/chaos_app.py, `-c 1`,
  one torch thread), a private Redis on a free port (append-only, fsync always) and SQLite in a
  temporary folder. The same `tiny` run is trained (1) uninterrupted, (2) with its training
  process SIGKILLed 5 times, (3) with Redis SIGKILLed and started again mid-run, and (4) with an
  out-of-memory error injected into one step. Per run: status, attempts, missing and duplicate
  metric rows, the final loss (mean of the last 10 steps) and its difference from the
  uninterrupted run, the largest per-step loss difference, and the case's own facts (kill
  steps; how long Redis was away and when live metrics came back; the micro-batch after the
  out-of-memory error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
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


# --------------------------------------------------------------------------- early rollback

EARLY_SPIKE_STEP = 150


class EarlySpike(Trainer):
    """One optimiser step at 1000x the learning rate, before any checkpoint exists."""

    def lr_at(self, step):
        lr = super().lr_at(step)
        return lr * LR_SPIKE if step + 1 == EARLY_SPIKE_STEP else lr


def early_rollback(args, data: Path, out: Path) -> None:
    steps = args.steps or 2 * EARLY_SPIKE_STEP
    records = []
    for seed in range(args.runs):
        cfg = preset("tiny", "enhanced")
        cfg.seed = seed
        cfg.steps, cfg.batch_size, cfg.lr_warmup_steps = steps, args.batch_size, 20
        cfg.eval_every, cfg.checkpoint_every = steps, 1000
        recorder = Recorder()
        started = time.perf_counter()
        trainer = EarlySpike(cfg, data, out / f"early-{seed}", recorder)
        result = trainer.run()
        losses = recorder.losses
        finite = [x for x in losses if math.isfinite(x)]
        before = [x for x in losses[EARLY_SPIKE_STEP - 11 : EARLY_SPIKE_STEP - 1]]
        tail = losses[-10:]
        ok = all(math.isfinite(x) for x in tail)
        record = {
            "case": "early-rollback",
            "seed": seed,
            "steps": steps,
            "spike_step": EARLY_SPIKE_STEP,
            "finished": result.status == "finished" and result.step == steps and ok,
            "rollbacks": recorder.rollbacks,
            "lr_scale_at_end": trainer.schedule.scale,
            "skipped": int(trainer.guard.skipped),
            "first_loss": float(np.mean(finite[:10])),
            "loss_before_fault": float(np.mean(before)),
            "last_loss": float(np.mean(tail)) if ok else None,
            "loss_fell": bool(ok and np.mean(tail) < LOSS_FELL * np.mean(finite[:10])),
            "seconds": round(time.perf_counter() - started, 1),
        }
        records.append(record)
        emit(record)
    emit(
        {
            "summary": "early-rollback",
            "runs": len(records),
            "finished": sum(r["finished"] for r in records),
            "loss_fell": sum(r["loss_fell"] for r in records),
            "rollbacks": [r["rollbacks"] for r in records],
            "mean_loss_before_fault": float(np.mean([r["loss_before_fault"] for r in records])),
            "mean_last_loss": float(
                np.mean([r["last_loss"] for r in records if r["last_loss"] is not None])
            ),
        }
    )


# --------------------------------------------------------------------------- chaos


class Redis:
    """A private redis-server on a free port: append-only, fsynced on every write, so a SIGKILL
    and a start on the same folder lose nothing."""

    def __init__(self, folder: Path):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.folder, self.url, self.proc = folder, f"redis://127.0.0.1:{self.port}/0", None

    def start(self) -> None:
        from studio.runtime import redis_server_binary, wait_for_redis

        self.folder.mkdir(parents=True, exist_ok=True)
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.folder), "--save", "", "--appendonly", "yes"]
        command += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for_redis(self.url):
            raise SystemExit("the private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Worker:
    """`celery worker` on the gpu queue with tests/chaos_app.py, like docker-compose's gpu one."""

    def __init__(self, log: Path, **env: str):
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 (open for the worker's whole life)
        environ = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env)
        command = [sys.executable, "-m", "celery", "-A", "tests.chaos_app", "worker"]
        command += ["-Q", "gpu", "-c", "1", "-P", "prefork", "-n", f"chaos-{log.stem}@%h"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environ,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        until(lambda: " ready." in self.log_path.read_text(errors="replace"), 120, "worker")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()


def until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def first_live_steps(url: str, group: str, timeout: float) -> list[int]:
    """Steps in the first live message with points that a new listener on `url` receives."""
    import asyncio

    from channels_redis.core import RedisChannelLayer

    async def listen():
        layer = RedisChannelLayer(hosts=[url])
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await layer.receive(channel)
                    steps = [p["step"] for p in message.get("data", {}).get("points", [])]
                    if steps:
                        return steps
        finally:
            await layer.flush()

    return asyncio.run(listen())


def chaos(args) -> None:
    steps = args.steps or 200
    root = Path(tempfile.mkdtemp(prefix="stability-chaos-"))
    redis = Redis(root / "redis")
    redis.start()
    os.environ.update(
        STUDIO_DATA_DIR=str(root / "data"),
        REDIS_URL=redis.url,
        DJANGO_SETTINGS_MODULE="studio.settings",
    )
    os.environ.pop("DATABASE_URL", None)  # SQLite in the temporary folder, never a real one
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db.models import Count

    from studio import live
    from studio.models import Dataset, MetricPoint, Run, RunEvent, TrainingConfig
    from training.config import TrainConfig

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create_user("chaos", password="chaos-pass-123")
    dataset = Dataset.objects.create(
        owner=owner,
        name="synthetic",
        status=Dataset.Status.READY,
        cache_dir=str(synthetic_cache(root / "corpus")),
    )
    config = TrainingConfig.objects.create(
        owner=owner,
        name="chaos",
        model_size="tiny",
        optimization_level="enhanced",
        batch_size=args.batch_size,
        steps=steps,
        learning_rate=2e-3,
        lr_warmup_steps=20,
        eval_every=steps,
        checkpoint_every=25,
    )
    emit({"bench": "stability", "case": "chaos", "steps": steps, "redis": redis.url})

    def new_run(name: str) -> Run:
        flat = TrainConfig.from_flat(dict(config.values(), device="cpu")).flat()
        run = Run.objects.create(
            owner=owner,
            dataset=dataset,
            config=config,
            name=name,
            config_snapshot=flat,
            total_steps=steps,
        )
        run.assign_out_dir()
        run.enqueue()
        return run

    def row(run: Run) -> Run:
        return Run.objects.get(pk=run.pk)

    def losses(run: Run) -> dict[int, float]:
        points = MetricPoint.objects.filter(run=run, name="loss/total")
        return dict(points.values_list("step", "value"))

    def finish(run: Run, started: float, reference: dict[int, float] | None, **facts) -> dict:
        until(lambda: row(run).status not in Run.ACTIVE, 900, f"run {run.name}", 0.5)
        run = row(run)
        by_step = losses(run)
        dupes = (
            MetricPoint.objects.filter(run=run)
            .values("step", "name")
            .annotate(n=Count("id"))
            .filter(n__gt=1)
            .count()
        )
        last = [by_step[s] for s in range(steps - 9, steps + 1) if s in by_step]
        record = {
            "case": "chaos",
            "run": run.name,
            "status": run.status,
            "error": run.error or None,
            "attempts": run.attempts,
            "missing_steps": sorted(set(range(1, steps + 1)) - set(by_step))[:20],
            "duplicate_rows": dupes,
            "final_loss": float(np.mean(last)) if last else None,
            "seconds": round(time.perf_counter() - started, 1),
            **facts,
        }
        if reference:
            common = sorted(set(by_step) & set(reference))
            ref_last = float(np.mean([reference[s] for s in range(steps - 9, steps + 1)]))
            record["final_loss_uninterrupted"] = ref_last
            if last:
                record["final_loss_diff"] = float(np.mean(last)) - ref_last
            record["max_step_loss_diff"] = max(abs(by_step[s] - reference[s]) for s in common)
        emit(record)
        return run

    worker = Worker(root / "worker.log")
    try:
        started = time.perf_counter()
        plain = finish(new_run("uninterrupted"), started, None)
        reference = losses(plain)

        # Five SIGKILLs of the training process, each a while after the newest checkpoint.
        started = time.perf_counter()
        run = new_run("sigkill-x5")
        kills = []
        for n in range(5):
            at = 35 + 30 * n
            held = until(
                lambda at=at: (r := row(run)).current_step >= at and r.status == "running" and r,
                300,
                f"step {at}",
                0.05,
            )
            os.kill(int(held.worker.rpartition(":")[2]), signal.SIGKILL)
            kills.append(held.current_step)
            until(lambda a=held.attempts: row(run).attempts > a, 120, "the redelivery", 0.2)
        finish(run, started, reference, kills_at=kills)

        # Redis killed and started again on the same folder mid-run.
        started = time.perf_counter()
        run = new_run("redis-restart")
        group = live.run_group(run.pk)
        first_live_steps(redis.url, group, 120)
        until(lambda: row(run).current_step >= 30, 300, "step 30")
        redis.kill()
        down = time.perf_counter()
        down_at = row(run).current_step
        until(lambda: row(run).current_step >= down_at + 20, 120, "steps without Redis")
        stepped = row(run).current_step - down_at
        redis.start()
        back = time.perf_counter()
        live_again = first_live_steps(redis.url, group, 60)
        finish(
            run,
            started,
            reference,
            redis_down_s=round(back - down, 1),
            steps_while_down=stepped,
            live_back_after_s=round(time.perf_counter() - back, 2),
            live_back_at_step=min(live_again),
        )
        worker.stop()

        # An out-of-memory error in step 40 (after the checkpoint at step 25).
        worker = Worker(root / "worker-oom.log", CHAOS_OOM_AT_STEP="40")
        started = time.perf_counter()
        run = finish(new_run("oom"), started, reference)
        oom = RunEvent.objects.filter(run=run, kind="oom").values_list("message", flat=True)
        snapshot = run.config_snapshot
        emit(
            {
                "case": "chaos",
                "run": "oom",
                "oom_events": list(oom),
                "micro_batch_after": [snapshot["batch_size"], snapshot["grad_accum_steps"]],
                "micro_batch_before": [args.batch_size, 1],
            }
        )
    finally:
        worker.stop()
        redis.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("faults", "early-rollback", "chaos"), default="faults")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--steps", type=int, help="default: 150 (faults), 300 (early-rollback), 200 (chaos)"
    )
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
    if args.case == "chaos":
        chaos(args)
        return

    with tempfile.TemporaryDirectory(prefix="stability-") as tmp:
        tmp = Path(tmp)
        data = args.data or synthetic_cache(tmp / "corpus")
        if args.case == "early-rollback":
            emit(
                {
                    "bench": "stability",
                    "case": "early-rollback",
                    "data": str(args.data or "synthetic"),
                }
            )
            early_rollback(args, data, tmp / "runs")
            return
        args.steps = args.steps or 150
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
