"""Fine-tuning HiFi-GAN from the universal generator: the losses move, checkpoints are
written, a resumed run computes exactly the losses of an uninterrupted one, the result is
a vocoder synthesis can load, and teacher-forced mels come from the acoustic checkpoint."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from synthesis.vocoders import load_vocoder
from tests.fixtures_audio import feature_cache
from training.checkpoint import save_checkpoint
from training.data import read_meta
from training.model import MODEL_SIZES, TTSModel
from training.trainer import Callbacks
from training.vocoder import VocoderConfig, VocoderTrainer
from training.vocoder_model import Discriminators, VocoderError

LOSSES = ("loss/generator", "loss/discriminator", "loss/mel", "loss/feature_matching")


def tiny(**overrides) -> VocoderConfig:
    """The universal generator as it is, tiny segments and discriminators: ~1 s a step."""
    values = dict(
        steps=20, batch_size=1, segment_size=1024, discriminator_width=0.125,
        eval_every=10, checkpoint_every=10, log_every=1, device="cpu",
    )  # fmt: skip
    return VocoderConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def cache():
    return feature_cache()


@pytest.fixture(scope="module")
def audio_files(cache):
    return {p.stem: p for p in (cache.parent / "audio" / "wavs").glob("*.wav")}


class Recorder(Callbacks):
    def __init__(self):
        self.steps, self.evals, self.checkpoints = [], [], []

    def on_step(self, metrics):
        self.steps.append(metrics)

    def on_eval(self, metrics, samples):
        self.evals.append((metrics, samples))

    def on_checkpoint(self, path, info):
        self.checkpoints.append((path, info))


def test_discriminators_judge_every_period_and_scale():
    d = Discriminators(width=0.125)
    scores, features = d(torch.randn(2, 1, 1024))
    assert len(scores) == 8 and len(features) == 8  # periods 2, 3, 5, 7, 11 + three scales
    assert all(s.shape[0] == 2 for s in scores)


@pytest.mark.slow
def test_twenty_steps_move_the_losses_write_checkpoints_and_resume_exactly(
    cache, audio_files, tmp_path
):
    whole = Recorder()
    result = VocoderTrainer(tiny(), cache, tmp_path / "whole", whole, audio_files=audio_files).run()
    assert result.status == "finished" and result.step == 20
    losses = {k: [m[k] for m in whole.steps] for k in LOSSES}
    for name, values in losses.items():
        assert all(math.isfinite(v) for v in values), name
        assert len(set(values)) > 1, f"{name} never moved"
    # The discriminators learn from random: their loss falls.
    assert losses["loss/discriminator"][-1] < losses["loss/discriminator"][0]
    saved = [p for p, info in whole.checkpoints if not info["best"]]
    assert [p.rsplit("/", 1)[-1] for p in saved] == ["step_0000010.pt", "step_0000020.pt"]
    metrics, samples = whole.evals[-1]
    assert math.isfinite(metrics["val/mel"]) and samples and samples[0].audio.size > 0

    # The generator alone is what synthesis loads as a fine-tuned vocoder.
    best = tmp_path / "whole" / "checkpoints" / "best.pt"
    vocoder = load_vocoder(str(best))
    assert vocoder.sample_rate == 22050 and "fine-tuned" in vocoder.label

    # Killed after step 10: the resumed run computes the same losses for steps 11-20.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(saved[0], resumed_dir / "checkpoints")
    again = Recorder()
    trainer = VocoderTrainer(
        tiny(), cache, resumed_dir, again, resume=True, audio_files=audio_files
    )
    assert trainer.step == 10
    trainer.run()
    for name in LOSSES:
        assert [m[name] for m in again.steps] == losses[name][10:], name


def test_teacher_forced_mels_come_from_the_acoustic_checkpoint(cache, audio_files, tmp_path):
    meta = read_meta(cache)
    torch.manual_seed(0)
    model = TTSModel(MODEL_SIZES["tiny"], len(meta["symbols"]))
    model.set_feature_stats(meta["stats"])
    ckpt = save_checkpoint(
        tmp_path / "acoustic.pt",
        {"model": model.state_dict(), "model_config": MODEL_SIZES["tiny"].to_dict(),
         "symbols": meta["symbols"]},
    )  # fmt: skip
    trainer = VocoderTrainer(
        tiny(acoustic_checkpoint=str(ckpt)), cache, tmp_path / "run", audio_files=audio_files
    )
    u = trainer.train_set[0]
    assert u.mel.shape == u.real_mel.shape
    assert not torch.allclose(u.mel, u.real_mel)  # an untrained model's mel, not the recording's
    assert u.wav.numel() == u.mel.shape[1] * 256

    other = save_checkpoint(
        tmp_path / "other.pt",
        {"model": model.state_dict(), "model_config": MODEL_SIZES["tiny"].to_dict(),
         "symbols": ["x", "y"]},
    )  # fmt: skip
    with pytest.raises(VocoderError, match="symbol table"):
        VocoderTrainer(
            tiny(acoustic_checkpoint=str(other)), cache, tmp_path / "r2", audio_files=audio_files
        )


def test_a_cache_without_recordings_is_refused_with_a_reason(cache, tmp_path):
    # The cache keeps each recording's path; here every one was moved away after preprocessing.
    moved = tmp_path / "cache"
    shutil.copytree(cache, moved)
    lines = (moved / "items.jsonl").read_text().splitlines()
    records = [dict(json.loads(line), audio_path=str(tmp_path / "gone.wav")) for line in lines]
    (moved / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="no training utterance has a readable recording"):
        VocoderTrainer(tiny(), moved, tmp_path / "run", audio_files={})
