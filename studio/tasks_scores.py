"""Objective scores of a checkpoint (SECS, MCD, WER, RTF), computed on a `cpu` worker.

    queue_scoring(ckpt)         mark the checkpoint "scoring…" and queue the task after commit
    queue_best_scoring(run_id)  the same for a finished run's best checkpoint
    score_checkpoint(ckpt_id)   the Celery task: synthesis.evaluate on a few held-out utterances

`Checkpoint.scores` holds one of three shapes, told apart by "state":
    queued  the previous scores (if any) plus queued_at
    done    synthesis.evaluate's dict plus scored_at and n (utterances asked for)
    error   a readable message in "error", plus scored_at and n
A failure to score is a fact about the checkpoint, so it is stored, never raised: the worker
goes on with its next task.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from studio import live
from studio.celery import app
from studio.models import Checkpoint

logger = logging.getLogger("studio.scores")

# Few utterances: scoring must take seconds on a small shared CPU (4-5 s with a `tiny` checkpoint
# on a 40-utterance cache, which has three held-out ones, measured on the project's 2-core box),
# and a handful of held-out sentences already tells checkpoints of one run apart.
SCORE_UTTERANCES = int(getattr(settings, "STUDIO_SCORE_UTTERANCES", 4))
SOFT_TIME_LIMIT = 10 * 60


def queue_scoring(ckpt: Checkpoint) -> bool:
    """Mark the checkpoint queued and send the task to the cpu queue once the transaction
    commits. False when it is already queued (a second click)."""
    if live.scoring_pending(ckpt.scores):
        return False
    scores = dict(ckpt.scores or {}, state="queued", queued_at=timezone.now().isoformat())
    Checkpoint.objects.filter(pk=ckpt.pk).update(scores=scores)
    ckpt.scores = scores
    pk, run = ckpt.pk, ckpt.run
    transaction.on_commit(lambda: score_checkpoint.apply_async((pk,), queue="cpu"))
    transaction.on_commit(lambda: live.publish_checkpoints(run))
    return True


def queue_best_scoring(run_id: int) -> None:
    """A run that finished: score its best checkpoint (its newest when none is marked best)."""
    checkpoints = Checkpoint.objects.select_related("run").filter(run_id=run_id)
    ckpt = checkpoints.filter(is_best=True).first() or checkpoints.order_by("-step").first()
    if ckpt is not None:
        queue_scoring(ckpt)


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

    from synthesis.engine import configure_cpu_threads
    from synthesis.evaluate import evaluate_checkpoint

    path = Path(ckpt.path)
    if not path.is_file():
        raise FileNotFoundError(f"the checkpoint file {path} is missing")
    cache_dir = ckpt.run.dataset.cache_dir
    if not cache_dir or not (Path(cache_dir) / "items.jsonl").is_file():
        raise FileNotFoundError(
            f"the feature cache of dataset “{ckpt.run.dataset}” is missing ({cache_dir or 'none'})"
        )
    threads = torch.get_num_threads()
    configure_cpu_threads()
    try:
        return evaluate_checkpoint(path, cache_dir, n, "cpu")
    finally:
        torch.set_num_threads(threads)


@app.task(
    name="studio.score_checkpoint",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=SOFT_TIME_LIMIT,
)
def score_checkpoint(checkpoint_id: int) -> str:
    ckpt = Checkpoint.objects.select_related("run__dataset").filter(pk=checkpoint_id).first()
    if ckpt is None:
        return "gone"  # pruned or deleted while the message waited
    n = SCORE_UTTERANCES
    try:
        scores = dict(evaluate(ckpt, n), state="done")
        state = "done"
    except Exception as exc:  # noqa: BLE001 - any failure is stored on the row, never raised
        logger.warning("checkpoint %s not scored", checkpoint_id, exc_info=True)
        scores, state = {"state": "error", "error": readable(exc)}, "error"
    scores.update(scored_at=timezone.now().isoformat(), n=n)
    Checkpoint.objects.filter(pk=checkpoint_id).update(scores=plain(scores))
    live.publish_checkpoints(ckpt.run)
    logger.info("checkpoint %s (run %s, step %s): %s", ckpt.pk, ckpt.run_id, ckpt.step, state)
    return state
