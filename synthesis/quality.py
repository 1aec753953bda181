"""Predicted MOS: how natural audio sounds, without a listener.

DNSMOS P.835 (Reddy et al. 2022, the Deep Noise Suppression challenge's metric): SIG (speech
quality), BAK (background noise), OVRL (overall), each on the 1-5 MOS scale, plus the P.808
overall figure. The ONNX models ship inside the `speechmos` wheel and run through onnxruntime, so
scoring works offline. pocketsphinx's word error rate barely separates vocoders; OVRL does (on
unseen voices: real 2.92, HiFi-GAN universal 3.11, Griffin-Lim 2.32).

    dnsmos(wav, sample_rate) -> DnsmosScore(ovrl=..., sig=..., bak=..., p808=...)

speechmos computes the features and the P.835 polynomial mapping; only the onnxruntime
sessions are made here, with one intra-op thread: the default thread pool spins on every core,
which on a shared CPU slows the synthesis and training around it.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

DNSMOS_SAMPLE_RATE = 16000
MIN_SECONDS = 0.5  # speechmos loops shorter clips up to its 9 s window; below this it is noise


class QualityUnavailable(RuntimeError):
    """DNSMOS cannot run here (speechmos or onnxruntime missing); the message says which."""


@dataclass(frozen=True)
class DnsmosScore:
    ovrl: float
    sig: float
    bak: float
    p808: float

    def to_dict(self) -> dict:
        return asdict(self)


def _models_dir() -> Path:
    spec = importlib.util.find_spec("speechmos")
    if spec is None or not spec.submodule_search_locations:
        raise QualityUnavailable("DNSMOS needs the 'speechmos' package, which is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "dnsmos_models"


class DnsmosScorer:
    """One pair of onnxruntime sessions per process; calls are serialised (sessions are
    thread-safe, but two concurrent runs would each want the core)."""

    _instance: DnsmosScorer | None = None
    _lock = threading.Lock()

    def __init__(self, threads: int = 1):
        try:
            import onnxruntime as ort
            from speechmos.dnsmos import DNSMOS
        except ImportError as exc:
            raise QualityUnavailable(f"DNSMOS cannot run: {exc}") from exc
        models = _models_dir()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]

        # speechmos' class builds sessions with onnxruntime's defaults; give it ours instead.
        class ThreadLimitedDNSMOS(DNSMOS):
            def __init__(self, primary: str, p808: str):
                self.primary_model_path = primary
                self.onnx_sess = ort.InferenceSession(primary, options, providers=providers)
                self.p808_onnx_sess = ort.InferenceSession(p808, options, providers=providers)

        self.model = ThreadLimitedDNSMOS(
            str(models / "sig_bak_ovr.onnx"), str(models / "model_v8.onnx")
        )

    @classmethod
    def shared(cls) -> DnsmosScorer:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __call__(self, wav: np.ndarray, sample_rate: int) -> DnsmosScore:
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if len(wav) < MIN_SECONDS * sample_rate:
            raise ValueError(f"DNSMOS needs at least {MIN_SECONDS:g} s of audio")
        if not np.all(np.isfinite(wav)):
            raise ValueError("the audio contains NaN or infinite samples")
        if sample_rate != DNSMOS_SAMPLE_RATE:
            wav = torch.from_numpy(wav)
            from training.audio import resample

            wav = resample(wav, sample_rate, DNSMOS_SAMPLE_RATE).numpy()
        wav = np.clip(wav, -1.0, 1.0).astype(np.float32)
        with self._lock:
            out = self.model(wav, DNSMOS_SAMPLE_RATE, False)
        return DnsmosScore(
            ovrl=float(out["ovrl_mos"]),
            sig=float(out["sig_mos"]),
            bak=float(out["bak_mos"]),
            p808=float(out["p808_mos"]),
        )


def dnsmos(wav: np.ndarray, sample_rate: int) -> DnsmosScore:
    """DNSMOS P.835 of a mono waveform at any sample rate (resampled to 16 kHz)."""
    return DnsmosScorer.shared()(wav, sample_rate)


def dnsmos_available() -> bool:
    try:
        _models_dir()
        import onnxruntime  # noqa: F401
    except (QualityUnavailable, ImportError):
        return False
    return True
