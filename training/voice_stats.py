"""Voice statistics: the long-term spectrum and the pitch level of a voice, from its own audio.

A speaker embedding learned from a handful of training voices maps a voice it never heard to a
blend of the nearest ones: issue 14 measured a female voice coming out 10.5 semitones too low,
and the clone's spectrum at a training voice's. Two properties of a voice need no learned map
at all, because they can be read off any clip of it and added back exactly:

- the mean log-mel over the clip's speech frames (its long-term average spectrum: vocal tract
  length, spectral tilt, the microphone), 80 numbers;
- the spread (standard deviation) of each band over those frames, 80 numbers: how far the voice
  moves between its sounds, band by band (a model trained with an L1 loss flattens it, the
  "global variance" of statistical speech synthesis);
- the log of the median F0 of its voiced frames, 1 number.

The model (training.model, ``voice_stats``) predicts its mel and pitch *relative* to these, and
they are added back at the output, so an unseen voice's level extrapolates by construction
instead of by the embedding's learned map. Training computes them per utterance from the target
itself; cloning computes them from the reference clips, through this same function.
"""

from __future__ import annotations

import math

import torch

# Frames quieter than the loudest by more than this (natural log of mel magnitude, about 35 dB)
# are pauses and breaths, not the voice: they would pull the mean towards silence by however
# much pause a clip happens to hold.
SPEECH_RANGE = 4.0
# log F0 of 0 means "no voiced frame" (1 Hz is no voice): the model then uses its default.
UNKNOWN_LOG_F0 = 0.0
# A band that never moves (a clip of one steady tone) still gets a spread to scale by.
MIN_SPREAD = 0.1


def dim(n_mels: int) -> int:
    return 2 * n_mels + 1


def split(stats: torch.Tensor, n_mels: int):
    """[..., 2 n_mels + 1] -> (mean [..., n_mels], spread [..., n_mels], log F0 [...])."""
    return stats[..., :n_mels], stats[..., n_mels : 2 * n_mels], stats[..., 2 * n_mels]


def pitch_in_hz(pitch: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised pitch as the feature dataset gives it (training.data) back to Hz; unvoiced
    frames stay exactly 0."""
    pitch = pitch.float()
    return torch.where(pitch != 0, pitch * std + mean, pitch)


def speech_frames(mels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n_mels, T] log-mels -> [B, T] True on the valid frames within SPEECH_RANGE of the
    clip's loudest."""
    batch, _, frames = mels.shape
    if lengths is None:
        lengths = torch.full((batch,), frames, device=mels.device)
    valid = torch.arange(frames, device=mels.device)[None, :] < lengths[:, None]
    loudness = torch.logsumexp(mels.float(), dim=1)  # [B, T]
    loudest = loudness.masked_fill(~valid, -math.inf).amax(dim=1, keepdim=True)
    return valid & (loudness > loudest - SPEECH_RANGE)


def voice_statistics(
    mels: torch.Tensor, f0_hz: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, n_mels, T] natural-log mels and [B, T] F0 in Hz (0 = unvoiced) -> [B, 2 n_mels + 1].

    ``lengths`` [B] marks the valid frames of a padded batch (default: all). Mean and standard
    deviation of the log-mel over speech frames, then log median F0 over voiced speech frames
    (UNKNOWN_LOG_F0 where none).
    """
    mels = mels.float()
    frames = mels.shape[2]
    f0_hz = f0_hz.float()[:, :frames]
    if f0_hz.shape[1] < frames:
        f0_hz = torch.nn.functional.pad(f0_hz, (0, frames - f0_hz.shape[1]))
    speech = speech_frames(mels, lengths)
    weight = speech.float()[:, None, :]
    count = weight.sum(2).clamp(min=1.0)
    mean = (mels * weight).sum(2) / count
    spread = (((mels - mean[:, :, None]) ** 2 * weight).sum(2) / count).sqrt()
    spread = spread.clamp(min=MIN_SPREAD)

    voiced = speech & (f0_hz > 0)
    log_f0 = torch.where(voiced, f0_hz.clamp(min=1e-3).log(), torch.full_like(f0_hz, math.nan))
    median = torch.nanmedian(log_f0, dim=1).values
    median = torch.where(voiced.any(dim=1), median, torch.full_like(median, UNKNOWN_LOG_F0))
    return torch.cat([mean, spread, median[:, None]], dim=1)


def of_clips(mels: list[torch.Tensor], f0s: list[torch.Tensor]) -> torch.Tensor:
    """One voice from several clips ([n_mels, T] and [T] each): their frames taken together,
    as one long clip would be -> [2 n_mels + 1]."""
    if not mels:
        raise ValueError("no clips to take voice statistics from")
    # Each clip's own loudest frame sets its speech threshold (clips differ in level).
    parts = [voice_statistics(m[None], f[None]) for m, f in zip(mels, f0s, strict=True)]
    frames = torch.tensor([float(m.shape[-1]) for m in mels])
    stats = torch.cat(parts)
    n = mels[0].shape[0]
    means, spreads, _ = split(stats, n)
    w = frames[:, None] / frames.sum()
    mean = (means * w).sum(0)
    # Pooled spread: each clip's own spread plus how far its mean sits from the pooled mean.
    spread = ((spreads**2 + (means - mean) ** 2) * w).sum(0).sqrt()
    known = stats[:, -1] != UNKNOWN_LOG_F0
    log_f0 = (
        (stats[known, -1] * frames[known]).sum() / frames[known].sum()
        if known.any()
        else torch.tensor(UNKNOWN_LOG_F0)
    )
    return torch.cat([mean, spread, log_f0.reshape(1)])


# Under this many speech frames (about 0.5 s) a synthesised chunk's own spread is too noisy a
# measure to correct by.
MATCH_MIN_FRAMES = 40
# A band is never stretched or squeezed by more than this: beyond it the correction would be
# amplifying the model's noise, not restoring the voice's movement.
MATCH_MAX_RATIO = 2.0


def match(mel: torch.Tensor, stats: torch.Tensor, floor: float) -> torch.Tensor:
    """A synthesised mel [n_mels, T] with its speech frames' mean and spread moved to the
    voice's (`stats`, [2 n_mels + 1]), band by band; values stay at or above `floor`.

    Global variance compensation (Toda & Tokuda 2007) with the reference as the target: a model
    trained with an L1 loss averages over what it cannot predict, so its output moves less than
    the voice does, and for a voice it never heard its long-term spectrum lands near the
    training voices'. Both are measured on the output itself and corrected exactly.
    """
    n = mel.shape[0]
    speech = speech_frames(mel[None])[0]
    if int(speech.sum()) < MATCH_MIN_FRAMES:
        return mel
    own = mel.float()[:, speech]
    own_mean, own_spread = own.mean(1), own.std(1).clamp(min=MIN_SPREAD)
    mean, spread, _ = split(stats.float().to(mel.device), n)
    ratio = (spread / own_spread).clamp(1.0 / MATCH_MAX_RATIO, MATCH_MAX_RATIO)
    out = (mel.float() - own_mean[:, None]) * ratio[:, None] + mean[:, None]
    return out.clamp(min=floor).to(mel.dtype)
