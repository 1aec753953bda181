"""The one table of safe ranges, the presets built on it, and the plateau detector."""

import math

import pytest

from training.config import (
    BATCH_RANGES,
    LEARNING_RATES,
    OPTIMIZATION_LEVELS,
    SAFE_RANGE_REASONS,
    SAFE_RANGES,
    LossConfig,
    PlateauDetector,
    TrainConfig,
    UnsafeConfig,
    check_safe,
    preset,
    range_text,
    safe_range,
)
from training.losses import StableAdaptiveWeights, TTSLoss

SIZES = ("tiny", "small", "normal", "big")


def test_the_seeds_ranges():
    assert SAFE_RANGES["mel_loss_weight"] == (1.0, 5.0)
    assert SAFE_RANGES["kl_loss_weight"] == (0.5, 2.0)


def test_every_range_is_ordered_and_has_a_one_line_reason():
    for name, (low, high) in SAFE_RANGES.items():
        assert low < high, name
        reason = SAFE_RANGE_REASONS[name]
        assert reason and "\n" not in reason, name


def test_old_mel_weight_is_refused_naming_field_and_range():
    with pytest.raises(UnsafeConfig) as info:
        check_safe({"mel_loss_weight": 35})
    assert isinstance(info.value, ValueError)
    assert info.value.problems == {"mel_loss_weight": "35 is outside the safe range 1-5"}
    assert str(info.value) == "mel_loss_weight: 35 is outside the safe range 1-5"


def test_every_field_out_of_range_is_named():
    with pytest.raises(UnsafeConfig) as info:
        check_safe({"mel_loss_weight": 45.0, "kl_loss_weight": 0.1, "grad_clip_norm": 0.5})
    assert set(info.value.problems) == {"mel_loss_weight", "kl_loss_weight"}
    assert "safe range 0.5-2" in info.value.problems["kl_loss_weight"]


@pytest.mark.parametrize("value", [math.nan, math.inf, "lots", [1]])
def test_nan_and_non_numbers_are_refused(value):
    with pytest.raises(UnsafeConfig) as info:
        check_safe({"mel_loss_weight": value})
    assert "safe range 1-5" in info.value.problems["mel_loss_weight"]


def test_missing_and_unguarded_fields_pass():
    check_safe({})
    check_safe({"mel_loss_weight": None, "steps": 10**9, "name": "x"})
    check_safe({"mel_loss_weight": 1.0, "bin_loss_weight": 0.0, "kl_loss_weight": 2.0})


def test_learning_rate_range_depends_on_the_model_size():
    check_safe({"size": "tiny", "learning_rate": 2e-3})
    with pytest.raises(UnsafeConfig) as info:
        check_safe({"size": "big", "learning_rate": 2e-3})
    assert info.value.problems == {
        "learning_rate": "0.002 is outside the safe range 1e-05-0.001 for the 'big' model"
    }
    # Without a size the envelope decides.
    check_safe({"learning_rate": 2e-3})
    with pytest.raises(UnsafeConfig):
        check_safe({"learning_rate": 1.0})
    with pytest.raises(UnsafeConfig):
        check_safe({"size": "tiny", "learning_rate": 1e-6})


def test_every_size_has_a_learning_rate_range_inside_the_envelope():
    env_low, env_high = SAFE_RANGES["learning_rate"]
    for size in SIZES:
        low, high = safe_range("learning_rate", size)
        assert f"learning_rate.{size}" in SAFE_RANGES
        assert env_low <= low < high <= env_high
    assert safe_range("learning_rate", "unknown") == SAFE_RANGES["learning_rate"]
    assert safe_range("mel_loss_weight", "big") == (1.0, 5.0)


def test_range_text():
    assert range_text("mel_loss_weight") == "safe range 1-5"
    assert range_text("learning_rate", "normal") == "safe range 1e-05-0.002 for the 'normal' model"
    assert range_text("grad_clip_norm", "normal") == "safe range 0.1-5"


def test_defaults_are_safe_and_the_old_config_is_not():
    TrainConfig().check()
    for size in SIZES:
        TrainConfig(size=size).check()
    bad = TrainConfig.from_flat({**TrainConfig().flat(), "mel_loss_weight": 35.0})
    with pytest.raises(UnsafeConfig, match="mel_loss_weight: 35 is outside the safe range 1-5"):
        bad.check()
    with pytest.raises(UnsafeConfig, match="mel_loss_weight"):
        TTSLoss(**{**LossConfig().__dict__, "mel_loss_weight": 35.0})


def test_the_controller_of_ttsloss_lives_inside_the_table():
    ctl = TTSLoss().controller
    assert (ctl.min_weight, ctl.max_weight) == SAFE_RANGES["mel_loss_weight"]
    assert StableAdaptiveWeights().max_weight == SAFE_RANGES["mel_loss_weight"][1]


# ---------------------------------------------------------------------- presets


def test_the_three_levels_exist():
    assert list(OPTIMIZATION_LEVELS) == ["basic", "enhanced", "plateau_breaker"]
    flat_names = set(TrainConfig().flat())
    for level, overrides in OPTIMIZATION_LEVELS.items():
        assert set(overrides) <= flat_names, level  # flat overrides of real fields only


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("level", list(OPTIMIZATION_LEVELS))
def test_every_preset_is_safe_and_carries_its_level(size, level):
    cfg = preset(size, level)
    cfg.check()
    flat = cfg.flat()
    assert flat["size"] == size and flat["optimization_level"] == level
    for name, value in OPTIMIZATION_LEVELS[level].items():
        assert flat[name] == value, name
    assert flat["learning_rate"] == LEARNING_RATES[size][level]
    low, high = BATCH_RANGES[size]
    assert low <= cfg.batch_size <= high


def test_levels_differ_where_they_should():
    basic, enhanced, breaker = (preset("tiny", lvl) for lvl in OPTIMIZATION_LEVELS)
    assert basic.loss.use_adaptive_weights is False
    assert enhanced.loss.use_adaptive_weights and breaker.loss.use_adaptive_weights
    assert basic.learning_rate < enhanced.learning_rate
    assert basic.grad_clip_norm < enhanced.grad_clip_norm
    # Bigger models get gentler learning rates.
    rates = [preset(size, "enhanced").learning_rate for size in SIZES]
    assert rates == sorted(rates, reverse=True)


def test_preset_refuses_unknown_names():
    with pytest.raises(ValueError, match="size"):
        preset("huge", "basic")
    with pytest.raises(ValueError, match="level"):
        preset("tiny", "turbo")


def test_preset_survives_the_studios_flat_roundtrip():
    cfg = preset("small", "plateau_breaker")
    assert TrainConfig.from_flat(cfg.flat()) == cfg


# ---------------------------------------------------------------------- plateau detector


def test_plateau_detector_restarts_after_patience_evals_without_improvement():
    det = PlateauDetector(patience=3, min_delta=0.01)
    assert [det.observe(v) for v in (2.0, 1.5, 1.2)] == [False, False, False]
    # 1.195 is not 1 % better than 1.2: no improvement.
    assert [det.observe(v) for v in (1.195, 1.3, 1.21)] == [False, False, True]
    assert det.restarts == 1 and det.best == 1.2
    # The count starts over; a real improvement resets it.
    assert [det.observe(v) for v in (1.25, 1.1, 1.2, 1.2)] == [False, False, False, False]
    assert det.observe(1.2) is True and det.restarts == 2


def test_plateau_detector_counts_nan_as_no_improvement():
    det = PlateauDetector(patience=2)
    det.observe(1.0)
    assert det.observe(math.nan) is False
    assert det.observe(math.inf) is True
    assert det.best == 1.0


def test_plateau_detector_state_roundtrip_and_config():
    det = PlateauDetector.from_config(preset("tiny", "plateau_breaker"))
    assert det.patience == OPTIMIZATION_LEVELS["plateau_breaker"]["plateau_patience"]
    for v in (3.0, 2.0, 2.5):
        det.observe(v)
    other = PlateauDetector(patience=det.patience, min_delta=det.min_delta)
    other.load_state_dict(det.state_dict())
    assert [other.observe(v) for v in (2.4, 2.3, 2.2)] == [det.observe(v) for v in (2.4, 2.3, 2.2)]
    with pytest.raises(ValueError):
        PlateauDetector(patience=0)
