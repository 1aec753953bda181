"""Loss components of the model and the weights that combine them.

The component functions take the model's output dict (see `training.model`) and return a
0-d float32 tensor. None of them clamps its value: a non-finite loss must stay visible so
the step guard can skip the step (DESIGN.md, "The loss, and why it cannot blow up").

`StableAdaptiveWeights` is the conservative controller of the mel weight carried over from
the old system's refactor (seeds/stable-adaptive-weights.md); `TTSLoss` weights the
components with it and the fixed weights of the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

import torch
import torch.nn.functional as F

from training.config import SAFE_RANGES, check_safe

COMPONENTS = ("mel", "duration", "pitch", "energy", "align", "bin")

# A recent loss within +/-5 % of its running average is batch noise, not a trend.
LOSS_RATIO_DEAD_BAND = 0.05
# Gradient norms count as growing when they rise consistently across the window (Kendall's tau
# of norm against time above GRADIENT_TREND_TAU) and the newer half's median is
# GRADIENT_GROWTH_MARGIN above the older half's. A plain comparison of the halves' means fired
# on noise: replayed on a healthy 1300-step tiny run (falling norms, one batch in a few far
# above the rest) it lowered the weight 13 times, 2.5 -> 1.28. For 20 noisy but flat values
# tau has a standard deviation of 0.16, so 0.5 is three of them; the same replay makes no change.
GRADIENT_TREND_TAU = 0.5
GRADIENT_GROWTH_MARGIN = 0.1
# Weight changes are relative; this absorbs float rounding of w * 1.05 in the 5 % check.
CHANGE_TOLERANCE = 1e-9
# The decision log goes into every checkpoint; the newest entries are the ones anyone reads.
MAX_DECISIONS = 1000


def _to_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


class StableAdaptiveWeights:
    """Adapts one loss weight slowly, only when training is calm, and never out of range.

    Call `step(loss, gradient_norm)` once per optimiser step with the unweighted loss of the
    component this weight scales; it returns the weight to use next. A change needs all of:
    past `warmup_steps`, `cooling_period` steps since the last decision, `min_stable_steps`
    consecutive stable steps (finite, no loss or gradient spike) and a variance of the recent
    losses under `variance_threshold`. The change is then +/-`max_change_percent`:

    - a gradient norm above `gradient_norm_threshold` or growing: lower (never raise);
    - the recent loss above its running average, gradients stable: raise;
    - the recent loss below its running average: lower.

    Each proposal is validated (finite, in range, at most the allowed change, no spike of the
    weighted loss) and applied or rejected; both are logged in `decisions`. A rejected proposal
    starts the cooling period too, so a weight sitting at its bound does not log every step.
    A NaN/Inf loss or gradient norm changes neither weight nor statistics; it is counted and
    ends the run of stable steps (a step that produced NaN is not a stable one).
    """

    def __init__(
        self,
        base_weight: float = 2.5,
        min_weight: float = 1.0,
        max_weight: float = 5.0,
        max_change_percent: float = 0.05,
        cooling_period: int = 50,
        min_stable_steps: int = 10,
        warmup_steps: int = 100,
        variance_threshold: float = 0.5,
        smoothing_factor: float = 0.1,
        spike_threshold: float = 2.0,
        gradient_norm_threshold: float = 5.0,
    ):
        numbers = (base_weight, min_weight, max_weight, max_change_percent, variance_threshold)
        if not all(math.isfinite(float(v)) for v in numbers):
            raise ValueError("weights and thresholds must be finite")
        if not (0 < min_weight <= base_weight <= max_weight):
            raise ValueError(
                f"need 0 < min_weight <= base_weight <= max_weight, got "
                f"{min_weight:g} <= {base_weight:g} <= {max_weight:g}"
            )
        if not (0 < max_change_percent < 1):
            raise ValueError(f"max_change_percent must be in (0, 1), got {max_change_percent:g}")
        if not (0 < smoothing_factor <= 1):
            raise ValueError(f"smoothing_factor must be in (0, 1], got {smoothing_factor:g}")
        if spike_threshold <= 1:
            raise ValueError(f"spike_threshold must be above 1, got {spike_threshold:g}")
        if min(cooling_period, min_stable_steps, warmup_steps) < 0:
            raise ValueError("cooling_period, min_stable_steps and warmup_steps must be >= 0")
        self.base_weight = float(base_weight)
        self.min_weight = float(min_weight)
        self.max_weight = float(max_weight)
        self.max_change_percent = float(max_change_percent)
        self.cooling_period = int(cooling_period)
        self.min_stable_steps = int(min_stable_steps)
        self.warmup_steps = int(warmup_steps)
        self.variance_threshold = float(variance_threshold)
        self.smoothing_factor = float(smoothing_factor)
        self.spike_threshold = float(spike_threshold)
        self.gradient_norm_threshold = float(gradient_norm_threshold)
        # Long enough for a variance and a gradient trend, short enough to forget a spike.
        self.window = max(2 * self.min_stable_steps, 20)

        self.weight = self.base_weight
        self.previous_weight = self.base_weight
        self.enabled = True
        self.decisions: list[dict] = []
        self.decisions_total = 0
        self.reset()

    # ------------------------------------------------------------------ control

    def reset(self) -> None:
        """Clear every statistic and counter; warm-up starts again. Weight and on/off survive."""
        self.step_count = 0
        self.running_loss: float | None = None
        self.losses: deque[float] = deque(maxlen=self.window)
        self.grad_norms: deque[float] = deque(maxlen=self.window)
        self.avg_gradient_norm: float | None = None
        self.consecutive_stable_steps = 0
        self.steps_since_change = 0
        self.last_decision_step: int | None = None
        self.last_change_step: int | None = None
        self.non_finite_losses = 0
        self.non_finite_grad_norms = 0
        self.spikes = 0
        self.changes = 0
        self.rejections = 0

    def disable(self) -> None:
        """Return to the base weight and hold it there until enable()."""
        old = self.weight
        self.enabled = False
        self._set_weight(self.base_weight)
        self._log(old, self.weight, "adaptation disabled: back to the base weight", True)

    def enable(self) -> None:
        if self.enabled:
            return
        self.enabled = True
        self._log(self.weight, self.weight, "adaptation enabled", True)

    # ------------------------------------------------------------------ the step

    def step(self, loss, gradient_norm=None) -> float:
        """Feed one optimiser step's loss (and gradient norm); return the weight to use next."""
        loss = _to_float(loss)
        grad = None if gradient_norm is None else _to_float(gradient_norm)
        self.step_count += 1
        self.steps_since_change += 1

        if not math.isfinite(loss):
            self.non_finite_losses += 1
            self.consecutive_stable_steps = 0
            return self.weight
        if grad is not None and not math.isfinite(grad):
            self.non_finite_grad_norms += 1
            self.consecutive_stable_steps = 0
            return self.weight

        running = self.running_loss
        loss_spike = running is not None and running > 0 and loss > self.spike_threshold * running
        avg_grad = self.avg_gradient_norm
        grad_spike = (
            grad is not None
            and avg_grad is not None
            and avg_grad > 0
            and grad > self.spike_threshold * avg_grad
        )
        self._update_statistics(loss, grad, loss_spike, grad_spike)
        if loss_spike:
            self.spikes += 1
        stable = not (loss_spike or grad_spike)
        self.consecutive_stable_steps = self.consecutive_stable_steps + 1 if stable else 0

        if self._may_change():
            direction, reason = self._direction(grad)
            if direction:
                self._propose(direction, reason, loss)
        return self.weight

    def _capped_average(self, average: float | None, value: float, spike: bool) -> float:
        """Exponential average in which a spike counts only up to the spike level.

        One outlier must not drag the average for a hundred steps, yet a lasting level shift
        still moves it. The loss used for training is never touched; this is only the statistic.
        """
        if average is None:
            return value
        seen = min(value, self.spike_threshold * average) if spike else value
        return (1 - self.smoothing_factor) * average + self.smoothing_factor * seen

    def _update_statistics(self, loss, grad, loss_spike, grad_spike) -> None:
        self.losses.append(loss)
        self.running_loss = self._capped_average(self.running_loss, loss, loss_spike)
        if grad is None:
            return
        self.grad_norms.append(grad)
        self.avg_gradient_norm = self._capped_average(self.avg_gradient_norm, grad, grad_spike)

    def _may_change(self) -> bool:
        if not self.enabled or self.step_count <= self.warmup_steps:
            return False
        if (
            self.last_decision_step is not None
            and self.step_count - self.last_decision_step < self.cooling_period
        ):
            return False
        if self.consecutive_stable_steps < self.min_stable_steps:
            return False
        if len(self.losses) < max(self.min_stable_steps, 2):
            return False
        return self.loss_variance < self.variance_threshold

    def _direction(self, grad: float | None) -> tuple[int, str]:
        if grad is not None and grad > self.gradient_norm_threshold:
            return (
                -1,
                f"gradient norm {grad:.3g} above its threshold {self.gradient_norm_threshold:g}",
            )
        if self.gradients_growing:
            return -1, "gradient norm growing"
        ratio = self.loss_ratio
        if ratio > 1 + LOSS_RATIO_DEAD_BAND:
            return +1, f"recent loss {ratio:.3f}x its running average, gradients stable"
        if ratio < 1 - LOSS_RATIO_DEAD_BAND:
            return -1, f"recent loss {ratio:.3f}x its running average"
        return 0, ""

    def _propose(self, direction: int, reason: str, loss: float) -> None:
        old = self.weight
        new = old * (1 + direction * self.max_change_percent)
        problem = self.validate(new, loss)
        self.last_decision_step = self.step_count
        if problem is None:
            self.previous_weight = old
            self._set_weight(new)
            self.steps_since_change = 0
            self.last_change_step = self.step_count
            self.changes += 1
            self._log(old, new, reason, True)
        else:
            # Rolled back: the proposal never becomes the weight.
            self.rejections += 1
            self._log(old, new, f"{reason}; rejected: {problem}", False)

    def validate(self, new_weight: float, loss: float | None = None) -> str | None:
        """Why `new_weight` may not replace the current weight, or None if it may."""
        if not math.isfinite(new_weight):
            return "new weight is not finite"
        if not (self.min_weight <= new_weight <= self.max_weight):
            return f"{new_weight:.4g} is outside {self.min_weight:g}-{self.max_weight:g}"
        change = abs(new_weight - self.weight) / self.weight
        if change > self.max_change_percent + CHANGE_TOLERANCE:
            return f"a {change:.1%} change is more than {self.max_change_percent:.0%}"
        if loss is not None and self.running_loss is not None and self.running_loss > 0:
            weighted, usual = new_weight * loss, self.weight * self.running_loss
            if not math.isfinite(weighted) or weighted > self.spike_threshold * usual:
                return "the weighted loss would spike"
        return None

    def _set_weight(self, value: float) -> None:
        # The last line of defence: whatever happens above, the weight stays finite and in range.
        if not math.isfinite(value):
            value = self.base_weight
        self.weight = min(max(float(value), self.min_weight), self.max_weight)

    def _log(self, old: float, new: float, reason: str, applied: bool) -> None:
        self.decisions.append(
            {
                "step": self.step_count,
                "old": float(old),
                "new": float(new),
                "reason": reason,
                "applied": bool(applied),
            }
        )
        self.decisions_total += 1
        del self.decisions[:-MAX_DECISIONS]

    # ------------------------------------------------------------------ statistics

    @property
    def loss_variance(self) -> float:
        n = len(self.losses)
        if n < 2:
            return 0.0
        mean = sum(self.losses) / n
        return sum((x - mean) ** 2 for x in self.losses) / (n - 1)

    @property
    def loss_ratio(self) -> float:
        """Mean of the last `min_stable_steps` losses over the running average (1.0 if unknown)."""
        if not self.losses or not self.running_loss or self.running_loss <= 0:
            return 1.0
        recent = list(self.losses)[-max(self.min_stable_steps, 1) :]
        return (sum(recent) / len(recent)) / self.running_loss

    @property
    def gradients_growing(self) -> bool:
        n = len(self.grad_norms)
        if n < max(self.min_stable_steps, 4):
            return False
        norms = list(self.grad_norms)
        concordance = sum(
            (norms[j] > norms[i]) - (norms[j] < norms[i]) for i in range(n) for j in range(i + 1, n)
        )
        tau = concordance / (n * (n - 1) / 2)
        older, newer = sorted(norms[: n // 2]), sorted(norms[n // 2 :])
        return (
            tau > GRADIENT_TREND_TAU
            and newer[len(newer) // 2] > (1 + GRADIENT_GROWTH_MARGIN) * older[len(older) // 2]
        )

    def metrics(self) -> dict:
        """Plain numbers for logging; unknown averages read 0.0."""
        variance = self.loss_variance
        return {
            "weight": self.weight,
            "previous_weight": self.previous_weight,
            "base_weight": self.base_weight,
            "min_weight": self.min_weight,
            "max_weight": self.max_weight,
            "enabled": self.enabled,
            "step_count": self.step_count,
            "running_loss": self.running_loss or 0.0,
            "loss_variance": variance,
            "loss_stability_score": 1.0 / (1.0 + variance),
            "avg_gradient_norm": self.avg_gradient_norm or 0.0,
            "consecutive_stable_steps": self.consecutive_stable_steps,
            "steps_since_weight_change": self.steps_since_change,
            "non_finite_losses": self.non_finite_losses,
            "non_finite_grad_norms": self.non_finite_grad_norms,
            "spikes": self.spikes,
            "changes": self.changes,
            "rejections": self.rejections,
        }

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {
            "weight": self.weight,
            "previous_weight": self.previous_weight,
            "base_weight": self.base_weight,
            "enabled": self.enabled,
            "step_count": self.step_count,
            "running_loss": self.running_loss,
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "avg_gradient_norm": self.avg_gradient_norm,
            "consecutive_stable_steps": self.consecutive_stable_steps,
            "steps_since_change": self.steps_since_change,
            "last_decision_step": self.last_decision_step,
            "last_change_step": self.last_change_step,
            "non_finite_losses": self.non_finite_losses,
            "non_finite_grad_norms": self.non_finite_grad_norms,
            "spikes": self.spikes,
            "changes": self.changes,
            "rejections": self.rejections,
            "decisions": [dict(d) for d in self.decisions],
            "decisions_total": self.decisions_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.enabled = bool(state["enabled"])
        self.step_count = int(state["step_count"])
        self.running_loss = state["running_loss"]
        self.losses.extend(float(x) for x in state["losses"])
        self.grad_norms.extend(float(x) for x in state["grad_norms"])
        self.avg_gradient_norm = state["avg_gradient_norm"]
        self.consecutive_stable_steps = int(state["consecutive_stable_steps"])
        self.steps_since_change = int(state["steps_since_change"])
        self.last_decision_step = state["last_decision_step"]
        self.last_change_step = state["last_change_step"]
        for name in (
            "non_finite_losses",
            "non_finite_grad_norms",
            "spikes",
            "changes",
            "rejections",
        ):
            setattr(self, name, int(state[name]))
        self.decisions = [dict(d) for d in state["decisions"]][-MAX_DECISIONS:]
        self.decisions_total = int(state["decisions_total"])
        # A checkpoint written under another config may hold a weight outside today's range;
        # the range of the config wins.
        self.previous_weight = float(state["previous_weight"])
        weight = float(state["weight"])
        if not self.enabled:
            weight = self.base_weight
        self._set_weight(weight)


# ---------------------------------------------------------------------- components


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where on the difference, not a multiply after squaring: NaN * 0 is NaN, and padding must
    # leak neither into the loss nor, through the backward of the square, into the gradient.
    diff = torch.where(mask, pred.float() - target.float(), torch.zeros((), device=pred.device))
    return diff.pow(2).sum() / mask.sum().clamp_min(1)


def mel_loss(out: dict) -> torch.Tensor:
    """L1 between predicted and target log-mel over the valid frames."""
    pred, target = out["mel_pred"].float(), out["mel_target"].float()
    mask = out["mel_mask"].bool().unsqueeze(1).expand_as(pred)
    diff = torch.where(mask, pred - target, torch.zeros((), device=pred.device))
    return diff.abs().sum() / mask.sum().clamp_min(1)


def duration_loss(out: dict) -> torch.Tensor:
    """MSE of the predicted log(1 + frames) against the durations from alignment search."""
    target = torch.log1p(out["dur_target"].float())
    return _masked_mse(out["log_dur_pred"], target, out["text_mask"].bool())


def pitch_loss(out: dict) -> torch.Tensor:
    """MSE of the normalised pitch per token over the valid tokens."""
    return _masked_mse(out["pitch_pred"], out["pitch_target"], out["text_mask"].bool())


def energy_loss(out: dict) -> torch.Tensor:
    """MSE of the normalised energy per token over the valid tokens."""
    return _masked_mse(out["energy_pred"], out["energy_target"], out["text_mask"].bool())


def forward_sum_loss(out: dict, blank_logprob: float = -1.0) -> torch.Tensor:
    """RAD-TTS forward-sum: -log of the total probability of all monotonic alignments.

    CTC over the attention log-probs, each frame emitting a token in order, with an extra
    blank class so a frame may also belong to no token. Averaged per token and over the batch.
    """
    logp = out["attn_logprob"].float().squeeze(1)  # [B, T, L]
    batch, _, n_tokens = logp.shape
    text_mask = out["text_mask"].bool()
    logp = F.pad(logp, (1, 0), value=blank_logprob)  # class 0 is the blank
    valid = F.pad(text_mask, (1, 0), value=True).unsqueeze(1)
    # A large finite value rather than -inf: CTC's backward turns -inf inputs into NaN.
    logp = logp.masked_fill(~valid, -1e4).log_softmax(dim=-1)
    targets = torch.arange(1, n_tokens + 1, device=logp.device).expand(batch, n_tokens)
    return F.ctc_loss(
        logp.transpose(0, 1),  # [T, B, C]
        targets,
        input_lengths=out["mel_lens"].long(),
        target_lengths=out["token_lens"].long(),
        blank=0,
        reduction="mean",
        # A clip with fewer frames than tokens has no monotonic alignment at all: its loss is
        # infinite by definition, not by instability, so it adds nothing instead of poisoning
        # the batch. NaN (real trouble) is not touched by this and still reaches the guard.
        zero_infinity=True,
    )


def bin_loss(out: dict) -> torch.Tensor:
    """Binarisation: pull the soft attention towards the hard alignment, -sum(hard log soft)/sum(hard)."""
    hard = out["attn_hard"].float()
    # The floor keeps log(0) out of frames the hard path does not use; where it uses one, a
    # zero soft probability is a real (large) loss and stays one.
    log_soft = torch.log(out["attn_soft"].float().clamp_min(1e-12))
    selected = torch.where(hard > 0, hard * log_soft, torch.zeros_like(log_soft))
    return -selected.sum() / hard.sum().clamp_min(1)


COMPONENT_FUNCTIONS = {
    "mel": mel_loss,
    "duration": duration_loss,
    "pitch": pitch_loss,
    "energy": energy_loss,
    "align": forward_sum_loss,
    "bin": bin_loss,
}


# ---------------------------------------------------------------------- the loss


class TTSLoss:
    """Weighted sum of the components; the mel weight comes from StableAdaptiveWeights.

    Keyword names and defaults are the old system's, so `TTSLoss(mel_loss_weight=2.5,
    use_adaptive_weights=True)` alone works. `kl_loss_weight` is accepted and kept because the
    safe-range table and stored configs carry it, but this model has no variational part, so
    no KL term exists and the weight is unused.

    Weights outside the safe ranges of training.config raise UnsafeConfig: code that builds a
    loss directly is held to the same table as the studio's forms.

    Per optimiser step the trainer calls `loss_fn(outputs)` once per micro-batch, then, after
    backward, `observe(total_loss, gradient_norm)` once. Only losses computed with gradients
    enabled feed the controller, so validation passes never move the weight.
    """

    def __init__(
        self,
        mel_loss_weight: float = 2.5,
        kl_loss_weight: float = 1.0,
        duration_loss_weight: float = 1.0,
        pitch_loss_weight: float = 0.1,
        energy_loss_weight: float = 0.1,
        align_loss_weight: float = 1.0,
        bin_loss_weight: float = 0.1,
        use_adaptive_weights: bool = True,
        loss_smoothing_factor: float = 0.1,
        max_loss_spike_threshold: float = 2.0,
        gradient_norm_threshold: float = 5.0,
        adaptive_weight_max_change_percent: float = 0.05,
        adaptive_weight_cooling_period: int = 50,
        adaptive_weight_min_stable_steps: int = 10,
        adaptive_weight_min_warmup_steps: int = 100,
        adaptive_weight_variance_threshold: float = 0.5,
    ):
        # The last layer that refuses the old mel_loss_weight=35: a run built in code is checked
        # against the same table as one built in the studio.
        check_safe(
            {
                "mel_loss_weight": mel_loss_weight,
                "kl_loss_weight": kl_loss_weight,
                "duration_loss_weight": duration_loss_weight,
                "pitch_loss_weight": pitch_loss_weight,
                "energy_loss_weight": energy_loss_weight,
                "align_loss_weight": align_loss_weight,
                "bin_loss_weight": bin_loss_weight,
            }
        )
        low, high = SAFE_RANGES["mel_loss_weight"]
        self.mel_loss_weight = float(mel_loss_weight)
        self.kl_loss_weight = float(kl_loss_weight)  # no KL term in this model; see docstring
        self.fixed_weights = {
            "duration": float(duration_loss_weight),
            "pitch": float(pitch_loss_weight),
            "energy": float(energy_loss_weight),
            "align": float(align_loss_weight),
            "bin": float(bin_loss_weight),
        }
        self.smoothing = float(loss_smoothing_factor)
        self.controller = StableAdaptiveWeights(
            base_weight=mel_loss_weight,
            min_weight=low,
            max_weight=high,
            max_change_percent=adaptive_weight_max_change_percent,
            cooling_period=adaptive_weight_cooling_period,
            min_stable_steps=adaptive_weight_min_stable_steps,
            warmup_steps=adaptive_weight_min_warmup_steps,
            variance_threshold=adaptive_weight_variance_threshold,
            smoothing_factor=loss_smoothing_factor,
            spike_threshold=max_loss_spike_threshold,
            gradient_norm_threshold=gradient_norm_threshold,
        )
        if not use_adaptive_weights:
            self.controller.enabled = False
        self.running_total_loss: float | None = None
        self._pending_mel: list[torch.Tensor] = []
        self._decisions_seen = 0

    @classmethod
    def from_config(cls, loss_config) -> TTSLoss:
        """From a training.config.LossConfig."""
        return cls(**dataclasses.asdict(loss_config))

    @property
    def weights(self) -> dict[str, float]:
        return {"mel": self.controller.weight, **self.fixed_weights}

    def __call__(self, outputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components = {name: fn(outputs) for name, fn in COMPONENT_FUNCTIONS.items()}
        weights = self.weights
        total = sum(weights[name] * value for name, value in components.items())
        if torch.is_grad_enabled() and components["mel"].requires_grad:
            # Kept as a tensor: reading it now would make the GPU wait before backward.
            self._pending_mel.append(components["mel"].detach())
        return total, components

    def observe(self, total_loss, gradient_norm=None) -> float:
        """Feed one optimiser step to the controller; returns the mel weight for the next step."""
        total = _to_float(total_loss)
        pending, self._pending_mel = self._pending_mel, []
        # With gradient accumulation, the step's mel loss is the mean of its micro-batches;
        # one NaN among them makes the whole step non-finite, as it did for the gradient.
        mel = float(torch.stack(pending).float().mean()) if pending else float("nan")
        if math.isfinite(total):
            if self.running_total_loss is None:
                self.running_total_loss = total
            else:
                a = self.smoothing
                self.running_total_loss = (1 - a) * self.running_total_loss + a * total
        return self.controller.step(mel, gradient_norm)

    def new_decisions(self) -> list[dict]:
        """Controller decisions made since the last call (for the trainer's event stream)."""
        total = self.controller.decisions_total
        fresh = min(total - self._decisions_seen, len(self.controller.decisions))
        self._decisions_seen = total
        return [dict(d) for d in self.controller.decisions[-fresh:]] if fresh > 0 else []

    # --------------------------------------------------- the old system's method names

    def get_stability_metrics(self) -> dict:
        m = self.controller.metrics()
        return {
            "running_mel_loss": m["running_loss"],
            "running_total_loss": self.running_total_loss or 0.0,
            "loss_variance": m["loss_variance"],
            "loss_stability_score": m["loss_stability_score"],
            "step_count": m["step_count"],
        }

    def get_adaptive_weight_metrics(self) -> dict:
        m = self.controller.metrics()
        return {
            "current_mel_weight": m["weight"],
            "previous_mel_weight": m["previous_weight"],
            "base_mel_weight": m["base_weight"],
            "steps_since_weight_change": m["steps_since_weight_change"],
            "consecutive_stable_steps": m["consecutive_stable_steps"],
            "weight_adjustment_enabled": m["enabled"],
            "avg_gradient_norm": m["avg_gradient_norm"],
        }

    def disable_adaptive_weights(self) -> None:
        self.controller.disable()

    def enable_adaptive_weights(self) -> None:
        self.controller.enable()

    def reset_stability_state(self) -> None:
        self.controller.reset()
        self.running_total_loss = None
        self._pending_mel = []

    # --------------------------------------------------- checkpoint

    def state_dict(self) -> dict:
        return {
            "controller": self.controller.state_dict(),
            "running_total_loss": self.running_total_loss,
        }

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.running_total_loss = state["running_total_loss"]
        self._pending_mel = []
        # Decisions restored from a checkpoint were already reported before it was written.
        self._decisions_seen = self.controller.decisions_total
