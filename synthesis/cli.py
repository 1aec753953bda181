"""Vocoders and voices from the command line, no browser needed.

    python -m synthesis vocode --vocoder hifigan --out DIR clip.wav ...
        copy synthesis: each file's own mel (made exactly as preprocessing makes it: trimmed,
        loudness-normalised) through the vocoder, written to DIR/<stem>.wav
    python -m synthesis say --checkpoint CKPT (--reference CLIP ... | --speaker NAME)
        --text TEXT --out OUT.wav [--vocoder NAME] [--speed X] [--pitch X] [--energy X]
    python -m synthesis vocoders
        the vocoders this machine can use

NAME is griffin-lim, hifigan (HiFi-GAN universal) or the path of a fine-tuned vocoder
checkpoint. Problems a person can fix end with a one-line message and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import soundfile as sf

from synthesis.engine import configure_cpu_threads

EXIT_USAGE = 2


def vocode_files(
    vocoder_name: str, out_dir: Path, files: list[str], device: str = "cpu"
) -> list[Path]:
    from synthesis.vocoders import load_vocoder
    from training.audio import DEFAULT, mel_spectrogram
    from training.vocoder import recording

    vocoder = load_vocoder(vocoder_name, DEFAULT, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in files:
        wav = recording(name, vocoder.config)
        started = time.perf_counter()
        out = vocoder(mel_spectrogram(wav, vocoder.config))
        spent = time.perf_counter() - started
        path = out_dir / f"{Path(name).stem}.wav"
        sf.write(path, out, vocoder.sample_rate)
        print(
            f"{path}  {len(out) / vocoder.sample_rate:.2f} s  RTF {spent / max(len(out) / vocoder.sample_rate, 1e-9):.2f}"
        )
        written.append(path)
    return written


def say(args: argparse.Namespace) -> Path:
    from synthesis.engine import Synthesizer
    from synthesis.evaluate import joined_clips

    synth = Synthesizer(args.checkpoint, args.device, vocoder=args.vocoder)
    if args.reference:
        # Several clips of one person are joined into one reference, as the page does.
        clips = args.reference
        target = synth.speaker_embedding(
            references=clips[0] if len(clips) == 1 else joined_clips(clips, synth.sample_rate)
        )
    else:
        target = synth.speaker_embedding(speaker=args.speaker)
    out = synth.synthesize(
        args.text, target, speed=args.speed, pitch=args.pitch, energy=args.energy
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, out.audio, out.sample_rate)
    t = out.timings
    print(
        f"{path}  {out.duration_s:.2f} s with {out.vocoder}  RTF {t['rtf']:.2f}  "
        f"first audio {t['first_audio_s']:.2f} s"
    )
    return path


def list_vocoders() -> None:
    from synthesis.vocoders import available_vocoders, default_vocoder_name

    default = default_vocoder_name()
    for choice in available_vocoders():
        mark = "*" if choice.name == default else " "
        state = "" if choice.available else f"  (unavailable: {choice.reason})"
        print(f"{mark} {choice.name:12s} {choice.label}{state}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m synthesis", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("vocode", help="copy synthesis of audio files through a vocoder")
    v.add_argument("--vocoder", default=None, help="griffin-lim, hifigan or a checkpoint path")
    v.add_argument("--out", required=True, type=Path, help="folder for <stem>.wav outputs")
    v.add_argument("audio", nargs="+", help="audio files")

    s = sub.add_parser("say", help="speak text with a trained checkpoint")
    s.add_argument("--checkpoint", required=True)
    voice = s.add_mutually_exclusive_group(required=True)
    voice.add_argument("--reference", action="append", help="a clip of the voice (repeatable)")
    voice.add_argument("--speaker", help="a speaker the checkpoint was trained on")
    s.add_argument("--text", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--vocoder", default=None, help="griffin-lim, hifigan or a checkpoint path")
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument("--pitch", type=float, default=0.0, help="semitones")
    s.add_argument("--energy", type=float, default=1.0)

    sub.add_parser("vocoders", help="list the vocoders this machine can use")
    return p


def main(argv: list[str] | None = None) -> int:
    from synthesis.reference_clips import ReferenceAudioError
    from synthesis.vocoders import VocoderError
    from training.audio import AudioError
    from training.checkpoint import CheckpointError

    args = parser().parse_args(argv)
    configure_cpu_threads(args.threads)
    try:
        if args.command == "vocode":
            vocode_files(args.vocoder, args.out, args.audio, args.device)
        elif args.command == "say":
            say(args)
        else:
            list_vocoders()
    except (
        VocoderError,
        AudioError,
        CheckpointError,
        ReferenceAudioError,
        ValueError,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0
