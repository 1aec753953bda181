"""What the trainer reports, turned into rows, files and live messages (on the gpu worker).

Metric rows are written in batches (one transaction about once a second); eval samples become
AudioSample rows with a WAV and a mel picture; checkpoints become Checkpoint rows. On resume,
rows past the resumed step are dropped and those the dead worker never flushed come back from
the trainer's metrics.jsonl, so no (run, step, name) is stored twice or lost.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from django.core.files.base import ContentFile
from django.db import transaction
from django.utils import timezone
from django.utils.text import get_valid_filename

from studio import live
from studio.models import AudioSample, MetricPoint, Run, RunEvent
from studio.runs.diagnostics import diagnose
from synthesis.pictures import mel_png
from training.audio import wav_bytes
from training.checkpoint import step_checkpoint_path
from training.trainer import Callbacks

logger = logging.getLogger("studio.training")

FLUSH_SECONDS = 1.0  # metric rows are written at most about once a second, in one transaction
STOP_POLL_SECONDS = 1.0
TRAINER_EVENT_KINDS = ("adaptive", "skip", "rollback", "diagnosis")
DIAGNOSIS_SERIES = (
    "loss/total",
    "val/total",
    "grad_norm",
    "nonfinite",
    "guard/skipped",
    "guard/rollbacks",
    "data_wait_share",
)


class ClaimLost(RuntimeError):
    """This worker's attempt no longer holds the run (taken over, cancelled or finished)."""


class StudioCallbacks(Callbacks):
    """The trainer's reports, turned into rows, files and live messages."""

    def __init__(self, run: Run, publisher: live.Publisher, known_diagnoses=()):
        self.run = run
        self.publisher = publisher
        self.checkpoint_every = int(run.config_snapshot.get("checkpoint_every") or 0)
        self.buffer: list[tuple[int, dict, float]] = []
        self.last_flush = time.monotonic()
        self.last_poll = -math.inf
        self.stop = False
        self.last_step = run.current_step
        self.last_loss = run.last_loss
        self.series: dict[str, deque] = {
            name: deque(maxlen=50 if name.startswith("val/") else 1000) for name in DIAGNOSIS_SERIES
        }
        self.diagnosed = set(known_diagnoses)

    # -- steps

    def on_step(self, metrics: dict) -> None:
        step = int(metrics["step"])
        clean, bad = live.finite_metrics(metrics)
        if bad:
            clean["nonfinite"] = float(len(bad))
            logger.warning("step %d: non-finite %s", step, ", ".join(sorted(bad)))
        now = time.time()
        self.buffer.append((step, clean, now))
        self.publisher.add_point(step, clean, t=now)
        self._remember(step, clean)
        self.last_step = step
        if "loss/total" in clean:
            self.last_loss = clean["loss/total"]
        if metrics.get("events"):
            self._events(metrics["events"])
        at_checkpoint = self.checkpoint_every and step % self.checkpoint_every == 0
        if at_checkpoint or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def _remember(self, step: int, values: dict) -> None:
        for name, series in self.series.items():
            if name in values:
                series.append((step, values[name]))

    def flush(self) -> None:
        """Write buffered steps in one transaction; move the run's step and last loss."""
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        buffer, self.buffer = self.buffer, []
        with transaction.atomic():
            # Fenced: only the attempt that holds the run writes its rows.
            moved = self.run.claimed().update(
                current_step=self.last_step, last_loss=self.last_loss, updated=timezone.now()
            )
            if not moved:
                raise ClaimLost(f"run {self.run.pk} is no longer held by {self.run.worker}")
            for step, values, t in buffer:
                MetricPoint.record(self.run.pk, step, values, time=_aware(t))
        self.run.current_step, self.run.last_loss = self.last_step, self.last_loss
        self.publisher.progress(self.run)
        self._diagnose()

    def _events(self, events: list[dict]) -> None:
        rows = RunEvent.objects.bulk_create(
            [
                RunEvent(
                    run_id=self.run.pk,
                    step=int(e.get("step") or self.last_step),
                    kind=str(e.get("kind") or "event")[:32],
                    message=str(e.get("message") or ""),
                    data=_jsonable(e.get("data") or {}),
                )
                for e in events
            ]
        )
        for e in rows:
            logger.info("step %d %s: %s", e.step, e.kind, e.message)
        self.publisher.add(events=[live.event_dict(e) for e in rows])

    def _diagnose(self) -> None:
        if self.run.kind == Run.Kind.VOCODER:
            return  # the diagnoses and their advice are written for acoustic models
        found = diagnose({k: list(v) for k, v in self.series.items()}, self.run.config_snapshot)
        new = [d for d in found if d.code not in self.diagnosed]
        for d in new:
            self.diagnosed.add(d.code)
            self._events(
                [
                    {
                        "kind": "diagnosis",
                        "step": self.last_step,
                        "message": f"{d.title}: {d.evidence}",
                        "data": d.as_dict(),
                    }
                ]
            )

    # -- evaluations and checkpoints

    def on_eval(self, metrics: dict, samples: list) -> None:
        self.flush()
        step = int(metrics["step"])
        clean, _ = live.finite_metrics(metrics)
        MetricPoint.record(self.run.pk, step, clean)
        self._remember(step, clean)
        self.publisher.add_point(step, clean)
        best = clean.get("val/best_mel")
        if best is not None:
            Run.objects.filter(pk=self.run.pk).update(best_val_loss=best)
            self.run.best_val_loss = best
        logger.info(
            "eval at step %d: %s",
            step,
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(clean.items())),
        )
        stored = []
        for sample in samples:
            stored.append(self._store_sample(step, sample))
        self.publisher.add(samples=[live.sample_dict(s) for s in stored])

    def _store_sample(self, step: int, sample) -> AudioSample:
        # A resumed run evaluates the same step again: replace, never pile up.
        for old in AudioSample.objects.filter(run=self.run, step=step, utterance_id=sample.id):
            _delete_sample(old)
        stem = get_valid_filename(f"run{self.run.pk}_step{step:07d}_{sample.id}") or "sample"
        row = AudioSample(
            run=self.run,
            step=step,
            utterance_id=sample.id[:300],
            speaker=sample.speaker[:200],
            text=sample.text,
        )
        row.audio.save(
            f"{stem}.wav", ContentFile(wav_bytes(sample.audio, sample.sample_rate)), save=False
        )
        row.mel_image.save(f"{stem}.png", ContentFile(mel_png(sample.mel)), save=False)
        row.save()
        return row

    def on_checkpoint(self, path: str, info: dict) -> None:
        self.flush()
        if not self.run.holds_claim():
            raise ClaimLost(f"run {self.run.pk} is no longer held by {self.run.worker}")
        if self.run.retries:
            # Progress past every earlier checkpoint: the attempts that died before this one
            # were not dying in a row, so the run gets its full STUDIO_MAX_ATTEMPTS again.
            self.run.claimed().update(retries=0)
            self.run.retries = 0
        ckpt = self.run.record_checkpoint(path, info)
        logger.info(
            "checkpoint at step %d%s: %s", info["step"], " (best)" if info.get("best") else "", path
        )
        if self.run.kind == Run.Kind.ACOUSTIC:
            # Every checkpoint is scored on a cpu worker while training goes on; a broker that
            # cannot take the task costs the scores of this checkpoint, never the run.
            try:
                ckpt.queue_scoring()
            except Exception as exc:
                logger.warning("checkpoint at step %d not queued for scoring: %s", ckpt.step, exc)
        self.publisher.add(
            checkpoints=[live.checkpoint_dict(c) for c in self.run.checkpoints.order_by("-step")]
        )

    def should_stop(self) -> bool:
        if not self.stop and time.monotonic() - self.last_poll >= STOP_POLL_SECONDS:
            self.last_poll = time.monotonic()
            row = self.run.claimed().values("cancel_requested").first()
            if row is None:
                raise ClaimLost(f"run {self.run.pk} is no longer held by {self.run.worker}")
            self.stop = row["cancel_requested"]
            if self.stop:
                logger.info("cancel requested: stopping at step %d", self.last_step)
        return self.stop

    def on_rewind(self, step: int, changes: dict) -> None:
        """The trainer went back to `step` (out of memory): its later rows will come again."""
        self.buffer = [entry for entry in self.buffer if entry[0] <= step]
        self.flush()
        forget_after(self.run, step)
        self.last_step = step
        if changes:
            # Later attempts start with what fitted, not with what ran out of memory.
            snapshot = {**self.run.config_snapshot, **changes}
            self.run.claimed().update(config_snapshot=snapshot, current_step=step)
            self.run.config_snapshot = snapshot


def _aware(t: float):

    return datetime.fromtimestamp(t, tz=UTC)


def _jsonable(value):
    """Event data as plain JSON: NaN/Inf (not JSON) become None, odd objects their repr."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        return _jsonable(float(value))
    except (TypeError, ValueError):
        return repr(value)


def _delete_sample(sample: AudioSample) -> None:
    for f in (sample.audio, sample.mel_image):
        if f:
            f.delete(save=False)
    sample.delete()


# --------------------------------------------------------------------------- resuming


def seed_from_checkpoint(run: Run, out_dir: Path) -> None:
    """Resume-from-another-run: its checkpoint becomes this run's first one."""
    src = Path(run.resume_from.path)
    dst = step_checkpoint_path(out_dir, run.resume_from.step)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    logger.info(
        "starting from %s (run %s, step %d)", src, run.resume_from.run_id, run.resume_from.step
    )


def forget_after(run: Run, step: int) -> None:
    """The trainer resumed at `step` and will report every later step again: drop ours."""
    MetricPoint.objects.filter(run=run, step__gt=step).delete()
    RunEvent.objects.filter(run=run, step__gt=step, kind__in=TRAINER_EVENT_KINDS).delete()
    for s in AudioSample.objects.filter(run=run, step__gt=step):
        _delete_sample(s)
    run.checkpoints.filter(step__gt=step).delete()


def backfill_metrics(run: Run, metrics_path: Path, upto: int) -> int:
    """Rows the dead worker had not flushed yet come back from the trainer's metrics.jsonl."""

    if not metrics_path.exists():
        return 0
    n = 0
    with transaction.atomic():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step")
            if not isinstance(step, int) or step > upto:
                continue
            clean, _ = live.finite_metrics({k: v for k, v in record.items() if v is not None})
            n += len(MetricPoint.record(run.pk, step, clean))
    return n
