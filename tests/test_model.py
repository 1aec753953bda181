"""Shapes, masks and inference controls of the acoustic model on random tiny batches."""

from dataclasses import replace

import pytest
import torch

from training.model import (
    MODEL_SIZES,
    ModelConfig,
    TTSModel,
    WeightAverage,
    average_over_durations,
    count_parameters,
    is_conditioning_key,
    load_model_weights,
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
        "voice_stats": (b, 161),  # each utterance's own (training.voice_stats)
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
    # The padding row of the embedding is the only one that must never learn; the shared
    # speaker layer sits behind zero-initialised norm conditioners, so it learns from step 2.
    assert [n for n in missing if not n.startswith("speaker_cond.")] == []
    assert model.embed.weight.grad[0].abs().sum() == 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    out = model(make_batch())
    (out["mel_pred"] - out["mel_target"]).abs().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.speaker_cond.parameters())


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
    assert 0.4e6 < counts[0] < 1.5e6 and 2e6 < counts[1] < 8e6
    cfg = MODEL_SIZES["normal"]
    assert ModelConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg


def test_too_few_frames_is_refused_clearly():
    with pytest.raises(ValueError, match="at least one frame per token"):
        tiny_model()(make_batch(token_lens=(5,), mel_lens=(4,)))


# ---------------------------------------------------------------------- speaker conditioning


def add_only_model(seed=0):
    torch.manual_seed(seed)
    return TTSModel(replace(MODEL_SIZES["tiny"], speaker_conditioning="add"), N_SYMBOLS)


def test_conditional_norms_start_as_plain_layer_norms():
    """An old checkpoint (speaker added once, no conditional norms) loads into today's model
    with the new weights at identity, and speaks exactly as before."""
    old = add_only_model().eval()
    state = old.state_dict()
    assert not any(is_conditioning_key(k) for k in state)
    new = tiny_model(seed=1).eval()
    filled = load_model_weights(new, state)
    assert filled and all(is_conditioning_key(k) for k in filled)
    assert any(".cond." in k for k in filled) and any(k.startswith("speaker_cond.") for k in filled)
    batch = make_batch()
    with torch.no_grad():
        old.duration_predictor.proj.bias.fill_(2.0)
        new.duration_predictor.proj.bias.fill_(2.0)
    a = old.infer(batch["tokens"], batch["token_lens"], batch["spk_emb"])
    b = new.infer(batch["tokens"], batch["token_lens"], batch["spk_emb"])
    assert torch.equal(a["durations"], b["durations"])
    assert torch.allclose(a["mel"], b["mel"], atol=1e-5)


def test_weights_missing_elsewhere_are_still_an_error():
    state = add_only_model().state_dict()
    del state["mel_out.weight"]
    with pytest.raises(RuntimeError, match=r"missing key.*mel_out.weight"):
        load_model_weights(tiny_model(), state)
    state = tiny_model().state_dict()
    state["decoder.blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected key"):
        load_model_weights(tiny_model(), state)


def test_the_voice_reaches_the_decoder_and_every_predictor():
    """With the additive encoder path switched off, the speaker still changes durations,
    pitch, energy and the mel, through the conditional norms alone."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.speaker_proj.weight.zero_()
        model.speaker_proj.bias.zero_()
        model.duration_predictor.proj.bias.fill_(2.0)
        for name, p in model.named_parameters():
            if ".cond." in name and name.endswith("weight"):
                p.normal_(0, 0.1)
    batch = make_batch()
    spk_a = batch["spk_emb"]
    spk_b = spk_a.roll(1, dims=0)
    frames = int(batch["mel_lens"].max())
    durations = torch.full_like(batch["tokens"], 2) * (batch["tokens"] > 0)
    text_mask = batch["tokens"] > 0

    def parts(spk):
        cond = model.speaker_condition(spk)
        _, enc = model.encode(batch["tokens"], text_mask, spk, cond)
        dec = model.decode(enc, durations, max_len=frames, cond=cond)[0]
        preds = [
            p(enc, text_mask, cond)
            for p in (model.duration_predictor, model.pitch_predictor, model.energy_predictor)
        ]
        return [dec, *preds]

    with torch.no_grad():
        for x, y in zip(parts(spk_a), parts(spk_b), strict=True):
            assert not torch.allclose(x, y, atol=1e-4)
    # The "add" layout has no conditional weights at all.
    assert not any(is_conditioning_key(k) for k in add_only_model().state_dict())


def test_an_unknown_conditioning_is_refused():
    with pytest.raises(ValueError, match="speaker_conditioning must be"):
        TTSModel(replace(MODEL_SIZES["tiny"], speaker_conditioning="film"), N_SYMBOLS)


def test_an_old_checkpoint_still_synthesises(tmp_path):
    from synthesis.engine import load_model
    from training.checkpoint import save_checkpoint

    old = add_only_model()
    config = old.cfg.to_dict()
    del config["speaker_conditioning"]  # written before the field existed
    path = save_checkpoint(
        tmp_path / "old.pt",
        {
            "model": old.state_dict(),
            "model_config": config,
            "size": "tiny",
            "symbols": ["<pad>", *(chr(97 + i) for i in range(N_SYMBOLS - 1))],
            "text": {"lang": "en", "backend": "chars"},
            "speakers": {},
        },
    )
    loaded = load_model(path, "cpu")
    assert loaded.model.cfg.speaker_conditioning == "cln"
    assert torch.equal(loaded.model.mel_out.weight, old.mel_out.weight)


# ---------------------------------------------------------------------- weight average


def test_the_weight_average_follows_the_weights_with_a_ramped_decay():
    model = tiny_model()
    ema = WeightAverage(model, decay=0.999)
    start = model.mel_out.bias.detach().clone()
    with torch.no_grad():
        model.mel_out.bias.add_(1.0)
    ema.update(model)
    # First update: decay (1 + 1) / (10 + 1), not 0.999, so a short run is not stuck at init.
    expected = start + (1 - 2 / 11) * 1.0
    assert torch.allclose(ema.weights["mel_out.bias"], expected)
    for _ in range(5000):
        ema.update(model)
    assert torch.allclose(ema.weights["mel_out.bias"], model.mel_out.bias, atol=1e-3)
    state = ema.state_dict()
    other = WeightAverage(tiny_model(seed=3), decay=0.999)
    other.load_state_dict(state)
    assert other.updates == 5001
    assert torch.equal(other.weights["mel_out.bias"], ema.weights["mel_out.bias"])
    ema.reset(tiny_model(seed=3))
    assert ema.updates == 0
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)
