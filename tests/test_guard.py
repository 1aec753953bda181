"""StepGuard: skip non-finite and spiking steps, roll back after K in a row."""

import io

import pytest
import torch

from training.guard import StepGuard, Verdict

NAN, INF = float("nan"), float("inf")


def warm(guard, n=20, loss=1.0):
    for _ in range(n):
        assert guard.check(loss, 1.0) == Verdict(skip=False)


def test_finite_calm_steps_pass():
    guard = StepGuard()
    warm(guard)
    assert guard.metrics()["applied"] == 20 and guard.metrics()["skipped"] == 0
    assert guard.running_loss == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_loss_is_skipped(bad):
    guard = StepGuard()
    warm(guard)
    verdict = guard.check(bad, 1.0)
    assert verdict.skip and not verdict.rollback
    assert "non-finite loss" in verdict.reason
    assert guard.non_finite_losses == 1


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_gradient_norm_is_skipped(bad):
    guard = StepGuard()
    warm(guard)
    verdict = guard.check(1.0, bad)
    assert verdict.skip and "gradient norm" in verdict.reason
    assert guard.non_finite_grad_norms == 1


def test_spike_over_the_threshold_is_skipped_and_below_it_passes():
    guard = StepGuard(spike_threshold=2.0)
    warm(guard)
    assert not guard.check(1.9, 1.0).skip
    guard = StepGuard(spike_threshold=2.0)
    warm(guard)
    verdict = guard.check(2.5, 1.0)
    assert verdict.skip and "spike" in verdict.reason and "2.5" in verdict.reason
    assert guard.spikes == 1


def test_first_step_has_nothing_to_spike_against():
    guard = StepGuard()
    assert not guard.check(1e4, 1.0).skip
    assert guard.running_loss == 1e4


def test_skipped_losses_never_enter_the_running_average():
    guard = StepGuard()
    warm(guard)
    before = guard.running_loss
    for bad in (NAN, 100.0, INF, 50.0):
        guard.check(bad, 1.0)
    assert guard.running_loss == before


def test_k_consecutive_skips_ask_for_a_rollback():
    guard = StepGuard(max_consecutive_skips=3)
    warm(guard)
    verdicts = [guard.check(NAN, 1.0) for _ in range(3)]
    assert [v.rollback for v in verdicts] == [False, False, True]
    assert all(v.skip for v in verdicts)
    assert "rolling back" in verdicts[-1].reason
    assert guard.rollbacks == 1 and guard.consecutive_skips == 0
    # The count starts again after the rollback.
    assert not guard.check(NAN, 1.0).rollback


def test_a_good_step_ends_the_run_of_skips():
    guard = StepGuard(max_consecutive_skips=3)
    warm(guard)
    for _ in range(10):
        assert not guard.check(NAN, 1.0).rollback
        assert not guard.check(NAN, 1.0).rollback
        assert not guard.check(1.0, 1.0).skip
    assert guard.rollbacks == 0 and guard.skipped == 20


def test_metrics_count_everything():
    guard = StepGuard(max_consecutive_skips=2)
    warm(guard, 5)
    guard.check(NAN, 1.0)
    guard.check(1.0, INF)
    guard.check(10.0, 1.0)
    m = guard.metrics()
    assert m == {
        "steps": 8,
        "applied": 5,
        "skipped": 3,
        "rollbacks": 1,
        "non_finite_losses": 1,
        "non_finite_grad_norms": 1,
        "spikes": 1,
        "consecutive_skips": 1,
        "running_loss": pytest.approx(1.0),
    }


def test_accepts_tensors_and_a_missing_gradient_norm():
    guard = StepGuard()
    assert not guard.check(torch.tensor(1.0, requires_grad=True) * 1, torch.tensor(2.0)).skip
    assert not guard.check(torch.tensor(1.1)).skip
    assert guard.check(torch.tensor(float("nan"))).skip


def test_state_dict_roundtrip_through_torch_save():
    guard = StepGuard(max_consecutive_skips=4)
    warm(guard, 7)
    guard.check(NAN, 1.0)
    guard.check(9.0, 1.0)
    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    restored = StepGuard(max_consecutive_skips=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.metrics() == guard.metrics()
    # Two more bad steps reach K=4 in both.
    for g in (guard, restored):
        g.check(NAN, 1.0)
        assert g.check(NAN, 1.0).rollback


@pytest.mark.parametrize(
    "kwargs", [{"spike_threshold": 1.0}, {"max_consecutive_skips": 0}, {"smoothing": 0.0}]
)
def test_refuses_settings_that_cannot_work(kwargs):
    with pytest.raises(ValueError):
        StepGuard(**kwargs)
