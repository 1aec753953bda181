"""Vocoders side by side on clips the studio never trained on: quality, intelligibility, speed.

    .venv/bin/python bench/vocoder.py [--clips 12] [--finetune-seconds 150] [--threads 1]
                                      [--speed-threads 2] [--compile] > vocoder.jsonl

Copy synthesis (each clip's own mel, made as preprocessing makes it, through the vocoder) on
validation clips of /work/shared/corpora/dev-en-8spk, round-robin over its speakers, for:
  real                    the recordings themselves: the ceiling
  griffin-lim             the fast preview (32 iterations), the old default: the baseline
  hifigan                 HiFi-GAN universal, as the studio loads it
  hifigan-finetuned       universal fine-tuned on this corpus's training clips for a short CPU
                          budget (training.vocoder.VocoderTrainer, real mels)
One JSON line each: DNSMOS OVRL/SIG/BAK (synthesis.quality), pocketsphinx WER, SECS against
another clip of the same speaker, MCD against the clip's own mel, RTF.

Then speed lines for HiFi-GAN on one sentence with --speed-threads threads, every variant in
the same run so they share the machine's load (other agents use the same cores; compare the
ratios): eager float32 (the baseline), eager bfloat16, ONNX Runtime (when the `onnx` exporter
package is installed), torch.compile (--compile; minutes of compiling on a small CPU), each
with its real-time factor and the time to the first streamed chunk. Conv1d has no
channels-last layout (that is a 4-D memory format), so it is not a candidate.
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


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_chunk_s(vocoder, mel) -> float:
    t = time.perf_counter()
    next(iter(vocoder.stream(mel)))
    return time.perf_counter() - t


def onnx_runner(generator, threads: int, workdir: Path):
    """The generator exported once to ONNX and run by onnxruntime; None without `onnx`."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        return None, "the onnx exporter package is not installed"
    import onnxruntime as ort

    path = workdir / "hifigan.onnx"
    with torch.no_grad():
        torch.onnx.export(
            generator, (torch.randn(1, 80, 64),), str(path), input_names=["mel"],
            output_names=["wav"], dynamic_axes={"mel": {2: "frames"}, "wav": {2: "samples"}},
            dynamo=False, opset_version=17,
        )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(mel: torch.Tensor) -> np.ndarray:
        return session.run(None, {"mel": mel[None].numpy().astype(np.float32)})[0][0, 0]

    return run, None


def speed(clip: dict, threads: int, repeats: int, use_compile: bool, workdir: Path) -> None:
    from training.vocoder_model import pretrained_generator, remove_weight_norm, wheel_config

    torch.set_num_threads(threads)
    _, layout = wheel_config()
    mel = A.mel_spectrogram(clip["wav"])
    audio_s = mel.shape[1] * A.DEFAULT.hop_length / A.DEFAULT.sample_rate
    variants = {
        "eager_fp32": vocoders.HiFiGAN(pretrained_generator(), layout, dtype=torch.float32),
        "eager_bf16": vocoders.HiFiGAN(pretrained_generator(), layout, dtype=torch.bfloat16),
    }
    results = {}
    for name, v in variants.items():
        v(mel)  # warm-up: oneDNN picks its kernels on the first call
        results[name] = (
            timed(lambda v=v: v(mel), repeats),
            timed(lambda v=v: first_chunk_s(v, mel), repeats),
        )
    run, why_not = onnx_runner(remove_weight_norm(pretrained_generator()).eval(), threads, workdir)
    if run is not None:
        run(mel)
        first = mel[:, : vocoders.FIRST_CHUNK_FRAMES + vocoders.CONTEXT_FRAMES]
        results["onnxruntime_fp32"] = (
            timed(lambda: run(mel), repeats),
            timed(lambda: run(first), repeats),
        )
    else:
        emit(kind="speed", variant="onnxruntime_fp32", skipped=why_not)
    if use_compile:
        v = vocoders.HiFiGAN(pretrained_generator(), layout, dtype=torch.float32)
        v.generator = torch.compile(v.generator, dynamic=True)
        t = time.perf_counter()
        v(mel)
        compile_s = time.perf_counter() - t
        results["compile_fp32"] = (
            timed(lambda: v(mel), repeats),
            timed(lambda: first_chunk_s(v, mel), repeats),
        )
        emit(kind="speed_note", variant="compile_fp32", compile_s=round(compile_s, 1))
    base = results["eager_fp32"][0]
    for name, (whole_s, first_s) in results.items():
        emit(
            kind="speed", variant=name, threads=threads, audio_s=round(audio_s, 2),
            rtf=round(whole_s / audio_s, 3), first_chunk_s=round(first_s, 3),
            speedup_vs_eager_fp32=round(base / whole_s, 2),
        )  # fmt: skip
    gl = vocoders.GriffinLim()
    emit(
        kind="speed",
        variant="griffin-lim",
        threads=threads,
        rtf=round(timed(lambda: gl(mel), repeats) / audio_s, 3),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--clips", type=int, default=12, help="validation clips to score")
    parser.add_argument("--finetune-seconds", type=float, default=150.0, help="0 skips it")
    parser.add_argument("--finetune-clips", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for quality")
    parser.add_argument("--speed-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
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
    # SECS reference: another clip (a training one) of the same speaker.
    references = {}
    for r in train:
        if r["speaker"] not in references:
            references[r["speaker"]] = embed_audio(recording(r["path"], A.DEFAULT).numpy(), 22050)

    with tempfile.TemporaryDirectory(prefix="bench-vocoder-") as tmp:
        workdir = Path(tmp)
        systems = [
            ("real", None),
            ("griffin-lim", vocoders.GriffinLim()),
            ("hifigan", vocoders.load_vocoder("hifigan")),
        ]
        if args.finetune_seconds > 0:
            path, info = finetune(
                round_robin(train, args.finetune_clips), args.finetune_seconds, workdir
            )
            emit(kind="finetune", **info)
            systems.append(("hifigan-finetuned", vocoders.load_vocoder(path)))
        for name, vocoder in systems:
            emit(**quality(name, vocoder, val, references))
        speed(val[0], args.speed_threads, args.repeats, args.compile, workdir)
    emit(kind="env_end", load_avg=os.getloadavg())


if __name__ == "__main__":
    main()
