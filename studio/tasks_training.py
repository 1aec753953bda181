"""The training task: one run on one `gpu` worker, reporting to the database and the browser.

    queue_run(run)          after the run row is committed, put it on the gpu queue
    train_run(run_id)       the Celery task (acks late, rejected when its worker dies)

A run survives its worker. The message is acknowledged only when the task returns, so a worker
whose child is killed hands it back to the broker (task_reject_on_worker_lost); a worker that
dies whole leaves the run `running` under a process that no longer exists, and the next worker
to start on that machine (or any worker, once the run's heartbeat is stale) marks it
`interrupted` and queues it again. Either way the task finds the run's own checkpoints in its
folder and the trainer resumes exactly from the newest one; rows the database already has past
that step are replaced, so no (run, step, name) is ever stored twice.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from functools import partial
from pathlib import Path

from celery.signals import worker_ready
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import close_old_connections, connections, transaction
from django.utils import timezone
from django.utils.text import get_valid_filename

from studio import live
from studio.celery import app
from studio.diagnostics import diagnose
from studio.models import AudioSample, Checkpoint, MetricPoint, Run, RunEvent
from studio.tasks_scores import queue_best_scoring
from training.config import UnsafeConfig, check_safe
from training.trainer import Callbacks, Trainer

logger = logging.getLogger("studio.training")

# How often the running task proves it is alive, and how old that proof may get before another
# worker may take the run over (only needed across machines: on one machine the pid decides).
HEARTBEAT_SECONDS = float(getattr(settings, "STUDIO_RUN_HEARTBEAT_SECONDS", 10.0))
STALE_SECONDS = float(getattr(settings, "STUDIO_RUN_STALE_SECONDS", 300.0))
FLUSH_SECONDS = 1.0  # metric rows are written at most about once a second, in one transaction
STOP_POLL_SECONDS = 1.0
TRAINER_EVENT_KINDS = ("adaptive", "skip", "rollback", "diagnosis")
DIAGNOSIS_SERIES = (
    "loss/total", "val/total", "grad_norm", "nonfinite", "guard/skipped", "guard/rollbacks",
    "data_wait_share",
)  # fmt: skip


def queue_run(run: Run) -> None:
    """Send the run to the gpu queue once the transaction that created it has committed."""
    task_id = str(uuid.uuid4())
    Run.objects.filter(pk=run.pk).update(celery_task_id=task_id)
    run.celery_task_id = task_id
    transaction.on_commit(lambda: train_run.apply_async((run.pk,), queue="gpu", task_id=task_id))


# --------------------------------------------------------------------------- who runs what


def worker_ident(nodename: str | None) -> str:
    """`name@host:pid` of the process that trains: enough to tell later whether it still lives."""
    return f"{nodename or 'worker@' + socket.gethostname()}:{os.getpid()}"


def _host_of(nodename: str) -> str:
    return nodename.partition("@")[2] or nodename


def pid_alive(pid: int) -> bool:
    """A zombie counts as dead: a killed worker's children may never be reaped in a container."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(run: Run, host: str) -> bool:
    """Is the process that was training `run` certainly gone?

    On this machine the pid answers; elsewhere only a heartbeat older than STALE_SECONDS does.
    """
    nodename, _, pid = run.worker.rpartition(":")
    if nodename and pid.isdigit() and _host_of(nodename) == host:
        return not pid_alive(int(pid))
    return (timezone.now() - run.updated).total_seconds() > STALE_SECONDS


def _event(run_id: int, kind: str, message: str, step: int = 0, data=None) -> RunEvent:
    return RunEvent.objects.create(
        run_id=run_id, kind=kind, message=message, step=step, data=data or {}
    )


@worker_ready.connect
def requeue_orphaned_runs(sender=None, **kwargs):
    """At worker start: runs left `running` by a dead worker become `interrupted` and are requeued.

    This is the path for a worker killed whole (SIGKILL, OOM, power): its unacknowledged
    message would otherwise wait for the broker's visibility timeout, which must outlast the
    longest run. The requeued task resumes from the run's last checkpoint.
    """
    host = _host_of(getattr(sender, "hostname", None) or socket.gethostname())
    try:
        for run in Run.objects.filter(status=Run.Status.RUNNING):
            with transaction.atomic():
                run = Run.objects.select_for_update().get(pk=run.pk)
                if run.status != Run.Status.RUNNING or not owner_gone(run, host):
                    continue
                reason = f"worker {run.worker} stopped mid-run (found at step {run.current_step})"
                run.mark_interrupted(reason)
                _event(run.pk, "interrupted", reason + "; requeued", run.current_step)
            live.publish_status(run)
            logger.warning("run %s: %s; requeued", run.pk, reason)
            train_run.apply_async((run.pk,), queue="gpu")
    except Exception:
        logger.exception("could not sweep runs left by dead workers")
    finally:
        connections.close_all()  # the pool forks from this process; it must not share sockets


# --------------------------------------------------------------------------- per-run log


class RunLog:
    """Everything logged while the task trains goes to `<out_dir>/worker.log` as well."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "worker.log"
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        self.handler.setLevel(logging.INFO)

    def __enter__(self):
        root = logging.getLogger()
        self._old_level = root.level
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(self.handler)
        logging.captureWarnings(True)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self._old_level)
        self.handler.close()


class Heartbeat(threading.Thread):
    """Touches Run.updated every few seconds while the run trains (see owner_gone)."""

    def __init__(self, run_id: int, ident: str):
        super().__init__(name=f"heartbeat-{run_id}", daemon=True)
        self.run_id, self.worker_id = run_id, ident
        self.stopped = threading.Event()

    def run(self):
        try:
            while not self.stopped.wait(HEARTBEAT_SECONDS):
                try:
                    Run.objects.filter(pk=self.run_id, worker=self.worker_id).update(
                        updated=timezone.now()
                    )
                except Exception as exc:  # a busy database must not kill the run
                    logger.warning("heartbeat of run %s not written: %s", self.run_id, exc)
        finally:
            connections.close_all()

    def stop(self):
        self.stopped.set()
        self.join(5)


# --------------------------------------------------------------------------- media


def wav_bytes(audio, sample_rate: int) -> bytes:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, dtype="float32"), -1, 1), sample_rate,
             format="WAV", subtype="PCM_16")  # fmt: skip
    return buf.getvalue()


def mel_png(mel) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no GUI, thread-safe

    fig = Figure(figsize=(6, 2.2), dpi=100)
    ax = fig.subplots()
    ax.imshow(mel, origin="lower", aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_xlabel("frame")
    ax.set_ylabel("mel band")
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- the callbacks


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
            for step, values, t in buffer:
                MetricPoint.record(self.run.pk, step, values, time=_aware(t))
            Run.objects.filter(pk=self.run.pk).update(
                current_step=self.last_step, last_loss=self.last_loss, updated=timezone.now()
            )
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
        found = diagnose({k: list(v) for k, v in self.series.items()}, self.run.config_snapshot)
        new = [d for d in found if d.code not in self.diagnosed]
        for d in new:
            self.diagnosed.add(d.code)
            self._events(
                [{"kind": "diagnosis", "step": self.last_step,
                  "message": f"{d.title}: {d.evidence}", "data": d.as_dict()}]
            )  # fmt: skip

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
            "eval at step %d: %s", step,
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(clean.items())),
        )  # fmt: skip
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
            run=self.run, step=step, utterance_id=sample.id[:300],
            speaker=sample.speaker[:200], text=sample.text,
        )  # fmt: skip
        row.audio.save(f"{stem}.wav", ContentFile(wav_bytes(sample.audio, sample.sample_rate)),
                       save=False)  # fmt: skip
        row.mel_image.save(f"{stem}.png", ContentFile(mel_png(sample.mel)), save=False)
        row.save()
        return row

    def on_checkpoint(self, path: str, info: dict) -> None:
        self.flush()
        path = str(path)
        step = int(info["step"])
        val = info.get("val_loss")
        val = val if isinstance(val, float) and math.isfinite(val) else None
        size = Path(path).stat().st_size if Path(path).exists() else 0
        with transaction.atomic():
            if info.get("best"):
                # best.pt now holds `step`: a row that pointed at it for another step is stale.
                self.run.checkpoints.filter(path=path).exclude(step=step).delete()
                self.run.checkpoints.update(is_best=False)
                ckpt, created = Checkpoint.objects.get_or_create(
                    run=self.run, step=step,
                    defaults={"path": path, "val_loss": val, "is_best": True, "size_bytes": size},
                )  # fmt: skip
                if not created:
                    ckpt.is_best, ckpt.val_loss = True, val if val is not None else ckpt.val_loss
                    ckpt.save(update_fields=["is_best", "val_loss", "updated"])
            else:
                Checkpoint.objects.update_or_create(
                    run=self.run, step=step,
                    defaults={"path": path, "val_loss": val, "size_bytes": size},
                )  # fmt: skip
            self._forget_pruned_checkpoints(Path(path).parent / "best.pt")
        logger.info(
            "checkpoint at step %d%s: %s", step, " (best)" if info.get("best") else "", path
        )
        self.publisher.add(
            checkpoints=[live.checkpoint_dict(c) for c in self.run.checkpoints.order_by("-step")]
        )

    def _forget_pruned_checkpoints(self, best_path: Path) -> None:
        """The trainer keeps the last few step files; rows of deleted files go (the best one
        falls back to best.pt, which holds the same weights)."""
        for c in self.run.checkpoints.all():
            if Path(c.path).exists():
                continue
            if c.is_best and best_path.exists():
                c.path = str(best_path)
                c.save(update_fields=["path", "updated"])
            else:
                c.delete()

    def should_stop(self) -> bool:
        if not self.stop and time.monotonic() - self.last_poll >= STOP_POLL_SECONDS:
            self.last_poll = time.monotonic()
            self.stop = Run.objects.filter(pk=self.run.pk, cancel_requested=True).exists()
            if self.stop:
                logger.info("cancel requested: stopping at step %d", self.last_step)
        return self.stop


def _aware(t: float):
    from datetime import UTC, datetime

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


CHECKPOINT_FILE = re.compile(r"step_(\d+)\.pt$")


def own_checkpoints(out_dir: Path) -> list[Path]:
    d = out_dir / "checkpoints"
    return (
        sorted(p for p in d.glob("step_*.pt") if CHECKPOINT_FILE.search(p.name))
        if d.is_dir()
        else []
    )


def seed_from_checkpoint(run: Run, out_dir: Path) -> None:
    """Resume-from-another-run: its checkpoint becomes this run's first one."""
    src = Path(run.resume_from.path)
    dst = out_dir / "checkpoints" / f"step_{run.resume_from.step:07d}.pt"
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
    import json

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


# --------------------------------------------------------------------------- the task


def claim(run_id: int, ident: str, host: str) -> tuple[Run | None, str]:
    """Take the run for this worker, or say why not. Returns (run or None, what happened)."""
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            return None, "gone"
        if run.status in Run.FINISHED:
            return None, f"already {run.status}"
        # A live worker holds it (a duplicate message): that worker answers a cancel itself.
        if run.status == Run.Status.RUNNING and not owner_gone(run, host):
            elsewhere = _host_of(run.worker.rpartition(":")[0]) != host
            return None, ("busy elsewhere" if elsewhere else "duplicate") + f": {run.worker}"
        if run.cancel_requested:
            run.mark_finished(Run.Status.CANCELLED)
            return None, "cancelled before it started"
        how = "start"
        if run.status == Run.Status.RUNNING:
            how = "redelivered"
            _event(run.pk, "interrupted",
                   f"worker {run.worker} was lost at step {run.current_step}; resuming",
                   run.current_step)  # fmt: skip
        elif run.status == Run.Status.INTERRUPTED or run.attempts > 0:
            how = "resume"
        run.mark_running(ident)
        if not run.out_dir:
            run.assign_out_dir()
        return run, how


@app.task(
    bind=True,
    name="studio.train_run",
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def train_run(self, run_id: int) -> str:
    nodename = self.request.hostname or f"worker@{socket.gethostname()}"
    ident = worker_ident(nodename)
    run, how = claim(run_id, ident, _host_of(nodename))
    if run is None:
        if how.startswith("busy elsewhere"):
            # Another machine's worker holds it and its heartbeat is fresh: look again later,
            # so a run whose machine died is taken over once its heartbeat goes stale.
            raise self.retry(countdown=min(STALE_SECONDS, 60))
        logger.info("run %s not started: %s", run_id, how)
        return how
    out_dir = Path(run.out_dir)
    publisher = live.Publisher(run.pk, rate=live.max_rate())
    heartbeat = Heartbeat(run.pk, ident)
    with RunLog(out_dir):
        publisher.status(run)
        heartbeat.start()
        try:
            status = _train(run, publisher, how, ident)
        finally:
            heartbeat.stop()
            run.refresh_from_db()
            publisher.status(run)
            publisher.close()
            close_old_connections()
    return status


def _train(run: Run, publisher: live.Publisher, how: str, ident: str) -> str:
    out_dir = Path(run.out_dir)
    logger.info("run %s attempt %d on %s (%s)", run.pk, run.attempts, ident, how)
    started = _event(
        run.pk, "status", f"attempt {run.attempts} started on {ident}", run.current_step
    )
    publisher.add(events=[live.event_dict(started)])
    try:
        check_safe(run.config_snapshot)
    except UnsafeConfig as exc:
        return _fail(run, f"The config is outside the safe ranges: {exc}", publisher)
    if not run.dataset.is_ready:
        message = (
            f"Dataset “{run.dataset}” is not ready for training (status {run.dataset.status})."
        )
        return _fail(run, message, publisher)
    cfg = run.train_config()
    if not own_checkpoints(out_dir) and run.resume_from_id:
        if not Path(run.resume_from.path).is_file():
            return _fail(
                run, f"Cannot resume: checkpoint file {run.resume_from.path} is gone.", publisher
            )
        seed_from_checkpoint(run, out_dir)
    resume = bool(own_checkpoints(out_dir))
    init_from = run.init_from.path if (run.init_from_id and not resume) else None
    known = set(run.events.filter(kind="diagnosis").values_list("data__code", flat=True))
    callbacks = StudioCallbacks(run, publisher, known_diagnoses=known)
    try:
        trainer = Trainer(cfg, run.dataset.cache_dir, out_dir, callbacks, resume=resume,
                          init_from=init_from)  # fmt: skip
        if resume:
            logger.info("resuming from step %d", trainer.step)
            forget_after(run, trainer.step)
            restored = backfill_metrics(run, out_dir / "metrics.jsonl", trainer.step)
            if restored:
                logger.info("restored %d metric rows from metrics.jsonl", restored)
        elif run.attempts > 1:
            forget_after(run, 0)  # nothing to resume: the earlier attempt's rows start over
        Run.objects.filter(pk=run.pk).update(current_step=trainer.step, total_steps=cfg.steps)
        run.current_step, run.total_steps = trainer.step, cfg.steps
        callbacks.last_step = trainer.step
        logger.info(
            "model %s, %d parameters, device %s, %d train / %d val utterances",
            cfg.size, trainer.param_count, trainer.device, len(trainer.train_set),
            len(trainer.val_set),
        )  # fmt: skip
        for w in trainer.warnings:
            _event(run.pk, "warning", w, trainer.step)
            logger.warning(w)
        result = trainer.run()
        callbacks.flush()
    except Exception as exc:
        try:
            callbacks.flush()  # keep what was learned before the failure
        except Exception:
            logger.exception("could not write the last metrics")
        logger.error("training failed:\n%s", traceback.format_exc())
        return _fail(run, f"{type(exc).__name__}: {exc}", publisher)

    run.refresh_from_db()
    run.current_step = result.step
    if result.best_val_loss is not None and math.isfinite(result.best_val_loss):
        run.best_val_loss = result.best_val_loss
    run.save(update_fields=["current_step", "best_val_loss", "updated"])
    if result.status == "finished":
        run.mark_finished(Run.Status.SUCCEEDED)
        done = _event(run.pk, "status", f"finished at step {result.step}", result.step)
        # Scores on a cpu worker; a broker hiccup there is logged, and the run stays succeeded.
        transaction.on_commit(partial(queue_best_scoring, run.pk), robust=True)
    else:
        run.mark_finished(Run.Status.CANCELLED)
        done = _event(run.pk, "status", f"cancelled at step {result.step}", result.step)
    publisher.add(events=[live.event_dict(done)])
    logger.info("run %s %s at step %d", run.pk, run.status, result.step)
    return run.status


def _fail(run: Run, message: str, publisher: live.Publisher) -> str:
    logger.error("run %s failed: %s", run.pk, message)
    run.mark_finished(Run.Status.FAILED, message)
    failed = _event(run.pk, "status", f"failed: {message}", run.current_step)
    publisher.add(events=[live.event_dict(failed)])
    return Run.Status.FAILED
