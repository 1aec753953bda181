"""A tiny corpus of synthesised "speech" and its feature cache, built by the real preprocessing.

Runs tests train on it: a dozen one-second harmonic clips from two voices, through
training.preprocess.preprocess_corpus (decode, trim, loudness, mel, pitch, energy, speaker
embedding, tokens). Built once per test session and shared by the modules that ask for it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 22050
TEXTS = (
    "The cat sat on the mat.",
    "A bird sings at dawn.",
    "We walked home slowly.",
    "Bread and butter, please.",
    "Rain fell all night.",
    "Open the window now.",
)
_lock = threading.Lock()


def voiced_clip(f0: float, seconds: float, seed: int) -> np.ndarray:
    """A vowel-like harmonic tone with vibrato between short silences."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    freq = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(freq) / SR
    tone = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6)) * np.hanning(t.size) ** 0.3
    tone = tone + rng.normal(0, 0.003, t.size)
    pad = np.zeros(int(0.2 * SR))
    return np.concatenate([pad, tone, pad]).astype(np.float32)


def write_corpus(root: Path, n: int = 12) -> list:
    from training.corpus import CorpusItem

    (root / "wavs").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        speaker = "low" if i % 2 == 0 else "high"
        path = root / "wavs" / f"{speaker}_{i:02d}.wav"
        f0 = (110 if speaker == "low" else 210) + 4 * i
        sf.write(path, voiced_clip(f0, 1.0 + 0.05 * (i % 5), seed=i), SR)
        items.append(
            CorpusItem(id=f"{speaker}_{i:02d}", audio_path=path, text=TEXTS[i % 6], speaker=speaker)
        )
    return items


def feature_cache(n: int = 12) -> Path:
    """The session's feature cache (built on first use), under the test data folder."""
    from training.preprocess import preprocess_corpus

    root = Path(os.environ["STUDIO_DATA_DIR"]) / f"fixture-corpus-{n}"
    cache = root / "cache"
    with _lock:
        if not (cache / "meta.json").exists():
            items = write_corpus(root / "audio", n)
            result = preprocess_corpus(items, cache, lang="en")
            assert result.kept == n, result.problems
    return cache
