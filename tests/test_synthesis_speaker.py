"""Reference clips -> speaker embeddings, and every way a clip can be refused.

Speech comes from espeak-ng (the library the espeakng-loader wheel ships), so the tests need no
recordings. `espeak_speech` is imported by the other synthesis test modules.
"""

from __future__ import annotations

import ctypes
import io
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from synthesis import speaker
from synthesis.evaluate import secs

_espeak = None
_espeak_lock = threading.Lock()
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def espeak_speech(text: str, voice: str = "en-us") -> tuple[np.ndarray, int]:
    """Speech from espeak-ng's C library in this process: (float32 mono, sample rate 22050).

    Voice variants ("en-us+f3") give a clearly different speaker for similarity tests.
    """
    global _espeak
    import espeakng_loader

    with _espeak_lock:
        if _espeak is None:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            sr = lib.espeak_Initialize(
                2, 0, espeakng_loader.get_data_path().encode(), 0
            )  # synchronous
            chunks: list[np.ndarray] = []

            def collect(wav, n, _events):
                if n > 0:
                    chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
                return 0

            callback = _SYNTH_CALLBACK(collect)
            lib.espeak_SetSynthCallback(callback)
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
            _espeak = (lib, sr, chunks, callback)
        lib, sr, chunks, _ = _espeak
        chunks.clear()
        assert lib.espeak_SetVoiceByName(voice.encode()) == 0, f"espeak-ng has no voice {voice}"
        data = text.encode()
        lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 1, None, None)  # 1 = UTF-8 text
        lib.espeak_Synchronize()
        return np.concatenate(chunks).astype(np.float32) / 32768.0, sr


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
