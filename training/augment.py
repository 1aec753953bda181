"""Speaker augmentation: pitch- and formant-shifted copies of each speaker as pseudo-speakers.

A corpus of 8 voices teaches the model 8 points of the speaker-embedding space; a voice it
never heard then comes out as a blend of the nearest ones (issue 14 measured a voice 350 cents
above a training voice coming out at the training voice's pitch). Each copy here is one speaker
resampled by a factor (the classic "tape speed" trick: playing the samples back faster raises
pitch and formants together, as a shorter vocal tract and higher voice would), kept as a speaker
of its own, "awb@up3" beside "awb". Preprocessing embeds the copies like any clip, so the model
sees many more voices, each with its own embedding, and learns a map from embedding to voice
that has to interpolate rather than memorise.

Runs offline (torchaudio's resampler), once, at preprocessing; the copies are written as WAV
files under the cache and go through the same checks and features as the real clips.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import soundfile as sf
import torch

# A pseudo-speaker is named <speaker><SEPARATOR><suffix>; held-out speakers take theirs along.
SEPARATOR = "@"
# Playback-rate factors: 0.86 and 1.16 are about -/+2.6 semitones (and formants alike), inside
# the spread of real adult voices of one sex, so the copies still sound like people.
DEFAULT_FACTORS: tuple[float, ...] = (0.86, 0.93, 1.07, 1.16)
# Corpora of fewer speakers than this get the copies by default (`python -m training preprocess`):
# on dev-en-8spk (6 training voices) they raised the normalised SECS of two voices the model never
# heard from 0.44 to 0.53 (tiny, 2000 steps, with voice statistics; issue 14). Beyond a few dozen
# real voices the map from embedding to voice has real points to learn from, and 5x the audio
# to preprocess is no longer worth it (not measured: no such corpus here).
AUGMENT_BELOW_SPEAKERS = 20
# Rates are rounded to this many Hz: a rate sharing a large divisor with the corpus rate keeps
# torchaudio's polyphase resampling kernel small.
_RATE_STEP = 50


def base_speaker(name: str) -> str:
    """The real speaker behind a pseudo-speaker ("awb@up3" -> "awb"); a real name unchanged."""
    return name.split(SEPARATOR, 1)[0]


def suffix(factor: float) -> str:
    cents = round(1200 * torch.log2(torch.tensor(float(factor))).item() / 100)
    return f"up{cents}" if cents >= 0 else f"down{-cents}"


def shift(wav: torch.Tensor, sr: int, factor: float) -> torch.Tensor:
    """`wav` [samples] played `factor` times faster: pitch and formants x factor, length / factor."""
    import torchaudio.functional as AF

    if factor <= 0:
        raise ValueError(f"a playback factor must be positive, not {factor}")
    source_rate = round(sr * factor / _RATE_STEP) * _RATE_STEP
    if source_rate == sr:
        return wav.clone()
    return AF.resample(wav, orig_freq=source_rate, new_freq=sr)


def augmented_items(
    items: Iterable, out_dir: str | Path, factors: Sequence[float] = DEFAULT_FACTORS
) -> list:
    """Shifted copies of every item (training.corpus.CorpusItem), written under `out_dir`.

    Copies already written (same name) are reused, so re-running preprocessing is cheap. An
    item whose audio cannot be read is skipped here; preprocessing reports it for the original.
    """
    from training.corpus import CorpusItem

    out = Path(out_dir)
    copies = []
    for item in items:
        if SEPARATOR in item.speaker:
            raise ValueError(
                f"speaker {item.speaker!r} contains {SEPARATOR!r}, which marks pseudo-speakers"
            )
        try:
            wav = None
            for factor in factors:
                name = suffix(factor)
                path = out / f"{item.speaker}{SEPARATOR}{name}" / f"{item.id}.wav"
                if not path.exists():
                    if wav is None:
                        data, sr = sf.read(item.audio_path, dtype="float32", always_2d=True)
                        wav = torch.from_numpy(data.mean(axis=1))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    shifted = shift(wav, sr, factor).clamp(-1.0, 1.0)
                    tmp = path.with_name(f".{path.name}.tmp")
                    sf.write(tmp, shifted.numpy(), sr, format="WAV")
                    tmp.replace(path)
                copies.append(
                    CorpusItem(
                        id=f"{item.id}{SEPARATOR}{name}",
                        audio_path=path,
                        text=item.text,
                        speaker=f"{item.speaker}{SEPARATOR}{name}",
                    )
                )
        except (OSError, RuntimeError, sf.LibsndfileError):
            continue
    return copies
