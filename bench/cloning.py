"""Cloning voices a checkpoint never heard: normalised SECS and WER, a JSON line per checkpoint.

    .venv/bin/python bench/cloning.py --checkpoint run/checkpoints/step_2000.pt [more.pt ...] \
        --corpus /work/shared/corpora/dev-en-8spk --held-out rms,esf2 [--label today] \
        [--vocoder hifigan] [--texts 4] [--no-wer] > cloning.jsonl

Trains nothing: it scores checkpoints that were trained with those speakers held out
(`python -m training train --hold-out-speakers rms,esf2`). Each held-out speaker is cloned from
3 of its clips joined into one reference and compared with up to 10 *other* clips of it
(synthesis.cloning explains the ceiling, the floor and the normalisation). The floor uses
--floor-clips real clips of every speaker of the corpus that is not held out.

A checkpoint whose `speakers` table names a held-out speaker was trained on that voice: the
line says so ("leak") and its figures do not measure cloning of an unseen voice.

A checkpoint with voice statistics gets two lines by default, with and without voice matching at
synthesis (`--match off,on`; off is the default), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", required=True)
    parser.add_argument("--corpus", required=True, help="corpus folder (as for preprocess)")
    parser.add_argument("--held-out", required=True, help="comma-separated held-out speakers")
    parser.add_argument("--label", default="", help="a name for the variant, copied to each line")
    parser.add_argument("--vocoder", default=None, help="default: the synthesis default")
    parser.add_argument("--texts", type=int, default=4, help="sentences per voice (max 4)")
    parser.add_argument("--targets", type=int, default=10, help="other clips per voice")
    parser.add_argument("--floor-clips", type=int, default=3, help="clips per floor speaker")
    parser.add_argument("--no-wer", action="store_true", help="skip pocketsphinx")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--match",
        default="off,on",
        help="voice matching at synthesis (training.voice_stats.match): on, off or both "
        "(off,on: the synthesis default and the option, in the same run)",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from synthesis.cloning import DEFAULT_TEXTS, clone_scores
    from synthesis.engine import ModelCache, Synthesizer
    from training.corpus import read_corpus

    held = [s.strip() for s in args.held_out.split(",") if s.strip()]
    items, _problems = read_corpus(args.corpus)
    by_speaker: dict[str, list[Path]] = {}
    for it in items:
        by_speaker.setdefault(it.speaker, []).append(Path(it.audio_path))
    missing = [s for s in held if s not in by_speaker]
    if missing:
        print(f"error: {', '.join(missing)} not in {args.corpus}", file=sys.stderr)
        return 2
    clips = {s: by_speaker[s] for s in held}
    floor = {
        s: sorted(paths, key=lambda p: p.name)[: args.floor_clips]
        for s, paths in by_speaker.items()
        if s not in held
    }
    matches = [m.strip() == "on" for m in args.match.split(",") if m.strip()]
    cache = ModelCache(1)
    for path, match in ((p, m) for p in args.checkpoint for m in matches):
        started = time.perf_counter()
        synth = Synthesizer(path, "cpu", vocoder=args.vocoder, cache=cache, match_voice=match)
        if match and not synth.loaded.uses_voice_stats and False in matches:
            continue  # a checkpoint without voice statistics has nothing to match: one line
        leak = sorted(set(held) & set(synth.loaded.speakers))
        result = clone_scores(
            synth,
            clips,
            DEFAULT_TEXTS[: args.texts],
            n_targets=args.targets,
            floor_clips=floor,
            transcribe=not args.no_wer,
        )
        line = {
            "label": args.label,
            "checkpoint": str(path),
            "step": synth.loaded.step,
            "size": synth.loaded.size,
            "voice_stats": synth.loaded.uses_voice_stats,
            "match_voice": match and synth.loaded.uses_voice_stats,
            "held_out": held,
            "leak": leak,
            **{k: v for k, v in result.items() if k != "speakers"},
            "per_speaker": {
                s["speaker"]: {
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in s.items()
                    if k in ("secs", "ceiling", "floor", "normalised", "wer")
                }
                for s in result["speakers"]
            },
            "elapsed_s": round(time.perf_counter() - started, 1),
            "load_avg": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
