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
import re
import threading
from pathlib import Path

import numpy as np
import torch
import torchaudio

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


def words(text: str) -> list[str]:
    """Lower-case words with punctuation dropped, numbers spelled out by the English normaliser."""
    from training.text import normalize

    text = normalize(text, "en").lower()
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        raise ValueError("the reference text has no words")
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


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


def evaluate_checkpoint(
    checkpoint: str | Path,
    cache_dir: str | Path,
    n_utterances: int = 8,
    device: str = "cpu",
    held_out: dict[str, list] | None = None,
    held_out_text: str = "The quick brown fox jumps over the lazy dog.",
    vocoder: str | None = None,
) -> dict:
    """Score a checkpoint on held-out (validation) utterances of its feature cache.

    `held_out` maps speakers the model never saw to a few of their clips, joined into one
    cloning reference (corpus clips are often shorter than the 3 s a reference needs); SECS is
    the output against that reference, as for seen speakers it is the output against the real
    recording of the same sentence.
    `vocoder` is a name for synthesis.vocoders.load_vocoder (None: the default vocoder).
    Returns a plain dict (JSON-ready) with means and the per-utterance rows.
    """
    from synthesis.engine import Synthesizer
    from synthesis.quality import QualityUnavailable, dnsmos
    from synthesis.reference_clips import embed_references, seen_speaker_embedding

    cache_dir = Path(cache_dir)
    records = [
        json.loads(line) for line in (cache_dir / "items.jsonl").read_text().splitlines() if line
    ]
    val = [r for r in records if r.get("split") == "val"] or records
    synth = Synthesizer(checkpoint, device, vocoder=vocoder)
    gt_vocoder = synth.vocoder

    def predicted_mos(wav: np.ndarray) -> float | None:
        try:
            return dnsmos(wav, synth.sample_rate).ovrl
        except (QualityUnavailable, ValueError):
            return None  # missing wheel, or a clip too short to judge: no score, not a failure

    rows = []
    for rec in _pick_utterances(val, n_utterances):
        feats = torch.load(cache_dir / rec["feats"], map_location="cpu", weights_only=True)
        real_emb = feats["spk_emb"].float().numpy()
        gt_mel = feats["mel"].float()
        if rec["speaker"] in synth.loaded.speakers:
            target = seen_speaker_embedding(synth.loaded.speakers, rec["speaker"])
        else:
            target = real_emb
        out = synth.synthesize(rec["text"], target)
        vocoded = gt_vocoder(gt_mel)
        audio_path = rec.get("audio_path")
        if audio_path and Path(audio_path).is_file():
            from training.audio import load_audio

            gt_wav, gt_kind = load_audio(audio_path, synth.sample_rate)[0].numpy(), "recording"
        else:
            # The cache keeps features, not audio: the ground truth is then its own mel through
            # the same vocoder, which also takes the vocoder's share out of the comparison.
            gt_wav, gt_kind = vocoded, "vocoded_ground_truth_mel"
        rows.append(
            {
                "id": rec["id"],
                "speaker": rec["speaker"],
                "text": rec["text"],
                "secs": secs(embed_audio(out.audio, out.sample_rate), real_emb),
                # What the vocoder alone costs: the ground truth's own mel, vocoded, vs the recording.
                "secs_vocoded_ground_truth": secs(
                    embed_audio(vocoded, synth.sample_rate), real_emb
                ),
                "mcd_db": mel_cepstral_distortion(gt_mel, out.mel),
                "wer_output": word_error_rate(rec["text"], transcribe(out.audio, out.sample_rate)),
                "wer_ground_truth": word_error_rate(
                    rec["text"], transcribe(gt_wav, synth.sample_rate)
                ),
                "ground_truth": gt_kind,
                "dnsmos_ovrl": predicted_mos(out.audio),
                "dnsmos_ovrl_ground_truth": predicted_mos(gt_wav),
                "rtf": out.timings["rtf"],
                "audio_s": out.duration_s,
            }
        )
    unseen = []
    for name, clips in (held_out or {}).items():
        reference = embed_references(joined_clips(clips, synth.sample_rate))
        out = synth.synthesize(held_out_text, reference)
        unseen.append(
            {"speaker": name, "secs": secs(embed_audio(out.audio, out.sample_rate), reference)}
        )

    def mean(key, items=rows):
        values = [r[key] for r in items if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "checkpoint": str(checkpoint),
        "step": synth.loaded.step,
        "size": synth.loaded.size,
        "device": str(synth.loaded.device),
        "vocoder": synth.vocoder.name,
        "n_utterances": len(rows),
        "secs_seen": mean("secs"),
        "secs_unseen": mean("secs", unseen),
        "secs_vocoded_ground_truth": mean("secs_vocoded_ground_truth"),
        **real_clip_similarity(cache_dir),
        "mcd_db": mean("mcd_db"),
        "wer_output": mean("wer_output"),
        "wer_ground_truth": mean("wer_ground_truth"),
        "dnsmos_ovrl": mean("dnsmos_ovrl"),
        "dnsmos_ovrl_ground_truth": mean("dnsmos_ovrl_ground_truth"),
        "ground_truth": rows[0]["ground_truth"] if rows else None,
        "rtf": mean("rtf"),
        "utterances": rows,
        "unseen": unseen,
    }


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
    parser.add_argument(
        "--clips", type=int, default=3, help="clips per held-out speaker joined into the reference"
    )
    args = parser.parse_args()
    from synthesis.engine import configure_cpu_threads

    configure_cpu_threads()
    held_out = {}
    for spec in args.held_out:
        name, _, pattern = spec.partition("=")
        held_out[name] = sorted(glob.glob(pattern))[: args.clips]
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
