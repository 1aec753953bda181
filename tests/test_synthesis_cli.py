"""`python -m synthesis vocode | say | vocoders`: files in, files out, and a one-line message
(exit status 2) instead of a traceback for anything a person can fix."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import soundfile as sf
import torch

from synthesis.cli import main
from tests.conftest import ROOT
from tests.fixtures_audio import espeak_speech
from training.checkpoint import save_checkpoint
from training.model import MODEL_SIZES, TTSModel
from training.text import Frontend, SymbolTable

TEXT = "Bring the red book home."


def speech_file(tmp_path, name="clip.wav"):
    wav, sr = espeak_speech(TEXT)
    path = tmp_path / name
    sf.write(path, wav, sr)
    return path


def tiny_checkpoint(tmp_path):
    frontend = Frontend("en")
    symbols = SymbolTable.from_tokens([frontend.tokens(TEXT + " ,.?!")])
    torch.manual_seed(0)
    model = TTSModel(MODEL_SIZES["tiny"], len(symbols))
    voice = np.random.default_rng(0).standard_normal(256)
    return save_checkpoint(
        tmp_path / "tiny.pt",
        {
            "model": model.state_dict(),
            "model_config": MODEL_SIZES["tiny"].to_dict(),
            "size": "tiny",
            "symbols": symbols.to_list(),
            "text": {"lang": "en", "backend": frontend.backend},
            "speakers": {"narrator": (voice / np.linalg.norm(voice)).tolist()},
        },
    )


def test_vocode_writes_one_wav_per_input_at_the_model_rate(tmp_path, capsys):
    clip = speech_file(tmp_path)
    assert main(["vocode", "--vocoder", "hifigan", "--out", str(tmp_path / "out"), str(clip)]) == 0
    wav, sr = sf.read(tmp_path / "out" / "clip.wav")
    assert sr == 22050 and len(wav) > sr // 2 and np.abs(wav).max() > 0.01
    assert "RTF" in capsys.readouterr().out


def test_say_speaks_with_a_seen_speaker_and_a_chosen_vocoder(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    out = tmp_path / "said.wav"
    argv = ["say", "--checkpoint", str(ckpt), "--speaker", "narrator", "--text", TEXT]
    assert main([*argv, "--out", str(out), "--vocoder", "griffin-lim", "--speed", "1.2"]) == 0
    wav, sr = sf.read(out)
    assert sr == 22050 and len(wav) > 0


def test_mistakes_get_a_message_not_a_traceback(tmp_path, capsys):
    clip = speech_file(tmp_path)
    ckpt = tiny_checkpoint(tmp_path)
    assert main(["vocode", "--vocoder", "wavenet", "--out", str(tmp_path), str(clip)]) == 2
    assert "unknown vocoder 'wavenet'" in capsys.readouterr().err
    assert main(["vocode", "--vocoder", "griffin-lim", "--out", str(tmp_path), "nope.wav"]) == 2
    assert "nope.wav: file not found" in capsys.readouterr().err
    argv = ["say", "--checkpoint", str(ckpt), "--text", TEXT, "--out", str(tmp_path / "x.wav")]
    assert main([*argv, "--speaker", "nobody"]) == 2
    assert "no speaker 'nobody'" in capsys.readouterr().err
    assert main([*argv, "--speaker", "narrator", "--pitch", "40"]) == 2
    assert "pitch must be between" in capsys.readouterr().err


def test_the_module_runs_and_lists_vocoders():
    done = subprocess.run(
        [sys.executable, "-m", "synthesis", "vocoders"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "hifigan" in done.stdout and "griffin-lim" in done.stdout
