"""How well a checkpoint clones voices it never heard: SECS against a speaker's *other* clips.

For each held-out speaker, its clips (sorted by name, so the choice is reproducible) are cut
into two disjoint sets:

- the first ``n_reference`` clips, joined into one cloning reference exactly as
  ``python -m synthesis say --reference a b c`` and the synthesis page join them;
- up to ``n_targets`` further clips, the *targets*: the voice as it really sounds. Their
  embeddings are averaged into one target vector.

The model is conditioned on the reference, speaks ``texts``, and each output is embedded and
compared with the target vector (never with the conditioning clips or the vector the model was
given: that would reward copying the input, not sounding like the person). Beside it:

- ceiling: each *reference* clip on its own against the target vector, i.e. two disjoint sets
  of real recordings of the same speaker, one utterance at a time like the outputs. A perfect
  clone scores about this.
- floor: real clips of *other* speakers (``floor_clips``; by default the other held-out
  speakers) against this speaker's target vector: what a voice that is simply not this person
  scores. The floor is a property of the target and of the encoder, not of the model, so the
  same floor serves every checkpoint.
- normalised = (secs - floor) / (ceiling - floor): 0 is "some other voice", 1 is "as close as
  another recording of the person". Resemblyzer rates any two voices of a small corpus as
  fairly alike (floors of 0.6 and more), so the raw SECS says little on its own.

Every embedding goes through training.speaker_embedding.embed_speech, the one path training
clips and references go through (trim, loudness, then the encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Sentences no corpus of the studio's tests or the dev corpora reads as a whole, so a model
# cannot score by replaying a memorised utterance; short enough for a CPU benchmark.
DEFAULT_TEXTS = (
    "The old lighthouse keeper counted seven ships before the storm arrived.",
    "Please remember to water the tomatoes on Thursday morning.",
    "A curious fox followed the children all the way to the river.",
    "Nobody expected the quiet musician to win the final round.",
)

_EMBEDDINGS: dict[tuple[str, float], np.ndarray] = {}


def clip_embedding(path: str | Path) -> np.ndarray:
    """The embedding of one real recording, memoised by path and modification time, so
    scoring several checkpoints embeds each real clip once."""
    from synthesis.reference_clips import decode
    from training.speaker_embedding import embed_speech

    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _EMBEDDINGS:
        wav, sr, _channels = decode(path)
        _EMBEDDINGS[key] = np.asarray(embed_speech(wav, sr), dtype=np.float32)
    return _EMBEDDINGS[key]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    from training.speaker_embedding import similarity

    return similarity(a, b)


def normalised_secs(value: float, floor: float, ceiling: float) -> float | None:
    """(value - floor) / (ceiling - floor); None where the ceiling does not clear the floor
    (the speaker's own clips are no closer to each other than to other voices: no scale)."""
    if ceiling - floor <= 1e-6:
        return None
    return float((value - floor) / (ceiling - floor))


def split_clips(
    clips: Sequence[str | Path], n_reference: int, n_targets: int, speaker: str = ""
) -> tuple[list[Path], list[Path]]:
    """(reference clips, target clips): disjoint, from the clips sorted by name."""
    ordered = sorted((Path(c) for c in clips), key=lambda p: p.name)
    if n_reference < 1:
        raise ValueError("n_reference must be at least 1")
    if len(ordered) < n_reference + 2:
        raise ValueError(
            f"speaker {speaker!r} has {len(ordered)} clip(s); cloning scores need "
            f"{n_reference} for the reference and at least 2 others to compare with"
        )
    return ordered[:n_reference], ordered[n_reference : n_reference + n_targets]


def clone_scores(
    synth,
    clips_by_speaker: dict[str, Sequence[str | Path]],
    texts: Sequence[str] = DEFAULT_TEXTS,
    n_reference: int = 3,
    n_targets: int = 10,
    floor_clips: dict[str, Sequence[str | Path]] | None = None,
    transcribe: bool = True,
) -> dict:
    """Clone every speaker of `clips_by_speaker` from `n_reference` of their clips and score it.

    `synth` is a synthesis.engine.Synthesizer (its vocoder is the one scored, and named in the
    result). `floor_clips` maps other speakers to real clips of theirs for the floor; None uses
    the other speakers of `clips_by_speaker` (all of their clips), so at least two speakers are
    needed then. `transcribe` adds the pocketsphinx WER of each output against its text.
    Returns a JSON-ready dict: per speaker and the means over speakers.
    """
    from synthesis.evaluate import joined_clips, word_error_rate
    from synthesis.evaluate import transcribe as asr
    from training.speaker_embedding import embed_speech, mean_embedding

    if not clips_by_speaker:
        raise ValueError("no held-out speakers to clone")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no text to synthesise")
    if floor_clips is None and len(clips_by_speaker) < 2:
        raise ValueError(
            "the floor needs real clips of other speakers: give floor_clips, or at least "
            "two held-out speakers"
        )

    splits = {
        name: split_clips(clips, n_reference, n_targets, name)
        for name, clips in sorted(clips_by_speaker.items())
    }
    speakers = []
    for name, (reference, targets) in splits.items():
        target = mean_embedding([clip_embedding(p) for p in targets])
        ceiling = float(np.mean([_cosine(clip_embedding(p), target) for p in reference]))
        others = (
            {k: v for k, v in clips_by_speaker.items() if k != name}
            if floor_clips is None
            else {k: v for k, v in floor_clips.items() if k != name}
        )
        other_paths = [p for clips in others.values() for p in clips]
        if not other_paths:
            raise ValueError(f"no clips of other speakers to set the floor for {name!r}")
        floor = float(np.mean([_cosine(clip_embedding(p), target) for p in other_paths]))

        conditioning = synth.speaker_embedding(
            references=joined_clips(list(reference), synth.sample_rate)
        )
        outputs = []
        for text in texts:
            out = synth.synthesize(text, conditioning)
            row = {
                "text": text,
                "secs": _cosine(embed_speech(out.audio, out.sample_rate), target),
                "audio_s": round(out.duration_s, 3),
            }
            if transcribe:
                row["wer"] = word_error_rate(text, asr(out.audio, out.sample_rate))
            outputs.append(row)
        value = float(np.mean([o["secs"] for o in outputs]))
        wers = [o["wer"] for o in outputs if "wer" in o]
        speakers.append(
            {
                "speaker": name,
                "secs": value,
                "ceiling": ceiling,
                "floor": floor,
                "normalised": normalised_secs(value, floor, ceiling),
                "wer": float(np.mean(wers)) if wers else None,
                "reference_clips": [p.name for p in reference],
                "target_clips": [p.name for p in targets],
                "floor_speakers": sorted(others),
                "outputs": outputs,
            }
        )

    def mean(key: str) -> float | None:
        values = [s[key] for s in speakers if s[key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "vocoder": synth.vocoder.name,
        "n_speakers": len(speakers),
        "n_reference": n_reference,
        "secs_unseen": mean("secs"),
        "ceiling": mean("ceiling"),
        "floor": mean("floor"),
        "normalised_secs_unseen": mean("normalised"),
        "wer_unseen": mean("wer"),
        "floor_kind": "real clips of other speakers vs the target speaker's other clips",
        "speakers": speakers,
    }
