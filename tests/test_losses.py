"""Loss components on hand-built tensors, and TTSLoss's API."""

import dataclasses
import io
import math

import pytest
import torch

from training.config import LossConfig, UnsafeConfig
from training.losses import (
    COMPONENTS,
    TTSLoss,
    bin_loss,
    duration_loss,
    energy_loss,
    forward_sum_loss,
    mel_loss,
    pitch_loss,
)

NAN = float("nan")


def outputs(batch=2, tokens=3, frames=6, mel_error=0.5, seed=0, grad=True):
    """A model-output dict with the shapes of training.model, valid lengths (3, 2) tokens and
    (6, 4) frames, and a mel prediction off by exactly `mel_error` on every valid cell."""
    g = torch.Generator().manual_seed(seed)
    token_lens = torch.tensor([tokens, tokens - 1])[:batch]
    mel_lens = torch.tensor([frames, frames - 2])[:batch]
    text_mask = torch.arange(tokens)[None] < token_lens[:, None]
    mel_mask = torch.arange(frames)[None] < mel_lens[:, None]
    target = torch.randn(batch, 80, frames, generator=g)
    logits = torch.randn(batch, 1, frames, tokens, generator=g)
    logprob = logits.masked_fill(~text_mask[:, None, None, :], -1e4).log_softmax(-1)
    hard = torch.zeros(batch, 1, frames, tokens)
    for b in range(batch):
        for t in range(int(mel_lens[b])):
            hard[
                b, 0, t, min(t * int(token_lens[b]) // int(mel_lens[b]), int(token_lens[b]) - 1)
            ] = 1
    out = {
        "mel_pred": target + mel_error,
        "mel_target": target,
        "mel_mask": mel_mask,
        "log_dur_pred": torch.randn(batch, tokens, generator=g),
        "dur_target": hard.sum(2)[:, 0],
        "text_mask": text_mask,
        "pitch_pred": torch.randn(batch, tokens, generator=g),
        "pitch_target": torch.randn(batch, tokens, generator=g),
        "energy_pred": torch.randn(batch, tokens, generator=g),
        "energy_target": torch.randn(batch, tokens, generator=g),
        "attn_logprob": logprob,
        "attn_soft": logprob.exp(),
        "attn_hard": hard,
        "token_lens": token_lens,
        "mel_lens": mel_lens,
    }
    if grad:
        for key in ("mel_pred", "log_dur_pred", "pitch_pred", "energy_pred", "attn_logprob"):
            out[key] = out[key].clone().requires_grad_(True)
    return out


# ---------------------------------------------------------------------- components


def test_mel_loss_is_l1_over_valid_frames_only():
    out = outputs(mel_error=0.5, grad=False)
    out["mel_target"][1, :, 4:] = NAN  # padding: must not leak in
    out["mel_pred"] = out["mel_target"] + 0.5
    assert mel_loss(out).item() == pytest.approx(0.5)
    out["mel_pred"][0, 3, 0] += 80 * 10  # one valid cell 800 off: mean grows by 800 / (80 * 10)
    assert mel_loss(out).item() == pytest.approx(0.5 + 800 / 800)


def test_mel_loss_gradient_skips_nan_padding():
    out = outputs()
    out["mel_target"] = out["mel_target"].clone()
    out["mel_target"][1, :, 4:] = NAN
    mel_loss(out).backward()
    assert torch.isfinite(out["mel_pred"].grad).all()
    assert (out["mel_pred"].grad[1, :, 4:] == 0).all()


def test_mel_loss_is_not_clamped():
    out = outputs(mel_error=1e6, grad=False)
    assert mel_loss(out).item() == pytest.approx(1e6)
    out["mel_pred"] = out["mel_pred"].clone()
    out["mel_pred"][0, 0, 0] = NAN
    assert math.isnan(mel_loss(out).item())


def test_duration_loss_is_mse_of_log_one_plus_frames():
    mask = torch.tensor([[True, True, False]])
    out = {
        "dur_target": torch.tensor([[1.0, 3.0, 0.0]]),
        "log_dur_pred": torch.tensor([[math.log(2), math.log(4) + 1.0, 99.0]]),
        "text_mask": mask,
    }
    assert duration_loss(out).item() == pytest.approx(0.5)


@pytest.mark.parametrize("fn, key", [(pitch_loss, "pitch"), (energy_loss, "energy")])
def test_pitch_and_energy_are_masked_token_mse(fn, key):
    out = {
        f"{key}_pred": torch.tensor([[1.0, 2.0, 50.0], [0.0, 0.0, 0.0]]),
        f"{key}_target": torch.tensor([[1.0, 0.0, NAN], [3.0, 0.0, 0.0]]),
        "text_mask": torch.tensor([[True, True, False], [True, False, False]]),
    }
    assert fn(out).item() == pytest.approx((0 + 4 + 9) / 3)


def test_token_losses_keep_nan_padding_out_of_the_gradient():
    out = outputs()
    for key in ("pitch_target", "energy_target", "dur_target"):
        out[key] = out[key].clone()
        out[key][1, 2] = NAN  # the padded token of the second item
    (pitch_loss(out) + energy_loss(out) + duration_loss(out)).backward()
    for key in ("pitch_pred", "energy_pred", "log_dur_pred"):
        assert torch.isfinite(out[key].grad).all(), key
        assert out[key].grad[1, 2] == 0


def fsum_out(logprob, token_lens, mel_lens):
    tokens = logprob.shape[-1]
    return {
        "attn_logprob": logprob,
        "token_lens": torch.tensor(token_lens),
        "mel_lens": torch.tensor(mel_lens),
        "text_mask": torch.arange(tokens)[None] < torch.tensor(token_lens)[:, None],
    }


def test_forward_sum_of_one_frame_one_token():
    # Blank log-prob -1 vs token log-prob 0: p(token) = 1 / (1 + e^-1).
    out = fsum_out(torch.zeros(1, 1, 1, 1), [1], [1])
    assert forward_sum_loss(out).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))


def test_forward_sum_sums_over_every_monotonic_path():
    # Two frames, one token: paths (tok, tok), (blank, tok), (tok, blank).
    out = fsum_out(torch.zeros(1, 1, 2, 1), [1], [2])
    p_tok = 1 / (1 + math.exp(-1))
    p_blank = 1 - p_tok
    expected = -math.log(p_tok**2 + 2 * p_blank * p_tok)
    assert forward_sum_loss(out).item() == pytest.approx(expected, rel=1e-5)


def test_forward_sum_of_a_padded_batch_equals_each_item_alone():
    out = outputs()
    both = forward_sum_loss(out)
    alone = []
    for b in range(2):
        n, t = int(out["token_lens"][b]), int(out["mel_lens"][b])
        item = fsum_out(out["attn_logprob"][b : b + 1, :, :t, :n].detach(), [n], [t])
        alone.append(forward_sum_loss(item))
    assert both.item() == pytest.approx(sum(x.item() for x in alone) / 2, rel=1e-5)
    both.backward()
    assert torch.isfinite(out["attn_logprob"].grad).all()


def test_forward_sum_prefers_the_diagonal():
    frames, tokens = 6, 3
    diagonal = torch.full((1, 1, frames, tokens), -8.0)
    for t in range(frames):
        diagonal[0, 0, t, t // 2] = 0.0
    reversed_ = diagonal.flip(-1)
    good = forward_sum_loss(fsum_out(diagonal.log_softmax(-1), [tokens], [frames]))
    bad = forward_sum_loss(fsum_out(reversed_.log_softmax(-1), [tokens], [frames]))
    assert good.item() < bad.item()


def test_forward_sum_of_a_clip_shorter_than_its_text_adds_nothing():
    out = fsum_out(torch.zeros(1, 1, 2, 3).log_softmax(-1), [3], [2])
    assert forward_sum_loss(out).item() == 0.0


def test_forward_sum_keeps_nan_visible():
    logprob = torch.zeros(1, 1, 2, 1)
    logprob[0, 0, 1, 0] = NAN
    assert math.isnan(forward_sum_loss(fsum_out(logprob, [1], [2])).item())


def test_bin_loss_is_hard_weighted_log_soft():
    soft = torch.tensor([[[[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]]])
    hard = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])
    out = {"attn_soft": soft, "attn_hard": hard}
    expected = -(math.log(0.5) + math.log(0.25) + math.log(1.0)) / 3
    assert bin_loss(out).item() == pytest.approx(expected)


def test_bin_loss_is_zero_when_soft_equals_hard():
    hard = torch.eye(3)[None, None]
    assert bin_loss({"attn_soft": hard.clone(), "attn_hard": hard}).item() == pytest.approx(0.0)


# ---------------------------------------------------------------------- TTSLoss


def test_old_keyword_call_alone_works():
    loss_fn = TTSLoss(mel_loss_weight=2.5, use_adaptive_weights=True)
    total, components = loss_fn(outputs())
    assert set(components) == set(COMPONENTS)
    assert total.ndim == 0 and torch.isfinite(total)
    assert loss_fn.controller.enabled


def test_keywords_and_defaults_are_the_loss_configs():
    loss_fn = TTSLoss(**dataclasses.asdict(LossConfig()))
    cfg = LossConfig()
    loss_fn.set_step(cfg.bin_loss_start_step + cfg.bin_loss_ramp_steps)  # past the bin ramp
    assert loss_fn.weights == {
        "mel": 2.5,
        "duration": 1.0,
        "pitch": 0.1,
        "energy": 0.1,
        "align": 1.0,
        "bin": 0.1,
    }
    ctl = loss_fn.controller
    assert (ctl.min_weight, ctl.max_weight) == (1.0, 5.0)
    assert (ctl.max_change_percent, ctl.cooling_period, ctl.min_stable_steps) == (0.05, 50, 10)
    assert (ctl.warmup_steps, ctl.variance_threshold) == (100, 0.5)
    assert (ctl.smoothing_factor, ctl.spike_threshold, ctl.gradient_norm_threshold) == (
        0.1,
        2.0,
        5.0,
    )
    other = TTSLoss.from_config(LossConfig(adaptive_weight_cooling_period=7, kl_loss_weight=0.5))
    assert other.controller.cooling_period == 7 and other.kl_loss_weight == 0.5


def test_total_is_the_weighted_sum_of_the_components():
    loss_fn = TTSLoss(mel_loss_weight=3.0, duration_loss_weight=0.5, bin_loss_weight=0.2)
    total, parts = loss_fn(outputs())
    expected = sum(loss_fn.weights[k] * parts[k] for k in COMPONENTS)
    assert total.item() == pytest.approx(expected.item())
    assert loss_fn.weights["mel"] == 3.0 and loss_fn.weights["bin"] == 0.2
    total.backward()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mel_loss_weight": 35.0}, "mel_loss_weight"),
        ({"kl_loss_weight": 3.0}, "kl_loss_weight"),
        ({"duration_loss_weight": 0.0}, "duration_loss_weight"),
    ],
)
def test_unsafe_weights_are_refused(kwargs, field):
    with pytest.raises(UnsafeConfig) as info:
        TTSLoss(**kwargs)
    assert field in info.value.problems
    assert "safe range" in str(info.value)


BASE = outputs(grad=False)


def drive(loss_fn, mel_errors, grad_norm=1.0):
    """One training step per error: forward with grad, then observe once."""
    for error in mel_errors:
        out = dict(BASE, mel_pred=(BASE["mel_target"] + error).requires_grad_(True))
        total, _ = loss_fn(out)
        loss_fn.observe(total, grad_norm)


def test_observe_steps_the_controller_with_the_mel_loss():
    loss_fn = TTSLoss()
    drive(loss_fn, [1.0] * 150 + [1.3] * 50)
    assert loss_fn.weights["mel"] == pytest.approx(2.625)
    (decision,) = loss_fn.new_decisions()
    assert decision["old"] == 2.5 and decision["applied"] is True
    assert loss_fn.new_decisions() == []
    metrics = loss_fn.metrics()
    assert metrics["step_count"] == 200
    assert metrics["running_loss"] == pytest.approx(1.3, rel=0.05)


def test_losses_without_gradients_never_feed_the_controller():
    loss_fn = TTSLoss()
    with torch.no_grad():
        for _ in range(5):
            loss_fn(outputs(mel_error=100.0))
    total, _ = loss_fn(outputs(mel_error=1.0))
    loss_fn.observe(total, 1.0)
    assert loss_fn.controller.running_loss == pytest.approx(1.0)


def test_gradient_accumulation_averages_the_micro_batches():
    loss_fn = TTSLoss()
    for error in (1.0, 3.0):
        total, _ = loss_fn(outputs(mel_error=error))
    loss_fn.observe(total, 1.0)
    assert loss_fn.controller.running_loss == pytest.approx(2.0)
    assert loss_fn.controller.step_count == 1


def test_a_nan_step_is_counted_and_moves_nothing():
    loss_fn = TTSLoss()
    drive(loss_fn, [1.0] * 20)
    out = outputs()
    out["mel_pred"] = out["mel_pred"] * NAN
    total, _ = loss_fn(out)
    assert math.isnan(total.item())
    before = loss_fn.metrics()
    loss_fn.observe(total, NAN)
    after = loss_fn.metrics()
    assert after["running_loss"] == before["running_loss"]
    assert after["running_total_loss"] == before["running_total_loss"]
    assert loss_fn.controller.non_finite_losses == 1
    assert loss_fn.weights["mel"] == 2.5


def test_fixed_weights_when_adaptation_is_off():
    loss_fn = TTSLoss(use_adaptive_weights=False)
    drive(loss_fn, [1.0] * 150 + [1.3] * 50)
    assert loss_fn.weights["mel"] == 2.5 and loss_fn.new_decisions() == []
    assert loss_fn.metrics()["enabled"] is False
    loss_fn.controller.enable()
    drive(loss_fn, [1.3] * 60 + [1.7] * 40)
    assert loss_fn.weights["mel"] > 2.5


def test_metrics_cover_the_specs_stability_and_weight_metrics():
    loss_fn = TTSLoss()
    drive(loss_fn, [1.0] * 5)
    assert {
        "running_loss",
        "running_total_loss",
        "loss_variance",
        "loss_stability_score",
        "step_count",
        "weight",
        "previous_weight",
        "base_weight",
        "steps_since_weight_change",
        "consecutive_stable_steps",
        "enabled",
        "avg_gradient_norm",
    } <= set(loss_fn.metrics())
    assert loss_fn.metrics()["avg_gradient_norm"] == pytest.approx(1.0)


def test_disable_enable_reset():
    loss_fn = TTSLoss()
    drive(loss_fn, [1.0] * 150 + [1.3] * 50)
    loss_fn.new_decisions()
    loss_fn.controller.disable()
    assert loss_fn.weights["mel"] == 2.5
    assert loss_fn.new_decisions()[0]["reason"].startswith("adaptation disabled")
    loss_fn.controller.enable()
    assert loss_fn.metrics()["enabled"] is True
    loss_fn.controller.reset()
    metrics = loss_fn.metrics()
    assert (metrics["running_loss"], metrics["loss_variance"]) == (0.0, 0.0)
    assert (metrics["loss_stability_score"], metrics["step_count"]) == (1.0, 0)


def test_state_dict_roundtrip_resumes_exactly():
    errors = [1.0] * 150 + [1.3] * 60 + [0.9] * 90
    whole = TTSLoss()
    drive(whole, errors)

    first = TTSLoss()
    drive(first, errors[:180])
    first.new_decisions()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = TTSLoss()
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.new_decisions() == []  # reported before the checkpoint
    drive(second, errors[180:])
    assert second.weights == whole.weights
    assert second.metrics() == whole.metrics()
    assert second.controller.decisions == whole.controller.decisions


def test_with_the_real_model_output():
    from training.model import MODEL_SIZES, TTSModel

    torch.manual_seed(0)
    model = TTSModel(MODEL_SIZES["tiny"], n_symbols=20)
    token_lens, mel_lens = torch.tensor([5, 3]), torch.tensor([24, 15])
    batch = {
        "tokens": torch.randint(1, 20, (2, 5)) * (torch.arange(5)[None] < token_lens[:, None]),
        "token_lens": token_lens,
        "mels": torch.randn(2, 80, 24),
        "mel_lens": mel_lens,
        "pitch": torch.randn(2, 24),
        "energy": torch.randn(2, 24),
        "spk_emb": torch.nn.functional.normalize(torch.randn(2, 256), dim=-1),
    }
    loss_fn = TTSLoss()
    total, parts = loss_fn(model(batch))
    assert all(torch.isfinite(v) for v in parts.values())
    total.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert math.isfinite(loss_fn.observe(total, norm))


def test_gradient_growth_is_judged_on_the_clipped_norm():
    # Norms far above the clip level and rising: the steps taken were all the same size.
    raw = [3.0 * 1.02**i for i in range(200)]
    errors = [1.0] * 200
    clipped = TTSLoss()
    for error, norm in zip(errors, raw, strict=True):
        out = dict(BASE, mel_pred=(BASE["mel_target"] + error).requires_grad_(True))
        clipped.observe(clipped(out)[0], norm, clip_norm=1.0)
    assert clipped.controller.avg_gradient_norm == pytest.approx(1.0)
    assert clipped.controller.decisions == []
    unclipped = TTSLoss(gradient_norm_threshold=1e9)
    for error, norm in zip(errors, raw, strict=True):
        out = dict(BASE, mel_pred=(BASE["mel_target"] + error).requires_grad_(True))
        unclipped.observe(unclipped(out)[0], norm)
    assert unclipped.controller.decisions[0]["reason"] == "gradient norm growing"


def test_hold_report_comes_at_most_once_per_cooling_period():
    loss_fn = TTSLoss()
    reports = []
    for step in range(1, 401):
        drive(loss_fn, [1.0])
        report = loss_fn.hold_report()
        if report is not None:
            reports.append((step, report))
    steps = [s for s, _ in reports]
    assert steps == [150, 200, 250, 300, 350, 400]  # nothing to say inside the warm-up
    first = reports[0][1]
    assert first["held"] == {"dead_band": 50} and first["weight"] == 2.5
    assert first["last"]["code"] == "dead_band"
    assert reports[-1][1]["holds_total"]["dead_band"] == 300
    assert sum(sum(r["held"].values()) for _, r in reports) == 300


def test_hold_report_skips_cooling_after_a_decision():
    # A loss falling by a tenth every 50 steps: a decision (its own event) every 50 steps, so
    # the holds in between are all cooling and there is nothing new to report.
    loss_fn = TTSLoss()
    reports = []
    for step in range(300):
        drive(loss_fn, [1.2 * 0.9 ** (step / 50)])
        reports.append(loss_fn.hold_report())
    assert len(loss_fn.controller.decisions) == 4
    assert loss_fn.controller.holds["cooling"] > 0
    assert all(r is None for r in reports)


def test_the_binarisation_term_ramps_in_after_the_aligner_settles():
    loss_fn = TTSLoss(bin_loss_weight=0.2, bin_loss_start_step=100, bin_loss_ramp_steps=200)
    seen = {}
    for step in (0, 99, 100, 200, 300, 5000):
        loss_fn.set_step(step)
        seen[step] = loss_fn.weights["bin"]
    assert seen[0] == seen[99] == seen[100] == 0.0
    assert seen[200] == pytest.approx(0.1)
    assert seen[300] == seen[5000] == pytest.approx(0.2)
    # The other weights do not move with it.
    assert loss_fn.weights["align"] == 1.0
    # Built without a ramp (code, old stored configs), the term is on from the first step.
    plain = TTSLoss(bin_loss_weight=0.2)
    assert plain.weights["bin"] == 0.2
