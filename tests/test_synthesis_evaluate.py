"""The objective scores on their own: SECS, MCD with DTW, WER with pocketsphinx, RTF.

`evaluate_checkpoint` on a trained checkpoint is exercised in test_synthesis_engine, which
trains one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthesis import evaluate
from tests.fixtures_audio import espeak_speech
from training import audio as audio_lib


@pytest.fixture(scope="module")
def mels() -> dict[str, torch.Tensor]:
    out = {}
    for name, text in [
        ("a", "The quiet teacher collected two loaves of bread."),
        ("b", "Nobody noticed the green door."),
    ]:
        wav, _sr = espeak_speech(text)
        out[name] = audio_lib.mel_spectrogram(torch.from_numpy(wav))
    return out


def test_secs_is_the_cosine():
    a = np.array([1.0, 0.0, 0.0])
    assert evaluate.secs(a, 3 * a) == pytest.approx(1.0)
    assert evaluate.secs(a, -a) == pytest.approx(-1.0)
    assert evaluate.secs(a, np.array([0.0, 2.0, 0.0])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        evaluate.secs(a, np.zeros(3))


def test_mel_cepstrum_drops_c0():
    mel = torch.randn(80, 50)
    cep = evaluate.mel_cepstrum(mel)
    assert cep.shape == (50, evaluate.N_CEPSTRA)
    # A loudness change moves only c0, which MCD leaves out.
    assert np.allclose(evaluate.mel_cepstrum(mel + 2.0), cep, atol=1e-4)


def test_mcd_is_zero_for_the_same_mel_and_dtw_absorbs_timing(mels):
    a = mels["a"]
    assert evaluate.mel_cepstral_distortion(a, a) == pytest.approx(0.0, abs=1e-6)
    slower = a.repeat_interleave(2, dim=1)  # same sound, twice as long
    assert evaluate.mel_cepstral_distortion(a, slower) == pytest.approx(0.0, abs=1e-6)


def test_mcd_grows_with_distortion_and_between_sentences(mels):
    a, b = mels["a"], mels["b"]
    gen = torch.Generator().manual_seed(0)
    small = evaluate.mel_cepstral_distortion(a, a + 0.2 * torch.randn(a.shape, generator=gen))
    large = evaluate.mel_cepstral_distortion(a, a + 1.0 * torch.randn(a.shape, generator=gen))
    other = evaluate.mel_cepstral_distortion(a, b)
    assert 0 < small < large
    assert other > small
    with pytest.raises(ValueError):
        evaluate.mel_cepstral_distortion(a, a[:, :0])


@pytest.mark.parametrize(
    "reference, hypothesis, expected",
    [
        ("the cat sat down", "the cat sat down", 0.0),
        ("The cat, sat down!", "the cat sat down", 0.0),  # case and punctuation do not count
        ("the cat sat down", "the dog sat down", 0.25),  # one substitution
        ("the cat sat down", "the cat sat", 0.25),  # one deletion
        ("the cat sat down", "the cat sat right down", 0.25),  # one insertion
        (
            "I have 2 cats",
            "i have two cats",
            0.0,
        ),  # the reference is normalised like the model's input
        ("the cat sat down", "", 1.0),
        ("one two", "three four five six", 2.0),  # WER is not capped at 1
    ],
)
def test_word_error_rate(reference, hypothesis, expected):
    assert evaluate.word_error_rate(reference, hypothesis) == pytest.approx(expected)


def test_word_error_rate_needs_reference_words():
    with pytest.raises(ValueError):
        evaluate.word_error_rate("...", "hello")


def test_the_recogniser_understands_a_real_recording(corpora_dir):
    from training.audio import load_audio

    root = corpora_dir / "dev-en-8spk"
    wav, _ = load_audio(root / "wavs" / "awb_0000.flac", 22050)
    heard = evaluate.transcribe(wav.numpy(), 22050)
    assert (
        evaluate.word_error_rate(
            "The quiet teacher collected two loaves of bread under the bright lights.", heard
        )
        < 0.5
    )


def test_real_time_factor():
    assert evaluate.real_time_factor(0.5, 2.0) == 0.25
    with pytest.raises(ValueError):
        evaluate.real_time_factor(1.0, 0.0)


def test_utterances_are_picked_round_robin_over_speakers():
    records = [{"id": f"{s}_{i}", "speaker": s} for s in ("b", "a") for i in range(3)] + [
        {"id": "c_0", "speaker": "c"}
    ]
    picked = [r["id"] for r in evaluate._pick_utterances(records, 5)]
    assert picked == ["a_0", "b_0", "c_0", "a_1", "b_1"]


def test_real_clip_similarity_from_a_feature_cache(tmp_path):
    (tmp_path / "feats").mkdir()
    rng = np.random.default_rng(0)
    centre = {"x": rng.standard_normal(256), "y": rng.standard_normal(256)}
    lines = []
    for speaker in ("x", "y"):
        for i in range(3):
            emb = centre[speaker] + 0.3 * rng.standard_normal(256)
            rel = f"feats/{speaker}{i}.pt"
            torch.save(
                {"spk_emb": torch.tensor(emb / np.linalg.norm(emb), dtype=torch.float32)},
                tmp_path / rel,
            )
            lines.append(json.dumps({"id": f"{speaker}{i}", "speaker": speaker, "feats": rel}))
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    sims = evaluate.real_clip_similarity(tmp_path)
    assert sims["secs_real_same_speaker"] > 0.8
    assert abs(sims["secs_real_different_speakers"]) < 0.2
