"""Vocoders side by side on clips the studio never trained on: quality, intelligibility, speed.

    .venv/bin/python bench/vocoder.py [--clips 12] [--finetune-seconds 150] [--threads 1]
                                      [--speed-threads 1 2] [--repeats 5] [--speed-only]
                                      [--variants eager_fp32 onnxruntime_fp32 ...] > v.jsonl

Copy synthesis (each clip's own mel, made as preprocessing makes it, through the vocoder) on
validation clips of /work/shared/corpora/dev-en-8spk, round-robin over its speakers, for:
  real                    the recordings themselves: the ceiling
  griffin-lim             the fast preview (32 iterations), the old default: the baseline
  hifigan                 HiFi-GAN universal, as the studio loads it
  hifigan-finetuned       universal fine-tuned on this corpus's training clips for a short CPU
                          budget (training.vocoder.VocoderTrainer, real mels)
One JSON line each: DNSMOS OVRL/SIG/BAK (synthesis.quality), pocketsphinx WER, SECS against
another clip of the same speaker, MCD against the clip's own mel, RTF.

Then speed lines for HiFi-GAN on one clip for each --speed-threads count, every variant timed
round-robin in the same run so they share the machine's load (other agents use the same
cores; compare the ratios, medians of --repeats rounds): eager float32 in inference mode (the
baseline; the studio's fallback), eager under no_grad only, eager bfloat16 (emulated, so slow,
on CPUs without AMX/AVX512-BF16), ONNX Runtime float32 (the studio's CPU default), and
torch.compile (`--variants compile_fp32`; minutes of compiling on a small CPU), each with
its real-time factor and the time to the first streamed chunk. Conv1d has no channels-last layout (that is a 4-D
memory format), so it is not a candidate; a line says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthesis import vocoders
from synthesis.evaluate import (
    embed_audio,
    mel_cepstral_distortion,
    secs,
    transcribe,
    word_error_rate,
)
from synthesis.quality import dnsmos
from training import audio as A
from training.preprocess import split_of
from training.vocoder import recording

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "dev-en-8spk"


def emit(**line) -> None:
    print(json.dumps(line), flush=True)


def corpus_rows(corpus: Path) -> list[dict]:
    with open(corpus / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="|"))
    return [
        {
            "id": Path(r["audio_file"]).stem,
            "path": corpus / r["audio_file"],
            "text": r["text"],
            "speaker": r["speaker_name"],
        }
        for r in rows
    ]


def round_robin(rows: list[dict], n: int) -> list[dict]:
    by_speaker: dict[str, list[dict]] = {}
    for r in rows:
        by_speaker.setdefault(r["speaker"], []).append(r)
    picked, queues = [], [by_speaker[s] for s in sorted(by_speaker)]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def finetune(train_rows: list[dict], seconds: float, workdir: Path) -> tuple[str, dict]:
    """Universal, fine-tuned on real mels of `train_rows` until `seconds` of CPU time pass."""
    from training.corpus import CorpusItem
    from training.preprocess import preprocess_corpus
    from training.trainer import Callbacks
    from training.vocoder import VocoderConfig, VocoderTrainer

    items = [CorpusItem(r["id"], r["path"], r["text"], r["speaker"]) for r in train_rows]
    started = time.perf_counter()
    preprocess_corpus(items, workdir / "cache", lang="en")
    prep_s = time.perf_counter() - started

    class Budget(Callbacks):
        def __init__(self):
            self.start = time.perf_counter()
            self.last: dict = {}

        def on_step(self, metrics):
            self.last = metrics

        def should_stop(self):
            return time.perf_counter() - self.start > seconds

    budget = Budget()
    cfg = VocoderConfig(
        steps=1_000_000, batch_size=2, segment_size=8192, eval_every=1_000_000,
        checkpoint_every=1_000_000, log_every=1, keep_last=1, device="cpu",
        learning_rate=1e-4,  # half the paper's: a few steps against untrained judges
    )  # fmt: skip
    trainer = VocoderTrainer(
        cfg, workdir / "cache", workdir / "run", budget,
        audio_files={r["id"]: r["path"] for r in train_rows},
    )  # fmt: skip
    result = trainer.run()
    info = {
        "preprocess_s": round(prep_s, 1),
        "train_s": round(time.perf_counter() - budget.start, 1),
        "steps": result.step,
        "train_clips": len(trainer.train_set),
        "last_losses": {k: round(v, 4) for k, v in budget.last.items() if k.startswith("loss/")},
    }
    # Stopped by the budget, the run has no eval and so no best.pt; the step checkpoint holds
    # the same generator (and loads as a vocoder too).
    return str(result.last_checkpoint), info


def quality(name: str, vocoder, clips: list[dict], references: dict) -> dict:
    sr = A.DEFAULT.sample_rate
    rows = []
    for clip in clips:
        wav = clip["wav"]
        mel = A.mel_spectrogram(wav)
        started = time.perf_counter()
        out = wav.numpy() if vocoder is None else vocoder(mel)
        spent = time.perf_counter() - started
        mos = dnsmos(out, sr)
        rows.append(
            {
                "ovrl": mos.ovrl,
                "sig": mos.sig,
                "bak": mos.bak,
                "wer": word_error_rate(clip["text"], transcribe(out, sr)),
                "secs": secs(embed_audio(out, sr), references[clip["speaker"]]),
                "mcd": mel_cepstral_distortion(mel, A.mel_spectrogram(torch.from_numpy(out))),
                "rtf": spent / (len(out) / sr),
            }
        )

    def mean(key):
        return round(float(np.mean([r[key] for r in rows])), 3)

    return {
        "kind": "quality",
        "vocoder": name,
        "n_clips": len(rows),
        "dnsmos_ovrl": mean("ovrl"),
        "dnsmos_sig": mean("sig"),
        "dnsmos_bak": mean("bak"),
        "wer": mean("wer"),
        "secs": mean("secs"),
        "mcd_db": mean("mcd"),
        "rtf": mean("rtf") if vocoder is not None else None,
    }


def first_chunk_s(vocoder, mel) -> float:
    t = time.perf_counter()
    next(iter(vocoder.stream(mel)))
    return time.perf_counter() - t


SPEED_VARIANTS = ("eager_fp32", "eager_fp32_no_grad", "eager_bf16", "onnxruntime_fp32")


def speed(
    clip: dict, threads: int, repeats: int, variants_wanted: list[str], max_seconds: float
) -> None:
    """Every variant timed round-robin (one call of each per round, `repeats` rounds), so a
    burst of load from other processes hits them all alike; medians are reported."""
    from training.vocoder_model import pretrained_generator, wheel_config

    torch.set_num_threads(threads)
    _, layout = wheel_config()
    wav = clip["wav"][: int(max_seconds * A.DEFAULT.sample_rate)]
    mel = A.mel_spectrogram(wav)
    audio_s = mel.shape[1] * A.DEFAULT.hop_length / A.DEFAULT.sample_rate

    def make(name: str):
        if name == "eager_fp32":  # the baseline: eager PyTorch in inference mode
            v = vocoders.HiFiGAN(pretrained_generator(), layout, backend=vocoders.BACKEND_EAGER)
            return v, v
        if name == "eager_fp32_no_grad":  # autograd off, but without inference mode
            v = vocoders.HiFiGAN(pretrained_generator(), layout, backend=vocoders.BACKEND_EAGER)

            def call(m, v=v):
                with torch.no_grad():
                    return v.vocode(v._prepare(m))

            return call, None
        if name == "eager_bf16":
            v = vocoders.HiFiGAN(
                pretrained_generator(), layout, dtype=torch.bfloat16, backend="eager"
            )
            return v, v
        if name == "onnxruntime_fp32":
            t = time.perf_counter()
            v = vocoders.HiFiGAN(pretrained_generator(), layout, backend=vocoders.BACKEND_ONNX)
            emit(kind="speed_note", variant=name, backend=v.backend,
                 load_and_export_s=round(time.perf_counter() - t, 1))  # fmt: skip
            return (v, v) if v.backend == vocoders.BACKEND_ONNX else None
        if name == "compile_fp32":
            v = vocoders.HiFiGAN(pretrained_generator(), layout, backend=vocoders.BACKEND_EAGER)
            v.generator = torch.compile(v.generator, dynamic=True)
            t = time.perf_counter()
            v(mel)
            emit(kind="speed_note", variant=name, compile_s=round(time.perf_counter() - t, 1))
            return v, v
        raise SystemExit(f"unknown speed variant {name!r}")

    variants = {}
    for name in ["eager_fp32", *[n for n in variants_wanted if n != "eager_fp32"]]:
        made = make(name)
        if made is not None:
            variants[name] = made
    emit(kind="speed_note", variant="channels_last", skipped="Conv1d has no channels-last "
         "layout (torch.channels_last is a 4-D memory format)")  # fmt: skip
    for whole, _ in variants.values():
        whole(mel)  # warm-up: oneDNN and ONNX Runtime pick their kernels on the first call
    times: dict[str, list[float]] = {name: [] for name in variants}
    firsts: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (whole, streamer) in variants.items():
            t = time.perf_counter()
            whole(mel)
            times[name].append(time.perf_counter() - t)
            if streamer is not None:
                firsts[name].append(first_chunk_s(streamer, mel))
    base = statistics.median(times["eager_fp32"])
    for name in variants:
        whole_s = statistics.median(times[name])
        emit(
            kind="speed", variant=name, threads=threads, audio_s=round(audio_s, 2),
            rtf=round(whole_s / audio_s, 3),
            first_chunk_s=round(statistics.median(firsts[name]), 3) if firsts[name] else None,
            speedup_vs_eager_fp32=round(base / whole_s, 2), repeats=repeats,
            load_avg_1m=round(os.getloadavg()[0], 2),
        )  # fmt: skip
    gl = vocoders.GriffinLim()
    gl_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gl(mel)
        gl_times.append(time.perf_counter() - t)
    emit(kind="speed", variant="griffin-lim", threads=threads,
         rtf=round(statistics.median(gl_times) / audio_s, 3))  # fmt: skip


def compare_quality(args, val: list[dict], train: list[dict], workdir: Path) -> None:
    # SECS reference: another clip (a training one) of the same speaker.
    references = {}
    for r in train:
        if r["speaker"] not in references:
            references[r["speaker"]] = embed_audio(recording(r["path"], A.DEFAULT).numpy(), 22050)
    systems = [
        ("real", None),
        ("griffin-lim", vocoders.GriffinLim()),
        ("hifigan", vocoders.load_vocoder("hifigan")),
    ]
    if systems[-1][1].dtype != torch.float32:
        # Served in bfloat16 on this processor: float32 beside it shows what bf16 costs.
        from training.vocoder_model import pretrained_generator, wheel_config

        _, layout = wheel_config()
        systems.append(("hifigan-float32", vocoders.HiFiGAN(pretrained_generator(), layout)))
    if args.finetune_seconds > 0:
        path, info = finetune(
            round_robin(train, args.finetune_clips), args.finetune_seconds, workdir
        )
        emit(kind="finetune", **info)
        systems.append(("hifigan-finetuned", vocoders.load_vocoder(path)))
    for name, vocoder in systems:
        emit(**quality(name, vocoder, val, references))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--clips", type=int, default=12, help="validation clips to score")
    parser.add_argument("--finetune-seconds", type=float, default=150.0, help="0 skips it")
    parser.add_argument("--finetune-clips", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for quality")
    parser.add_argument("--speed-threads", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--speed-only", action="store_true", help="skip the quality lines")
    parser.add_argument(
        "--variants", nargs="+", default=list(SPEED_VARIANTS),
        help=f"speed variants, eager_fp32 always included: {' '.join(SPEED_VARIANTS)} "
        "compile_fp32 (minutes of compiling on a small CPU)",
    )  # fmt: skip
    parser.add_argument("--speed-seconds", type=float, default=4.0, help="clip length timed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emit(
        kind="env", machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
        load_avg=os.getloadavg(), torch=torch.__version__, bf16_native=vocoders.cpu_bf16_is_fast(),
        threads=args.threads,
    )  # fmt: skip

    rows = corpus_rows(args.corpus)
    val = round_robin([r for r in rows if split_of(r["id"]) == "val"], args.clips)
    train = [r for r in rows if split_of(r["id"]) == "train"]
    for clip in val:
        clip["wav"] = recording(clip["path"], A.DEFAULT)
    if not args.speed_only:
        with tempfile.TemporaryDirectory(prefix="bench-vocoder-") as tmp:
            compare_quality(args, val, train, Path(tmp))
    for threads in args.speed_threads:
        speed(val[0], threads, args.repeats, args.variants, args.speed_seconds)
    emit(kind="env_end", load_avg=os.getloadavg())


if __name__ == "__main__":
    main()
