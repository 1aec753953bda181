"""Reference clips in, a speaker embedding out.

The model is conditioned on the 256-d Resemblyzer utterance embedding it was trained with, so a
cloned voice is only as good as the reference clip. Every way a clip can be unusable gets its own
`ReferenceAudioError` with a message a person can act on, instead of a silent bad embedding.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from training.audio import resample

MIN_SECONDS = 3.0
MAX_SECONDS = 30.0
# Resemblyzer embeds 1.6 s windows; less voiced speech than this gives a noisy embedding.
MIN_SPEECH_SECONDS = 1.0
# Below -60 dBFS RMS a recording is a muted microphone, not a voice.
SILENCE_DBFS = -60.0
# More than 1 % of samples pinned at full scale is audible distortion that the encoder
# would learn as part of the "voice".
CLIPPED_SHARE = 0.01
CLIP_LEVEL = 0.999

ENCODER_SAMPLE_RATE = 16000  # Resemblyzer's rate; its VAD only accepts 8/16/32/48 kHz.

AudioSource = str | os.PathLike | bytes | io.IOBase | tuple[int, np.ndarray]


class ReferenceAudioError(ValueError):
    """A reference clip that cannot give a usable voice; `code` is stable, the message is for people."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class ReferenceClip:
    wav: np.ndarray  # float32 mono at ENCODER_SAMPLE_RATE, silences trimmed by the VAD
    original_sample_rate: int
    channels: int
    duration_s: float  # before trimming
    speech_s: float  # after trimming
    # The decoded clip as it came (mono, its own rate): what embed_clip embeds, through the
    # same trim and loudness normalisation as every training clip.
    source: np.ndarray | None = None


def decode(source: AudioSource) -> tuple[np.ndarray, int, int]:
    """Any file soundfile reads (path, bytes or file object) or Gradio's (rate, array) pair
    -> (float32 mono waveform, sample rate, channel count)."""
    if isinstance(source, tuple):
        sr, data = source
        data = np.asarray(data)
        if np.issubdtype(data.dtype, np.integer):
            data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
        data = data.astype(np.float32).reshape(len(data), -1)
    else:
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        _refuse_long_by_header(source)
        try:
            data, sr = sf.read(source, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise ReferenceAudioError(
                "undecodable",
                f"Could not read the reference audio; upload a WAV, FLAC, OGG or MP3 file ({exc}).",
            ) from exc
        except FileNotFoundError as exc:
            raise ReferenceAudioError("undecodable", f"Reference file not found: {exc}.") from exc
    channels = data.shape[1] if data.ndim == 2 else 1
    wav = data.mean(axis=1) if data.ndim == 2 else data
    if not np.all(np.isfinite(wav)):
        raise ReferenceAudioError(
            "undecodable", "The reference audio contains invalid samples (NaN or infinity)."
        )
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr), int(channels)


def _refuse_long_by_header(source) -> None:
    """Judge the duration from the header before decoding a sample: a few MB of compressed
    audio can decode to gigabytes of floats."""
    start = source.tell() if hasattr(source, "tell") else None
    try:
        info = sf.info(source)
    except Exception:
        return  # sf.read says what is wrong with it
    finally:
        if start is not None:
            source.seek(start)
    if info.samplerate > 0 and info.frames / info.samplerate > MAX_SECONDS + 1:
        check_reference(np.zeros(0, np.float32), 1, seconds=info.frames / info.samplerate)


def check_reference(wav: np.ndarray, sr: int, seconds: float | None = None) -> None:
    """Raise ReferenceAudioError for clips too short, too long, silent or clipped."""
    if seconds is None:
        seconds = len(wav) / sr if sr else 0.0
    if seconds < MIN_SECONDS:
        raise ReferenceAudioError(
            "too_short",
            f"The reference is {seconds:.1f} s long; give {MIN_SECONDS:g}-{MAX_SECONDS:g} s of clear speech.",
        )
    if seconds > MAX_SECONDS:
        raise ReferenceAudioError(
            "too_long",
            f"The reference is {seconds:.1f} s long; give {MIN_SECONDS:g}-{MAX_SECONDS:g} s of clear speech "
            "(trim it, or split it into several clips).",
        )
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms <= 0 or 20 * np.log10(rms) < SILENCE_DBFS:
        raise ReferenceAudioError(
            "silent", "The reference is silent; check that the microphone is on and not muted."
        )
    clipped = float(np.mean(np.abs(wav) >= CLIP_LEVEL))
    if clipped > CLIPPED_SHARE:
        raise ReferenceAudioError(
            "clipped",
            f"The reference is clipped ({clipped:.1%} of samples at full scale); record it again "
            "with the input level lower.",
        )


def load_reference(source: AudioSource) -> ReferenceClip:
    """Decode, check and VAD-trim one reference clip, ready for the speaker encoder."""
    # Imported here: resemblyzer pulls in librosa and webrtcvad, which the rest of the
    # engine does not need when a seen speaker is used. webrtcvad imports the deprecated
    # pkg_resources, which is its business, not the user's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import preprocess_wav

    wav, sr, channels = decode(source)
    check_reference(wav, sr)
    wav16 = wav
    if sr != ENCODER_SAMPLE_RATE:
        # training.audio.resample: bounded memory at any rate (a clip that says 48001 Hz made
        # torchaudio's kernel 8 GB)
        wav16 = resample(torch.from_numpy(wav), sr, ENCODER_SAMPLE_RATE).numpy()
    # Resemblyzer's own preparation: volume normalisation and webrtcvad trimming of long
    # silences, exactly what its encoder saw in training.
    trimmed = preprocess_wav(wav16.astype(np.float32))
    speech_s = len(trimmed) / ENCODER_SAMPLE_RATE
    if speech_s < MIN_SPEECH_SECONDS:
        raise ReferenceAudioError(
            "no_speech",
            f"Found only {speech_s:.1f} s of speech in the reference after removing silence; "
            f"give at least {MIN_SPEECH_SECONDS:g} s of someone talking.",
        )
    return ReferenceClip(
        wav=trimmed.astype(np.float32),
        original_sample_rate=sr,
        channels=channels,
        duration_s=len(wav) / sr,
        speech_s=speech_s,
        source=wav.astype(np.float32),
    )


def embed_clip(clip: ReferenceClip) -> np.ndarray:
    from training.speaker_embedding import embed_speech, embed_wav

    if clip.source is None:  # a clip made elsewhere, already at the encoder's rate
        return embed_wav(clip.wav, ENCODER_SAMPLE_RATE)
    return embed_speech(clip.source, clip.original_sample_rate)


def load_references(sources: AudioSource | Sequence[AudioSource]) -> list[ReferenceClip]:
    """One clip or several, each decoded and checked; a bad one is named in the error."""
    given: list = [sources] if is_single_source(sources) else list(sources)  # type: ignore[arg-type]
    if not given:
        raise ReferenceAudioError("missing", "Give at least one reference clip.")
    clips = []
    for i, source in enumerate(given, 1):
        try:
            clips.append(load_reference(source))
        except ReferenceAudioError as exc:
            if len(given) == 1:
                raise
            name = Path(source).name if isinstance(source, (str, os.PathLike)) else f"clip {i}"
            raise ReferenceAudioError(exc.code, f"{name}: {exc}") from exc
    return clips


def embed_references(sources: AudioSource | Sequence[AudioSource]) -> np.ndarray:
    """One clip or several of the same person -> one L2-normalised 256-d embedding.

    Several clips are averaged: the mean of unit embeddings is the usual way to get a steadier
    speaker vector than any single utterance gives.
    """
    return _mean_embedding(load_references(sources))


def _mean_embedding(clips: list[ReferenceClip]) -> np.ndarray:
    return normalised(np.mean([embed_clip(c) for c in clips], axis=0))


def clip_voice_statistics(clips: list[ReferenceClip], audio) -> np.ndarray:
    """The voice statistics (training.voice_stats) of reference clips, with the features the
    model was trained on: the clip at the model's rate, trimmed and loudness-normalised as
    preprocessing does, its log-mel and YIN pitch. `audio` is the model's AudioConfig."""
    from training import audio as audio_lib
    from training import voice_stats

    mels, f0s = [], []
    for clip in clips:
        if clip.source is not None:
            wav = torch.from_numpy(clip.source)
            sr = clip.original_sample_rate
        else:
            wav, sr = torch.from_numpy(clip.wav), ENCODER_SAMPLE_RATE
        if sr != audio.sample_rate:
            wav = resample(wav, sr, audio.sample_rate)
        wav = audio_lib.normalise_loudness(audio_lib.trim_silence(wav, audio.sample_rate))
        with torch.inference_mode():
            mels.append(audio_lib.mel_spectrogram(wav, audio))
            f0s.append(audio_lib.pitch(wav, audio.sample_rate, audio.hop_length))
    return voice_stats.of_clips(mels, f0s).numpy().astype(np.float32)


def reference_voice(sources: AudioSource | Sequence[AudioSource], audio=None) -> np.ndarray:
    """The voice a model is conditioned on: the mean embedding, followed by the clips' voice
    statistics when `audio` (the model's AudioConfig) is given, from one decode of each clip."""
    clips = load_references(sources)
    embedding = _mean_embedding(clips)
    if audio is None:
        return embedding
    return np.concatenate([embedding, clip_voice_statistics(clips, audio)])


def is_single_source(source) -> bool:
    if isinstance(source, tuple):  # Gradio's (sample rate, samples) pair, not a tuple of clips
        return len(source) == 2 and isinstance(source[0], int | np.integer)
    return isinstance(source, str | os.PathLike | bytes) or hasattr(source, "read")


def seen_speaker_embedding(speakers: dict, name: str) -> np.ndarray:
    """A speaker of the training data, by name, from the checkpoint's `speakers` table."""
    if name not in speakers:
        known = ", ".join(sorted(speakers)) or "none"
        raise ReferenceAudioError(
            "unknown_speaker", f"This checkpoint has no speaker {name!r} (it knows: {known})."
        )
    return normalised(np.asarray(speakers[name], dtype=np.float32))


def normalised(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(emb))
    if not np.isfinite(norm) or norm == 0:
        raise ReferenceAudioError("bad_embedding", "The speaker embedding is empty or invalid.")
    return emb / norm
