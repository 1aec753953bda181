"""Speaker embeddings from the pretrained Resemblyzer voice encoder.

The encoder's weights ship inside the resemblyzer wheel, so this works offline. The same
encoder embeds training utterances (cached with the features), reference clips for cloning and
synthesised audio for similarity scores, so all three live in one space.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
import torchaudio.transforms as AT

from training.audio import resample

ENCODER_SAMPLE_RATE = 16000
EMBEDDING_DIM = 256

_encoders: dict[str, object] = {}
_lock = threading.Lock()


def _resemblyzer():
    with warnings.catch_warnings():
        # webrtcvad (a resemblyzer dependency) imports the deprecated pkg_resources.
        warnings.simplefilter("ignore")
        import resemblyzer
    return resemblyzer


def encoder(device: str | torch.device = "cpu"):
    """The process's VoiceEncoder for `device`, loaded on first use."""
    key = str(device)
    with _lock:
        if key not in _encoders:
            VoiceEncoder = _resemblyzer().VoiceEncoder
            _encoders[key] = VoiceEncoder(device=torch.device(key), verbose=False)
        return _encoders[key]


def _prepare(wav, sr: int) -> np.ndarray:
    rz = _resemblyzer().audio
    x = torch.as_tensor(wav, dtype=torch.float32).detach().cpu().reshape(-1)
    if sr != ENCODER_SAMPLE_RATE:
        # torchaudio rather than resemblyzer.preprocess_wav: the latter resamples with
        # librosa, which takes seconds on its first call in every process.
        x = resample(x, sr, ENCODER_SAMPLE_RATE)
    samples = x.numpy()
    if samples.size == 0 or not np.isfinite(samples).all() or not np.abs(samples).max() > 0:
        raise ValueError("cannot embed an empty, silent or non-finite waveform")
    samples = rz.normalize_volume(samples, -30, increase_only=True)
    trimmed = rz.trim_long_silences(samples)
    # The VAD can remove everything from a clip that is very short or very quiet; the
    # untrimmed clip still gives a usable (if weaker) embedding.
    return trimmed if trimmed.size >= ENCODER_SAMPLE_RATE // 4 else samples


_MEL: dict[str, torch.nn.Module] = {}


def _encoder_mel(x: np.ndarray, device: str) -> torch.Tensor:
    """The encoder's input features (40-band power mel, 25 ms / 10 ms at 16 kHz) via torchaudio.

    Resemblyzer computes the same thing with librosa, whose first call in a process costs
    several seconds of JIT compilation (and every preprocessing worker is a new process); the
    torchaudio version matches it to 1e-6 relative.
    """
    if device not in _MEL:
        _MEL[device] = AT.MelSpectrogram(
            sample_rate=ENCODER_SAMPLE_RATE,
            n_fft=400,
            hop_length=160,
            n_mels=40,
            power=2.0,
            center=True,
            pad_mode="constant",
            norm="slaney",
            mel_scale="slaney",
        ).to(device)
    return _MEL[device](torch.from_numpy(x).to(device)).T  # [frames, 40]


def embed_wav(wav, sr: int, device: str | torch.device = "cpu") -> np.ndarray:
    """L2-normalised 256-d float32 embedding of one utterance (any sample rate, mono).

    As VoiceEncoder.embed_utterance: mean of the embeddings of 1.6 s partial windows.
    """
    x = _prepare(wav, sr).astype(np.float32)
    enc = encoder(device)
    wav_slices, mel_slices = enc.compute_partial_slices(x.size, rate=1.3, min_coverage=0.75)
    if wav_slices[-1].stop >= x.size:
        x = np.pad(x, (0, wav_slices[-1].stop - x.size))
    with torch.inference_mode():
        mel = _encoder_mel(x, str(enc.device))
        partials = enc(torch.stack([mel[s] for s in mel_slices]))
        emb = partials.mean(dim=0).cpu().numpy().astype(np.float32)
    norm = float(np.linalg.norm(emb))
    return emb / norm if norm > 0 else emb


def embed_speech(wav, sr: int, device: str | torch.device = "cpu") -> np.ndarray:
    """The one embedding path for training clips and reference clips alike: silence trimmed
    and loudness normalised as preprocessing does, then embed_wav.

    Reference clips used to skip the trim and the -23 dBFS normalisation; the same clip then
    scored 0.95-0.99 cosine against itself depending on its level, while two different
    speakers of the dev corpus are 0.43-0.73 apart.
    """
    from training.audio import normalise_loudness, trim_silence

    x = torch.as_tensor(wav, dtype=torch.float32).reshape(-1)
    return embed_wav(normalise_loudness(trim_silence(x, sr)), sr, device=device)


def mean_embedding(embeddings) -> np.ndarray:
    """The speaker's embedding: L2-normalised mean of its utterance embeddings."""
    mean = np.mean(np.asarray(embeddings, dtype=np.float32), axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def similarity(a, b) -> float:
    """Cosine similarity of two embeddings (1 = same voice direction)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denom == 0:
        raise ValueError("cannot compare an all-zero speaker embedding")
    return float(a @ b / denom)
