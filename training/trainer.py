"""The training loop: one readable loop in the nanoGPT manner, with every guard in plain sight.

    Trainer(cfg, data_dir, out_dir, callbacks).run()

One optimiser step: set the learning rate (warm-up, cosine decay, lowered after a rollback,
restarted on a plateau); for each of `grad_accum_steps` micro-batches run the model under
bf16 autocast (GPU only), compute the weighted loss and backpropagate; clip the gradient norm
and keep the norm from before clipping; ask the StepGuard whether to apply the step (never
clamping the loss: a non-finite loss or gradient, or a spike, skips the step instead; too many
skips in a row roll the weights back to the last good checkpoint and lower the learning rate);
feed loss and clipped norm to the loss's adaptive weight controller; report metrics.

The outside world sees the run only through `Callbacks` (and `metrics.jsonl` plus the
checkpoints in `out_dir`). Exact resume: a checkpoint carries model, optimiser, schedule, step,
loss-controller, guard and RNG states and the position in the data (epoch, batch), and the
data order depends only on (seed, epoch), so a resumed run computes the same losses as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from training import distributed, voice_stats
from training.audio import LOG_FLOOR, AudioConfig, griffin_lim
from training.augment import base_speaker
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    step_checkpoint_path,
    step_checkpoints,
)
from training.config import PlateauDetector, TrainConfig
from training.data import BucketBatchSampler, collate, read_meta
from training.device import autocast_dtype
from training.guard import StepGuard, Verdict
from training.losses import COMPONENTS, TTSLoss
from training.model import (
    MODEL_SIZES,
    ModelConfig,
    TTSModel,
    WeightAverage,
    count_parameters,
    load_model_weights,
)
from training.shards import ShardedFeatureDataset, open_features

SAMPLE_COUNT = 2  # fixed validation utterances turned into audio at every eval
MIN_SAMPLE_FRAMES = 8
VOICE_TABLE_CLIPS = 50  # clips per speaker read for its voice statistics
PRELOAD_MAX_AUDIO_S = 3 * 3600  # about 540 MB of cached features


@dataclass
class Sample:
    id: str
    speaker: str
    text: str
    audio: np.ndarray  # float32 [samples]
    sample_rate: int
    mel: np.ndarray  # [80, frames] natural-log mel


class TrainingDiverged(RuntimeError):
    """Rollbacks did not cure the run; the message says what was tried."""


class Callbacks:
    """The studio's window into a run; every method is a no-op here."""

    def on_step(self, metrics: dict) -> None:
        pass

    def on_eval(self, metrics: dict, samples: list[Sample]) -> None:
        pass

    def on_checkpoint(self, path: str, info: dict) -> None:
        pass

    def on_rewind(self, step: int, changes: dict) -> None:
        """The trainer went back to `step` and will report every later step again; `changes`
        are the config values it changed to get there (after running out of memory)."""

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped"
    step: int
    best_val_loss: float | None
    last_checkpoint: str | None
    param_count: int = 0
    warnings: list[str] = field(default_factory=list)


class LRSchedule:
    """Linear warm-up to the peak, then cosine decay to `floor` x peak at the last step.

    `scale` is lowered by rollbacks; `restart(step)` (plateau breaker) begins a new warm-up and
    decay over the steps that are left.
    """

    def __init__(self, peak: float, warmup: int, total: int, floor: float = 0.1):
        self.peak, self.warmup, self.total, self.floor = peak, warmup, total, floor
        self.scale = 1.0
        self.start = 0
        self.restarts = 0

    def lr(self, step: int) -> float:
        s = step - self.start
        span = max(1, self.total - self.start)
        warmup = min(self.warmup, span // 2)
        if s < warmup:
            factor = (s + 1) / (warmup + 1)
        else:
            progress = min(1.0, (s - warmup) / max(1, span - warmup))
            factor = self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.peak * self.scale * factor

    def restart(self, step: int) -> None:
        self.start = step
        self.restarts += 1

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key in ("scale", "start", "restarts"):
            setattr(self, key, state[key])


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Every RNG the run touches, as tensors and lists so the checkpoint loads weights_only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


class _Plan:
    """A batch sampler whose batch list the trainer swaps each epoch, so one DataLoader (and
    its persistent workers) serves the whole run."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        data_dir,
        out_dir,
        callbacks: Callbacks | None = None,
        resume: bool = False,
        init_from=None,
        vocoder=None,
    ):
        cfg.check()  # the worker refuses an unsafe config even if it was written around the forms
        if cfg.size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {cfg.size!r}; one of {', '.join(MODEL_SIZES)}")
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        # Under torchrun this joins the process group and picks this rank's GPU; rank 0 alone
        # reports to the outside world (metrics, events, checkpoints, eval samples).
        self.device = distributed.setup(cfg.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.callbacks = (callbacks or Callbacks()) if self.is_main else Callbacks()
        # mel [n_mels, frames] -> waveform for eval samples (the studio passes its default
        # vocoder, synthesis.vocoders); None: Griffin-Lim.
        self.vocoder = vocoder
        self.meta = read_meta(self.data_dir)
        self.symbols = list(self.meta["symbols"])
        self.warnings: list[str] = []

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # A misspelt held-out name would silently train on the voice it should hold out.
        known = set(self.meta.get("speakers") or self.meta.get("speaker_embeddings", {}))
        unknown = sorted(set(cfg.held_out_speakers or ()) - known)
        if unknown:
            raise ValueError(
                f"held-out speaker(s) {', '.join(unknown)} are not in {self.data_dir}; "
                f"its speakers are {', '.join(sorted(known)) or 'none'}"
            )
        # Data: the order of every epoch is a function of (seed, epoch) alone.
        self.train_set, train_lengths = self._dataset("train")
        if len(self.train_set) == 0:
            raise ValueError(f"{self.data_dir} has no usable training utterances")
        self.val_set, val_lengths = self._dataset("val")
        if len(self.val_set) == 0:
            # A corpus too small for a validation split still gets evals and samples, from
            # training utterances; the warning says their loss is not a held-out one.
            self.warnings.append("the cache has no validation split; evaluating on training data")
            self.val_set, val_lengths = self.train_set, train_lengths
        self.lengths = {"train": train_lengths, "val": val_lengths}
        self._batching()
        if not self.sampler.batches(0):
            raise ValueError(
                f"{len(self.train_set)} training utterances make fewer batches of "
                f"{cfg.batch_size} than there are ranks ({self.world_size}): use fewer ranks "
                "or a smaller batch size"
            )
        self.epoch, self.batch_in_epoch = 0, 0
        self._batches = None
        self._persistent: DataLoader | None = None
        self._plan: _Plan | None = None

        # Model, loss, guard, optimiser, schedule.
        self.model_config: ModelConfig = MODEL_SIZES[cfg.size]
        self.model = TTSModel(self.model_config, len(self.symbols)).to(self.device)
        self.model.set_feature_stats(self.meta["stats"])
        # Each training voice's statistics (training.voice_stats), for synthesis by name; their
        # mean is the model's default voice. Before the weight average copies the buffers.
        self.voices = self._voice_table() if self.model_config.voice_stats else {}
        self._set_default_voice()
        self.param_count = count_parameters(self.model)
        # bf16 needs no loss scaling; fp16 (GPUs without bf16) does, or small gradients vanish.
        self.amp_dtype = autocast_dtype(self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.loss_fn = TTSLoss.from_config(cfg.loss)
        self.guard = self._new_guard()
        self.optimizer = self._optimizer()
        # The average synthesis uses (see WeightAverage); None when cfg.ema_decay is 0.
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.schedule = LRSchedule(cfg.learning_rate, cfg.lr_warmup_steps, cfg.steps)
        self.plateau = (
            PlateauDetector.from_config(cfg)
            if cfg.optimization_level == "plateau_breaker"
            else None
        )
        self.step = 0
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_checkpoint: str | None = None
        self.pending_events: list[dict] = []
        self.tried_rollbacks: set[str] = set()
        # The checkpoint the last rollback restored: it cured the run once, so pruning keeps it.
        self.known_good: str | None = None
        self.oom_recoveries = 0
        self.last_saved_step = -1
        self.last_eval_step = -1

        if self.world_size > 1:
            # Same initial weights on every rank (seeded above), different dropout masks after.
            torch.manual_seed(cfg.seed + self.rank)
        resumed = self._resume() if resume else False
        if not resumed and init_from:
            self._init_from(init_from)
        # Where a rollback goes when no checkpoint is on disk yet: the state we start from.
        self.start_state = self._model_state_copy()
        # DDP averages the gradients in backward (its constructor also copies rank 0's weights
        # to the others); the checkpoint always saves self.model, the bare module.
        self.ddp = (
            DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.world_size > 1
            else None
        )
        net = self.ddp or self.model
        self.compiled = torch.compile(net, dynamic=True) if cfg.compile else net

    # ------------------------------------------------------------------ setup

    def _new_guard(self) -> StepGuard:
        cfg = self.cfg
        return StepGuard(
            spike_threshold=cfg.loss.max_loss_spike_threshold,
            max_consecutive_skips=cfg.max_consecutive_skips,
            smoothing=cfg.loss.loss_smoothing_factor,
        )

    def _batching(self) -> None:
        """Batches of cfg.batch_size; rebuilt when a recovery from out-of-memory halves it."""
        cfg = self.cfg
        # Each rank takes every world_size-th batch of the same (seed, epoch) order; with shards,
        # pools stay inside one shard.
        base = self.train_set.dataset
        groups = (
            [base.items[i]["shard"] for i in self.train_set.indices]
            if isinstance(base, ShardedFeatureDataset)
            else None
        )
        self.sampler = BucketBatchSampler(
            self.lengths["train"],
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            drop_last=False,
            num_replicas=self.world_size,
            rank=self.rank,
            groups=groups,
        )
        self.val_batches = BucketBatchSampler(
            self.lengths["val"], cfg.batch_size, shuffle=False
        ).batches()[self.rank :: self.world_size]

    def _dataset(self, split: str):
        """The split's utterances that the aligner can align (at least one frame per token)."""
        # Without worker processes, a small corpus is read into memory once (~50 kB per second
        # of audio) so the loop never waits on disk; a large one is read as it goes.
        preload = (
            self.cfg.num_workers == 0
            and self.meta.get("audio_seconds", math.inf) <= PRELOAD_MAX_AUDIO_S
        )
        # A sharded store (training.shards) when the cache has one, else the per-file reader.
        dataset = open_features(
            self.data_dir, split, preload=preload, exclude_speakers=self.cfg.held_out_speakers or ()
        )
        keep = [i for i, it in enumerate(dataset.items) if it["n_frames"] >= it["n_tokens"] > 0]
        dropped = len(dataset) - len(keep)
        if dropped:
            self.warnings.append(
                f"{dropped} {split} utterance(s) have fewer mel frames than tokens and are skipped"
            )
        return Subset(dataset, keep), [dataset.lengths[i] for i in keep]

    def _voice_table(self) -> dict[str, list[float]]:
        """Voice statistics of every training speaker from up to VOICE_TABLE_CLIPS of its clips
        (spread over them): a bounded read, whatever the size of the corpus."""
        dataset = self.train_set.dataset
        by_speaker: dict[str, list[int]] = {}
        for i in self.train_set.indices:
            by_speaker.setdefault(dataset.items[i]["speaker"], []).append(i)
        mean, std = self.meta["stats"]["pitch_mean"], self.meta["stats"]["pitch_std"]
        table = {}
        for name, indices in sorted(by_speaker.items()):
            chosen = indices[:: max(1, len(indices) // VOICE_TABLE_CLIPS)][:VOICE_TABLE_CLIPS]
            mels, f0s = [], []
            for i in chosen:
                item = dataset[i]
                mels.append(item["mel"].float())
                f0s.append(voice_stats.pitch_in_hz(item["pitch"], mean, std))
            table[name] = voice_stats.of_clips(mels, f0s).tolist()
        return table

    def _set_default_voice(self) -> None:
        if not self.voices:
            return
        stats = torch.tensor(list(self.voices.values()), dtype=torch.float32)
        # The mean voice: mean of means, root mean square of spreads, mean of known pitches.
        default = stats.mean(0)
        n = self.model_config.n_mels
        default[n : 2 * n] = stats[:, n : 2 * n].pow(2).mean(0).sqrt()
        known = stats[:, -1] != voice_stats.UNKNOWN_LOG_F0
        default[-1] = stats[known, -1].mean() if known.any() else voice_stats.UNKNOWN_LOG_F0
        with torch.no_grad():
            self.model.default_voice.copy_(default.to(self.model.default_voice.device))

    def _optimizer(self) -> torch.optim.Optimizer:
        # A fine-tune's frozen parts (cfg.freeze) get no gradient and no optimiser state; the
        # speaker conditioning inside them stays trainable: a new voice must move it.
        frozen = tuple(self.cfg.freeze or ())
        for name, p in self.model.named_parameters():
            if frozen and name.startswith(frozen) and not ("cond" in name or "speaker" in name):
                p.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # No weight decay on biases, norms and the embedding's scale-free rows (1-d tensors).
        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.learning_rate,
            betas=(0.9, 0.98),
            eps=1e-9,
            fused=self.device.type == "cuda",
        )

    def autocast(self):
        if self.amp_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ data

    def _loader(self, batches: list[list[int]]) -> DataLoader:
        workers = self.cfg.num_workers
        if workers > 0 and self._persistent is not None:
            # Same worker processes every epoch (no re-spawn, maps and page cache stay warm):
            # the loader reads its batch list from the plan, which runs in this process.
            self._plan.batches = batches
            return self._persistent
        self._plan = _Plan(batches)
        loader = DataLoader(
            self.train_set,
            batch_sampler=self._plan,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=workers > 0,
            # Its own generator: making an iterator must not draw from the global RNG, or a
            # resumed run would see different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        if workers > 0:
            self._persistent = loader
        return loader

    def next_batch(self) -> dict:
        """The next training batch on the device; (epoch, batch_in_epoch) is the resume point."""
        while True:
            if self._batches is None:
                order = self.sampler.batches(self.epoch)[self.batch_in_epoch :]
                self._batches = iter(self._loader(order))
            try:
                batch = next(self._batches)
                break
            except StopIteration:
                self._batches = None
                self.epoch += 1
                self.batch_in_epoch = 0
        self.batch_in_epoch += 1
        return self.to_device(batch)

    def to_device(self, batch: dict) -> dict:
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    # ------------------------------------------------------------------ the loop

    def lr_at(self, step: int) -> float:
        return self.schedule.lr(step)

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        status = "finished"
        self.model.train()
        while self.step < cfg.steps:
            stop = self.callbacks.should_stop()
            if self.world_size > 1:
                stop = distributed.all_reduce_sum([float(stop)])[0] > 0  # rank 0 asks for all
            if stop:
                status = "stopped"
                break
            try:
                self.train_step()
            except torch.OutOfMemoryError:
                self.recover_from_oom()
                continue
            if self.step % cfg.eval_every == 0:
                self.evaluate()
            if self.step % cfg.checkpoint_every == 0:
                self.save()
        if status == "finished" and self.last_eval_step != self.step:
            self.evaluate()
        if self.last_saved_step != self.step:
            self.save()
        if self._batches is not None:
            self._batches = None  # lets worker processes go
        self._persistent = None
        return TrainResult(
            status=status,
            step=self.step,
            best_val_loss=self.best_val_loss,
            last_checkpoint=self.last_checkpoint,
            param_count=self.param_count,
            warnings=list(self.warnings),
        )

    def train_step(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.loss_fn.set_step(self.step)  # the binarisation ramp

        data_time, samples = 0.0, 0
        totals, parts = [], {name: [] for name in COMPONENTS}
        for micro in range(cfg.grad_accum_steps):
            t = time.perf_counter()
            batch = self.next_batch()
            data_time += time.perf_counter() - t
            samples += batch["tokens"].shape[0]
            # DDP averages gradients over ranks in backward; the last micro-batch's is enough.
            last = micro == cfg.grad_accum_steps - 1
            sync = (
                self.ddp.no_sync()
                if self.ddp is not None and not last
                else contextlib.nullcontext()
            )
            with sync:
                with self.autocast():
                    outputs = self.compiled(batch)
                    loss, components = self.loss_fn(outputs)
                self.scaler.scale(loss / cfg.grad_accum_steps).backward()
            totals.append(loss.detach().float())
            for name in COMPONENTS:
                parts[name].append(components[name].detach().float())
        loss_value = float(torch.stack(totals).mean())
        part_values = {n: float(torch.stack(v).mean()) for n, v in parts.items()}
        self.scaler.unscale_(self.optimizer)  # fp16: clip and judge the true gradient
        # clip_grad_norm_ returns the norm before clipping: the guard and the controller need
        # the size of the gradient the batch produced, not the clipped one.
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
        )
        if self.world_size > 1:
            # The guard, the controller and the plateau breaker decide on these figures: the
            # same numbers on every rank give the same verdicts, so the replicas never diverge.
            reduced = distributed.all_reduce_mean([loss_value, grad_norm, *part_values.values()])
            loss_value, grad_norm = reduced[0], reduced[1]
            part_values = dict(zip(part_values, reduced[2:], strict=True))

        # fp16 loss scaling overflows now and then by design (the scaler probes for the largest
        # safe scale): that skip is the scaler's, not a fault for the guard to count.
        overflow = (
            self.scaler.is_enabled() and math.isfinite(loss_value) and not math.isfinite(grad_norm)
        )
        if overflow:
            verdict = Verdict(
                skip=True,
                reason=f"fp16 gradient overflow at loss scale {self.scaler.get_scale():g}; "
                "scale lowered",
            )
        else:
            verdict = self.guard.check(loss_value, grad_norm)
        if not verdict.skip:
            self.scaler.step(self.optimizer)  # a plain optimizer.step() without fp16
            if self.ema is not None:
                self.ema.update(self.model)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not overflow:
            # The controller judges the clipped norm: the step the weights actually took.
            self.loss_fn.observe(loss_value, grad_norm, clip_norm=cfg.grad_clip_norm)
        self.step += 1

        events, self.pending_events = self.pending_events, []
        for d in self.loss_fn.new_decisions():
            verb = "applied" if d.get("applied") else "rejected"
            events.append(
                {
                    "kind": "adaptive",
                    "step": self.step,
                    "message": f"mel weight {d['old']:.4g} -> {d['new']:.4g} {verb}: {d['reason']}",
                    "data": d,
                }
            )
        # Why the controller held, at most once per cooling period: the log shows it is alive.
        held = self.loss_fn.hold_report()
        if held is not None:
            counts = ", ".join(f"{code} x{n}" for code, n in held["held"].items())
            last = held["last"]["reason"] if held["last"] else ""
            events.append(
                {
                    "kind": "adaptive",
                    "step": self.step,
                    "message": f"mel weight {held['weight']:.4g} held ({counts}); last: {last}",
                    "data": held,
                }
            )
        if verdict.skip:
            events.append(
                {
                    "kind": "skip",
                    "step": self.step,
                    "message": f"optimiser step skipped: {verdict.reason}",
                    "data": {
                        "loss": _finite_or_none(loss_value),
                        "grad_norm": _finite_or_none(grad_norm),
                    },
                }
            )
        if verdict.rollback:
            events.append(self.rollback())

        step_time = time.perf_counter() - started
        metrics = {
            "step": self.step,
            "epoch": self.epoch,
            "loss/total": loss_value,
            **{f"loss/{n}": v for n, v in part_values.items()},
            **{f"weight/{n}": float(w) for n, w in self.loss_fn.weights.items()},
            "grad_norm": grad_norm,
            "lr": lr,
            "time/step": step_time,
            "time/data": data_time,
            "data_wait_share": data_time / step_time if step_time > 0 else 0.0,
            "samples_per_s": samples * self.world_size / step_time if step_time > 0 else 0.0,
            "guard/skipped": float(self.guard.skipped),
            "guard/rollbacks": float(self.guard.rollbacks),
            "events": events,
        }
        if self.step % cfg.log_every == 0 or events:
            self._write_metrics(metrics)
            self.callbacks.on_step(metrics)
        return metrics

    # ------------------------------------------------------------------ guarding

    def rollback(self) -> dict:
        """Restore the newest checkpoint not yet tried (else the starting state); lower the LR.

        The step counter and the data position go on: replaying the same batches could replay
        the fault. A checkpoint that already failed to cure the run is not tried again, so
        repeated failures walk further back instead of looping on broken weights; once every
        checkpoint has been tried the oldest is used again, never the random starting weights.
        The guard's running loss comes back with the weights: judged against the average of
        the broken stretch, healthy restored weights looked like a spike on every step and
        rolled back again and again (30 times in one reproduced run). Past `max_rollbacks`
        the run fails with the reason.
        """
        if self.guard.rollbacks > self.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"{self.cfg.max_rollbacks} rollbacks did not cure the run (learning rate already "
                f"x{self.schedule.scale:g}): the data or the config keeps breaking the weights; "
                "look at the skipped steps in the event log"
            )
        found = self._checkpoints()
        untried = [p for p in found if str(p) not in self.tried_rollbacks]
        ckpt, target = None, None
        for path in (untried or found[:1])[::-1]:
            self.tried_rollbacks.add(str(path))
            try:
                ckpt, target = load_checkpoint(path, map_location=self.device), path
                break
            except CheckpointError as exc:
                self.warnings.append(f"rollback skipped an unreadable checkpoint: {exc}")
        if ckpt is not None and target is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.loss_fn.load_state_dict(ckpt["loss_state"])
            self.guard.running_loss = ckpt["guard_state"]["running_loss"]
            self.known_good = str(target)
            source, source_step = target.name, int(ckpt["step"])
        else:
            self.model.load_state_dict(self.start_state["model"])
            self.optimizer.load_state_dict(self.start_state["optimizer"])
            self.loss_fn.load_state_dict(self.start_state["loss_state"])
            # A fresh average: the first losses of the starting weights set the bar again.
            self.guard.running_loss = None
            source, source_step = "the starting weights", self.start_state["step"]
        if self.ema is not None:
            self.ema.reset(self.model)  # the average may hold the weights that broke
        self.schedule.scale *= self.cfg.rollback_lr_factor
        return {
            "kind": "rollback",
            "step": self.step,
            "message": (
                f"{self.cfg.max_consecutive_skips} bad steps in a row: rolled back to "
                f"{source} (step {source_step}); learning rate now x{self.schedule.scale:g}"
            ),
            "data": {"to_step": source_step, "lr_scale": self.schedule.scale},
        }

    def recover_from_oom(self) -> None:
        """Out of memory in a step: go back to the newest checkpoint with half the micro-batch
        and twice the accumulation, so each optimiser step still sees the same batch."""
        cfg = self.cfg
        failed_at = self.step + 1
        if self.world_size > 1:
            raise RuntimeError(
                f"out of memory at step {failed_at} on rank {self.rank}: a run on several ranks "
                "cannot halve one rank's batch alone; lower the batch size or the model size"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self._batches = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if cfg.batch_size < 2:
            raise RuntimeError(
                f"out of memory at step {failed_at} with a micro-batch of one utterance: "
                "choose a smaller model size or a device with more memory"
            )
        before = (cfg.batch_size, cfg.grad_accum_steps)
        cfg.batch_size, cfg.grad_accum_steps = cfg.batch_size // 2, cfg.grad_accum_steps * 2
        self._batching()
        self.oom_recoveries += 1
        if not self._load_newest():
            self._restart_from_scratch()
        changes = {"batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps}
        self.callbacks.on_rewind(self.step, changes)
        self.pending_events.append(
            {
                "kind": "oom",
                "step": self.step,
                "message": (
                    f"out of memory at step {failed_at}: resumed from step {self.step} with "
                    f"micro-batch {cfg.batch_size} x {cfg.grad_accum_steps} accumulation "
                    f"(was {before[0]} x {before[1]})"
                ),
                "data": {**changes, "failed_at": failed_at, "was": list(before)},
            }
        )

    def _restart_from_scratch(self) -> None:
        """No checkpoint yet: the starting state, with the schedule and guard of step 0."""
        cfg = self.cfg
        self.model.load_state_dict(self.start_state["model"])
        self.optimizer.load_state_dict(self.start_state["optimizer"])
        self.loss_fn.load_state_dict(self.start_state["loss_state"])
        if self.ema is not None:
            self.ema.reset(self.model)
        self.guard = self._new_guard()
        self.schedule = LRSchedule(cfg.learning_rate, cfg.lr_warmup_steps, cfg.steps)
        self.step, self.epoch, self.batch_in_epoch = self.start_state["step"], 0, 0
        self.last_eval_step = self.last_saved_step = -1
        torch.manual_seed(cfg.seed)
        self._truncate_metrics(self.step)

    def _model_state_copy(self) -> dict:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "loss_state": copy.deepcopy(self.loss_fn.state_dict()),
            "step": self.step,
        }

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        # Evaluation (Griffin-Lim's random phase in particular) must not move the training RNG.
        with torch.random.fork_rng(devices=devices):
            sums = {name: 0.0 for name in ("total", *COMPONENTS)}
            count = 0
            for indices in self.val_batches:
                batch = self.to_device(collate([self.val_set[i] for i in indices]))
                with self.autocast():
                    outputs = self.model(batch)
                    total, components = self.loss_fn(outputs)
                n = len(indices)
                sums["total"] += float(total) * n
                for name in COMPONENTS:
                    sums[name] += float(components[name]) * n
                count += n
            if self.world_size > 1:
                # Each rank scored its share of the validation batches.
                keys = list(sums)
                reduced = distributed.all_reduce_sum([*sums.values(), count])
                sums, count = dict(zip(keys, reduced[:-1], strict=True)), reduced[-1]
            samples = self.samples() if self.is_main else []
        self.model.train()

        metrics = {"step": self.step, **{f"val/{k}": v / count for k, v in sums.items()}}
        # Checkpoints are ranked by the validation mel loss: the weighted total moves whenever
        # the adaptive controller moves a weight, so it cannot compare two steps.
        val_loss = metrics["val/mel"]
        self.last_val_loss = val_loss if math.isfinite(val_loss) else None
        improved = self.last_val_loss is not None and (
            self.best_val_loss is None or val_loss < self.best_val_loss
        )
        if improved:
            self.best_val_loss = val_loss
        metrics["val/best_mel"] = self.best_val_loss if self.best_val_loss is not None else val_loss
        self.last_eval_step = self.step
        self._write_metrics(metrics)
        self.callbacks.on_eval(metrics, samples)
        if improved:
            self.save(best=True)
        if self.plateau is not None and self.plateau.observe(val_loss):
            self.schedule.restart(self.step)
            self.pending_events.append(
                {
                    "kind": "adaptive",
                    "step": self.step,
                    "message": (
                        f"validation mel loss has not improved for {self.plateau.patience} "
                        "evals: learning-rate schedule restarted"
                    ),
                    "data": {"plateau_restart": self.schedule.restarts},
                }
            )
        return metrics

    def samples(self) -> list[Sample]:
        audio_cfg = AudioConfig.from_dict(self.meta["audio"])
        dataset = self.val_set.dataset
        chosen = sorted(self.val_set.indices, key=lambda i: dataset.items[i]["id"])[:SAMPLE_COUNT]
        out = []
        for i in chosen:
            item = dataset[i]
            tokens = item["tokens"][None].to(self.device)
            result = self.model.infer(
                tokens,
                torch.tensor([tokens.shape[1]], device=self.device),
                item["spk_emb"][None].to(self.device),
                voice_stats=self._item_voice(item),
            )
            mel = result["mel"][0, :, : int(result["mel_lens"][0])].float().cpu()
            # An untrained duration predictor can say one frame, too short for an STFT window;
            # pad with silence so early evals still produce (near-silent) audio.
            if mel.shape[1] < MIN_SAMPLE_FRAMES:
                mel = F.pad(mel, (0, MIN_SAMPLE_FRAMES - mel.shape[1]), value=math.log(LOG_FLOOR))
            if self.vocoder is not None:
                wav = torch.as_tensor(np.asarray(self.vocoder(mel), dtype=np.float32))
            else:
                wav = griffin_lim(mel, cfg=audio_cfg)
            out.append(
                Sample(
                    id=item["id"],
                    speaker=item["speaker"],
                    text=item["text"],
                    audio=wav.numpy().astype(np.float32),
                    sample_rate=audio_cfg.sample_rate,
                    mel=mel.numpy(),
                )
            )
        return out

    def _item_voice(self, item: dict) -> torch.Tensor | None:
        """The voice statistics of one dataset item, as a reference clip of it would give."""
        if not self.model_config.voice_stats:
            return None
        stats = self.meta["stats"]
        hz = voice_stats.pitch_in_hz(item["pitch"], stats["pitch_mean"], stats["pitch_std"])
        return voice_stats.voice_statistics(item["mel"].float()[None], hz[None]).to(self.device)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dict(self) -> dict:
        ckpt = self._checkpoint_dict()
        if self.ema is not None:
            ckpt["ema"] = self.ema.state_dict()
        return ckpt

    def _checkpoint_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "model_config": self.model_config.to_dict(),
            "size": self.cfg.size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                **self.schedule.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau else None,
            },
            "step": self.step,
            "loss_state": self.loss_fn.state_dict(),
            "guard_state": self.guard.state_dict(),
            "scaler": self.scaler.state_dict(),  # empty unless fp16
            "rng": rng_state(),
            "data_position": {
                "epoch": self.epoch,
                "batch": self.batch_in_epoch,
                "batch_size": self.cfg.batch_size,
                "world_size": self.world_size,
            },
            "config": self.cfg.flat(),
            "symbols": self.symbols,
            "audio": self.meta["audio"],
            "text": self.meta.get("text", {"lang": self.meta.get("language"), "backend": None}),
            "stats": self.meta["stats"],
            "val_loss": self.last_val_loss,
            "eval_step": self.last_eval_step,
            "best_val_loss": self.best_val_loss,
            # Held-out voices are not offered as seen speakers: the model never heard them.
            "speakers": {
                name: emb
                for name, emb in self.meta.get("speaker_embeddings", {}).items()
                if base_speaker(name) not in (self.cfg.held_out_speakers or ())
            },
            # Their voice statistics (training.voice_stats), for synthesis by name.
            "voices": self.voices,
        }

    def save(self, best: bool = False) -> str:
        # Every rank's RNG, so a resumed N-rank run draws the same dropout masks on each rank.
        ranks_rng = distributed.all_gather_object(rng_state()) if self.world_size > 1 else None
        path = self.ckpt_dir / "best.pt" if best else step_checkpoint_path(self.out_dir, self.step)
        if self.is_main:
            ckpt = self.checkpoint_dict()
            if ranks_rng is not None:
                ckpt["rng_ranks"] = ranks_rng
            path = save_checkpoint(path, ckpt)
            if not best:
                for old in self._checkpoints()[: -self.cfg.keep_last]:
                    if str(old) != self.known_good:
                        old.unlink(missing_ok=True)
        # The other ranks read these files on a rollback: nobody goes on before they are on disk.
        distributed.barrier()
        if not best:
            self.last_checkpoint = str(path)
            self.last_saved_step = self.step
        self.callbacks.on_checkpoint(
            str(path), {"step": self.step, "val_loss": self.last_val_loss, "best": best}
        )
        return str(path)

    def _checkpoints(self) -> list[Path]:
        return step_checkpoints(self.out_dir)

    def _resume(self) -> bool:
        if self.is_main:
            for leftover in self.ckpt_dir.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)  # a write that died before its rename
        if not self._checkpoints():
            self.warnings.append(f"nothing to resume in {self.ckpt_dir}; starting from scratch")
            return False
        if not self._load_newest():
            self.warnings.append("no checkpoint could be read; starting from scratch")
            return False
        return True

    def _load_newest(self) -> bool:
        """Every state of the newest readable checkpoint; an unreadable one is set aside.

        With several ranks, rank 0 alone looks (and renames) and the others load its choice.
        """
        chosen = None
        if self.is_main:
            for path in self._checkpoints()[::-1]:
                try:
                    chosen = (path, load_checkpoint(path, map_location=self.device))
                    break
                except CheckpointError as exc:
                    self.warnings.append(f"skipped an unreadable checkpoint: {exc}")
                    path.rename(path.with_name(path.name + ".unreadable"))
        if self.world_size > 1:
            name = distributed.broadcast_object(str(chosen[0]) if chosen else None)
            if not self.is_main and name is not None:
                chosen = (Path(name), load_checkpoint(name, map_location=self.device))
        if chosen is None:
            return False
        path, ckpt = chosen
        self._load_state(ckpt)
        self.last_checkpoint = str(path)
        return True

    def _load_state(self, ckpt: dict) -> None:
        if ckpt["size"] != self.cfg.size:
            raise ValueError(
                f"cannot resume a '{ckpt['size']}' checkpoint as a '{self.cfg.size}' model"
            )
        if ckpt["symbols"] != self.symbols:
            raise ValueError("cannot resume: the feature cache's symbol table has changed")
        saved_config = ModelConfig.from_dict(ckpt.get("model_config") or {})
        if saved_config.voice_stats != self.model_config.voice_stats:
            raise ValueError(
                "cannot resume: the checkpoint was written before the model took voice "
                "statistics; its checkpoints still synthesise, and a new run can start from it "
                "only as a new model"
            )
        if load_model_weights(self.model, ckpt["model"]):
            # Its optimiser state has no slots for the new weights: it cannot continue exactly.
            raise ValueError(
                "cannot resume: the checkpoint was written before the model conditioned every "
                "block on the speaker; start a new run from it with --init-from instead"
            )
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"])
            else:
                self.ema.reset(self.model)
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.plateau is not None and ckpt["scheduler"].get("plateau"):
            self.plateau.load_state_dict(ckpt["scheduler"]["plateau"])
        self.loss_fn.load_state_dict(ckpt["loss_state"])
        self.guard.load_state_dict(ckpt["guard_state"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        position = ckpt["data_position"]
        self.epoch = int(position["epoch"])
        # Saved with another micro-batch (before an out-of-memory recovery): the same share of
        # the epoch, counted in the batches of today's size.
        # Likewise with another number of ranks: each rank's batch counts world_size batches.
        saved_batch = int(position.get("batch_size", self.cfg.batch_size))
        saved = saved_batch * int(position.get("world_size", 1))
        self.batch_in_epoch = (
            int(position["batch"]) * saved // (self.cfg.batch_size * self.world_size)
        )
        self.best_val_loss = ckpt.get("best_val_loss")
        self.last_val_loss = ckpt.get("val_loss")
        self.last_saved_step = self.step
        self.last_eval_step = int(ckpt.get("eval_step", -1))
        ranks_rng = ckpt.get("rng_ranks")
        if ranks_rng and len(ranks_rng) == self.world_size:
            set_rng_state(ranks_rng[self.rank])
        else:
            if ranks_rng or self.world_size > 1:
                self.warnings.append(
                    f"resumed with {self.world_size} rank(s) a checkpoint of "
                    f"{len(ranks_rng or [1])}: the data order goes on, dropout draws differ"
                )
            set_rng_state(ckpt["rng"])
            if self.world_size > 1:
                torch.manual_seed(self.cfg.seed + self.rank + self.step)
        self._truncate_metrics(self.step)

    def _init_from(self, path) -> None:
        """Fine-tune: take the weights of another run's checkpoint, nothing else.

        Embedding rows are matched by symbol, so a checkpoint whose symbol table differs (a new
        corpus brings new phonemes) still lends every symbol the two tables share.
        """
        ckpt = load_checkpoint(path, map_location=self.device)
        # Compared through ModelConfig, so a checkpoint from before a config field existed
        # (it gets the field's default) still matches its size.
        if ModelConfig.from_dict(ckpt["model_config"]) != self.model_config:
            if ckpt.get("size") == self.cfg.size:
                raise ValueError(
                    f"init_from {path}: that '{self.cfg.size}' model was made by an earlier "
                    "version of the studio (without voice statistics), so its weights do not "
                    "fit; start from a checkpoint trained since"
                )
            raise ValueError(
                f"init_from {path}: it is a '{ckpt.get('size')}' model, this run trains "
                f"'{self.cfg.size}'; pick a checkpoint of the same size"
            )
        state = dict(ckpt["model"])
        old_rows = state.pop("embed.weight")
        old_index = {s: i for i, s in enumerate(ckpt["symbols"])}
        self.model.load_state_dict(state, strict=False)
        with torch.no_grad():
            for i, symbol in enumerate(self.symbols):
                if symbol in old_index:
                    self.model.embed.weight[i] = old_rows[old_index[symbol]]
        # The new corpus's statistics describe the data this run trains on.
        self.model.set_feature_stats(self.meta["stats"])
        self._set_default_voice()
        if self.ema is not None:
            self.ema.reset(self.model)

    # ------------------------------------------------------------------ metrics file

    def _write_metrics(self, metrics: dict) -> None:
        if not self.is_main:
            return  # one metrics.jsonl per run: no step written twice
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # NaN is not JSON; the file keeps null where the callback saw a non-finite float.
        clean = {k: _finite_or_none(v) for k, v in metrics.items()}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from; the resumed run logs them again."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the half-written last line of a worker killed mid-write
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
