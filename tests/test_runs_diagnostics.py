"""The diagnostics panel names the seeds' failure patterns from series, and stays quiet otherwise."""

from __future__ import annotations

import math

from studio.runs.diagnostics import diagnose

CONFIG = {
    "size": "tiny",
    "batch_size": 16,
    "optimization_level": "enhanced",
    "learning_rate": 2e-3,
    "lr_warmup_steps": 100,
    "grad_clip_norm": 1.0,
    "gradient_norm_threshold": 5.0,
    "num_workers": 0,
}


def series(values, start=1):
    return [(start + i, float(v)) for i, v in enumerate(values)]


def healthy(n=600):
    return {
        "loss/total": series(20 * math.exp(-i / 150) + 2 for i in range(n)),
        "grad_norm": series(1.0 + 0.1 * math.sin(i) for i in range(n)),
        "guard/skipped": series([0] * n),
        "guard/rollbacks": series([0] * n),
        "data_wait_share": series([0.05] * n),
        "val/total": series([10, 8, 6, 5, 4.5, 4.2], start=100),
    }


def codes(found):
    return [d.code for d in found]


def test_a_healthy_run_has_nothing_to_report():
    assert diagnose(healthy(), CONFIG) == []
    assert diagnose({}, CONFIG) == []


def test_plateau_from_the_training_loss_names_plateau_breaker_and_the_batch():
    s = healthy()
    s["loss/total"] = series([20 * math.exp(-i / 40) + 2.6 for i in range(200)] + [2.6] * 800)
    found = diagnose(s, dict(CONFIG, batch_size=64))
    assert codes(found) == ["plateau"]
    advice = " ".join(found[0].advice)
    assert "plateau_breaker" in advice and "8-16 for 'tiny' (now 64)" in advice
    # Already on plateau_breaker: it is not suggested again.
    again = diagnose(s, dict(CONFIG, optimization_level="plateau_breaker"))
    assert "plateau_breaker' optimization level" not in " ".join(again[0].advice)


def test_plateau_from_validation_losses_that_stopped_improving():
    s = healthy()
    s["val/total"] = series([10, 6, 4.0, 4.01, 3.99, 4.02], start=100)
    assert codes(diagnose(s, CONFIG)) == ["plateau"]


def test_early_noise_is_not_a_plateau():
    s = healthy(n=150)
    s["loss/total"] = series([5.0] * 150)
    s["val/total"] = series([5.0, 5.0], start=50)
    assert diagnose(s, CONFIG) == []


def test_exploding_gradients_by_share_above_threshold_and_by_growth():
    s = healthy()
    s["grad_norm"] = series([1.0] * 400 + [40.0 if i % 2 else 2.0 for i in range(200)])
    found = diagnose(s, CONFIG)
    assert codes(found) == ["exploding_gradients"] and found[0].severity == "error"
    assert "above 5" in found[0].evidence and "0.5" in " ".join(found[0].advice)
    s["grad_norm"] = series([0.5] * 300 + [4.0] * 300)
    assert "grew" in diagnose(s, CONFIG)[0].evidence


def test_large_gradients_during_warm_up_are_not_an_explosion():
    s = healthy(n=120)
    s["grad_norm"] = series([80.0] * 60 + [1.0] * 60)
    assert diagnose(s, CONFIG) == []


def test_nan_streaks_from_the_guard_counter_and_non_finite_counts():
    s = healthy()
    skipped = [0] * 300 + list(range(1, 5)) + [4] * 296  # cumulative: 4 skips in a row
    s["guard/skipped"] = series(skipped)
    found = diagnose(s, CONFIG)
    assert codes(found) == ["nan_streak"] and "4 steps in a row" in found[0].evidence
    assert "basic" in " ".join(found[0].advice)
    s = healthy()
    s["nonfinite"] = [(50, 1.0), (51, 2.0), (52, 1.0)]
    assert codes(diagnose(s, CONFIG)) == ["nan_streak"]
    s = healthy()
    s["nonfinite"] = [(50, 1.0), (52, 1.0), (54, 1.0)]  # scattered, not a streak
    assert diagnose(s, CONFIG) == []
    s["guard/rollbacks"] = series([0] * 500 + [1] * 100)
    assert "1 rollback" in diagnose(s, CONFIG)[0].evidence


def test_input_bound_steps():
    s = healthy()
    s["data_wait_share"] = series([0.7] * 600)
    found = diagnose(s, CONFIG)
    assert codes(found) == ["input_bound"] and "70%" in found[0].evidence
    assert "num_workers (now 0)" in found[0].advice[0]
