"""Training configuration: dataclasses, model-size presets and the one table of safe ranges.

The safe-range table is the single source of truth: the Django model, the forms, the admin,
the Celery task and the adaptive controller all read it, so a bad value is refused the same
way everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# (low, high) for every setting whose bad value is known to wreck training, and why.
# "name.size" entries narrow a field for one model size; "name" alone is the envelope used
# when the size is unknown (and what a form shows before a size is picked).
SAFE_RANGES: dict[str, tuple[float, float]] = {
    "mel_loss_weight": (1.0, 5.0),
    "kl_loss_weight": (0.5, 2.0),
    "duration_loss_weight": (0.1, 2.0),
    "pitch_loss_weight": (0.01, 1.0),
    "energy_loss_weight": (0.01, 1.0),
    "align_loss_weight": (0.1, 2.0),
    "bin_loss_weight": (0.0, 1.0),
    "grad_clip_norm": (0.1, 5.0),
    "learning_rate": (1e-5, 2e-2),
    "learning_rate.tiny": (1e-5, 2e-2),
    "learning_rate.small": (1e-5, 5e-3),
    "learning_rate.normal": (1e-5, 2e-3),
    "learning_rate.big": (1e-5, 1e-3),
}

SAFE_RANGE_REASONS: dict[str, str] = {
    "mel_loss_weight": "35-45 in the old system made the loss three digits; 2.5 is the tested default.",
    "kl_loss_weight": "the old system's tested band; kept for stored configs, this model has no KL term.",
    "duration_loss_weight": "log-duration MSE is O(1); above 2 it overpowers the mel term.",
    "pitch_loss_weight": "normalised pitch MSE; large weights pull capacity away from the mel.",
    "energy_loss_weight": "normalised energy MSE; same reasoning as pitch.",
    "align_loss_weight": "forward-sum is O(1) per frame; too low and the aligner never converges.",
    "bin_loss_weight": "binarisation only sharpens an already-learned alignment.",
    "grad_clip_norm": "below 0.1 learning stalls; above 5 one bad batch can undo an epoch.",
    "learning_rate": "below 1e-5 nothing moves; the upper end is tiny's, each larger size has less.",
    "learning_rate.tiny": "dev-en-8spk, 300 steps, val mel: 0.96 at 1e-3, 0.74 at 5e-3, 0.75 at 2e-2, 1.05 at 5e-2.",
    "learning_rate.small": "deeper stacks amplify each update; a cautious 4x under tiny until measured on a GPU.",
    "learning_rate.normal": "FastPitch-sized; FastSpeech-style models of this width peak near 1e-3.",
    "learning_rate.big": "the largest model needs the gentlest steps; half of normal's limit.",
}


def safe_range(name: str, size: str | None = None) -> tuple[float, float]:
    """The range for `name`, narrowed to the model size where the table has an entry for it."""
    return SAFE_RANGES.get(f"{name}.{size}", SAFE_RANGES[name]) if size else SAFE_RANGES[name]


class UnsafeConfig(ValueError):
    """A configuration with values outside SAFE_RANGES; the message names each and its range."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()))


def range_text(name: str, size: str | None = None) -> str:
    low, high = safe_range(name, size)
    where = f" for the '{size}' model" if size and f"{name}.{size}" in SAFE_RANGES else ""
    return f"safe range {low:g}-{high:g}{where}"


def check_safe(values: dict) -> None:
    """Raise UnsafeConfig naming every field in `values` outside its safe range.

    A "size" in `values` selects the per-size ranges (the learning rate); problems are keyed
    by the field name either way, so forms can put the message beside the field.
    """
    problems = {}
    size = values.get("size")
    size = size if isinstance(size, str) else None
    for name in SAFE_RANGES:
        if "." in name or name not in values or values[name] is None:
            continue
        low, high = safe_range(name, size)
        try:
            v = float(values[name])
        except (TypeError, ValueError):
            problems[name] = f"{values[name]!r} is not a number ({range_text(name, size)})"
            continue
        if not (low <= v <= high):  # also false for NaN
            problems[name] = f"{v:g} is outside the {range_text(name, size)}"
    if problems:
        raise UnsafeConfig(problems)


# Recommended batch range per model size; outside it is a warning, not an error.
BATCH_RANGES: dict[str, tuple[int, int]] = {
    "tiny": (8, 16),
    "small": (16, 32),
    "normal": (32, 64),
    "big": (16, 32),
}


def batch_warning(size: str, batch_size: int) -> str | None:
    low, high = BATCH_RANGES[size]
    if low <= batch_size <= high:
        return None
    return f"batch size {batch_size} is outside the recommended {low}-{high} for the '{size}' model"


@dataclass
class LossConfig:
    mel_loss_weight: float = 2.5
    kl_loss_weight: float = 1.0
    duration_loss_weight: float = 1.0
    pitch_loss_weight: float = 0.1
    energy_loss_weight: float = 0.1
    align_loss_weight: float = 1.0
    bin_loss_weight: float = 0.1
    # The binarisation term pulls the soft attention towards the hard path; before the aligner
    # has found the diagonal it only locks in its first guesses (RAD-TTS turns it on late). It
    # is off for this many steps, then ramps linearly to its full weight over the next ones.
    bin_loss_start_step: int = 200
    bin_loss_ramp_steps: int = 300
    use_adaptive_weights: bool = True
    loss_smoothing_factor: float = 0.1
    max_loss_spike_threshold: float = 2.0
    gradient_norm_threshold: float = 5.0
    adaptive_weight_max_change_percent: float = 0.05
    adaptive_weight_cooling_period: int = 50
    adaptive_weight_min_stable_steps: int = 10
    adaptive_weight_min_warmup_steps: int = 100
    adaptive_weight_variance_threshold: float = 0.5


@dataclass
class TrainConfig:
    size: str = "tiny"
    batch_size: int = 16
    steps: int = 1000
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1
    eval_every: int = 100
    checkpoint_every: int = 200
    log_every: int = 1
    keep_last: int = 3
    seed: int = 1234
    optimization_level: str = "basic"
    compile: bool = False
    device: str = "auto"
    num_workers: int = 0
    # Guarding the step: consecutive skipped steps before rolling back to the last good checkpoint.
    max_consecutive_skips: int = 5
    rollback_lr_factor: float = 0.5
    # Rollbacks that did not cure a run: past this many it fails with the reason instead of
    # walking back further with an ever smaller learning rate.
    max_rollbacks: int = 4
    # plateau_breaker: no relative improvement of min_delta in the validation loss over
    # `plateau_patience` evals restarts the LR schedule (see PlateauDetector).
    plateau_patience: int = 3
    plateau_min_delta: float = 0.005
    # Speakers whose utterances never enter a training or validation batch, so cloning them
    # measures how the model follows a voice it never heard (synthesis.cloning).
    held_out_speakers: list[str] = field(default_factory=list)
    # Exponential moving average of the weights, saved in each checkpoint and used for
    # synthesis: steadier voices than the last step's weights. 0 turns it off. The decay ramps
    # up from 0.1 ((1 + n) / (10 + n) after n updates) so a short run is not stuck near init.
    ema_decay: float = 0.999
    # Parameters a fine-tune leaves as they are: those whose names start with one of these
    # prefixes (e.g. "embed", "encoder": the text side), except the speaker-conditioning ones
    # ("speaker", "cond" in the name), which a new voice must still move.
    freeze: list[str] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)

    def flat(self) -> dict:
        """Every field in one flat dict (loss fields included), as the studio stores it."""
        d = dataclasses.asdict(self)
        d.update(d.pop("loss"))
        return d

    @classmethod
    def from_flat(cls, values: dict) -> TrainConfig:
        """Build from a flat dict, ignoring unknown keys, so stored configs survive new fields."""
        loss_names = {f.name for f in dataclasses.fields(LossConfig)}
        top_names = {f.name for f in dataclasses.fields(cls)} - {"loss"}
        loss = LossConfig(**{k: v for k, v in values.items() if k in loss_names})
        return cls(loss=loss, **{k: v for k, v in values.items() if k in top_names})

    def check(self) -> None:
        check_safe(self.flat())


# ---------------------------------------------------------------------- presets

# The old system's level names. Each is a set of flat overrides (TrainConfig.flat() names);
# the learning rate depends on the model size as well, so it lives in LEARNING_RATES.
# The stable adaptive mel weight with the refactor's settings, and the full learning rate.
_ENHANCED: dict = {
    "lr_warmup_steps": 100,
    "grad_clip_norm": 1.0,
    "mel_loss_weight": 2.5,
    "duration_loss_weight": 1.0,
    "pitch_loss_weight": 0.1,
    "energy_loss_weight": 0.1,
    "align_loss_weight": 1.0,
    "bin_loss_weight": 0.1,
    "use_adaptive_weights": True,
    "loss_smoothing_factor": 0.1,
    "max_loss_spike_threshold": 2.0,
    "gradient_norm_threshold": 5.0,
    "adaptive_weight_max_change_percent": 0.05,
    "adaptive_weight_cooling_period": 50,
    "adaptive_weight_min_stable_steps": 10,
    "adaptive_weight_min_warmup_steps": 100,
    "adaptive_weight_variance_threshold": 0.5,
}

OPTIMIZATION_LEVELS: dict[str, dict] = {
    # Fixed weights, tight clipping, long warm-up: nothing moves that the user did not set.
    "basic": {
        "lr_warmup_steps": 200,
        "grad_clip_norm": 0.5,
        "mel_loss_weight": 2.5,
        "duration_loss_weight": 1.0,
        "pitch_loss_weight": 0.1,
        "energy_loss_weight": 0.1,
        "align_loss_weight": 1.0,
        "bin_loss_weight": 0.1,
        "use_adaptive_weights": False,
    },
    "enhanced": _ENHANCED,
    # enhanced, plus LR restarts when the validation loss stops improving.
    "plateau_breaker": {
        **_ENHANCED,
        "plateau_patience": 3,
        "plateau_min_delta": 0.005,
    },
}

# Peak learning rate per model size and level; basic runs at half the rate for a safety margin.
# tiny is measured (SAFE_RANGE_REASONS["learning_rate.tiny"]): 5e-3 is near the best val mel at
# 300 steps with 4x headroom to where it got worse. The larger sizes could not be measured on
# this project's CPU machines; theirs follow the FastSpeech 2 / FastPitch peak of about 1e-3.
LEARNING_RATES: dict[str, dict[str, float]] = {
    "tiny": {"basic": 2.5e-3, "enhanced": 5e-3, "plateau_breaker": 5e-3},
    "small": {"basic": 1e-3, "enhanced": 2e-3, "plateau_breaker": 2e-3},
    "normal": {"basic": 5e-4, "enhanced": 1e-3, "plateau_breaker": 1e-3},
    "big": {"basic": 2.5e-4, "enhanced": 5e-4, "plateau_breaker": 5e-4},
}


def preset(size: str, level: str = "enhanced") -> TrainConfig:
    """A TrainConfig for `size` at optimisation `level`, with the size's recommended batch."""
    if size not in LEARNING_RATES:
        raise ValueError(f"unknown model size {size!r}; one of {', '.join(LEARNING_RATES)}")
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(
            f"unknown optimization level {level!r}; one of {', '.join(OPTIMIZATION_LEVELS)}"
        )
    values = TrainConfig(size=size).flat()
    values.update(OPTIMIZATION_LEVELS[level])
    values.update(
        optimization_level=level,
        learning_rate=LEARNING_RATES[size][level],
        batch_size=BATCH_RANGES[size][1],
    )
    return TrainConfig.from_flat(values)


# A new voice from a few minutes: fine-tune a multi-speaker checkpoint on one speaker's 30-100
# clips. A fifth of the size's full learning rate and no adaptive weights, so a few hundred
# steps move the voice without unlearning the text side; the text encoder is frozen (its
# phoneme embeddings and blocks, not its speaker conditioning) because the text is not what
# changes, and 30 clips cannot retrain it without overfitting their few sentences. Evaluated
# and checkpointed often: on so few clips the best checkpoint comes early.
FEW_SHOT: dict = {
    "steps": 400,
    "lr_warmup_steps": 50,
    "eval_every": 50,
    "checkpoint_every": 100,
    "keep_last": 5,
    "use_adaptive_weights": False,
    "freeze": ["embed", "encoder"],
}
FEW_SHOT_CLIPS = (30, 100)


def few_shot_preset(size: str) -> TrainConfig:
    """The fine-tune preset for one new voice (FEW_SHOT), for a checkpoint of `size`."""
    values = preset(size, "basic").flat()
    values.update(FEW_SHOT)
    values.update(
        learning_rate=LEARNING_RATES[size]["enhanced"] / 5,
        batch_size=BATCH_RANGES[size][0],
    )
    return TrainConfig.from_flat(values)


class PlateauDetector:
    """Says when the validation loss has stopped improving, so the trainer restarts its LR.

    `observe(val_loss)` after each eval returns True when `patience` evals in a row failed to
    beat the best loss by `min_delta` (relative). The trainer then restarts its schedule
    (warm-up, then decay) from the current step; the count starts over, and the best loss is
    kept, so only a real improvement ends the next plateau.
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.005):
        if patience < 1:
            raise ValueError("patience must be at least 1")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.evals_since_best = 0
        self.restarts = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PlateauDetector:
        return cls(patience=cfg.plateau_patience, min_delta=cfg.plateau_min_delta)

    def observe(self, val_loss: float) -> bool:
        val_loss = float(val_loss)
        improved = math.isfinite(val_loss) and (
            self.best is None or val_loss < self.best * (1 - self.min_delta)
        )
        if improved:
            self.best = val_loss
            self.evals_since_best = 0
            return False
        self.evals_since_best += 1
        if self.evals_since_best >= self.patience:
            self.evals_since_best = 0
            self.restarts += 1
            return True
        return False

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "evals_since_best": self.evals_since_best,
            "restarts": self.restarts,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.evals_since_best = int(state["evals_since_best"])
        self.restarts = int(state["restarts"])
