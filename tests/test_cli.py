"""`python -m training preprocess` and `python -m training train` on tiny corpora and caches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from test_trainer import write_synthetic_cache

from training.checkpoint import load_checkpoint
from training.cli import main

ROOT = Path(__file__).resolve().parent.parent


def write_coqui_corpus(root: Path) -> Path:
    """Four voiced-sounding clips (harmonics with a gliding pitch) in the Coqui CSV layout."""
    sr = 22050
    (root / "wavs").mkdir(parents=True)
    rows = ["audio_file|text|speaker_name"]
    texts = ["A quiet day.", "Bread and tea.", "The bright lights.", "Two small boats."]
    rng = np.random.default_rng(0)
    for i, text in enumerate(texts):
        t = np.arange(int(1.2 * sr)) / sr
        f0 = 110 + 40 * i + 20 * np.sin(2 * np.pi * 1.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        wav = sum(np.sin(k * phase) / k for k in range(1, 6))
        wav = 0.3 * wav * np.hanning(t.size) ** 0.2 + 0.003 * rng.standard_normal(t.size)
        sf.write(root / "wavs" / f"clip{i}.wav", wav.astype(np.float32), sr)
        rows.append(f"wavs/clip{i}.wav|{text}|{'ann' if i % 2 else 'bob'}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_preprocess_writes_a_cache(tmp_path, capsys):
    corpus = write_coqui_corpus(tmp_path / "corpus")
    out = tmp_path / "cache"
    assert main(["preprocess", str(corpus), str(out), "--lang", "en", "--no-augment-speakers"]) == 0
    printed = capsys.readouterr().out
    assert "4 utterances" in printed and "kept 4" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["speakers"] == ["ann", "bob"]
    items = (out / "items.jsonl").read_text().splitlines()
    assert len(items) == 4


def test_preprocess_augments_a_small_corpus_by_default(tmp_path, capsys):
    corpus = write_coqui_corpus(tmp_path / "corpus")
    out = tmp_path / "cache"
    assert main(["preprocess", str(corpus), str(out), "--lang", "en"]) == 0
    assert "speaker augmentation: 16 shifted copies of 2 speaker(s)" in capsys.readouterr().out
    speakers = json.loads((out / "meta.json").read_text())["speakers"]
    assert {"ann", "bob"} < set(speakers) and len(speakers) == 10
    assert all(s.split("@")[0] in ("ann", "bob") for s in speakers)


def test_preprocess_reports_an_unreadable_corpus(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", str(tmp_path / "empty"), str(tmp_path / "cache")]) == 2
    assert "error:" in capsys.readouterr().err


def test_train_then_resume(tmp_path, capsys):
    cache = write_synthetic_cache(tmp_path / "cache")
    run = tmp_path / "run"
    args = ["train", "--data", str(cache), "--out", str(run), "--size", "tiny"]
    args += ["--batch-size", "4", "--device", "cpu", "--threads", "1", "--eval-every", "2"]
    assert main([*args, "--steps", "3"]) == 0
    captured = capsys.readouterr()
    assert "finished at step 3" in captured.out
    # The parameter count and the batch-range warning are printed.
    assert "warning: batch size 4 is outside the recommended 8-16 for the 'tiny' model" in (
        captured.out
    )
    assert "model 'tiny': " in captured.out and "parameters on cpu" in captured.out
    assert (run / "checkpoints" / "step_0000003.pt").is_file()

    assert main([*args, "--steps", "5", "--resume"]) == 0
    assert "finished at step 5" in capsys.readouterr().out
    ckpt = load_checkpoint(run / "checkpoints" / "step_0000005.pt")
    assert ckpt["step"] == 5 and ckpt["config"]["optimization_level"] == "basic"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(s for s in steps if s)


def test_unsafe_learning_rate_is_refused(tmp_path, capsys):
    cache = write_synthetic_cache(tmp_path / "cache")
    code = main(
        [
            "train",
            "--data",
            str(cache),
            "--out",
            str(tmp_path / "run"),
            "--lr",
            "0.5",
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "safe range" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_cache_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "run `python -m training preprocess`" in capsys.readouterr().err


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "training", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "--resume" in done.stdout and "--size" in done.stdout
