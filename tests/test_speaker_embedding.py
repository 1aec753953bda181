import numpy as np
import pytest
import torch

from tests.fixtures_audio import espeak_speech
from training import speaker_embedding as speaker
from training.audio import resample

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore every summer.",
)


@pytest.fixture(scope="module")
def say():
    """Real speech from the espeak-ng library that ships in the espeakng-loader wheel."""
    pytest.importorskip("espeakng_loader")
    return espeak_speech


def test_embedding_shape_norm_and_dtype(say):
    wav, sr = say(SENTENCES[0])
    emb = speaker.embed_wav(wav, sr)
    assert emb.shape == (speaker.EMBEDDING_DIM,) and emb.dtype == np.float32
    assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    # Tensors work as well as arrays, and the encoder is loaded once per process.
    again = speaker.embed_wav(torch.from_numpy(wav), sr)
    np.testing.assert_allclose(again, emb, atol=1e-5)
    assert speaker.encoder() is speaker.encoder("cpu")


def test_sample_rate_does_not_change_the_voice(say):
    wav, sr = say(SENTENCES[0])
    at_16k = resample(torch.from_numpy(wav), sr, 16000).numpy()
    at_44k = resample(torch.from_numpy(wav), sr, 44100).numpy()
    ref = speaker.embed_wav(wav, sr)
    assert speaker.similarity(ref, speaker.embed_wav(at_16k, 16000)) > 0.98
    assert speaker.similarity(ref, speaker.embed_wav(at_44k, 44100)) > 0.98


def test_same_voice_is_closer_than_another_voice(say):
    male = [speaker.embed_wav(*say(s, "en-us", pitch=40)) for s in SENTENCES]
    female = [speaker.embed_wav(*say(s, "en-us+f3", pitch=80)) for s in SENTENCES]
    same = min(speaker.similarity(*male), speaker.similarity(*female))
    other = max(speaker.similarity(m, f) for m in male for f in female)
    assert same > other + 0.1
    # The speaker's mean embedding sits with its own utterances.
    mean = speaker.mean_embedding(male)
    assert np.linalg.norm(mean) == pytest.approx(1.0, abs=1e-5)
    assert speaker.similarity(mean, male[0]) > speaker.similarity(mean, female[0])


def test_silent_or_empty_audio_is_refused():
    with pytest.raises(ValueError, match="silent"):
        speaker.embed_wav(np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="empty"):
        speaker.embed_wav(np.zeros(0, dtype=np.float32), 16000)


def test_very_short_clip_still_embeds():
    t = np.arange(4000) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    emb = speaker.embed_wav(wav, 16000)
    assert np.isfinite(emb).all() and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
