"""Training `tiny` through injected faults: NaN batches and a 1000x learning-rate spike.

The faults go in through the trainer's own seams (`next_batch`, `lr_at`), so everything else
is the real loop: model, loss, adaptive controller, step guard, checkpoints and rollback.
"""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from training.config import SAFE_RANGES, preset
from training.corpus import CorpusItem
from training.preprocess import preprocess_corpus
from training.trainer import Callbacks, Trainer

pytestmark = pytest.mark.slow

SR = 22050
# Each "word" is a harmonic tone of its own pitch: a corpus the model can learn from in a few
# hundred steps, with text, durations, pitch and energy that line up.
WORDS = {"sun": 180, "moon": 140, "red": 220, "blue": 160, "sea": 200, "tree": 120, "sky": 240}
NAN_STEPS = {30, 31, 90, 91, 92, 160}  # batches whose mels are NaN (a corrupt feature file)
SPIKE_STEP = 130  # the optimiser step that runs at 1000x the learning rate
STEPS = 200


def utterance(words, voice, rng):
    parts = [np.zeros(int(0.1 * SR))]
    for word in words:
        t = np.arange(int(0.22 * SR)) / SR
        f0 = WORDS[word] * voice
        tone = sum((0.5 / k) * np.sin(2 * np.pi * f0 * k * t) for k in range(1, 6))
        envelope = np.sin(np.pi * t / t[-1]) ** 0.5
        parts += [0.3 * envelope * tone + 0.005 * rng.standard_normal(t.size)]
        parts += [np.zeros(int(0.04 * SR))]
    parts.append(np.zeros(int(0.1 * SR)))
    return np.concatenate(parts).astype(np.float32)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-corpus")
    rng = np.random.default_rng(0)
    items = []
    for i in range(40):
        speaker = f"spk{i % 2}"
        words = list(rng.choice(list(WORDS), size=int(rng.integers(3, 6))))
        path = root / f"u{i:03d}.wav"
        sf.write(path, utterance(words, 1.0 if speaker == "spk0" else 1.3, rng), SR)
        items.append(CorpusItem(f"u{i:03d}", path, " ".join(words), speaker))
    cache = root / "cache"
    result = preprocess_corpus(items, cache, text_backend="chars")
    assert result.kept == 40
    return cache


class SpikeOnly(Trainer):
    """One optimiser step at 1000x the learning rate."""

    def lr_at(self, step):
        lr = super().lr_at(step)
        return lr * 1000 if step + 1 == SPIKE_STEP else lr


class FaultyTrainer(SpikeOnly):
    """The spike, and NaN mels in the batches of NAN_STEPS."""

    def next_batch(self):
        batch = super().next_batch()
        if self.step + 1 in NAN_STEPS:
            batch["mels"] = batch["mels"] * float("nan")
        return batch


class Recorder(Callbacks):
    def __init__(self):
        self.steps, self.evals = [], []

    def on_step(self, metrics):
        self.steps.append(metrics)

    def on_eval(self, metrics, samples):
        self.evals.append(metrics)


def test_training_survives_nan_batches_and_a_learning_rate_spike(feature_cache, tmp_path):
    cfg = preset("tiny", "enhanced")
    cfg.steps, cfg.batch_size, cfg.lr_warmup_steps = STEPS, 8, 20
    cfg.eval_every, cfg.checkpoint_every = 100, 50
    recorder = Recorder()
    trainer = FaultyTrainer(cfg, feature_cache, tmp_path / "run", recorder)
    result = trainer.run()

    assert result.status == "finished" and result.step == STEPS
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    by_step = {m["step"]: m for m in recorder.steps}
    assert len(by_step) == STEPS
    events = [e for m in recorder.steps for e in m["events"]]
    skipped = {e["step"] for e in events if e["kind"] == "skip"}
    assert skipped >= NAN_STEPS
    # The broken weights after the spike keep failing until the guard rolls them back.
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert len(rollbacks) == 1 and SPIKE_STEP < rollbacks[0]["step"] <= SPIKE_STEP + 6
    assert rollbacks[0]["data"]["lr_scale"] == pytest.approx(cfg.rollback_lr_factor)
    assert by_step[STEPS]["guard/rollbacks"] == 1.0
    assert by_step[STEPS]["guard/skipped"] == float(len(skipped))

    low, high = SAFE_RANGES["mel_loss_weight"]
    for m in recorder.steps:
        assert math.isfinite(m["weight/mel"]) and low <= m["weight/mel"] <= high

    def mean_loss(steps):
        values = [by_step[s]["loss/total"] for s in steps if s not in skipped]
        assert all(math.isfinite(v) for v in values)
        return sum(values) / len(values)

    first, last = mean_loss(range(1, 11)), mean_loss(range(STEPS - 9, STEPS + 1))
    assert last < 0.6 * first
    # After the rollback the run keeps learning rather than limping along at the spike's level.
    assert mean_loss(range(SPIKE_STEP + 10, SPIKE_STEP + 20)) < 2 * last
    assert recorder.evals and all(math.isfinite(m["val/mel"]) for m in recorder.evals)


def test_rollback_to_the_start_does_not_livelock(feature_cache, tmp_path):
    """The spike comes before the first checkpoint: back to the starting weights, once.

    Judged against the running loss of the trained weights, the starting weights' loss looked
    like a spike on every step, and the guard rolled back until the learning rate was 0.
    """
    cfg = preset("tiny", "enhanced")
    cfg.steps, cfg.batch_size, cfg.lr_warmup_steps = STEPS, 8, 20
    cfg.eval_every, cfg.checkpoint_every = 1000, 1000
    recorder = Recorder()
    trainer = SpikeOnly(cfg, feature_cache, tmp_path / "run", recorder)
    result = trainer.run()
    events = [e for m in recorder.steps for e in m["events"]]
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert result.status == "finished"
    assert len(rollbacks) == 1 and "starting weights" in rollbacks[0]["message"]
    assert trainer.schedule.scale == pytest.approx(cfg.rollback_lr_factor)
    after = [m for m in recorder.steps if m["step"] > rollbacks[0]["step"] + 5]
    skipped_after = [e for e in events if e["kind"] == "skip" and e["step"] > after[0]["step"]]
    assert not skipped_after
    # Training again from the start, the loss falls instead of being skipped at its first value.
    assert after[-1]["loss/total"] < 0.9 * after[0]["loss/total"]
