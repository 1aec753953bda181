"""Celery tasks of the runs area.

    runs.train              one run on one `gpu` worker (acks late, rejected when its worker dies);
                            an acoustic model (training.trainer) or a vocoder fine-tune
                            (training.vocoder), the same callbacks, checkpoints and resume for both
    runs.score_checkpoint   objective scores of a checkpoint (SECS, MCD, WER, DNSMOS, RTF) on the
                            `cpu` queue, made with STUDIO_EVAL_VOCODER and naming it

A run survives its worker. The message is acknowledged only when the task returns, so a worker
whose child is killed hands it back to the broker (task_reject_on_worker_lost); a worker that
dies whole leaves the run `running` under a process that no longer exists, and the next worker
to start on that machine (or any worker, once the run's heartbeat is stale) marks it
`interrupted` and queues it again. Either way the task finds the run's own checkpoints in its
folder and the trainer resumes exactly from the newest one; rows the database already has past
that step are replaced, so no (run, step, name) is ever stored twice.

A failure to score is a fact about the checkpoint, so it is stored on the row, never raised:
the worker goes on with its next task.
"""

from __future__ import annotations

import logging
import math
import socket
import traceback
from functools import partial
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready
from django.conf import settings
from django.db import close_old_connections, connections, transaction
from django.utils import timezone

from studio import live, workers
from studio.celery import app
from studio.models import SCORE_TASK, TRAIN_QUEUE, TRAIN_TASK, Checkpoint, Run
from studio.runs.callbacks import (
    ClaimLost,
    StudioCallbacks,
    backfill_metrics,
    forget_after,
    seed_from_checkpoint,
)
from training.checkpoint import step_checkpoints
from training.config import UnsafeConfig, check_safe
from training.trainer import Trainer
from training.vocoder import VocoderConfig, VocoderTrainer

logger = logging.getLogger("studio.training")

# Scoring must take seconds on a small shared CPU (4-5 s with a `tiny` checkpoint on a
# 40-utterance cache, measured on the project's 2-core box).
SOFT_TIME_LIMIT = 10 * 60


def _beat(run: Run) -> None:
    if not run.beat():
        logger.warning("run %s: this worker no longer holds it; stopping at the next step", run.pk)


@worker_ready.connect
def requeue_orphaned_runs(sender=None, **kwargs):
    """At worker start: runs left `running` by a dead worker become `interrupted` and are requeued.

    This is the path for a worker killed whole (SIGKILL, OOM, power): its unacknowledged
    message would otherwise wait for the broker's visibility timeout, which must outlast the
    longest run. The requeued task resumes from the run's last checkpoint.
    """
    host = workers.host_of(getattr(sender, "hostname", None) or socket.gethostname())
    try:
        for run in Run.objects.filter(status=Run.Status.RUNNING):
            with transaction.atomic():
                run = Run.objects.select_for_update().get(pk=run.pk)
                if run.status != Run.Status.RUNNING or not run.owner_gone(host):
                    continue
                reason = f"worker {run.worker} stopped mid-run (found at step {run.current_step})"
                run.mark_interrupted(reason)
                run.event("interrupted", reason + "; requeued")
            live.publish_status(run)
            logger.warning("run %s: %s; requeued", run.pk, reason)
            train.apply_async((run.pk,), queue=TRAIN_QUEUE)
    except Exception:
        logger.exception("could not sweep runs left by dead workers")
    finally:
        connections.close_all()  # the pool forks from this process; it must not share sockets


# --------------------------------------------------------------------------- training


@app.task(
    bind=True,
    name=TRAIN_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def train(self, run_id: int) -> str:
    nodename = self.request.hostname or f"worker@{socket.gethostname()}"
    ident = workers.worker_ident(nodename)
    run, how = Run.claim(run_id, ident, workers.host_of(nodename))
    if run is None:
        if how.startswith("busy elsewhere"):
            # Another machine's worker holds it and its heartbeat is fresh: look again later,
            # so a run whose machine died is taken over once its heartbeat goes stale.
            raise self.retry(countdown=min(settings.STUDIO_RUN_STALE_SECONDS, 60))
        logger.info("run %s not started: %s", run_id, how)
        return how
    out_dir = Path(run.out_dir)
    publisher = live.Publisher(run.pk, rate=live.max_rate())
    heartbeat = workers.Heartbeat(f"run-{run.pk}", partial(_beat, run))
    with workers.RunLog(out_dir):
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
    started = run.event("status", f"attempt {run.attempts} started on {ident}", run.current_step)
    publisher.add(events=[live.event_dict(started)])
    try:
        check_config(run)
    except UnsafeConfig as exc:
        return _fail(run, f"The config is outside the safe ranges: {exc}", publisher)
    except (TypeError, ValueError) as exc:
        return _fail(run, f"The config is not valid: {exc}", publisher)
    if not run.dataset.is_ready:
        message = (
            f"Dataset “{run.dataset}” is not ready for training (status {run.dataset.status})."
        )
        return _fail(run, message, publisher)
    if not step_checkpoints(out_dir) and run.resume_from_id:
        if not Path(run.resume_from.path).is_file():
            return _fail(
                run, f"Cannot resume: checkpoint file {run.resume_from.path} is gone.", publisher
            )
        seed_from_checkpoint(run, out_dir)
    if run.ranks > 1:
        from studio.runs.ranks import train_ranked  # the launcher of torchrun

        return train_ranked(run, publisher)
    return fit(run, publisher)


def fit(run: Run, publisher: live.Publisher, fail_on=(Exception,)) -> str:
    """Train in this process and record the outcome. An exception outside `fail_on` is raised,
    not recorded (a rank of a torchrun group leaves that verdict to its supervisor)."""
    out_dir = Path(run.out_dir)
    resume = bool(step_checkpoints(out_dir))
    init_from = run.init_from.path if (run.init_from_id and not resume) else None
    known = set(run.events.filter(kind="diagnosis").values_list("data__code", flat=True))
    callbacks = StudioCallbacks(run, publisher, known_diagnoses=known)
    try:
        trainer = build_trainer(run, callbacks, resume, init_from)
        cfg = trainer.cfg
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
            "%s, %d parameters, device %s, %d train / %d val utterances",
            f"model {cfg.size}" if run.kind == Run.Kind.ACOUSTIC else "vocoder (HiFi-GAN)",
            getattr(trainer, "param_count", None)
            or sum(p.numel() for p in trainer.generator.parameters()),
            trainer.device,
            len(trainer.train_set),
            len(trainer.val_set),
        )
        for w in trainer.warnings:
            run.event("warning", w, trainer.step)
            logger.warning(w)
        result = trainer.run()
        callbacks.flush()
    except ClaimLost as exc:
        # Another attempt owns the run now: leave every row to it.
        logger.warning("run %s: stopped, %s", run.pk, exc)
        return "claim lost"
    except fail_on as exc:
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
    finished = result.status == "finished"
    run.claimed().update(current_step=run.current_step, best_val_loss=run.best_val_loss)
    if not run.finish_claimed(Run.Status.SUCCEEDED if finished else Run.Status.CANCELLED):
        logger.warning("run %s: another attempt holds it now; leaving its status alone", run.pk)
        return "claim lost"
    if finished:
        done = run.event("status", f"finished at step {result.step}", result.step)
        # Scores on a cpu worker; a broker hiccup there is logged, and the run stays succeeded.
        # (Scores are of acoustic checkpoints: SECS, MCD and WER need a model that reads text.)
        if run.kind == Run.Kind.ACOUSTIC:
            transaction.on_commit(partial(score_best_checkpoint, run.pk), robust=True)
    else:
        done = run.event("status", f"cancelled at step {result.step}", result.step)
    publisher.add(events=[live.event_dict(done)])
    logger.info("run %s %s at step %d", run.pk, run.status, result.step)
    return run.status


def record_left_out(run: Run) -> None:
    """Which clips this run never sees, and why, as the dataset stood when it first started
    (a review applied later changes the dataset, not what this run trained on)."""
    if run.events.filter(kind="data").exists():
        return
    from studio.datasets.reports import left_out

    counts = left_out(run.dataset)
    total = sum(counts.values())
    words = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    message = f"{total} clips left out of training: {words}" if total else "no clip left out"
    run.event("data", message, 0, {"left_out": counts})


def check_config(run: Run) -> None:
    """The worker's own check of the stored config: the safe ranges for an acoustic run,
    VocoderConfig's for a vocoder run (TypeError/ValueError naming the field)."""
    if run.kind == Run.Kind.VOCODER:
        VocoderConfig(**run.config_snapshot).check()
    else:
        check_safe(run.config_snapshot)


def build_trainer(run: Run, callbacks: StudioCallbacks, resume: bool, init_from: str | None):
    """The trainer of the run's kind, on the dataset's cache, in the run's folder."""
    record_left_out(run)
    cache_dir, out_dir = run.dataset.cache_dir, Path(run.out_dir)
    if run.kind == Run.Kind.VOCODER:
        values = dict(run.config_snapshot)
        if init_from:
            values["init"] = init_from  # fine-tune a vocoder checkpoint instead of universal
        if run.acoustic_checkpoint_id:
            values["acoustic_checkpoint"] = run.acoustic_checkpoint.path
        # The feature cache keeps features, not audio: the trainer reads the recordings again.
        audio_files = dict(
            run.dataset.utterances.filter(usable=True)
            .exclude(audio_path="")
            .values_list("item_id", "audio_path")
        )
        return VocoderTrainer(
            VocoderConfig(**values), cache_dir, out_dir, callbacks, resume, audio_files
        )
    cfg = run.train_config()
    if "held_out_speakers" not in (run.config_snapshot or {}):
        # A run made without the form (admin, API, an older row): the dataset's choice now.
        cfg.held_out_speakers = run.dataset.held_out_speakers()
    vocoder = eval_vocoder(run, cfg.device)
    return Trainer(
        cfg, cache_dir, out_dir, callbacks, resume=resume, init_from=init_from, vocoder=vocoder
    )


def eval_vocoder(run: Run, device: str):
    """The vocoder of eval samples (STUDIO_EVAL_VOCODER); Griffin-Lim, with a warning on the
    run, when that one cannot be loaded: eval audio is never worth failing a run for."""
    from studio.synthesis.vocoders import eval_name
    from synthesis.vocoders import GRIFFIN_LIM, VocoderError, load_vocoder
    from training.data import read_meta
    from training.device import select_device

    name = eval_name()
    if name == GRIFFIN_LIM:
        return None  # the trainer's own
    try:
        audio = read_meta(run.dataset.cache_dir)["audio"]
        vocoder = load_vocoder(name, audio, select_device(device))
    except (VocoderError, OSError, KeyError) as exc:
        run.event("warning", f"eval samples use Griffin-Lim: the vocoder {name} failed ({exc})")
        return None
    logger.info("eval samples are vocoded with %s", vocoder.label)
    return vocoder


def _fail(run: Run, message: str, publisher: live.Publisher) -> str:
    logger.error("run %s failed: %s", run.pk, message)
    if not run.finish_claimed(Run.Status.FAILED, message):
        logger.warning("run %s: another attempt holds it now; not marking it failed", run.pk)
        return "claim lost"
    failed = run.event("status", f"failed: {message}", run.current_step)
    publisher.add(events=[live.event_dict(failed)])
    return Run.Status.FAILED


# --------------------------------------------------------------------------- scores


def score_best_checkpoint(run_id: int) -> None:
    """A run that finished: score the checkpoints no scoring reached yet (every checkpoint is
    queued as it is written; a broker hiccup then, or best.pt's row, can leave one out)."""
    checkpoints = Checkpoint.objects.select_related("run").filter(run_id=run_id)
    queued = [c for c in checkpoints.order_by("-step") if not c.scores and c.queue_scoring()]
    if queued:
        live.publish_checkpoints(queued[0].run)


# Clips per other speaker for the floor of the unseen-voice SECS (a few are enough: the floor
# is a mean over voices, and each clip is embedded once per worker).
FLOOR_CLIPS_PER_SPEAKER = 5
# Clips of the fine-tuned voice it never trained on (validation split) that its SECS is judged by.
SPEAKER_CHECK_TARGETS = 10


def scoring_inputs(run: Run) -> dict:
    """What synthesis.evaluate needs from the studio's rows: the run's held-out speakers with all
    their clips, other speakers' clips for the floor, the dataset's language, and for a
    fine-tune of a single voice the clips that judge it (3 training clips to clone it from,
    validation clips it never trained on to compare with)."""
    snapshot = run.config_snapshot or {}
    clips = run.dataset.clips_by_speaker()
    names = snapshot.get("held_out_speakers")
    if names is None:
        names = run.dataset.held_out_speakers()
    held_out = {n: [p for _, p in clips[n]] for n in names if n in clips}
    floor = {n: [p for _, p in c[:FLOOR_CLIPS_PER_SPEAKER]] for n, c in clips.items()}
    inputs = {
        "held_out": held_out,
        "floor_clips": floor,
        "language": run.dataset.language,
        "speaker_check": None,
    }
    trained = [n for n in clips if n not in held_out]
    if run.init_from_id and len(trained) == 1:
        (name,) = trained
        train = [p for split, p in clips[name] if split == "train"]
        val = [p for split, p in clips[name] if split == "val"]
        if len(train) >= 3 and val:
            inputs["speaker_check"] = {
                "speaker": name,
                "reference": train[:3],
                "targets": val[:SPEAKER_CHECK_TARGETS],
            }
    return inputs


# Scores that also become metric points ("score/<name>", at the checkpoint's step), so the run
# page draws quality by step beside the losses, and the history outlives pruned checkpoints.
SCORE_METRICS = (
    "quality",
    "secs_seen",
    "normalised_secs_unseen",
    "secs_unseen",
    "wer_output",
    "wer_ground_truth",
    "dnsmos_ovrl",
    "mcd_db",
    "rtf",
)


def score_points(scores: dict) -> dict[str, float]:
    points = {
        f"score/{k}": scores[k] for k in SCORE_METRICS if isinstance(scores.get(k), (int, float))
    }
    check = scores.get("speaker_check") or {}
    if isinstance(check.get("secs"), (int, float)):
        points["score/speaker_secs"] = check["secs"]
    return points


def record_score_points(ckpt: Checkpoint, scores: dict) -> list[dict]:
    """Store the scores as metric points (a rescore replaces them); the points for the page."""
    from studio.models import MetricPoint

    points = score_points(scores)
    if not points:
        return []
    MetricPoint.objects.filter(run_id=ckpt.run_id, step=ckpt.step, name__in=list(points)).delete()
    MetricPoint.record(ckpt.run_id, ckpt.step, points)
    return [{"step": ckpt.step, "t": timezone.now().timestamp(), "m": points}]


def base_speaker_secs(run: Run, check: dict) -> None:
    """A fine-tune's "before": its base checkpoint scored on the same clips, once per run, kept
    as a `fewshot` event so the page shows it beside every checkpoint's "after"."""
    from studio.synthesis.vocoders import eval_name
    from synthesis.engine import Synthesizer
    from synthesis.evaluate import FEW_SHOT_TEXTS, speaker_secs

    if run.events.filter(kind="fewshot").exists() or not run.init_from_id:
        return
    path = Path(run.init_from.path)
    try:
        synth = Synthesizer(path, "cpu", vocoder=eval_name())
        before = speaker_secs(synth, check["reference"], check["targets"], FEW_SHOT_TEXTS)
        message = (
            f"SECS of the base checkpoint ({run.init_from.label}) on {check['speaker']}'s "
            f"{len(check['targets'])} clips it never trained on: {before['secs']:.3f} "
            f"(two sets of real clips: {before['ceiling']:.3f})"
        )
        data = plain(dict(before, speaker=check["speaker"], base=run.init_from_id))
    except Exception as exc:
        message, data = f"the base checkpoint was not scored: {readable(exc)}", {"error": True}
    run.event("fewshot", message, 0, data=data)


def readable(exc: BaseException) -> str:
    """The message a person sees on the checkpoint row."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return f"scoring took longer than {SOFT_TIME_LIMIT // 60} minutes and was stopped"
    if isinstance(exc, (ValueError, OSError)) and str(exc):
        return str(exc)  # CheckpointError, AudioError, missing files: already written for people
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def plain(value):
    """JSON a database can store: NaN/Inf (not JSON) become None, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else None


def evaluate(ckpt: Checkpoint, n: int) -> dict:
    """synthesis.evaluate on one torch thread (restored after: the process may train next)."""
    import torch

    from studio.synthesis.vocoders import eval_name
    from synthesis.engine import configure_cpu_threads
    from synthesis.evaluate import evaluate_checkpoint

    if ckpt.run.kind == Run.Kind.VOCODER:
        raise ValueError(
            "scores are made for voices (acoustic checkpoints); a vocoder is judged by its "
            "validation mel loss and eval audio, and in use on the synthesis page"
        )
    path = Path(ckpt.path)
    if not path.is_file():
        raise FileNotFoundError(f"the checkpoint file {path} is missing")
    cache_dir = ckpt.run.dataset.cache_dir
    if not cache_dir or not (Path(cache_dir) / "items.jsonl").is_file():
        raise FileNotFoundError(
            f"the feature cache of dataset “{ckpt.run.dataset}” is missing ({cache_dir or 'none'})"
        )
    inputs = scoring_inputs(ckpt.run)
    threads = torch.get_num_threads()
    configure_cpu_threads(settings.STUDIO_SYNTH_THREADS)
    try:
        if inputs["speaker_check"]:
            base_speaker_secs(ckpt.run, inputs["speaker_check"])
        # The scores name their vocoder ("vocoder") and carry DNSMOS OVRL beside SECS/MCD/WER.
        return evaluate_checkpoint(path, cache_dir, n, "cpu", vocoder=eval_name(), **inputs)
    finally:
        torch.set_num_threads(threads)


@app.task(
    name=SCORE_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=SOFT_TIME_LIMIT,
)
def score_checkpoint(checkpoint_id: int) -> str:
    ckpt = Checkpoint.objects.select_related("run__dataset").filter(pk=checkpoint_id).first()
    if ckpt is None:
        return "gone"  # pruned or deleted while the message waited
    n = settings.STUDIO_SCORE_UTTERANCES
    try:
        scores = dict(evaluate(ckpt, n), state="done")
        state = "done"
    except Exception as exc:
        logger.warning("checkpoint %s not scored", checkpoint_id, exc_info=True)
        scores, state = {"state": "error", "error": readable(exc)}, "error"
    scores.update(scored_at=timezone.now().isoformat(), n=n)
    ckpt.record_scores(plain(scores))
    points = record_score_points(ckpt, plain(scores)) if state == "done" else []
    live.publish_checkpoints(ckpt.run, points)
    logger.info("checkpoint %s (run %s, step %s): %s", ckpt.pk, ckpt.run_id, ckpt.step, state)
    return state
