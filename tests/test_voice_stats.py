"""Voice statistics: read off a clip, added back by the model, carried by checkpoints and voices.

The model predicts its mel and pitch relative to a voice's own statistics (training.voice_stats),
so a voice it never heard gets its spectrum and pitch level from its reference, not from a map
learned on a few training voices. These tests pin each link of that chain.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.fixtures_audio import SR, bare_checkpoint, voiced_clip
from tests.test_trainer import tiny_config, write_synthetic_cache
from training import voice_stats as vs
from training.checkpoint import load_checkpoint
from training.model import MEL_CENTER, MODEL_SIZES, ModelConfig, TTSModel
from training.trainer import Trainer

FLOOR = math.log(1e-5)


def test_statistics_are_the_speech_frames_mean_and_the_voiced_median():
    speech = torch.linspace(-6.0, -2.0, 80)[:, None].repeat(1, 10)
    silence = torch.full((80, 5), FLOOR)  # pauses must not pull the mean towards silence
    mel = torch.cat([silence, speech, silence], dim=1)[None]
    f0 = torch.cat(
        [torch.zeros(5), torch.tensor([100.0] * 3 + [200.0] * 6 + [0.0]), torch.zeros(5)]
    )
    stats = vs.voice_statistics(mel, f0[None])
    assert stats.shape == (1, 161)
    assert torch.allclose(stats[0, :80], speech[:, 0], atol=1e-5)
    assert torch.allclose(stats[0, 80:160], torch.full((80,), vs.MIN_SPREAD))  # steady bands
    assert stats[0, 160] == pytest.approx(math.log(200.0), abs=1e-5)


def test_unvoiced_clip_has_unknown_pitch_and_padding_is_ignored():
    mel = torch.full((2, 80, 12), -4.0)
    mel[1, :, 8:] = 3.0  # padding of a shorter clip: louder than anything, still not counted
    f0 = torch.zeros(2, 12)
    f0[1, :4] = 150.0
    stats = vs.voice_statistics(mel, f0, lengths=torch.tensor([12, 8]))
    assert stats[0, 160] == vs.UNKNOWN_LOG_F0
    assert torch.allclose(stats[1, :80], torch.full((80,), -4.0))
    assert stats[1, 160] == pytest.approx(math.log(150.0), abs=1e-5)


def test_several_clips_count_by_their_length():
    a, b = torch.full((80, 30), -3.0), torch.full((80, 10), -7.0)
    stats = vs.of_clips([a, b], [torch.full((30,), 100.0), torch.zeros(10)])
    assert torch.allclose(stats[:80], torch.full((80,), -4.0))
    # Pooled spread: the clips sit 3 and 1 away from the pooled mean, each steady inside.
    pooled = math.sqrt(0.75 * (vs.MIN_SPREAD**2 + 1.0) + 0.25 * (vs.MIN_SPREAD**2 + 9.0))
    assert torch.allclose(stats[80:160], torch.full((80,), pooled), atol=1e-5)
    assert stats[160] == pytest.approx(math.log(100.0), abs=1e-5)  # the unvoiced clip abstains
    with pytest.raises(ValueError, match="no clips"):
        vs.of_clips([], [])


def _model() -> TTSModel:
    torch.manual_seed(0)
    model = TTSModel(MODEL_SIZES["tiny"], 12).eval()
    model.set_feature_stats(
        {"pitch_mean": 150.0, "pitch_std": 40.0, "energy_mean": 1.0, "energy_std": 1.0}
    )
    return model


def _voice(level: float, hz: float, spread: float = 1.0) -> torch.Tensor:
    return torch.cat(
        [torch.full((80,), level), torch.full((80,), spread), torch.tensor([math.log(hz)])]
    )[None]


def test_a_new_model_speaks_at_the_voice_level_band_for_band():
    """The conditional norms start at identity, so before any training the voice statistics
    act only through the added mean: two voices 1.5 apart in log-mel give outputs exactly
    1.5 apart in every band and frame, with the same durations."""
    model = _model()
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    lens = torch.tensor([5])
    spk = torch.nn.functional.normalize(torch.rand(1, 256), dim=1)
    low = model.infer(tokens, lens, spk, voice_stats=_voice(-6.0, 110.0))
    high = model.infer(tokens, lens, spk, voice_stats=_voice(-4.5, 110.0))
    assert torch.equal(low["durations"], high["durations"])
    assert torch.allclose(high["mel"] - low["mel"], torch.full_like(low["mel"], 1.5), atol=1e-4)


def test_pitch_is_predicted_relative_to_the_voice_pitch():
    model = _model()
    tokens = torch.tensor([[1, 2, 3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    spk = torch.nn.functional.normalize(torch.rand(1, 256), dim=1)

    def pitch_of(hz):
        voice = model.voice_terms(_voice(-5.0, hz), 1)
        cond = model.speaker_condition(spk, voice)
        _, enc = model.encode(tokens, mask, spk, cond)
        return model.predict_pitch(enc, mask, cond, voice)

    # A voice at 230 Hz sits (230 - 150) / 40 = 2 normalised units above one at the mean; the
    # conditioning features differ too, so compare the offsets, not whole predictions.
    offsets = [model.voice_terms(_voice(-5.0, hz), 1)["pitch"].item() for hz in (150.0, 230.0)]
    assert offsets == pytest.approx([0.0, 2.0], abs=1e-4)
    assert torch.isfinite(pitch_of(230.0)).all()
    # Unknown pitch (an unvoiced reference) takes the training mean: no offset.
    unknown = _voice(-5.0, 1.0)
    unknown[0, 160] = vs.UNKNOWN_LOG_F0
    assert model.voice_terms(unknown, 1)["pitch"].item() == pytest.approx(0.0, abs=1e-6)


def test_old_configs_have_no_voice_statistics():
    old = ModelConfig.from_dict(
        {k: v for k, v in MODEL_SIZES["tiny"].to_dict().items() if k != "voice_stats"}
    )
    assert old.voice_stats is False
    model = TTSModel(old, 12)
    assert model.voice_terms(None, 1) is None
    assert "default_voice" not in model.state_dict()
    assert model.mel_out.bias.detach().mean().item() == pytest.approx(MEL_CENTER)
    assert all(cfg.voice_stats for cfg in MODEL_SIZES.values())


def test_trainer_keeps_each_training_voice_and_their_mean(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache")
    trainer = Trainer(tiny_config(steps=2, checkpoint_every=2), cache, tmp_path / "run")
    trainer.run()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000002.pt")
    voices = ckpt["voices"]
    assert set(voices) == {"spk_a", "spk_b"} and all(len(v) == 161 for v in voices.values())
    # The synthetic speakers differ by a spectral tilt of +/-0.6: the top band shows it.
    assert voices["spk_a"][79] - voices["spk_a"][0] > voices["spk_b"][79] - voices["spk_b"][0]
    assert 100 < math.exp(voices["spk_a"][160]) < 250
    default = ckpt["model"]["default_voice"]
    assert torch.allclose(
        default[:80], torch.tensor([voices["spk_a"], voices["spk_b"]])[:, :80].mean(0)
    )

    held = Trainer(tiny_config(steps=1, held_out_speakers=["spk_b"]), cache, tmp_path / "held")
    assert set(held.voices) == {"spk_a"}  # a held-out voice is not learned from, nor offered


def test_resume_refuses_a_checkpoint_from_before_voice_statistics(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache")
    Trainer(tiny_config(steps=2, checkpoint_every=2), cache, tmp_path / "run").run()
    path = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    ckpt = load_checkpoint(path)
    ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k != "voice_stats"}
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="before the model took voice statistics"):
        Trainer(tiny_config(steps=4), cache, tmp_path / "run", resume=True)


def test_a_reference_brings_its_own_statistics_to_synthesis(tmp_path):
    from synthesis.engine import ModelCache, Synthesizer

    texts = ["a quiet voice"]
    ckpt = bare_checkpoint(tmp_path, texts)
    synth = Synthesizer(ckpt, "cpu", vocoder="griffin-lim", cache=ModelCache(1))
    low, high = tmp_path / "low.wav", tmp_path / "high.wav"
    sf.write(low, voiced_clip(110.0, 3.5, seed=1), SR)
    sf.write(high, voiced_clip(220.0, 3.5, seed=2), SR)
    voice_low = synth.speaker_embedding(references=[low])
    voice_high = synth.speaker_embedding(references=[high])
    assert voice_low.shape == (256 + 161,)
    assert math.exp(voice_low[-1]) == pytest.approx(110.0, rel=0.1)
    assert math.exp(voice_high[-1]) == pytest.approx(220.0, rel=0.1)
    a = synth.synthesize(texts[0], voice_low)
    b = synth.synthesize(texts[0], voice_high)
    assert not np.allclose(a.mel, b.mel)
    # A bare embedding still speaks (the training voices' mean statistics)...
    assert synth.synthesize(texts[0], voice_low[:256]).audio.size > 0
    # ...and a vector of any other length is refused with what a voice is.
    with pytest.raises(ValueError, match="256-d speaker embedding"):
        synth.synthesize(texts[0], voice_low[:300])


def test_matching_moves_a_mel_to_the_voice_mean_and_spread():
    torch.manual_seed(1)
    mel = torch.randn(80, 120) * 0.8 - 5.0
    target = vs.voice_statistics(mel[None], torch.zeros(1, 120))[0].clone()
    target[:80] += 0.7
    target[80:160] *= 1.5
    out = vs.match(mel, target, FLOOR)
    got = vs.voice_statistics(out[None], torch.zeros(1, 120))[0]
    assert torch.allclose(got[:80], target[:80], atol=1e-3)
    assert torch.allclose(got[80:160], target[80:160], rtol=2e-2)


def test_matching_is_bounded_and_leaves_short_chunks_alone():
    mel = torch.randn(80, 20) - 5.0  # under MATCH_MIN_FRAMES of speech: no measure to trust
    target = vs.voice_statistics(mel[None], torch.zeros(1, 20))[0] + 1.0
    assert torch.equal(vs.match(mel, target, FLOOR), mel)

    long = torch.randn(80, 200) * 0.5 - 5.0
    stats = vs.voice_statistics(long[None], torch.zeros(1, 200))[0].clone()
    stats[80:160] *= 10.0  # a spread far beyond the output's is not chased
    stats[:80] = -20.0  # a mean below the floor: nothing goes under it
    out = vs.match(long, stats, FLOOR)
    assert out.min() >= FLOOR
    bounded = vs.match(long, torch.cat([stats[:80] + 20.0 - 5.0, stats[80:]]), FLOOR)
    ratio = bounded.std(1) / long.std(1)
    assert ratio.max() <= vs.MATCH_MAX_RATIO * 1.05
