"""Audio in, features out: decoding, resampling, trimming, loudness, log-mel, pitch, energy.

Every feature is framed the same way (hop 256, centred frames), so `n_frames(len(wav))` is the
length of the mel, the pitch and the energy of one waveform, and the model can index them
together. Transforms are built once per process and configuration because building a mel
filterbank or an STFT window for each of 800 files costs more than using it.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.transforms as AT

LOG_FLOOR = 1e-5


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 22050
    n_mels: int = 80
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    f_min: float = 0.0
    f_max: float = 8000.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AudioConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


DEFAULT = AudioConfig()


class AudioError(ValueError):
    """A file that cannot become a training waveform; the message says which file and why."""


def load_audio(path: str | Path, sr: int = DEFAULT.sample_rate) -> tuple[torch.Tensor, int]:
    """Decode any format libsndfile reads, mix down to mono, resample to `sr`.

    Returns (wav [T] float32, original sample rate) so callers can report a resampled file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path.name}: file not found")
    try:
        data, original_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{path.name}: cannot decode audio ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path.name}: the file holds no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path.name}: the audio contains NaN or infinite samples")
    wav = resample(torch.from_numpy(data.mean(axis=1)), int(original_sr), sr)
    return wav.contiguous(), int(original_sr)


# torchaudio's windowed-sinc kernel is (new/g) x (orig/g + ...) wide, g = gcd(orig, new): 441 x 320
# floats for 16 kHz -> 22.05 kHz, but 22050 x 48001 (8 GB in float64 while it is built) for a
# file that says 48001 Hz. Pairs whose kernel would pass this many elements go through soxr,
# which resamples any ratio in bounded memory; the common rates keep torchaudio's kernel.
MAX_KERNEL_ELEMENTS = 4_000_000
# Kernels kept per process (each at most MAX_KERNEL_ELEMENTS floats): a corpus has a few rates.
MAX_CACHED_RESAMPLERS = 16
_RESAMPLERS: OrderedDict[tuple, AT.Resample] = OrderedDict()
_RESAMPLERS_LOCK = threading.Lock()


def kernel_elements(orig_sr: int, new_sr: int) -> int:
    """Roughly how many floats torchaudio's resampling kernel for this pair holds."""
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    # lowpass_filter_width 6 on each side of every output phase, plus one input period
    width = math.ceil(6 * orig / min(orig, new))
    return new * (orig + 2 * width)


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample a 1-D (or [..., T]) waveform with memory bounded by the audio, whatever the rates.

    torchaudio's windowed-sinc resampler for common rate pairs, its kernel built once per pair
    (building it costs more than applying it to a few seconds of audio) and kept in a small
    LRU cache; soxr for pairs whose reduced ratio would make that kernel huge.
    """
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise AudioError(f"cannot resample from {orig_sr} Hz to {new_sr} Hz")
    if orig_sr == new_sr:
        return wav
    if kernel_elements(orig_sr, new_sr) > MAX_KERNEL_ELEMENTS:
        return _soxr_resample(wav, orig_sr, new_sr)
    key = (orig_sr, new_sr, str(wav.device))
    with _RESAMPLERS_LOCK:
        resampler = _RESAMPLERS.get(key)
        if resampler is None:
            resampler = AT.Resample(orig_sr, new_sr).to(wav.device)
            _RESAMPLERS[key] = resampler
            while len(_RESAMPLERS) > MAX_CACHED_RESAMPLERS:
                _RESAMPLERS.popitem(last=False)
        else:
            _RESAMPLERS.move_to_end(key)
    return resampler(wav.float())


def _soxr_resample(wav: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    import soxr

    x = wav.detach().float().cpu().numpy()
    flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x[None]
    # soxr wants [time, channels]; "VHQ" is as close to torchaudio's default sinc as it gets.
    out = soxr.resample(np.ascontiguousarray(flat.T), orig_sr, new_sr, quality="VHQ")
    out = np.ascontiguousarray(out.T).reshape(*x.shape[:-1], -1)
    return torch.from_numpy(out).to(wav.device)


def _frame_rms_db(wav: torch.Tensor, frame: int, hop: int) -> torch.Tensor:
    if wav.numel() < frame:
        wav = torch.nn.functional.pad(wav, (0, frame - wav.numel()))
    frames = wav.unfold(0, frame, hop)
    rms = frames.pow(2).mean(dim=1).sqrt()
    return 20 * torch.log10(rms.clamp_min(1e-10))


def trim_silence(
    wav: torch.Tensor, sr: int = DEFAULT.sample_rate, top_db: float = 40.0
) -> torch.Tensor:
    """Cut leading and trailing audio quieter than `top_db` below the loudest frame.

    Frames of ~46 ms (hop ~12 ms) as librosa.effects.trim does; a fully silent clip is returned
    unchanged so the caller's silence check can report it rather than get an empty tensor.
    """
    frame = max(1, round(0.0464 * sr))
    hop = max(1, frame // 4)
    db = _frame_rms_db(wav, frame, hop)
    loud = torch.nonzero(db > db.max() - top_db).flatten()
    if wav.abs().max() == 0 or loud.numel() == 0:
        return wav
    start = int(loud[0]) * hop
    end = min(wav.numel(), int(loud[-1]) * hop + frame)
    return wav[start:end]


def normalise_loudness(
    wav: torch.Tensor, target_db: float = -23.0, peak: float = 0.99
) -> torch.Tensor:
    """Scale to an RMS level of `target_db` dBFS, then pull down if that would clip.

    RMS rather than BS.1770 LUFS: the clips are already trimmed speech, where the two differ by
    a near-constant offset, and RMS needs no sample rate.
    """
    rms = wav.pow(2).mean().sqrt()
    if not torch.isfinite(rms) or rms < 1e-8:
        return wav
    gain = 10 ** (target_db / 20) / rms
    top = wav.abs().max() * gain
    if top > peak:
        gain = gain * peak / top
    return wav * gain


def n_frames(num_samples: int, cfg: AudioConfig = DEFAULT) -> int:
    """Frames of a centred STFT: one per hop, plus the frame centred on sample 0."""
    return 1 + num_samples // cfg.hop_length


_MEL: dict[tuple, AT.MelSpectrogram] = {}


def _mel_transform(cfg: AudioConfig, device: torch.device) -> AT.MelSpectrogram:
    key = (cfg, str(device))
    if key not in _MEL:
        # power=1 (magnitude) and Slaney mel as in HiFi-GAN style recipes, so an external
        # vocoder trained on the usual settings can read these mels.
        _MEL[key] = AT.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            win_length=cfg.win_length,
            hop_length=cfg.hop_length,
            f_min=cfg.f_min,
            f_max=cfg.f_max,
            n_mels=cfg.n_mels,
            power=1.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        ).to(device)
    return _MEL[key]


def _magnitude(wav: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    num = wav.shape[-1]
    if num <= cfg.n_fft // 2:
        # Reflect padding needs more samples than half a window; a clip this short (~23 ms)
        # is zero-padded instead, keeping the frame count of its true length.
        wav = torch.nn.functional.pad(wav, (0, cfg.n_fft // 2 + 1 - num))
        return _mel_transform(cfg, wav.device).spectrogram(wav)[..., : n_frames(num, cfg)]
    return _mel_transform(cfg, wav.device).spectrogram(wav)


def mel_spectrogram(wav: torch.Tensor, cfg: AudioConfig = DEFAULT) -> torch.Tensor:
    """Natural-log mel magnitude [..., n_mels, frames], floored at 1e-5."""
    mel = _mel_transform(cfg, wav.device).mel_scale(_magnitude(wav.float(), cfg))
    return torch.log(mel.clamp_min(LOG_FLOOR))


def energy(wav: torch.Tensor, cfg: AudioConfig = DEFAULT) -> torch.Tensor:
    """L2 norm of each STFT magnitude frame [..., frames] (FastSpeech 2's energy)."""
    return _magnitude(wav.float(), cfg).norm(dim=-2)


def mel_and_energy(
    wav: torch.Tensor, cfg: AudioConfig = DEFAULT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both from one STFT; preprocessing needs both and the STFT is the expensive part."""
    mag = _magnitude(wav.float(), cfg)
    mel = _mel_transform(cfg, wav.device).mel_scale(mag)
    return torch.log(mel.clamp_min(LOG_FLOOR)), mag.norm(dim=-2)


def pitch(
    wav: torch.Tensor,
    sr: int = DEFAULT.sample_rate,
    hop_length: int = DEFAULT.hop_length,
    f_min: float = 60.0,
    f_max: float = 800.0,
    threshold: float = 0.1,
    voicing: float = 0.25,
    silence_db: float = -50.0,
) -> torch.Tensor:
    """F0 in Hz per frame by YIN (de Cheveigne & Kawahara 2002), 0 where unvoiced.

    All frames at once: the difference function comes from one batched FFT cross-correlation
    plus cumulative energies, so a 5 s clip costs a few milliseconds. Frames are centred on
    multiples of `hop_length`, exactly like the mel frames.
    """
    wav = wav.float().flatten()
    num = wav.numel()
    tau_min = max(2, int(sr / f_max))
    tau_max = math.ceil(sr / f_min)
    window = 2 * tau_max  # integration window: two periods of the lowest pitch
    length = window + tau_max
    # Centre frame i on sample i*hop, like torch.stft(center=True).
    left = length // 2
    padded = torch.nn.functional.pad(wav, (left, length - left + hop_length))
    frames = padded.unfold(0, length, hop_length)[: 1 + num // hop_length]  # [N, length]
    frames = frames - frames.mean(dim=1, keepdim=True)

    nfft = 1 << (length + window - 1).bit_length()
    spec_full = torch.fft.rfft(frames, nfft)
    spec_head = torch.fft.rfft(frames[:, :window], nfft)
    corr = torch.fft.irfft(spec_full * spec_head.conj(), nfft)[:, : tau_max + 1]

    sq = torch.nn.functional.pad(frames.pow(2).cumsum(dim=1), (1, 0))
    taus = torch.arange(tau_max + 1, device=wav.device)
    e_shift = sq[:, taus + window] - sq[:, taus]  # energy of x[tau : tau+window]
    diff = (sq[:, window : window + 1] + e_shift - 2 * corr).clamp_min(0)

    cum = diff[:, 1:].cumsum(dim=1)
    cmnd = torch.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] * taus[1:] / cum.clamp_min(1e-12)

    search = cmnd[:, tau_min:tau_max]
    below = search < threshold
    # YIN's rule: the first dip under the threshold, else the global minimum; the frame is
    # voiced if that dip is under `voicing`. Low, breathy voices rarely dip under 0.1, and on
    # dev-en-8spk 0.25 keeps most of their voiced frames with under 1% octave jumps.
    first = torch.where(below.any(dim=1), below.float().argmax(dim=1), search.argmin(dim=1))
    # From the first dip under the threshold, walk down to its local minimum.
    rising = torch.zeros_like(below)
    rising[:, :-1] = search[:, 1:] >= search[:, :-1]
    rising[:, -1] = True
    idx = torch.arange(search.shape[1], device=wav.device)
    best = (rising & (idx >= first[:, None])).float().argmax(dim=1)

    # Parabolic interpolation around the minimum for sub-sample periods.
    b = (best + tau_min).clamp(1, tau_max - 1)
    rows = torch.arange(cmnd.shape[0], device=wav.device)
    y0, y1, y2 = cmnd[rows, b - 1], cmnd[rows, b], cmnd[rows, b + 1]
    denom = y0 - 2 * y1 + y2
    shift = torch.where(denom.abs() > 1e-9, 0.5 * (y0 - y2) / denom, torch.zeros_like(denom))
    period = b.float() + shift.clamp(-1, 1)
    f0 = sr / period

    # Quiet frames are unvoiced whatever their periodicity (reverb tails, hum under silence).
    rms_db = 10 * torch.log10(
        frames[:, left - window // 2 : left + window // 2].pow(2).mean(1) + 1e-12
    )
    loud = rms_db > rms_db.max() + silence_db
    keep = (y1 < voicing) & loud & (f0 >= f_min) & (f0 <= f_max)
    return torch.where(keep, f0, torch.zeros_like(f0))


_GL: dict[tuple, tuple[torch.Tensor, AT.GriffinLim]] = {}


def _griffin_lim_parts(cfg: AudioConfig, n_iter: int, device: torch.device):
    key = (cfg, n_iter, str(device))
    if key not in _GL:
        fb = _mel_transform(cfg, device).mel_scale.fb  # [n_freq, n_mels]
        # The pseudo-inverse gives the least-squares linear spectrogram in one matmul; the
        # iterative InverseMelScale solves the same problem per call and is far slower.
        inverse = torch.linalg.pinv(fb.T.double()).float()  # [n_freq, n_mels]
        gl = AT.GriffinLim(
            n_fft=cfg.n_fft,
            n_iter=n_iter,
            win_length=cfg.win_length,
            hop_length=cfg.hop_length,
            power=1.0,
        ).to(device)
        _GL[key] = (inverse, gl)
    return _GL[key]


@torch.no_grad()
def griffin_lim(
    log_mel: torch.Tensor, n_iter: int = 32, cfg: AudioConfig = DEFAULT
) -> torch.Tensor:
    """Waveform [..., samples] from a natural-log mel [..., n_mels, frames]; always works."""
    inverse, gl = _griffin_lim_parts(cfg, n_iter, log_mel.device)
    mel = torch.exp(log_mel.float())
    linear = (inverse @ mel).clamp_min(0.0)
    wav = gl(linear)
    peak = wav.abs().max()
    return wav / peak * 0.95 if peak > 0 else wav


def wav_bytes(audio, sample_rate: int) -> bytes:
    """16-bit PCM WAV of float audio, clipped to [-1, 1] so a loud sample wraps nowhere."""
    buf = io.BytesIO()
    samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    sf.write(buf, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
