"""How well the dataset quality gate catches injected faults, and what it costs, as JSON lines.

    .venv/bin/python bench/quality_gate.py                     # all of dev-en-8spk
    .venv/bin/python bench/quality_gate.py --per-speaker 40    # a quicker subset

A copy of the corpus gets a known share of faults of five kinds, each on different clips:
swapped transcripts (two clips of one speaker trade texts), truncated transcripts (the first
35-65 % of the words kept), noise-only clips (the audio replaced by noise at speech level),
clips of another speaker (another speaker's clip, with its own correct transcript, filed
under this speaker) and heavy added noise (white or pink noise at 0-5 dB SNR).

The copy is preprocessed in alternating rounds (--repeats, medians), each from an empty cache
and with one thread: as before the gate (`quality=False`, the baseline) and with it. Per fault kind: recall = the
share of that kind's clips the gate flags (review or drop), precision = the share of clips
whose worst reason is that kind's that really carry it. Then the clean clips flagged, and the
cost in ms a clip of both runs: wall clock, and CPU time of this process (the fair figure on a
shared machine; both runs use one process and one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "dev-en-8spk"
KINDS = {  # injected fault -> the gate's reason code for it
    "swapped_transcript": "transcript_mismatch",
    "truncated_transcript": "transcript_truncated",
    "noise_only": "no_speech",
    "other_speaker": "other_speaker",
    "heavy_noise": "noisy",
}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def corrupt(corpus: Path, dest: Path, per_speaker: int, share: float, seed: int) -> dict:
    """Write the faulty copy (metadata.csv + wavs/) and return item id -> injected kind."""
    import numpy as np
    import soundfile as sf

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    rows = [line.split("|") for line in (corpus / "metadata.csv").read_text().splitlines()[1:]]
    by_spk: dict[str, list] = {}
    for f, text, spk in rows:
        by_spk.setdefault(spk, []).append([f, text, spk])
    speakers = sorted(by_spk)
    chosen = []
    for spk in speakers:
        chosen += by_spk[spk][:per_speaker] if per_speaker else by_spk[spk]
    (dest / "wavs").mkdir(parents=True, exist_ok=True)
    truth: dict[str, str] = {}
    out_rows = []
    for i, (f, text, spk) in enumerate(chosen):
        out_rows.append([str((corpus / f).resolve()), text, spk, f"{spk}_{i:04d}"])
    n_each = max(2, round(share * len(out_rows)))
    order = list(range(len(out_rows)))
    rng.shuffle(order)
    picks = {kind: [] for kind in KINDS}
    cursor = 0
    for kind in KINDS:
        picks[kind] = order[cursor : cursor + n_each]
        cursor += n_each
    for idx in picks["swapped_transcript"]:
        row = out_rows[idx]
        # A partner of the same speaker that is clean too: both clips become faulty.
        partners = [
            j
            for j in order[cursor:]
            if out_rows[j][2] == row[2] and out_rows[j][3] not in truth and j != idx
        ]
        j = rng.choice(partners)
        row[1], out_rows[j][1] = out_rows[j][1], row[1]
        truth[row[3]] = truth[out_rows[j][3]] = "swapped_transcript"
    for idx in picks["truncated_transcript"]:
        row = out_rows[idx]
        words = row[1].split()
        keep = max(1, round(len(words) * rng.uniform(0.35, 0.65)))
        row[1] = " ".join(words[:keep])
        truth[row[3]] = "truncated_transcript"
    for idx in picks["noise_only"]:
        row = out_rows[idx]
        wav, sr = sf.read(row[0], dtype="float32")
        rms = float(np.sqrt(np.mean(wav**2))) or 0.05
        noise = _noise(nrng, len(wav), rng.choice(["white", "pink", "hum"]), sr)
        path = dest / "wavs" / f"{row[3]}.wav"
        sf.write(path, noise * rms / (np.sqrt(np.mean(noise**2)) + 1e-9), sr)
        row[0] = str(path)
        truth[row[3]] = "noise_only"
    for idx in picks["other_speaker"]:
        row = out_rows[idx]
        other = rng.choice([s for s in speakers if s != row[2]])
        f, text, _ = rng.choice(by_spk[other][per_speaker or 0 :] or by_spk[other])
        row[0], row[1] = str((corpus / f).resolve()), text
        truth[row[3]] = "other_speaker"
    for idx in picks["heavy_noise"]:
        row = out_rows[idx]
        wav, sr = sf.read(row[0], dtype="float32")
        noise = _noise(nrng, len(wav), rng.choice(["white", "pink"]), sr)
        snr_db = rng.uniform(0.0, 5.0)
        speech = float(np.mean(wav**2))
        noise *= np.sqrt(speech / (10 ** (snr_db / 10)) / (np.mean(noise**2) + 1e-12))
        mixed = wav + noise
        mixed /= max(1.0, float(np.abs(mixed).max()) / 0.99)
        path = dest / "wavs" / f"{row[3]}.wav"
        sf.write(path, mixed.astype("float32"), sr)
        row[0] = str(path)
        truth[row[3]] = "heavy_noise"
    lines = ["audio_file|text|speaker_name"] + [f"{r[0]}|{r[1]}|{r[2]}" for r in out_rows]
    (dest / "metadata.csv").write_text("\n".join(lines) + "\n")
    return {"rows": out_rows, "truth": truth}


def _noise(rng, n: int, colour: str, sr: int):
    import numpy as np

    if colour == "hum":
        t = np.arange(n) / sr
        return (np.sin(2 * np.pi * 50 * t) + 0.3 * rng.standard_normal(n)).astype("float32")
    white = rng.standard_normal(n).astype("float32")
    if colour == "white":
        return white
    spectrum = np.fft.rfft(white)
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    return np.fft.irfft(spectrum, n).astype("float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--per-speaker", type=int, default=0, help="first N clips a speaker")
    parser.add_argument("--share", type=float, default=0.03, help="of the clips, per fault kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--asr",
        default="inconclusive",
        choices=["inconclusive", "all", "off"],
        help="which clips pocketsphinx hears (preprocess_corpus's asr)",
    )
    parser.add_argument("--keep", type=Path, help="keep the faulty copy and caches here")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating timed rounds of each (medians)"
    )
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from training.preprocess import preprocess_corpus

    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        work = args.keep or Path(tmp)
        faulty = corrupt(
            args.corpus.resolve(), work / "corpus", args.per_speaker, args.share, args.seed
        )
        truth = faulty["truth"]
        items = [
            type("Item", (), {"id": r[3], "audio_path": r[0], "text": r[1], "speaker": r[2]})
            for r in faulty["rows"]
        ]
        runs: dict[str, list[float]] = {
            "baseline": [],
            "gate": [],
            "baseline_cpu": [],
            "gate_cpu": [],
        }
        results = {}
        # Alternating rounds, medians: one pass of each differs by up to 7 % from the next on
        # this machine, as much as the margin being measured.
        for _ in range(args.repeats):
            for name, gate in (("baseline", False), ("gate", True)):
                cache = work / f"cache-{name}"
                shutil.rmtree(cache, ignore_errors=True)
                started, cpu = time.perf_counter(), time.process_time()
                results[name] = preprocess_corpus(items, cache, quality=gate, asr=args.asr)
                runs[name].append(time.perf_counter() - started)
                # CPU seconds of this process (one thread, one process): what the work costs,
                # whatever else the machine is busy with; the wall clock is printed beside it.
                runs[name + "_cpu"].append(time.process_time() - cpu)
        timings = {k: statistics.median(v) for k, v in runs.items()}
        n = len(items)
        verdicts = results["gate"].verdicts
        flagged = {i for i, v in verdicts.items() if v["verdict"] in ("review", "drop")}
        said = {i: v["reasons"][0]["code"] for i, v in verdicts.items() if i in flagged}
        for kind, code in KINDS.items():
            injected = {i for i, k in truth.items() if k == kind}
            caught = injected & flagged
            named = {i for i, c in said.items() if c == code}
            emit(
                {
                    "kind": kind,
                    "injected": len(injected),
                    "flagged": len(caught),
                    "recall": round(len(caught) / max(len(injected), 1), 3),
                    "named_as": code,
                    "named": len(named),
                    "precision": round(len(named & injected) / max(len(named), 1), 3),
                    "missed": sorted(injected - flagged)[:5],
                    "misnamed": {i: said[i] for i in sorted(caught - named)[:5]},
                }
            )
        clean = [i for i in verdicts if i not in truth]
        false_flags = sorted(i for i in clean if i in flagged)
        emit(
            {
                "clean": len(clean),
                "clean_flagged": len(false_flags),
                "clean_flagged_share": round(len(false_flags) / max(len(clean), 1), 4),
                "examples": {i: verdicts[i]["reasons"][0]["message"] for i in false_flags[:6]},
            }
        )
        trained = {
            json.loads(line)["id"]
            for line in (work / "cache-gate" / "items.jsonl").read_text().splitlines()
        }
        noise_only = {i for i, k in truth.items() if k == "noise_only"}
        emit(
            {
                "clips": n,
                "asr": args.asr,
                "baseline_ms_per_clip": round(1000 * timings["baseline"] / n, 1),
                "gate_ms_per_clip": round(1000 * timings["gate"] / n, 1),
                "cost_ratio": round(timings["gate"] / timings["baseline"], 3),
                "baseline_cpu_ms_per_clip": round(1000 * timings["baseline_cpu"] / n, 1),
                "gate_cpu_ms_per_clip": round(1000 * timings["gate_cpu"] / n, 1),
                "cpu_cost_ratio": round(timings["gate_cpu"] / timings["baseline_cpu"], 3),
                "repeats": args.repeats,
                "cpu_cost_ratio_each": [
                    round(g / b, 3)
                    for g, b in zip(runs["gate_cpu"], runs["baseline_cpu"], strict=True)
                ],
                "noise_only_in_training": len(noise_only & trained),
                "left_out": results["gate"].left_out,
            }
        )


if __name__ == "__main__":
    main()
