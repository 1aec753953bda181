"""Command line: `python -m training preprocess DATA_DIR OUT_DIR` and `python -m training train ...`.

Both print what they do with a tqdm bar; Ctrl-C during training stops at the next step and
writes a checkpoint that `--resume` continues from exactly.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter

import torch
from tqdm import tqdm

from training import distributed
from training.augment import AUGMENT_BELOW_SPEAKERS
from training.config import OPTIMIZATION_LEVELS, UnsafeConfig, batch_warning, preset
from training.model import MODEL_SIZES
from training.trainer import Callbacks, Trainer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training", description="Prepare a corpus and train a TTS voice."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser(
        "preprocess",
        help="check a corpus and write its feature cache",
        description="Read a corpus (LJSpeech, VCTK, Coqui `audio_file|text|speaker_name` CSV or "
        "Common Voice TSV), check every file and cache log-mel, pitch, energy, tokens and "
        "speaker embeddings in OUT_DIR. Re-running finishes an interrupted cache.",
    )
    pre.add_argument("data_dir", help="corpus folder")
    pre.add_argument("out_dir", help="feature cache folder to write")
    pre.add_argument("--lang", default="en", help="text language: en or fa (default en)")
    pre.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    pre.add_argument("--format", dest="fmt", default=None, help="corpus format (default: detect)")
    pre.add_argument(
        "--text-backend",
        default="auto",
        choices=("auto", "espeak", "chars"),
        help="phonemes through espeak-ng, or characters (default auto: espeak when available)",
    )

    pre.add_argument(
        "--augment-speakers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add pitch- and formant-shifted copies of every speaker as extra speakers "
        "(training.augment), so a small corpus teaches more than a few voices (default: on "
        f"for corpora of fewer than {AUGMENT_BELOW_SPEAKERS} speakers)",
    )

    sh = sub.add_parser(
        "shards",
        help="pack a feature cache into memory-mapped shards (for corpora of many hours)",
        description="Pack a finished feature cache into shards of about --shard-mb each under "
        "CACHE/shards; the trainer then reads them instead of one file per utterance.",
    )
    sh.add_argument("cache_dir", help="feature cache folder (from preprocess)")
    sh.add_argument("--shard-mb", type=int, default=256, help="shard size in MB (default 256)")

    tr = sub.add_parser(
        "train",
        help="train a model on a feature cache",
        description="Train on a feature cache; checkpoints and metrics.jsonl go to --out.",
    )
    tr.add_argument("--data", required=True, help="feature cache folder (from preprocess)")
    tr.add_argument("--out", required=True, help="run folder for checkpoints and metrics")
    tr.add_argument("--size", default="tiny", choices=list(MODEL_SIZES))
    tr.add_argument("--level", default="basic", choices=list(OPTIMIZATION_LEVELS))
    tr.add_argument("--steps", type=int, help="optimiser steps in total")
    tr.add_argument("--batch-size", type=int, help="utterances per micro-batch")
    tr.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    tr.add_argument("--lr", type=float, help="peak learning rate (checked against its safe range)")
    tr.add_argument("--eval-every", type=int, help="steps between validations")
    tr.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    tr.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1")
    tr.add_argument("--workers", type=int, help="data loader worker processes")
    tr.add_argument("--seed", type=int, help="random seed")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    tr.add_argument("--init-from", help="checkpoint whose weights start this run (fine-tuning)")
    tr.add_argument(
        "--hold-out-speakers",
        default="",
        metavar="NAMES",
        help="comma-separated speakers kept out of training and validation, e.g. rms,esf2 "
        "(for scoring cloning of voices the model never heard)",
    )
    tr.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (on a busy machine 1 is often fastest)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "preprocess":
        return preprocess(args)
    if args.command == "shards":
        return shards(args)
    return train(args)


def shards(args) -> int:
    from training.shards import build_shards

    if args.shard_mb < 1:
        print("error: --shard-mb must be at least 1", file=sys.stderr)
        return 2
    try:
        with tqdm(unit="shard", desc="shards") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            n = build_shards(args.cache_dir, args.shard_mb * 2**20, progress=progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} shard(s) in {args.cache_dir}/shards")
    return 0


def preprocess(args) -> int:
    from training.corpus import read_corpus
    from training.preprocess import preprocess_corpus

    try:
        items, problems = read_corpus(args.data_dir, args.fmt)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(items)} utterances in {args.data_dir}, {len(problems)} metadata problem(s)")
    speakers = {it.speaker for it in items}
    augment = args.augment_speakers
    if augment is None:
        augment = len(speakers) < AUGMENT_BELOW_SPEAKERS
    if augment:
        from pathlib import Path

        from training.augment import augmented_items

        copies = augmented_items(items, Path(args.out_dir) / "augmented")
        print(
            f"speaker augmentation: {len(copies)} shifted copies of {len(speakers)} speaker(s) "
            "as extra speakers (--no-augment-speakers to skip)"
        )
        items = list(items) + copies
    with tqdm(total=len(items), unit="utt", desc="preprocess") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = preprocess_corpus(
            items,
            args.out_dir,
            lang=args.lang,
            progress=progress,
            workers=args.workers,
            text_backend=args.text_backend,
            known_problems=problems,
        )
    print(
        f"kept {result.kept} ({result.train} train, {result.val} val), dropped {result.dropped}, "
        f"reused {result.reused}; {result.audio_seconds / 60:.1f} min of audio; text backend "
        f"{result.text_backend}; {result.elapsed_s:.0f} s"
    )
    codes = Counter(f"{p.severity} {p.code}" for p in result.problems)
    for code, count in sorted(codes.items()):
        print(f"  {count:5d} x {code}")
    return 0


class ProgressBar(Callbacks):
    """Callbacks that drive a tqdm bar and print evals, events and checkpoints above it."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self.stop_requested = False

    def on_step(self, metrics: dict) -> None:
        self.bar.update(metrics["step"] - self.bar.n)
        self.bar.set_postfix(
            loss=f"{metrics['loss/total']:.3f}",
            mel=f"{metrics['loss/mel']:.3f}",
            lr=f"{metrics['lr']:.2e}",
            refresh=False,
        )
        for event in metrics["events"]:
            self.bar.write(f"step {event['step']}: {event['kind']}: {event['message']}")

    def on_eval(self, metrics: dict, samples) -> None:
        parts = " ".join(
            f"{k[4:]}={v:.3f}" for k, v in metrics.items() if k.startswith("val/") and v is not None
        )
        self.bar.write(f"step {metrics['step']}: validation {parts}")

    def on_checkpoint(self, path: str, info: dict) -> None:
        self.bar.write(f"step {info['step']}: checkpoint {path}")

    def should_stop(self) -> bool:
        return self.stop_requested


def train(args) -> int:

    cfg = preset(args.size, args.level)
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum_steps": args.grad_accum,
        "learning_rate": args.lr,
        "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every,
        "num_workers": args.workers,
        "seed": args.seed,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    cfg.device = args.device
    cfg.compile = args.compile
    cfg.held_out_speakers = [s.strip() for s in args.hold_out_speakers.split(",") if s.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    # Under torchrun: join the process group first, so only rank 0 draws a bar and prints.
    try:
        distributed.setup(cfg.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    main_rank = distributed.is_main()
    warning = batch_warning(cfg.size, cfg.batch_size)
    if warning and main_rank:
        print(f"warning: {warning}")
    try:
        bar = tqdm(total=cfg.steps, unit="step", desc=f"train {cfg.size}", disable=not main_rank)
        with bar:
            callbacks = ProgressBar(bar)
            trainer = Trainer(
                cfg, args.data, args.out, callbacks, resume=args.resume, init_from=args.init_from
            )
            ranks = f" x {trainer.world_size} ranks" if trainer.world_size > 1 else ""
            for line in [
                f"model '{cfg.size}': {trainer.param_count:,} parameters on {trainer.device}"
                f"{ranks}; level {cfg.optimization_level}, lr {cfg.learning_rate:g}, "
                f"batch {cfg.batch_size} x {cfg.grad_accum_steps}, {cfg.steps} steps",
                *(f"warning: {w}" for w in trainer.warnings),
            ]:
                if main_rank:
                    bar.write(line)
            bar.update(trainer.step)

            def request_stop(signum, frame):
                callbacks.stop_requested = True
                bar.write("stopping after this step (a checkpoint will be written)...")

            previous = signal.signal(signal.SIGINT, request_stop)
            try:
                result = trainer.run()
            finally:
                signal.signal(signal.SIGINT, previous)
    except (UnsafeConfig, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    if not main_rank:
        return 0
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(
        f"{result.status} at step {result.step}; best validation mel loss {best}; "
        f"last checkpoint {result.last_checkpoint}"
    )
    return 0
