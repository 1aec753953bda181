"""Vocoders: log-mel spectrogram in, waveform out.

Griffin-Lim needs no training and always works, so it is the default. A trained neural vocoder
is a run kind of its own; it plugs in by subclassing `Vocoder` and registering a loader in
`VOCODERS`, and the engine never needs to know which one it has.
"""

from __future__ import annotations

import numpy as np
import torch

from training import audio as audio_lib

MIN_FRAMES = 8


class Vocoder:
    """Turns a natural-log mel spectrogram [n_mels, frames] into a mono float32 waveform.

    Subclasses set `name`, `sample_rate` and `hop_length` (samples per mel frame) and implement
    `vocode`. The engine relies on the hop length to size pauses and on `sample_rate` to label
    the audio it returns.
    """

    name = "vocoder"
    sample_rate: int
    hop_length: int

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, mel: torch.Tensor | np.ndarray) -> np.ndarray:
        mel = torch.as_tensor(mel, dtype=torch.float32)
        if mel.dim() != 2:
            raise ValueError(
                f"expected a mel spectrogram [n_mels, frames], got shape {tuple(mel.shape)}"
            )
        if mel.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        frames = mel.shape[1]
        if frames < MIN_FRAMES:
            # An inverse STFT needs a few frames; an untrained model can predict a single one.
            pad = torch.full(
                (mel.shape[0], MIN_FRAMES - frames), float(np.log(audio_lib.LOG_FLOOR))
            )
            mel = torch.cat([mel, pad.to(mel)], dim=1)
        with torch.inference_mode():
            wav = self.vocode(mel)
        return wav.detach().to("cpu", torch.float32).numpy()

    def describe(self) -> dict:
        return {"name": self.name, "sample_rate": self.sample_rate}


class GriffinLim(Vocoder):
    """Phase reconstruction from the mel; robotic but honest, and it needs no weights.

    Runs on the CPU whatever device the acoustic model uses: it is a few FFTs per iteration,
    and moving the mel off the GPU first keeps a busy training GPU free for training.
    """

    name = "griffin_lim"

    def __init__(self, audio: dict | None = None, n_iter: int = 32):
        if n_iter < 1:
            raise ValueError("Griffin-Lim needs at least one iteration")
        self.config = audio_lib.AudioConfig.from_dict(audio or {})
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


# name -> factory(audio_config_dict, **options); a neural vocoder adds itself here.
VOCODERS = {"griffin_lim": GriffinLim}


def make_vocoder(name: str = "griffin_lim", audio: dict | None = None, **options) -> Vocoder:
    try:
        factory = VOCODERS[name]
    except KeyError:
        raise ValueError(
            f"unknown vocoder {name!r}; known: {', '.join(sorted(VOCODERS))}"
        ) from None
    return factory(audio, **options)
