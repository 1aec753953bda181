"""Every behaviour of StableAdaptiveWeights that issue 4 names, plus property tests."""

import io
import itertools
import json
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.losses import StableAdaptiveWeights

NAN, INF = float("nan"), float("inf")


def drive(ctl, losses, grads=None):
    """Step through `losses` (and `grads`); return the weight after each step."""
    grads = grads if grads is not None else [1.0] * len(losses)
    return [ctl.step(loss, g) for loss, g in zip(losses, grads, strict=True)]


def shift(before, after, n_before=150, n_after=50):
    """A flat loss that moves to a new level: the running average lags, the recent mean does not."""
    return [before] * n_before + [after] * n_after


def applied(ctl):
    return [d for d in ctl.decisions if d["applied"] and d["old"] != d["new"]]


def test_defaults_are_the_issues():
    ctl = StableAdaptiveWeights()
    assert (ctl.base_weight, ctl.min_weight, ctl.max_weight) == (2.5, 1.0, 5.0)
    assert ctl.max_change_percent == 0.05
    assert (ctl.cooling_period, ctl.min_stable_steps, ctl.warmup_steps) == (50, 10, 100)
    assert ctl.variance_threshold == 0.5
    assert ctl.smoothing_factor == 0.1
    assert ctl.spike_threshold == 2.0
    assert ctl.gradient_norm_threshold == 5.0
    assert ctl.weight == 2.5 and ctl.enabled


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_weight": 6.0},
        {"min_weight": 3.0},
        {"base_weight": NAN},
        {"max_change_percent": 0.0},
        {"max_change_percent": 1.5},
        {"spike_threshold": 1.0},
        {"smoothing_factor": 0.0},
        {"warmup_steps": -1},
    ],
)
def test_refuses_settings_that_cannot_work(kwargs):
    with pytest.raises(ValueError):
        StableAdaptiveWeights(**kwargs)


def test_loss_above_its_average_with_stable_gradients_raises_the_weight():
    ctl = StableAdaptiveWeights()
    weights = drive(ctl, shift(1.0, 1.3))
    assert weights[149] == 2.5
    assert weights[-1] == pytest.approx(2.5 * 1.05)
    (decision,) = applied(ctl)
    assert decision["old"] == 2.5 and decision["new"] == pytest.approx(2.625)
    assert "running average" in decision["reason"]
    assert decision["step"] > 150


def test_loss_below_its_average_lowers_the_weight():
    ctl = StableAdaptiveWeights()
    weights = drive(ctl, shift(1.0, 0.7))
    assert weights[-1] == pytest.approx(2.5 * 0.95)


def test_flat_loss_changes_nothing():
    ctl = StableAdaptiveWeights()
    drive(ctl, [1.0] * 400)
    assert ctl.weight == 2.5 and ctl.decisions == []


def test_gradient_norm_above_its_threshold_only_lowers():
    ctl = StableAdaptiveWeights()
    losses = shift(1.0, 1.3)  # would raise with calm gradients
    weights = drive(ctl, losses, [10.0] * len(losses))
    assert weights[-1] < 2.5
    assert all(d["new"] < d["old"] for d in ctl.decisions)
    assert "above its threshold" in ctl.decisions[0]["reason"]


def test_growing_gradient_norm_only_lowers():
    ctl = StableAdaptiveWeights(gradient_norm_threshold=1e9)
    losses = shift(1.0, 1.3)
    grads = [1.03**i for i in range(len(losses))]  # +3 % a step: growing, never a spike
    weights = drive(ctl, losses, grads)
    assert weights[-1] < 2.5
    assert ctl.decisions[0]["reason"] == "gradient norm growing"


def test_noisy_but_flat_gradient_norms_are_not_growing():
    # Heavy-tailed batch-to-batch noise of the norm, as real batches give, around a flat level.
    rng = random.Random(0)
    grads = [math.exp(rng.gauss(0, 0.5)) for _ in range(2000)]
    ctl = StableAdaptiveWeights()
    drive(ctl, [1.0 + 0.01 * rng.random() for _ in grads], grads)
    assert ctl.decisions == []


def test_without_a_gradient_norm_the_loss_alone_decides():
    ctl = StableAdaptiveWeights()
    for loss in shift(1.0, 1.3):
        ctl.step(loss)
    assert ctl.weight == pytest.approx(2.625)
    assert ctl.metrics()["avg_gradient_norm"] == 0.0


def test_no_change_during_warmup():
    losses = shift(1.0, 1.3, n_before=40, n_after=60)
    early = StableAdaptiveWeights(warmup_steps=0)
    drive(early, losses)
    assert applied(early) and applied(early)[0]["step"] < 100  # the sequence does ask for one
    ctl = StableAdaptiveWeights(warmup_steps=100)
    weights = drive(ctl, losses)
    assert set(weights) == {2.5} and ctl.decisions == []


def test_cooling_period_between_changes():
    # A staircase down keeps asking for a lower weight every few steps.
    losses = [0.8 ** (i // 15) for i in range(400)]
    fast = StableAdaptiveWeights(warmup_steps=0, cooling_period=0)
    drive(fast, losses)
    fast_steps = [d["step"] for d in applied(fast)]
    assert min(b - a for a, b in itertools.pairwise(fast_steps)) < 50

    ctl = StableAdaptiveWeights(warmup_steps=0, cooling_period=50)
    drive(ctl, losses)
    steps = [d["step"] for d in ctl.decisions]
    assert len(steps) >= 3
    assert all(b - a >= 50 for a, b in itertools.pairwise(steps))


def test_each_change_is_at_most_five_percent():
    losses = [0.8 ** (i // 15) for i in range(400)]
    ctl = StableAdaptiveWeights(warmup_steps=0, cooling_period=0)
    weights = drive(ctl, losses)
    changes = [abs(b - a) / a for a, b in zip([2.5, *weights], weights, strict=False) if a != b]
    assert changes and max(changes) <= 0.05 + 1e-9


def test_needs_min_stable_steps_after_a_bad_step():
    losses = shift(1.0, 0.7)
    calm = StableAdaptiveWeights()
    drive(calm, losses)
    first = applied(calm)[0]["step"]
    assert 150 < first < 165

    ctl = StableAdaptiveWeights()
    losses[first - 3] = NAN  # three steps before the change it would have made
    drive(ctl, losses)
    # The run of stable steps starts again after the NaN: ten more steps before any change.
    assert applied(ctl)[0]["step"] == first - 2 + 10


def test_noisy_loss_blocks_changes_by_its_variance():
    losses = [3.0, 1.0] * 75 + [2.4, 0.4] * 25  # variance about 1, then a lower level
    strict = StableAdaptiveWeights(variance_threshold=0.5)
    drive(strict, losses)
    assert strict.decisions == [] and strict.loss_variance > 0.5
    loose = StableAdaptiveWeights(variance_threshold=5.0)
    drive(loose, losses)
    assert applied(loose)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_loss_changes_nothing_and_is_counted(bad):
    ctl = StableAdaptiveWeights()
    drive(ctl, [1.0] * 120)
    before = ctl.state_dict()
    assert ctl.step(bad, 1.0) == 2.5
    after = ctl.state_dict()
    assert ctl.non_finite_losses == 1
    assert after["running_loss"] == before["running_loss"]
    assert after["losses"] == before["losses"] and after["grad_norms"] == before["grad_norms"]
    assert after["avg_gradient_norm"] == before["avg_gradient_norm"]
    assert after["weight"] == before["weight"]


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_gradient_norm_changes_nothing_and_is_counted(bad):
    ctl = StableAdaptiveWeights()
    drive(ctl, [1.0] * 120)
    before = ctl.state_dict()
    ctl.step(1.0, bad)
    after = ctl.state_dict()
    assert ctl.non_finite_grad_norms == 1
    assert after["losses"] == before["losses"] and after["grad_norms"] == before["grad_norms"]
    assert after["running_loss"] == before["running_loss"]


def test_spike_is_counted_and_only_capped_into_the_average():
    ctl = StableAdaptiveWeights()
    drive(ctl, [1.0] * 50)
    ctl.step(1000.0, 1.0)
    assert ctl.spikes == 1 and ctl.consecutive_stable_steps == 0
    # Capped at 2x the average: 0.9 * 1 + 0.1 * 2.
    assert ctl.running_loss == pytest.approx(1.1)


def test_accepts_zero_dim_tensors():
    ctl = StableAdaptiveWeights()
    assert ctl.step(torch.tensor(1.0, requires_grad=True) * 2, torch.tensor(0.5)) == 2.5
    assert ctl.running_loss == 2.0 and ctl.avg_gradient_norm == 0.5
    ctl.step(torch.tensor(float("nan")))
    assert ctl.non_finite_losses == 1


def test_a_proposal_out_of_range_is_rejected_and_logged():
    ctl = StableAdaptiveWeights(base_weight=5.0)
    drive(ctl, shift(1.0, 1.3))
    assert ctl.weight == 5.0
    (decision,) = ctl.decisions
    assert decision["applied"] is False
    assert decision["old"] == 5.0 and decision["new"] == pytest.approx(5.25)
    assert "rejected" in decision["reason"] and "outside 1-5" in decision["reason"]
    assert ctl.rejections == 1 and ctl.changes == 0


def test_validate_names_what_is_wrong():
    ctl = StableAdaptiveWeights()
    drive(ctl, [1.0] * 20)
    assert ctl.validate(2.6, 1.0) is None
    assert "not finite" in ctl.validate(NAN, 1.0)
    assert "outside" in ctl.validate(5.5, 1.0)
    assert "outside" in ctl.validate(0.5, 1.0)
    assert "more than 5%" in ctl.validate(2.5 * 1.2, 1.0)
    assert "spike" in ctl.validate(2.6, 1.95)  # 2.6 * 1.95 > 2 * 2.5 * 1.0


def test_disable_returns_to_base_and_freezes_until_enable():
    ctl = StableAdaptiveWeights()
    drive(ctl, shift(1.0, 1.3))
    assert ctl.weight != 2.5
    ctl.disable()
    assert ctl.weight == 2.5 and not ctl.enabled
    assert ctl.decisions[-1]["reason"].startswith("adaptation disabled")
    drive(ctl, shift(1.3, 0.6, n_before=100, n_after=100))
    assert ctl.weight == 2.5
    ctl.enable()
    assert ctl.enabled
    drive(ctl, shift(0.6, 0.3, n_before=60, n_after=40))
    assert ctl.weight != 2.5


def test_reset_clears_statistics_and_warmup_starts_again():
    ctl = StableAdaptiveWeights()
    drive(ctl, [*shift(1.0, 1.3), NAN, 50.0])
    ctl.reset()
    m = ctl.metrics()
    assert m["step_count"] == 0 and m["running_loss"] == 0.0 and m["loss_variance"] == 0.0
    assert m["non_finite_losses"] == 0 and m["spikes"] == 0
    assert m["consecutive_stable_steps"] == 0 and m["avg_gradient_norm"] == 0.0
    weight = ctl.weight
    drive(ctl, shift(1.0, 1.3, n_before=40, n_after=60))
    assert ctl.weight == weight  # inside the new warm-up


def test_metrics_are_plain_values():
    ctl = StableAdaptiveWeights()
    drive(ctl, [*shift(1.0, 1.3), NAN])
    m = ctl.metrics()
    assert all(type(v) in (int, float, bool) for v in m.values())
    json.dumps(m)
    assert m["weight"] == ctl.weight and m["changes"] == 1 and m["non_finite_losses"] == 1
    assert 0 < m["loss_stability_score"] <= 1


def test_decisions_have_step_old_new_reason_applied():
    ctl = StableAdaptiveWeights(warmup_steps=0, cooling_period=0)
    drive(ctl, [0.8 ** (i // 15) for i in range(200)])
    assert ctl.decisions
    for d in ctl.decisions:
        assert set(d) == {"step", "old", "new", "reason", "applied"}
        assert isinstance(d["step"], int) and isinstance(d["reason"], str) and d["reason"]


def test_state_dict_is_plain_and_resume_is_exact():
    losses = [0.8 ** (i // 15) + 0.01 * (i % 3) for i in range(400)]
    losses[123] = NAN
    grads = [1.0 + 0.1 * (i % 5) for i in range(400)]
    whole = StableAdaptiveWeights(warmup_steps=20, cooling_period=10)
    expected = drive(whole, losses, grads)

    first = StableAdaptiveWeights(warmup_steps=20, cooling_period=10)
    head = drive(first, losses[:200], grads[:200])
    state = first.state_dict()
    json.dumps(state)  # plain Python values only
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    second = StableAdaptiveWeights(warmup_steps=20, cooling_period=10)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    tail = drive(second, losses[200:], grads[200:])
    assert head + tail == expected
    assert second.decisions == whole.decisions
    assert second.metrics() == whole.metrics()


def test_loading_a_weight_outside_the_range_keeps_it_in_range():
    ctl = StableAdaptiveWeights()
    state = ctl.state_dict()
    state["weight"] = 40.0
    ctl.load_state_dict(state)
    assert ctl.weight == 5.0


# ---------------------------------------------------------------------- properties

finite_loss = st.floats(min_value=1e-4, max_value=50.0)
odd_loss = st.sampled_from([NAN, INF, -INF, 0.0, 1e6])
loss_value = st.one_of(finite_loss, finite_loss, finite_loss, odd_loss)
grad_value = st.one_of(
    st.none(), st.floats(min_value=0.0, max_value=20.0), st.sampled_from([NAN, INF, 1e4])
)


@st.composite
def loss_sequences(draw):
    """Plateaus of drawn level and noise, with NaN, Inf and spikes mixed in."""
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        level = draw(st.floats(0.05, 5.0))
        noise = draw(st.floats(0.0, 0.3))
        length = draw(st.integers(1, 120))
        grad = draw(st.floats(0.1, 8.0))
        growth = draw(st.floats(0.97, 1.05))
        for i in range(length):
            loss = level * (1 + noise * math.sin(i * 1.7))
            steps.append((loss, grad * growth**i))
    for _ in range(draw(st.integers(0, 20))):
        steps.insert(draw(st.integers(0, len(steps))), (draw(loss_value), draw(grad_value)))
    return steps


controller_settings = st.fixed_dictionaries(
    {
        "base_weight": st.floats(1.0, 5.0),
        "warmup_steps": st.integers(0, 120),
        "cooling_period": st.integers(0, 60),
        "min_stable_steps": st.integers(0, 12),
        "variance_threshold": st.floats(0.01, 10.0),
    }
)


def test_property_weight_stays_safe_under_any_sequence():
    changes_seen = []

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(kwargs=controller_settings, steps=loss_sequences())
    def check(kwargs, steps):
        ctl = StableAdaptiveWeights(**kwargs)
        last_change = None
        weight = ctl.weight
        for n, (loss, grad) in enumerate(steps, start=1):
            new = ctl.step(loss, grad)
            assert math.isfinite(new) and 1.0 <= new <= 5.0
            assert new == ctl.weight
            if new != weight:
                assert abs(new - weight) / weight <= 0.05 + 1e-9
                assert n > kwargs["warmup_steps"], "changed inside warm-up"
                if last_change is not None:
                    assert n - last_change >= kwargs["cooling_period"], "changed while cooling"
                last_change = n
                changes_seen.append(n)
            weight = new
        json.dumps(ctl.metrics())

    check()
    # The generator must actually exercise changes, or the properties above prove nothing.
    assert len(changes_seen) > 20


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.tuples(loss_value, grad_value), min_size=1, max_size=300),
    cut=st.integers(0, 300),
)
def test_property_state_roundtrip_continues_identically(steps, cut):
    cut = min(cut, len(steps))
    kwargs = {"warmup_steps": 5, "cooling_period": 3, "min_stable_steps": 2}
    whole = StableAdaptiveWeights(**kwargs)
    expected = [whole.step(loss, g) for loss, g in steps]
    first = StableAdaptiveWeights(**kwargs)
    got = [first.step(loss, g) for loss, g in steps[:cut]]
    second = StableAdaptiveWeights(**kwargs)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [second.step(loss, g) for loss, g in steps[cut:]]
    assert got == expected


# ---------------------------------------------------------------------- issue 16: at any scale


def mel_like(start, per_window, steps=300, noise=0.04, seed=0):
    """A mel-L1-scale loss moving `per_window` (relative) every 50 steps, with batch noise."""
    rng = random.Random(seed)
    rate = math.log1p(per_window) / 50
    return [start * math.exp(rate * i + rng.gauss(0, noise)) for i in range(steps)]


def test_decides_on_a_smoothly_falling_mel_scale_loss():
    # What a healthy tiny run's mel L1 does: about -10 % per 50 steps, variance about 1e-3.
    losses = mel_like(1.2, -0.10)
    ctl = StableAdaptiveWeights()
    drive(ctl, losses, [0.8] * len(losses))
    changes = applied(ctl)
    assert [d["step"] for d in changes] == [101, 151, 201, 251]
    assert all(d["new"] < d["old"] for d in changes)  # a falling loss never raises its weight
    assert "loss falling" in changes[0]["reason"]
    assert ctl.weight == pytest.approx(2.5 * 0.95**4)


def test_a_rising_loss_with_calm_gradients_moves_the_weight_up():
    losses = mel_like(0.8, +0.08)
    ctl = StableAdaptiveWeights()
    drive(ctl, losses, [0.8] * len(losses))
    assert applied(ctl) and all(d["new"] > d["old"] for d in applied(ctl))
    assert "loss rising" in applied(ctl)[0]["reason"]
    assert ctl.weight > 2.5


def test_decisions_do_not_depend_on_the_loss_scale():
    losses = mel_like(1.2, -0.10)
    weights = {}
    for scale in (1e-3, 1.0, 1e3):
        ctl = StableAdaptiveWeights()
        weights[scale] = drive(ctl, [scale * x for x in losses])
    assert weights[1e-3] == weights[1.0] == weights[1e3]
    assert len(set(weights[1.0])) > 1


def test_every_evaluation_after_the_warmup_decides_or_records_why_it_held():
    losses = mel_like(1.2, -0.10, steps=200) + [1.0] * 150
    losses[260] = NAN
    ctl = StableAdaptiveWeights()
    drive(ctl, losses)
    assert sum(ctl.holds.values()) + len(ctl.decisions) == len(losses) - 100
    assert ctl.holds["cooling"] > 0  # after each decision
    assert ctl.holds["unsettled"] >= 10  # the NaN, then ten steps to be stable again
    assert ctl.holds["dead_band"] > 0  # the flat tail
    assert ctl.last_hold["code"] == "dead_band" and "dead band" in ctl.last_hold["reason"]
    m = ctl.metrics()
    assert m["held_cooling"] == ctl.holds["cooling"] and m["held_dead_band"] > 0

    erratic = StableAdaptiveWeights()
    drive(erratic, [3.0, 1.0] * 100)
    assert erratic.holds["noisy"] == 100 and erratic.decisions == []
    erratic.disable()
    erratic.step(1.0)
    assert erratic.last_hold["code"] == "disabled"


def test_hold_counts_survive_a_checkpoint():
    ctl = StableAdaptiveWeights()
    drive(ctl, mel_like(1.2, -0.10, steps=180))
    other = StableAdaptiveWeights()
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.holds == ctl.holds and other.last_hold == ctl.last_hold
    # A checkpoint from before hold reasons were counted still loads.
    old = ctl.state_dict()
    del old["holds"], old["last_hold"]
    other.load_state_dict(old)
    assert sum(other.holds.values()) == 0
