"""Reference clips -> speaker embeddings, and every way a clip can be refused.

Speech comes from espeak-ng (the library the espeakng-loader wheel ships), so the tests need no
recordings. `espeak_speech` lives in tests/fixtures_audio.py, shared by every module that speaks.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from synthesis import reference_clips as speaker
from synthesis.evaluate import secs
from tests.fixtures_audio import espeak_speech

SENTENCES = [
    "The quiet teacher collected two loaves of bread under the bright lights.",
    "A young doctor measured the evening train, and nobody noticed at all.",
]


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    wav, sr = espeak_speech(" ".join(SENTENCES))
    assert 5 < len(wav) / sr < 12
    return wav, sr


def wav_bytes(wav: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format=fmt)
    return buf.getvalue()


def test_a_clip_becomes_a_unit_256_d_embedding(tmp_path, speech):
    wav, sr = speech
    path = tmp_path / "ref.wav"
    sf.write(path, wav, sr)
    emb = speaker.embed_references(str(path))
    assert emb.shape == (256,) and emb.dtype == np.float32
    assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5


def test_stereo_flac_at_another_rate_gives_the_same_voice(tmp_path, speech):
    wav, sr = speech
    wav44 = torchaudio.functional.resample(torch.from_numpy(wav), sr, 44100).numpy()
    stereo = np.stack([wav44, 0.8 * wav44], axis=1)
    path = tmp_path / "ref.flac"
    sf.write(path, stereo, 44100)
    clip = speaker.load_reference(path)
    assert clip.channels == 2 and clip.original_sample_rate == 44100
    assert clip.speech_s <= clip.duration_s
    assert secs(speaker.embed_references(path), speaker.embed_references(wav_bytes(wav, sr))) > 0.95


def test_bytes_file_objects_and_gradio_pairs_are_accepted(speech):
    wav, sr = speech
    data = wav_bytes(wav, sr)
    as_int16 = (wav * 32767).astype(np.int16)
    a = speaker.embed_references(data)
    b = speaker.embed_references(io.BytesIO(data))
    c = speaker.embed_references((sr, as_int16))
    assert secs(a, b) > 0.999 and secs(a, c) > 0.99


def test_several_clips_are_averaged(speech):
    first, sr = espeak_speech(SENTENCES[0] + " " + SENTENCES[1])
    second, _ = espeak_speech(SENTENCES[1] + " " + SENTENCES[0])
    one = speaker.embed_references(wav_bytes(first, sr))
    two = speaker.embed_references(wav_bytes(second, sr))
    both = speaker.embed_references([wav_bytes(first, sr), wav_bytes(second, sr)])
    expected = (one + two) / np.linalg.norm(one + two)
    assert np.allclose(both, expected, atol=1e-5)


@pytest.mark.parametrize(
    "make, code, words",
    [
        (lambda sr: np.zeros(5 * sr, dtype=np.float32), "silent", "silent"),
        (lambda sr: np.full(5 * sr, 1e-5, dtype=np.float32), "silent", "silent"),
        (
            lambda sr: 0.3 * np.sin(np.arange(sr // 2) * 0.05).astype(np.float32),
            "too_short",
            "0.5 s",
        ),
        (
            lambda sr: 0.1 * np.random.default_rng(0).standard_normal(40 * sr).astype(np.float32),
            "too_long",
            "40.0 s",
        ),
    ],
)
def test_bad_references_are_refused_clearly(make, code, words):
    sr = 16000
    with pytest.raises(speaker.ReferenceAudioError) as err:
        speaker.embed_references(wav_bytes(make(sr), sr))
    assert err.value.code == code
    assert words in str(err.value)
    assert isinstance(err.value, ValueError)


def test_clipped_reference_is_refused(speech):
    wav, sr = speech
    loud = np.clip(wav * 30, -1.0, 1.0)
    with pytest.raises(speaker.ReferenceAudioError, match="clipped") as err:
        speaker.embed_references(wav_bytes(loud, sr, "FLAC"))
    assert err.value.code == "clipped"


@pytest.mark.parametrize("data", [b"", b"RIFF\x00\x00garbage" * 50, b"\x00" * 1000])
def test_corrupt_files_are_refused(data):
    with pytest.raises(speaker.ReferenceAudioError, match="Could not read") as err:
        speaker.embed_references(data)
    assert err.value.code == "undecodable"


def test_truncated_wav_is_refused_or_too_short(speech):
    wav, sr = speech
    data = wav_bytes(wav, sr)[:2000]  # header says seconds, body has a few milliseconds
    with pytest.raises(speaker.ReferenceAudioError) as err:
        speaker.embed_references(data)
    assert err.value.code in ("undecodable", "too_short")


def test_no_speech_after_vad(speech):
    """A clip that is mostly silence with a blip of sound: long enough, loud enough, no voice."""
    wav, sr = speech
    clip = np.zeros(6 * sr, dtype=np.float32)
    blip = wav[: int(0.3 * sr)]
    clip[sr : sr + len(blip)] = blip
    with pytest.raises(speaker.ReferenceAudioError, match="of speech") as err:
        speaker.embed_references(wav_bytes(clip, sr))
    assert err.value.code == "no_speech"


def test_which_clip_failed_is_named_when_several_are_given(tmp_path, speech):
    wav, sr = speech
    good = tmp_path / "good.wav"
    bad = tmp_path / "quiet.wav"
    sf.write(good, wav, sr)
    sf.write(bad, np.zeros(4 * sr, dtype=np.float32), sr)
    with pytest.raises(speaker.ReferenceAudioError, match=r"^quiet\.wav: .*silent"):
        speaker.embed_references([good, bad])


def test_seen_speaker_by_name():
    table = {"awb": [3.0] + [0.0] * 255, "slt": [0.0, 2.0] + [0.0] * 254}
    emb = speaker.seen_speaker_embedding(table, "slt")
    assert emb[1] == pytest.approx(1.0)
    with pytest.raises(speaker.ReferenceAudioError, match="awb, slt"):
        speaker.seen_speaker_embedding(table, "nobody")


def test_different_voices_are_further_apart_than_one_voice(speech):
    """The encoder behind every score here separates voices at all (ceiling > floor)."""
    a1, sr = espeak_speech(SENTENCES[0])
    a2, _ = espeak_speech(SENTENCES[1])
    b1, _ = espeak_speech(SENTENCES[1], "en-us+f3")
    from synthesis.evaluate import embed_audio

    same = secs(embed_audio(a1, sr), embed_audio(a2, sr))
    different = secs(embed_audio(a1, sr), embed_audio(b1, sr))
    assert same > different + 0.1


def test_a_long_clip_is_refused_from_its_header_before_decoding(monkeypatch):
    """A few MB of compressed audio can decode to gigabytes: the header decides first."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(8000 * 600, np.int16), 8000, format="WAV", subtype="PCM_16")

    def decoded(*args, **kwargs):
        raise AssertionError("the samples were decoded")

    monkeypatch.setattr(speaker.sf, "read", decoded)
    with pytest.raises(speaker.ReferenceAudioError) as refused:
        speaker.decode(buffer.getvalue())
    assert refused.value.code == "too_long" and "600.0 s" in str(refused.value)


def test_a_reference_is_embedded_as_its_clip_would_be_in_training(speech):
    """One embedding path: the clip's level no longer moves the voice, and a reference gives
    the embedding preprocessing gives the same recording."""
    from training import audio as A
    from training.speaker_embedding import embed_wav

    wav, sr = speech
    quiet = speaker.embed_references(wav_bytes(0.05 * wav, sr))
    loud = speaker.embed_references(wav_bytes(0.9 * wav, sr))
    assert secs(quiet, loud) > 0.999
    trained = embed_wav(A.normalise_loudness(A.trim_silence(torch.from_numpy(wav), sr)), sr)
    assert secs(loud, trained) > 0.999
