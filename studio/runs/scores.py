"""What the run page says about its checkpoints' scores: which one to keep, whether the run
has started to overfit, and for a fine-tune of one voice, its similarity before and after.

The checkpoint to keep is chosen by synthesis.evaluate.QUALITY_FORMULA, a score of
free-running synthesis (the validation loss is teacher-forced: true durations and pitch).
"""

from __future__ import annotations

from django.db.models import Avg

from studio.models import MetricPoint, Run
from synthesis.evaluate import QUALITY_FORMULA

# Validation must be this much (relative) above its best, at this many evals in a row, and the
# training loss this much below where it stood at the best, before a run is called overfitting:
# one noisy eval of a small validation set is not a trend.
OVERFIT_MARGIN = 0.02
OVERFIT_EVALS = 2
TRAIN_MARGIN = 0.01
VAL_METRIC, TRAIN_METRIC = "val/mel", "loss/mel"

__all__ = ["QUALITY_FORMULA", "best_by_quality", "overfitting", "speaker_before_after"]


def best_by_quality(checkpoints: list[dict]) -> dict | None:
    """The scored checkpoint (live.checkpoint_dict) with the highest quality; None if none."""
    scored = [c for c in checkpoints if (c.get("scores") or {}).get("quality") is not None]
    if not scored:
        return None
    return max(scored, key=lambda c: (c["scores"]["quality"], c["step"]))


def _train_mean(run: Run, after: int, upto: int) -> float | None:
    row = MetricPoint.objects.filter(
        run=run, name=TRAIN_METRIC, step__gt=after, step__lte=upto
    ).aggregate(v=Avg("value"))
    return row["v"]


def overfitting(run: Run) -> dict | None:
    """When validation mel loss has risen for OVERFIT_EVALS evals in a row past its best while
    the training mel loss kept falling: {since, best_step, best_val, last_val, train_then,
    train_now}; None otherwise. `since` is the first eval after the best, where it started."""
    evals = list(
        MetricPoint.objects.filter(run=run, name=VAL_METRIC)
        .order_by("step")
        .values_list("step", "value")
    )
    if len(evals) < OVERFIT_EVALS + 1:
        return None
    best_i = min(range(len(evals)), key=lambda i: (evals[i][1], i))
    after = evals[best_i + 1 :]
    best_step, best_val = evals[best_i]
    if len(after) < OVERFIT_EVALS or any(
        v <= best_val * (1 + OVERFIT_MARGIN) for _, v in after[-OVERFIT_EVALS:]
    ):
        return None
    # Training loss over the stretch that led to each eval: the best one, and the latest.
    prev_step = evals[best_i - 1][0] if best_i else -1
    then = _train_mean(run, prev_step, best_step)
    now = _train_mean(run, after[-2][0] if len(after) > 1 else best_step, after[-1][0])
    if then is None or now is None or now >= then * (1 - TRAIN_MARGIN):
        return None
    return {
        "since": after[0][0],
        "best_step": best_step,
        "best_val": best_val,
        "last_step": after[-1][0],
        "last_val": after[-1][1],
        "train_then": then,
        "train_now": now,
    }


def speaker_before_after(run: Run, checkpoints: list[dict]) -> dict | None:
    """A fine-tune of one voice: SECS of the base checkpoint ("before", a `fewshot` event) and
    of each scored checkpoint ("after") on the speaker's clips the run never trained on."""
    event = run.events.filter(kind="fewshot").order_by("-created").first()
    after = [
        {"step": c["step"], **c["scores"]["speaker_check"]}
        for c in checkpoints
        if isinstance((c.get("scores") or {}).get("speaker_check"), dict)
    ]
    if event is None and not after:
        return None
    before = event.data if event is not None and not event.data.get("error") else None
    for a in after:
        a["change"] = a["secs"] - before["secs"] if before and a.get("secs") is not None else None
    return {
        "speaker": (before or {}).get("speaker") or (after[0]["speaker"] if after else ""),
        "before": before,
        "before_message": event.message if event is not None else "",
        "after": sorted(after, key=lambda a: a["step"]),
    }
