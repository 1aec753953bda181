"""A tiny corpus of synthesised "speech" and its feature cache, built by the real preprocessing.

Runs tests train on it: a dozen one-second harmonic clips from two voices, through
training.preprocess.preprocess_corpus (decode, trim, loudness, mel, pitch, energy, speaker
embedding, tokens). Built once per test session and shared by the modules that ask for it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
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


# espeak-ng keeps one C state per loaded library: one callback, one voice, one pitch. Every
# test module speaks through this one helper, because a second module registering its own
# callback on the same library leaves the first one calling freed memory (a segfault seen
# when the whole suite ran in one process).
_espeak = None
_espeak_lock = threading.Lock()
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
_ESPEAK_PITCH = 3  # espeakPITCH
DEFAULT_PITCH = 50


def espeak_speech(
    text: str, voice: str = "en-us", pitch: int = DEFAULT_PITCH
) -> tuple[np.ndarray, int]:
    """Speech from espeak-ng's C library (the one the espeakng-loader wheel ships), in this
    process: (float32 mono, its sample rate, 22050).

    Voice variants ("en-us+f3") and pitch give clearly different speakers for similarity tests.
    """
    global _espeak
    import espeakng_loader

    with _espeak_lock:
        if _espeak is None:
            # A private copy of the library: dlopen of the same path returns the instance the
            # phonemiser (training.text) initialises too, whose set-up replaces our callback.
            private = Path(tempfile.mkdtemp(prefix="espeak-")) / "libespeak-ng-tests.so"
            shutil.copyfile(espeakng_loader.get_library_path(), private)
            lib = ctypes.CDLL(str(private))
            synchronous = 2
            sr = lib.espeak_Initialize(synchronous, 0, espeakng_loader.get_data_path().encode(), 0)
            chunks: list[np.ndarray] = []

            def collect(wav, n, _events):
                if n > 0:
                    chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
                return 0

            callback = _SYNTH_CALLBACK(collect)  # referenced for as long as the library lives
            lib.espeak_SetSynthCallback(callback)
            lib.espeak_Synth.argtypes = [
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.c_uint,
                ctypes.c_int,
                ctypes.c_uint,
                ctypes.c_uint,
                ctypes.c_void_p,
                ctypes.c_void_p,
            ]
            _espeak = (lib, sr, chunks, callback)
        lib, sr, chunks, _ = _espeak
        chunks.clear()
        assert lib.espeak_SetVoiceByName(voice.encode()) == 0, f"espeak-ng has no voice {voice}"
        lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)  # absolute; always set, never inherited
        data = text.encode()
        utf8 = 1
        lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, utf8, None, None)
        lib.espeak_Synchronize()
        return np.concatenate(chunks).astype(np.float32) / 32768.0, sr


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


def bare_checkpoint(folder: Path, texts) -> Path:
    """An untrained tiny model with no seen speakers, whose symbols cover `texts`."""
    from training.checkpoint import save_checkpoint
    from training.model import MODEL_SIZES, TTSModel
    from training.text import Frontend, SymbolTable

    frontend = Frontend("en")
    symbols = SymbolTable.from_tokens([frontend.tokens(" ".join(texts))])
    model = TTSModel(MODEL_SIZES["tiny"], len(symbols))
    return save_checkpoint(
        folder / "bare.pt",
        {
            "model": model.state_dict(),
            "model_config": MODEL_SIZES["tiny"].to_dict(),
            "size": "tiny",
            "symbols": symbols.to_list(),
            "text": {"lang": "en", "backend": frontend.backend},
            "speakers": {},
        },
    )
