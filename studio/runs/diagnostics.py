"""Naming the failure patterns the old system suffered, from a run's recent metrics.

The seeds (functional-evaluation.md, nan-loss-test-report.md) describe four ways a TTS run
goes wrong and what helped: a loss that stops falling (plateau), gradients that explode,
streaks of NaN/Inf losses, and steps that wait on the input pipeline (the "GPU 90% -> 5%"
pattern). `diagnose` looks for each in plain series so the worker can run it as it trains;
the advice is adapted to this studio, whose loss is never clamped and whose ranges are its own.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from training.config import BATCH_RANGES, batch_warning

# Below these amounts of evidence a pattern is not named: early training is noisy by nature.
PLATEAU_MIN_STEPS = 200
PLATEAU_MIN_RELATIVE_DROP = 0.01
PLATEAU_VAL_EVALS = 4
EXPLODE_HIGH_SHARE = 0.2
EXPLODE_GROWTH = 5.0
EXPLODE_MIN_STEPS = 50
NAN_STREAK = 3
INPUT_BOUND_SHARE = 0.5
INPUT_BOUND_MIN_STEPS = 20


@dataclass
class Diagnosis:
    code: str
    title: str
    evidence: str
    advice: list[str] = field(default_factory=list)
    severity: str = "warning"

    def as_dict(self) -> dict:
        return asdict(self)


Series = Sequence[tuple[int, float]]


def _values(series: Series | None) -> list[float]:
    return [v for _, v in series or ()]


def _increments(values: list[float]) -> list[float]:
    """Per-step counts from a counter that may be cumulative (never decreasing) or per step."""
    if len(values) > 1 and all(b >= a for a, b in itertools.pairwise(values)):
        return [values[0]] + [b - a for a, b in itertools.pairwise(values)]
    return values


def _longest_streak(steps_with_trouble: set[int]) -> tuple[int, int]:
    """Longest run of consecutive steps in the set: (length, last step of that run)."""
    best, best_end, run, prev = 0, 0, 0, None
    for step in sorted(steps_with_trouble):
        run = run + 1 if prev is not None and step == prev + 1 else 1
        prev = step
        if run >= best:
            best, best_end = run, step
    return best, best_end


def plateau(series: dict[str, Series], config: dict) -> Diagnosis | None:
    level = config.get("optimization_level", "")
    advice = []
    if level != "plateau_breaker":
        advice.append(
            "Start the next run with the 'plateau_breaker' optimization level: it restarts "
            "the learning-rate schedule when validation stops improving."
        )
    size, batch = config.get("size"), config.get("batch_size")
    if size in BATCH_RANGES and isinstance(batch, int) and batch_warning(size, batch):
        low, high = BATCH_RANGES[size]
        advice.append(
            f"Match the batch size to the model: {low}-{high} for '{size}' (now {batch})."
        )
    advice += [
        "Keep the mel weight between 2.5 and 5 and the learning rate inside its per-size range.",
        "If the loss is already low, the model may be at its capacity for this data: try the "
        "next model size or more recordings.",
    ]

    val = list(series.get("val/total") or ())
    if len(val) >= PLATEAU_VAL_EVALS:
        best_before = min(v for _, v in val[: -PLATEAU_VAL_EVALS + 1])
        recent_best = min(v for _, v in val[-PLATEAU_VAL_EVALS + 1 :])
        if recent_best > best_before * (1 - PLATEAU_MIN_RELATIVE_DROP / 2):
            return Diagnosis(
                "plateau",
                "Loss plateau",
                f"validation loss has not improved for {PLATEAU_VAL_EVALS - 1} evaluations "
                f"(best {best_before:.3f}, since then {recent_best:.3f})",
                advice,
            )
    train = list(series.get("loss/total") or ())
    warmup = int(config.get("lr_warmup_steps") or 0)
    train = [(s, v) for s, v in train if s > warmup]
    if len(train) >= PLATEAU_MIN_STEPS and train[-1][0] - train[0][0] >= PLATEAU_MIN_STEPS:
        quarter = len(train) // 4
        earlier = statistics.fmean(v for _, v in train[-2 * quarter : -quarter])
        recent = statistics.fmean(v for _, v in train[-quarter:])
        if earlier > 0 and (earlier - recent) / earlier < PLATEAU_MIN_RELATIVE_DROP:
            return Diagnosis(
                "plateau",
                "Loss plateau",
                f"training loss averaged {earlier:.3f} then {recent:.3f} over the last "
                f"{2 * quarter} steps: under {PLATEAU_MIN_RELATIVE_DROP:.0%} better",
                advice,
            )
    return None


def exploding_gradients(series: dict[str, Series], config: dict) -> Diagnosis | None:
    # The first steps of any run have large gradients (random weights, warm-up): not evidence.
    warmup = int(config.get("lr_warmup_steps") or 0)
    grads = [v for s, v in series.get("grad_norm") or () if s > warmup]
    if len(grads) < EXPLODE_MIN_STEPS:
        return None
    threshold = float(config.get("gradient_norm_threshold") or 5.0)
    clip = float(config.get("grad_clip_norm") or 1.0)
    recent = grads[-100:]
    high_share = sum(g > threshold for g in recent) / len(recent)
    early = statistics.median(grads[: max(10, len(grads) // 5)])
    late = statistics.median(grads[-max(10, len(grads) // 5) :])
    growth = late / early if early > 0 else 0.0
    if high_share < EXPLODE_HIGH_SHARE and not (growth >= EXPLODE_GROWTH and late > clip):
        return None
    if high_share >= EXPLODE_HIGH_SHARE:
        evidence = (
            f"the gradient norm was above {threshold:g} in {high_share:.0%} of the last "
            f"{len(recent)} steps (max {max(recent):.3g})"
        )
    else:
        evidence = f"the gradient norm grew {growth:.1f}x (median {early:.3g} -> {late:.3g})"
    return Diagnosis(
        "exploding_gradients",
        "Exploding gradients",
        evidence,
        [
            f"Lower the learning rate (now {config.get('learning_rate', '?')}) toward the "
            "bottom of its per-size range.",
            f"Clip harder: a gradient clip norm of 0.5 (now {clip:g}).",
            "Use the 'basic' optimization level: fixed weights and a longer warm-up.",
            "Steps with a spiking loss are skipped and rolled back automatically; if this "
            "keeps up, look for a broken clip in the dataset's problem list.",
        ],
        "error" if high_share >= 0.5 else "warning",
    )


def nan_streak(series: dict[str, Series], config: dict) -> Diagnosis | None:
    trouble: set[int] = set()
    for name in ("nonfinite", "guard/skipped"):
        pts = list(series.get(name) or ())
        for (step, _), inc in zip(pts, _increments([v for _, v in pts]), strict=False):
            if inc > 0:
                trouble.add(step)
    rollbacks = _increments(_values(series.get("guard/rollbacks")))
    n_rollbacks = int(sum(r for r in rollbacks if r > 0))
    length, end = _longest_streak(trouble)
    if length < NAN_STREAK and not n_rollbacks:
        return None
    parts = []
    if length >= NAN_STREAK:
        parts.append(f"{length} steps in a row had a NaN/Inf or spiking loss (up to step {end})")
    if n_rollbacks:
        parts.append(f"{n_rollbacks} rollback(s) to the last good checkpoint")
    return Diagnosis(
        "nan_streak",
        "NaN / Inf losses",
        "; ".join(parts),
        [
            "Use the 'basic' optimization level (the old system's NaN report: it alone "
            "trained without a NaN).",
            "Lower the learning rate and keep the mel weight near 2.5; clip at 0.5.",
            "Keep the batch small for the model size (8-16 for 'tiny').",
            "The guard skips these steps and never clamps the loss: if streaks continue, a "
            "bad utterance is the usual cause; check the dataset's problems.",
        ],
        "error",
    )


def input_bound(series: dict[str, Series], config: dict) -> Diagnosis | None:
    shares = _values(series.get("data_wait_share"))[-200:]
    if len(shares) < INPUT_BOUND_MIN_STEPS:
        return None
    share = statistics.median(shares)
    if share < INPUT_BOUND_SHARE:
        return None
    workers = config.get("num_workers", 0)
    return Diagnosis(
        "input_bound",
        "Input-bound steps",
        f"steps spend {share:.0%} of their time waiting for the next batch",
        [
            f"Load batches in parallel: raise num_workers (now {workers}) to 2-4 per GPU.",
            "Keep the feature cache on a local disk, not a network share.",
            "The GPU idles while it waits (the old system's '90% -> 5%' pattern): a bigger "
            "model or batch will not make this run slower, only use the GPU better.",
        ],
    )


CHECKS = (nan_streak, exploding_gradients, plateau, input_bound)


def diagnose(series: dict[str, Series], config: dict) -> list[Diagnosis]:
    """Every pattern found in `series` (metric name -> [(step, value)], oldest first)."""
    found = []
    for check in CHECKS:
        d = check(series, config)
        if d is not None:
            found.append(d)
    return found
