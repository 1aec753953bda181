"""Guarding the optimiser step: skip bad steps, ask for a rollback after too many.

The loss value is never clamped (a clamped loss has no gradient: it hides the problem and
stops learning). Instead the trainer asks `StepGuard.check(loss, grad_norm)` after backward
and before `optimizer.step()`:

- a NaN/Inf loss or gradient norm, or a loss above `spike_threshold` x its running average,
  skips the step (zero the gradients, do not step the optimiser or scheduler);
- `max_consecutive_skips` skips in a row mean the weights themselves are broken (say, by a
  learning-rate spike): the verdict asks the trainer to roll back to the last good checkpoint
  and lower the learning rate.

Skipped losses never enter the running average, so a burst of spikes cannot raise the bar
for the next one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    skip: bool
    reason: str | None = None
    rollback: bool = False


def _to_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


class StepGuard:
    """Decides per optimiser step whether to apply it, skip it, or roll back.

    On a rollback the trainer restores model, optimiser and scheduler from the checkpoint and
    this guard's running loss with them (the bar the restored weights are judged by); the
    counters stay, they are the run's history, and the verdict already cleared the run of
    consecutive skips.
    """

    def __init__(self, spike_threshold: float = 2.0, max_consecutive_skips: int = 5, smoothing=0.1):
        if spike_threshold <= 1:
            raise ValueError(f"spike_threshold must be above 1, got {spike_threshold:g}")
        if max_consecutive_skips < 1:
            raise ValueError("max_consecutive_skips must be at least 1")
        if not (0 < smoothing <= 1):
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing:g}")
        self.spike_threshold = float(spike_threshold)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.smoothing = float(smoothing)
        self.running_loss: float | None = None
        self.steps = 0
        self.applied = 0
        self.skipped = 0
        self.rollbacks = 0
        self.non_finite_losses = 0
        self.non_finite_grad_norms = 0
        self.spikes = 0
        self.consecutive_skips = 0

    def check(self, loss, grad_norm=None) -> Verdict:
        """Judge one step from its loss and its gradient norm (before clipping)."""
        loss = _to_float(loss)
        grad = None if grad_norm is None else _to_float(grad_norm)
        self.steps += 1
        reason = None
        if not math.isfinite(loss):
            self.non_finite_losses += 1
            reason = f"non-finite loss ({loss})"
        elif grad is not None and not math.isfinite(grad):
            self.non_finite_grad_norms += 1
            reason = f"non-finite gradient norm ({grad})"
        elif (
            self.running_loss is not None
            and self.running_loss > 0
            and loss > self.spike_threshold * self.running_loss
        ):
            self.spikes += 1
            reason = (
                f"loss spike: {loss:.4g} is {loss / self.running_loss:.1f}x the running "
                f"average {self.running_loss:.4g} (limit {self.spike_threshold:g}x)"
            )

        if reason is None:
            self.applied += 1
            self.consecutive_skips = 0
            a = self.smoothing
            self.running_loss = (
                loss if self.running_loss is None else (1 - a) * self.running_loss + a * loss
            )
            return Verdict(skip=False)

        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            self.rollbacks += 1
            self.consecutive_skips = 0
            return Verdict(
                skip=True,
                reason=f"{reason}; {self.max_consecutive_skips} bad steps in a row, rolling back",
                rollback=True,
            )
        return Verdict(skip=True, reason=reason)

    def metrics(self) -> dict:
        return {**self.state_dict(), "running_loss": self.running_loss or 0.0}

    def state_dict(self) -> dict:
        return {
            "running_loss": self.running_loss,
            "steps": self.steps,
            "applied": self.applied,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "non_finite_losses": self.non_finite_losses,
            "non_finite_grad_norms": self.non_finite_grad_norms,
            "spikes": self.spikes,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict) -> None:
        self.running_loss = state["running_loss"]
        for name in (
            "steps",
            "applied",
            "skipped",
            "rollbacks",
            "non_finite_losses",
            "non_finite_grad_norms",
            "spikes",
            "consecutive_skips",
        ):
            setattr(self, name, int(state[name]))
