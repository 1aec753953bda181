"""Shapes, masks and inference controls of the acoustic model on random tiny batches."""

import pytest
import torch

from training.model import (
    MODEL_SIZES,
    ModelConfig,
    TTSModel,
    average_over_durations,
    count_parameters,
    regulate_length,
)

N_SYMBOLS = 40


def make_batch(token_lens=(9, 6, 4), mel_lens=(40, 30, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, length, frames = len(token_lens), max(token_lens), max(mel_lens)
    tokens = torch.randint(1, N_SYMBOLS, (batch, length), generator=g)
    mels = torch.randn(batch, 80, frames, generator=g)
    pitch = torch.randn(batch, frames, generator=g)
    energy = torch.randn(batch, frames, generator=g)
    for i, (n, m) in enumerate(zip(token_lens, mel_lens, strict=True)):
        tokens[i, n:] = 0
        mels[i, :, m:] = 0
        pitch[i, m:] = 0
        energy[i, m:] = 0
    return {
        "tokens": tokens,
        "token_lens": torch.tensor(token_lens),
        "mels": mels,
        "mel_lens": torch.tensor(mel_lens),
        "pitch": pitch,
        "energy": energy,
        "spk_emb": torch.nn.functional.normalize(torch.randn(batch, 256, generator=g), dim=1),
    }


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TTSModel(MODEL_SIZES["tiny"], N_SYMBOLS)


def slice_one(batch, i):
    n, m = int(batch["token_lens"][i]), int(batch["mel_lens"][i])
    return {
        "tokens": batch["tokens"][i : i + 1, :n],
        "token_lens": batch["token_lens"][i : i + 1],
        "mels": batch["mels"][i : i + 1, :, :m],
        "mel_lens": batch["mel_lens"][i : i + 1],
        "pitch": batch["pitch"][i : i + 1, :m],
        "energy": batch["energy"][i : i + 1, :m],
        "spk_emb": batch["spk_emb"][i : i + 1],
    }


def test_output_shapes_and_masks():
    batch = make_batch()
    out = tiny_model()(batch)
    b, length, frames = 3, 9, 40
    shapes = {
        "mel_pred": (b, 80, frames),
        "mel_target": (b, 80, frames),
        "mel_mask": (b, frames),
        "log_dur_pred": (b, length),
        "dur_target": (b, length),
        "text_mask": (b, length),
        "pitch_pred": (b, length),
        "pitch_target": (b, length),
        "energy_pred": (b, length),
        "energy_target": (b, length),
        "attn_logprob": (b, 1, frames, length),
        "attn_soft": (b, 1, frames, length),
        "attn_hard": (b, 1, frames, length),
        "token_lens": (b,),
        "mel_lens": (b,),
    }
    assert set(out) == set(shapes)
    for key, shape in shapes.items():
        assert tuple(out[key].shape) == shape, key
    assert out["mel_mask"].dtype == torch.bool and out["text_mask"].dtype == torch.bool
    assert out["mel_mask"].sum(1).tolist() == [40, 30, 12]
    assert out["text_mask"].sum(1).tolist() == [9, 6, 4]
    # Hard durations cover every frame, give each token at least one and padding none.
    assert out["dur_target"].sum(1).tolist() == [40, 30, 12]
    assert (out["dur_target"][out["text_mask"]] >= 1).all()
    assert (out["dur_target"][~out["text_mask"]] == 0).all()
    # Soft attention is a distribution over the valid tokens on every valid frame.
    soft = out["attn_soft"][:, 0]
    row_sums = soft.sum(-1)
    assert torch.allclose(row_sums[out["mel_mask"]], torch.ones(82), atol=1e-5)
    assert (row_sums[~out["mel_mask"]] == 0).all()
    assert torch.isfinite(out["attn_logprob"]).all()
    # Predictions and padding: nothing leaks out of the masks.
    assert (out["mel_pred"].transpose(1, 2)[~out["mel_mask"]] == 0).all()
    for key in ("log_dur_pred", "pitch_pred", "energy_pred"):
        assert (out[key][~out["text_mask"]] == 0).all(), key


def test_padding_does_not_change_an_utterance():
    model = tiny_model().eval()  # no dropout, so the two passes are comparable
    batch = make_batch()
    together = model(batch)
    for i in range(3):
        alone = model(slice_one(batch, i))
        n, m = int(batch["token_lens"][i]), int(batch["mel_lens"][i])
        assert torch.allclose(together["mel_pred"][i, :, :m], alone["mel_pred"][0], atol=1e-4)
        assert torch.equal(together["dur_target"][i, :n], alone["dur_target"][0])
        assert torch.allclose(together["log_dur_pred"][i, :n], alone["log_dur_pred"][0], atol=1e-5)


def test_every_part_gets_a_gradient():
    model = tiny_model()
    out = model(make_batch())
    loss = (
        (out["mel_pred"] - out["mel_target"]).abs().mean()
        + out["log_dur_pred"].pow(2).mean()
        + out["pitch_pred"].pow(2).mean()
        + out["energy_pred"].pow(2).mean()
        - out["attn_logprob"].mean()
    )
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # The padding row of the embedding is the only one that must never learn.
    assert missing == []
    assert model.embed.weight.grad[0].abs().sum() == 0


def test_token_averages_over_hard_durations():
    values = torch.tensor([[1.0, 3.0, 0.0, 4.0, 5.0, 6.0]])
    durations = torch.tensor([[2, 2, 0, 2]])
    assert average_over_durations(values, durations, False).tolist() == [[2.0, 2.0, 0.0, 5.5]]
    # Voiced-only: the exact zero (unvoiced) is left out of the second token's mean.
    assert average_over_durations(values, durations, True).tolist() == [[2.0, 4.0, 0.0, 5.5]]


def test_length_regulator_repeats_states():
    states = torch.arange(3.0)[None, :, None]
    frames, lengths = regulate_length(states, torch.tensor([[2, 0, 3]]), max_len=7)
    assert frames[0, :, 0].tolist() == [0, 0, 2, 2, 2, 0, 0]
    assert lengths.tolist() == [5]


def test_infer_controls():
    model = tiny_model().eval()
    batch = make_batch()
    tokens, lens, spk = batch["tokens"], batch["token_lens"], batch["spk_emb"]
    # An untrained predictor says ~0 frames; push the log durations so lengths are meaningful.
    with torch.no_grad():
        model.duration_predictor.proj.bias.fill_(2.0)
    base = model.infer(tokens, lens, spk)
    assert base["mel"].shape[:2] == (3, 80)
    assert base["mel"].shape[2] == int(base["mel_lens"].max())
    assert torch.equal(base["durations"].sum(1), base["mel_lens"])
    assert (base["durations"][batch["tokens"] == 0] == 0).all()
    slow = model.infer(tokens, lens, spk, duration_scale=2.0)
    assert (slow["mel_lens"] > base["mel_lens"] * 1.8).all()
    model.set_feature_stats({"pitch_mean": 150.0, "pitch_std": 30.0})
    shifted = model.infer(tokens, lens, spk, pitch_shift=12.0, energy_scale=0.5)
    assert torch.equal(shifted["durations"], base["durations"])
    assert not torch.allclose(shifted["mel"], base["mel"])


def test_infer_with_a_nan_duration_predictor_gives_short_output_not_a_crash():
    model = tiny_model().eval()
    batch = make_batch()
    with torch.no_grad():
        model.duration_predictor.proj.bias.fill_(float("nan"))
    out = model.infer(batch["tokens"], batch["token_lens"], batch["spk_emb"])
    # Every utterance still gets its one frame, and no frame count is negative.
    assert (out["durations"] >= 0).all() and (out["mel_lens"] == 1).all()


def test_bf16_autocast_keeps_float32_outputs():
    out_fp32 = tiny_model().eval()(make_batch())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model().eval()(make_batch())
    assert out["mel_pred"].dtype == torch.float32
    assert torch.isfinite(out["mel_pred"]).all()
    # The aligner runs in float32 under autocast, so the hard durations do not change.
    assert torch.equal(out["dur_target"], out_fp32["dur_target"])


def test_sizes_grow_and_config_round_trips():
    counts = [count_parameters(TTSModel(MODEL_SIZES[s], N_SYMBOLS)) for s in ("tiny", "small")]
    assert 0.4e6 < counts[0] < 1.2e6 and 2e6 < counts[1] < 8e6
    cfg = MODEL_SIZES["normal"]
    assert ModelConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg


def test_too_few_frames_is_refused_clearly():
    with pytest.raises(ValueError, match="at least one frame per token"):
        tiny_model()(make_batch(token_lens=(5,), mel_lens=(4,)))
