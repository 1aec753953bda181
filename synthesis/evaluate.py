"""Objective scores for a checkpoint: speaker similarity, spectral distance, intelligibility, speed.

- SECS: cosine of Resemblyzer embeddings of the output and of a real clip of the target voice.
- MCD: mel cepstral distortion against the ground-truth mel after DTW alignment, with the
  cepstra c1..c24 taken from the 80-band log mel by a DCT. Comparable between our own
  checkpoints and close in scale to, but not numerically equal to, SPTK-based (all-pass
  warped) MCD figures in papers.
- WER: pocketsphinx's bundled US-English model on the output, beside the same recogniser on
  the ground-truth recording, so a weak recogniser is not mistaken for a weak model.
- DNSMOS OVRL: the predicted overall MOS (1-5) of the output (synthesis.quality), the one score
  here that hears what the vocoder does to naturalness.
- RTF: synthesis seconds per second of audio produced.

Every score is made with one vocoder, recorded beside it as "vocoder": the same checkpoint
scores differently through Griffin-Lim and through HiFi-GAN.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch
import torchaudio

from training.text import word_error_rate, words  # noqa: F401 (scores and benches use them from here)

N_CEPSTRA = 24
ASR_SAMPLE_RATE = 16000


def secs(a: np.ndarray, b: np.ndarray) -> float:
    """Speaker-encoder cosine similarity of two embeddings (1 = same voice)."""
    from training.speaker_embedding import similarity

    return similarity(a, b)


def embed_audio(wav: np.ndarray, sr: int) -> np.ndarray:
    """Embedding of synthesised or recorded audio without the reference length checks:
    outputs are often shorter than the 3 s a cloning reference must have."""
    from training.speaker_embedding import embed_wav

    return np.asarray(embed_wav(np.asarray(wav, dtype=np.float32), sr), dtype=np.float32)


def mel_cepstrum(log_mel: np.ndarray | torch.Tensor, n_cepstra: int = N_CEPSTRA) -> np.ndarray:
    """[n_mels, frames] natural-log mel -> [frames, n_cepstra] cepstra c1..cN (c0, the loudness, left out).

    The real cepstrum of a log spectrum sampled at M points is its DCT-II with a 2/M weight;
    the orthonormal DCT has sqrt(2/M), so the extra sqrt(2/M) below puts these on the scale of
    a true mel-cepstrum, and MCD on its usual dB scale (5-10 dB for a fair TTS voice) instead
    of sqrt(M/2) = 6.3 times that.
    """
    log_mel = torch.as_tensor(log_mel, dtype=torch.float32)
    n_mels = log_mel.shape[0]
    dct = torchaudio.functional.create_dct(n_cepstra + 1, n_mels, norm="ortho")  # [n_mels, n+1]
    return (log_mel.T @ dct)[:, 1:].numpy() * np.sqrt(2.0 / n_mels)


def mel_cepstral_distortion(reference_mel, output_mel, n_cepstra: int = N_CEPSTRA) -> float:
    """MCD in dB between two log-mel spectrograms of the same sentence, aligned with DTW."""
    from librosa.sequence import dtw

    ref = mel_cepstrum(reference_mel, n_cepstra)
    out = mel_cepstrum(output_mel, n_cepstra)
    if len(ref) == 0 or len(out) == 0:
        raise ValueError("cannot compute MCD of an empty spectrogram")
    _, path = dtw(X=ref.T, Y=out.T, metric="euclidean")
    diff = ref[path[:, 0]] - out[path[:, 1]]
    per_frame = np.sqrt(2.0 * np.sum(diff**2, axis=1))
    return float(10.0 / np.log(10.0) * per_frame.mean())


class Recogniser:
    """pocketsphinx with the US-English model that ships in its wheel; one decoder per process.

    A decoder is not safe to share between threads, so calls are serialised.
    """

    _decoder = None
    _lock = threading.Lock()

    @classmethod
    def transcribe(cls, wav: np.ndarray, sr: int) -> str:
        from pocketsphinx import Decoder

        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if sr != ASR_SAMPLE_RATE:
            from training.audio import resample

            wav = resample(torch.from_numpy(wav), sr, ASR_SAMPLE_RATE).numpy()
        pcm = (np.clip(wav, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        with cls._lock:
            if cls._decoder is None:
                cls._decoder = Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL")
            decoder = cls._decoder
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def transcribe(wav: np.ndarray, sr: int) -> str:
    return Recogniser.transcribe(wav, sr)


def real_time_factor(seconds_spent: float, audio_seconds: float) -> float:
    if audio_seconds <= 0:
        raise ValueError("no audio was produced")
    return seconds_spent / audio_seconds


def _pick_utterances(records: list[dict], n: int) -> list[dict]:
    """Up to n records, round-robin over speakers (sorted ids within each) so one voice
    cannot fill the sample."""
    by_speaker: dict[str, list[dict]] = {}
    for rec in sorted(records, key=lambda r: r["id"]):
        by_speaker.setdefault(rec.get("speaker", ""), []).append(rec)
    picked: list[dict] = []
    queues = [by_speaker[s] for s in sorted(by_speaker)]
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def real_clip_similarity(cache_dir: str | Path, max_per_speaker: int = 6) -> dict:
    """SECS between real recordings of the cache: same speaker (the ceiling a clone can reach)
    and different speakers (the floor), from the embeddings stored with the features."""
    cache_dir = Path(cache_dir)
    records = [
        json.loads(line) for line in (cache_dir / "items.jsonl").read_text().splitlines() if line
    ]
    by_speaker: dict[str, list[np.ndarray]] = {}
    for rec in sorted(records, key=lambda r: r["id"]):
        embs = by_speaker.setdefault(rec["speaker"], [])
        if len(embs) < max_per_speaker:
            feats = torch.load(cache_dir / rec["feats"], map_location="cpu", weights_only=True)
            embs.append(feats["spk_emb"].float().numpy())
    same, different = [], []
    speakers = sorted(by_speaker)
    for i, a in enumerate(speakers):
        embs = by_speaker[a]
        same += [secs(x, y) for j, x in enumerate(embs) for y in embs[j + 1 :]]
        for b in speakers[i + 1 :]:
            different += [secs(x, y) for x in embs for y in by_speaker[b]]
    return {
        "secs_real_same_speaker": float(np.mean(same)) if same else None,
        "secs_real_different_speakers": float(np.mean(different)) if different else None,
    }


def joined_clips(clips: list, sr: int, gap_s: float = 0.3) -> tuple[int, np.ndarray]:
    """Several clips of one person as one reference: mono, one rate, short gaps between,
    at most the longest reference allowed."""
    from synthesis.reference_clips import MAX_SECONDS, decode
    from training.audio import resample

    gap = np.zeros(int(gap_s * sr), dtype=np.float32)
    parts: list[np.ndarray] = []
    for clip in clips:
        wav, clip_sr, _ = decode(clip)
        if clip_sr != sr:
            wav = resample(torch.from_numpy(wav), clip_sr, sr).numpy()
        parts += [wav, gap]
    joined = np.concatenate(parts[:-1]) if parts else np.zeros(0, dtype=np.float32)
    return sr, joined[: int(MAX_SECONDS * sr)]


# --------------------------------------------------------------------------- which scorer runs

# What each score needs beyond torch: checked before scoring, so a missing wheel turns into a
# named gap on the run page ("skipped": {score: reason}) rather than a failed checkpoint.
SCORER_MODULES = {
    "secs": ("resemblyzer", "speaker similarity needs the 'resemblyzer' package"),
    "wer": ("pocketsphinx", "the word error rate needs the 'pocketsphinx' package"),
    "mcd": ("librosa", "MCD needs 'librosa' (its DTW)"),
}


def missing_scorers(language: str = "en") -> dict[str, str]:
    """score -> why it cannot be made here (an empty dict when every scorer is installed)."""
    import importlib.util

    from synthesis.quality import dnsmos_available

    gaps = {
        name: reason
        for name, (module, reason) in SCORER_MODULES.items()
        if importlib.util.find_spec(module) is None
    }
    if language != "en" and "wer" not in gaps:
        gaps["wer"] = f"pocketsphinx ships an English model only; this dataset is {language!r}"
    if not dnsmos_available():
        gaps["dnsmos"] = "DNSMOS needs the 'speechmos' and 'onnxruntime' packages"
    return gaps


# --------------------------------------------------------------------------- the checkpoint's score

# One number per checkpoint, to pick the one to keep, from free-running synthesis only (the
# validation loss is teacher-forced: true durations and pitch, so it never sees the predictors).
# Every term is on 0-1, higher is better; the score is the mean of the terms that were made:
#   SECS seen (cosine), unseen normalised SECS clipped to 0-1, 1 - WER clipped to 0-1, and
#   (DNSMOS OVRL - 1) / 4.
QUALITY_FORMULA = (
    "quality = mean of the scores made of: SECS seen; normalised unseen SECS, clipped to 0-1; "
    "1 − WER, clipped to 0-1; (DNSMOS OVRL − 1) / 4"
)


def quality_score(scores: dict) -> float | None:
    """The documented QUALITY_FORMULA of a scores dict; None when no term was made."""

    def clip01(x: float) -> float:
        return min(1.0, max(0.0, float(x)))

    terms = []
    if scores.get("secs_seen") is not None:
        terms.append(clip01(scores["secs_seen"]))
    if scores.get("normalised_secs_unseen") is not None:
        terms.append(clip01(scores["normalised_secs_unseen"]))
    if scores.get("wer_output") is not None:
        terms.append(1.0 - clip01(scores["wer_output"]))
    if scores.get("dnsmos_ovrl") is not None:
        terms.append(clip01((scores["dnsmos_ovrl"] - 1.0) / 4.0))
    return float(np.mean(terms)) if terms else None


# Two sentences are enough to compare a checkpoint with its base, and keep scoring quick.
FEW_SHOT_TEXTS = (
    "The old lighthouse keeper counted seven ships before the storm arrived.",
    "Please remember to water the tomatoes on Thursday morning.",
)


def speaker_secs(synth, reference_clips: list, target_clips: list, texts) -> dict:
    """How close a checkpoint's output comes to one speaker: conditioned on `reference_clips`
    joined, compared with the mean embedding of `target_clips` (disjoint from the reference;
    for a fine-tune, clips it never trained on). The ceiling is each reference clip against the
    same target, as in synthesis.cloning."""
    from synthesis.cloning import clip_embedding
    from training.speaker_embedding import embed_speech, mean_embedding

    if not reference_clips or not target_clips:
        raise ValueError("need at least one reference clip and one other clip to compare with")
    target = mean_embedding([clip_embedding(p) for p in target_clips])
    conditioning = synth.speaker_embedding(
        references=joined_clips(list(reference_clips), synth.sample_rate)
    )
    outputs = [synth.synthesize(text, conditioning) for text in texts]
    return {
        "secs": float(
            np.mean([secs(embed_speech(o.audio, o.sample_rate), target) for o in outputs])
        ),
        "ceiling": float(np.mean([secs(clip_embedding(p), target) for p in reference_clips])),
        "n_reference": len(reference_clips),
        "n_targets": len(target_clips),
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    cache_dir: str | Path,
    n_utterances: int = 8,
    device: str = "cpu",
    held_out: dict[str, list] | None = None,
    floor_clips: dict[str, list] | None = None,
    vocoder: str | None = None,
    language: str = "en",
    unseen_texts=None,
    speaker_check: dict | None = None,
) -> dict:
    """Score a checkpoint: free-running synthesis of validation utterances, and clones of
    speakers it never heard.

    `held_out` maps held-out speakers to all their clips (audio files); synthesis.cloning
    clones each from 3 of them and compares the output with their *other* clips, beside a
    ceiling and a floor (`floor_clips`: real clips of other speakers; None: the other held-out
    speakers). `speaker_check` ({"speaker", "reference", "targets"}) adds speaker_secs for one
    voice (the few-shot fine-tune's before/after). `vocoder` is a name for
    synthesis.vocoders.load_vocoder (None: the default vocoder). A scorer that is not installed
    is skipped, its reason in "skipped". Returns a plain dict (JSON-ready) with means and the
    per-utterance rows.
    """
    from synthesis.engine import Synthesizer
    from synthesis.quality import QualityUnavailable, dnsmos
    from training import voice_stats
    from training.audio import load_audio

    cache_dir = Path(cache_dir)
    records = [
        json.loads(line) for line in (cache_dir / "items.jsonl").read_text().splitlines() if line
    ]
    skipped = missing_scorers(language)
    synth = Synthesizer(checkpoint, device, vocoder=vocoder)
    # Speakers a run held out are not scored as seen voices: the model never trained on them.
    # A validation split with none of the others (tiny corpora) falls back to their training
    # utterances.
    seen = [r for r in records if r.get("speaker") not in (held_out or {})] or records
    val = [r for r in seen if r.get("split") == "val"] or seen
    gt_vocoder = synth.vocoder

    def predicted_mos(wav: np.ndarray) -> float | None:
        if "dnsmos" in skipped:
            return None
        try:
            return dnsmos(wav, synth.sample_rate).ovrl
        except (QualityUnavailable, ValueError):
            return None  # missing wheel, or a clip too short to judge: no score, not a failure

    def wer(text: str, wav: np.ndarray) -> float | None:
        if "wer" in skipped:
            return None
        return word_error_rate(text, transcribe(wav, synth.sample_rate))

    rows = []
    for rec in _pick_utterances(val, n_utterances):
        feats = torch.load(cache_dir / rec["feats"], map_location="cpu", weights_only=True)
        real_emb = feats["spk_emb"].float().numpy()
        gt_mel = feats["mel"].float()
        if rec["speaker"] in synth.loaded.speakers:
            target = synth.speaker_embedding(speaker=rec["speaker"])
        elif synth.loaded.uses_voice_stats:
            # A speaker the checkpoint has no table row for: its own clip's voice, as a
            # reference of it would give.
            stats = voice_stats.voice_statistics(gt_mel[None], feats["pitch"].float()[None])
            target = np.concatenate([real_emb, stats[0].numpy()])
        else:
            target = real_emb
        out = synth.synthesize(rec["text"], target)
        vocoded = gt_vocoder(gt_mel)
        # The WER ground truth is the real recording, whose path the feature cache keeps.
        audio_path = rec.get("audio_path")
        if audio_path and Path(audio_path).is_file():
            gt_wav, gt_kind = load_audio(audio_path, synth.sample_rate)[0].numpy(), "recording"
        else:
            # An older cache without the path: the ground truth's own mel through the same
            # vocoder, which also takes the vocoder's share out of the comparison.
            gt_wav, gt_kind = vocoded, "vocoded_ground_truth_mel"
        with_secs = "secs" not in skipped
        rows.append(
            {
                "id": rec["id"],
                "speaker": rec["speaker"],
                "text": rec["text"],
                "secs": secs(embed_audio(out.audio, out.sample_rate), real_emb)
                if with_secs
                else None,
                # What the vocoder alone costs: the ground truth's own mel, vocoded, vs the recording.
                "secs_vocoded_ground_truth": secs(embed_audio(vocoded, synth.sample_rate), real_emb)
                if with_secs
                else None,
                "mcd_db": mel_cepstral_distortion(gt_mel, out.mel)
                if "mcd" not in skipped
                else None,
                "wer_output": wer(rec["text"], out.audio),
                "wer_ground_truth": wer(rec["text"], gt_wav),
                "ground_truth": gt_kind,
                "dnsmos_ovrl": predicted_mos(out.audio),
                "dnsmos_ovrl_ground_truth": predicted_mos(gt_wav),
                "rtf": out.timings["rtf"],
                "audio_s": out.duration_s,
            }
        )

    def mean(key, items=rows):
        values = [r[key] for r in items if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    unseen: dict = {}
    if "secs" in skipped:
        skipped.setdefault("secs_unseen", skipped["secs"])
    elif not held_out:
        skipped["secs_unseen"] = "no speaker is held out (mark some on the dataset page)"
    else:
        from synthesis.cloning import DEFAULT_TEXTS, clone_scores

        try:
            unseen = clone_scores(
                synth,
                held_out,
                texts=unseen_texts or DEFAULT_TEXTS,
                floor_clips=floor_clips,
                transcribe="wer" not in skipped,
            )
        except ValueError as exc:  # too few clips, no other speaker for the floor
            skipped["secs_unseen"] = str(exc)
    check = None
    if speaker_check and "secs" not in skipped:
        check = dict(
            speaker_secs(
                synth,
                speaker_check["reference"],
                speaker_check["targets"],
                unseen_texts or FEW_SHOT_TEXTS,
            ),
            speaker=speaker_check["speaker"],
        )

    scores = {
        "checkpoint": str(checkpoint),
        "step": synth.loaded.step,
        "size": synth.loaded.size,
        "device": str(synth.loaded.device),
        "vocoder": synth.vocoder.name,
        "n_utterances": len(rows),
        "secs_seen": mean("secs"),
        "secs_vocoded_ground_truth": mean("secs_vocoded_ground_truth"),
        **(real_clip_similarity(cache_dir) if "secs" not in skipped else {}),
        # Unseen voices (synthesis.cloning): output vs the speaker's *other* clips.
        "secs_unseen": unseen.get("secs_unseen"),
        "secs_unseen_ceiling": unseen.get("ceiling"),
        "secs_unseen_floor": unseen.get("floor"),
        "normalised_secs_unseen": unseen.get("normalised_secs_unseen"),
        "wer_unseen": unseen.get("wer_unseen"),
        "unseen_speakers": [s["speaker"] for s in unseen.get("speakers", [])],
        "mcd_db": mean("mcd_db"),
        "wer_output": mean("wer_output"),
        "wer_ground_truth": mean("wer_ground_truth"),
        "dnsmos_ovrl": mean("dnsmos_ovrl"),
        "dnsmos_ovrl_ground_truth": mean("dnsmos_ovrl_ground_truth"),
        "ground_truth": rows[0]["ground_truth"] if rows else None,
        "rtf": mean("rtf"),
        "skipped": skipped,
        "utterances": rows,
        "unseen": unseen.get("speakers", []),
    }
    if check is not None:
        scores["speaker_check"] = check
    scores["quality"] = quality_score(scores)
    return scores


def main() -> None:
    import argparse
    import glob

    parser = argparse.ArgumentParser(
        description="Score a checkpoint on its feature cache's held-out utterances."
    )
    parser.add_argument("checkpoint")
    parser.add_argument("cache_dir")
    parser.add_argument("--n", type=int, default=8, help="validation utterances to synthesise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--vocoder", default=None, help="griffin-lim, hifigan, or a fine-tuned vocoder checkpoint"
    )
    parser.add_argument(
        "--held-out",
        nargs="*",
        default=[],
        metavar="NAME=GLOB",
        help="a speaker the model never saw and a glob of their clips, e.g. fam1='corpus/wavs/fam1_*.flac'",
    )
    args = parser.parse_args()
    from synthesis.engine import configure_cpu_threads

    configure_cpu_threads()
    held_out = {}
    for spec in args.held_out:
        name, _, pattern = spec.partition("=")
        held_out[name] = sorted(glob.glob(pattern))  # 3 clone the voice, the others judge it
    print(
        json.dumps(
            evaluate_checkpoint(
                args.checkpoint,
                args.cache_dir,
                args.n,
                args.device,
                held_out,
                vocoder=args.vocoder,
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
