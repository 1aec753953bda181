"""The training loop on a tiny synthetic feature cache: resume, checkpoints, guard, learning.

The cache is written in the layout training.preprocess produces (meta.json, items.jsonl,
feats/<id>.pt). Its "speech" is learnable on purpose: every symbol has its own mel pattern,
duration, pitch and energy, and each speaker adds its own spectral tilt, so a model that works
can drive the validation mel loss far below where it starts within a few hundred CPU steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.audio import AudioConfig
from training.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from training.config import TrainConfig, UnsafeConfig
from training.trainer import Callbacks, LRSchedule, Sample, Trainer, TrainingDiverged

SYMBOLS = ["<pad>", "a", "b", "c", "d", "e", "f", "g", "h"]


def write_synthetic_cache(
    root: Path, n_train=24, n_val=6, seed=0, symbols=SYMBOLS, min_tokens=3, max_tokens=8
) -> Path:
    g = torch.Generator().manual_seed(seed)
    feats_dir = root / "feats"
    feats_dir.mkdir(parents=True)
    n_sym = len(symbols)
    bands = torch.linspace(0, 1, 80)
    # Smooth spectral shapes in the log-mel range of speech (about -9 to 0).
    patterns = torch.stack(
        [
            -5 + 2.5 * torch.sin(2 * math.pi * (k % 5 + 1) * bands + k) - 2 * bands
            for k in range(n_sym)
        ]
    )
    durations = [2 + k % 4 for k in range(n_sym)]
    pitches = [0.0 if k % 3 == 0 else 110.0 + 15 * k for k in range(n_sym)]
    speakers = {
        "spk_a": (torch.nn.functional.normalize(torch.randn(256, generator=g), dim=0), 0.6),
        "spk_b": (torch.nn.functional.normalize(torch.randn(256, generator=g), dim=0), -0.6),
    }
    items, pitch_values, energy_values = [], [], []
    for n in range(n_train + n_val):
        speaker = ["spk_a", "spk_b"][n % 2]
        emb, tilt = speakers[speaker]
        length = int(torch.randint(min_tokens, max_tokens + 1, (1,), generator=g))
        tokens = torch.randint(1, n_sym, (length,), generator=g)
        frames = [d for t in tokens.tolist() for d in [t] * durations[t]]
        mel = patterns[frames].T + tilt * (bands[:, None] - 0.5)
        mel = mel + 0.05 * torch.randn(mel.shape, generator=g)
        pitch = torch.tensor([pitches[t] for t in frames])
        energy = mel.exp().sum(0).sqrt()
        item_id = f"utt{n:03d}"
        torch.save(
            {
                "mel": mel.half(),
                "pitch": pitch,
                "energy": energy,
                "tokens": tokens,
                "spk_emb": emb,
            },
            feats_dir / f"{item_id}.pt",
        )
        pitch_values += [p for p in pitch.tolist() if p > 0]
        energy_values += energy.tolist()
        items.append(
            {
                "id": item_id,
                "speaker": speaker,
                "text": " ".join(symbols[t] for t in tokens.tolist()),
                "n_tokens": length,
                "n_frames": len(frames),
                "duration_s": len(frames) * 256 / 22050,
                "split": "train" if n < n_train else "val",
                "feats": f"feats/{item_id}.pt",
            }
        )
    (root / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    meta = {
        "format_version": 1,
        "audio": AudioConfig().to_dict(),
        "language": "en",
        "text": {"lang": "en", "backend": "chars"},
        "symbols": list(symbols),
        "speakers": sorted(speakers),
        "speaker_embeddings": {s: e.tolist() for s, (e, _) in speakers.items()},
        "stats": {
            "pitch_mean": float(np.mean(pitch_values)),
            "pitch_std": float(np.std(pitch_values)),
            "energy_mean": float(np.mean(energy_values)),
            "energy_std": float(np.std(energy_values)),
        },
        "val_fraction": n_val / (n_train + n_val),
        "audio_seconds": sum(it["duration_s"] for it in items),
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def cache(tmp_path):
    return write_synthetic_cache(tmp_path / "cache")


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        size="tiny",
        batch_size=4,
        steps=12,
        learning_rate=2e-3,
        lr_warmup_steps=3,
        eval_every=1000,
        checkpoint_every=1000,
        device="cpu",
        seed=7,
        # Adaptive weights that decide within a few steps, so their state must survive resume.
        use_adaptive_weights=True,
        adaptive_weight_min_warmup_steps=2,
        adaptive_weight_cooling_period=2,
        adaptive_weight_min_stable_steps=1,
        adaptive_weight_variance_threshold=100.0,
    )
    values.update(overrides)
    return TrainConfig.from_flat(values)


class Recorder(Callbacks):
    def __init__(self, stop_at: int | None = None):
        self.steps: list[dict] = []
        self.evals: list[tuple[dict, list[Sample]]] = []
        self.checkpoints: list[tuple[str, dict]] = []
        self.stop_at = stop_at

    def on_step(self, metrics):
        self.steps.append(metrics)

    def on_eval(self, metrics, samples):
        self.evals.append((metrics, samples))

    def on_checkpoint(self, path, info):
        self.checkpoints.append((path, info))

    def should_stop(self):
        return (
            self.stop_at is not None and bool(self.steps) and self.steps[-1]["step"] >= self.stop_at
        )

    def losses(self):
        return [(m["step"], m["loss/total"]) for m in self.steps]


def test_resume_continues_exactly(cache, tmp_path):
    # Two micro-batches per step and 6 batches per epoch: the stop at step 4 lands mid-epoch
    # and the resumed run crosses epoch boundaries.
    cfg = tiny_config(grad_accum_steps=2, steps=11)
    whole = Recorder()
    Trainer(cfg, cache, tmp_path / "whole", whole).run()

    first = Recorder(stop_at=4)
    result = Trainer(cfg, cache, tmp_path / "split", first).run()
    assert result.status == "stopped" and result.step == 4
    second = Recorder()
    resumed = Trainer(cfg, cache, tmp_path / "split", second, resume=True)
    assert resumed.step == 4 and (resumed.epoch, resumed.batch_in_epoch) == (1, 2)
    assert resumed.run().status == "finished"

    assert first.losses() + second.losses() == whole.losses()
    assert len(whole.losses()) == 11
    # The adaptive controller decided something, and did so identically in both runs.
    weights = [m["weight/mel"] for m in whole.steps]
    assert len(set(weights)) > 1
    assert weights == [m["weight/mel"] for m in first.steps + second.steps]
    # metrics.jsonl of the resumed run reads like the uninterrupted one.
    split_lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in split_lines if "loss/total" in x] == list(range(1, 12))


def test_checkpoints_metrics_samples(cache, tmp_path):
    rec = Recorder()
    cfg = tiny_config(steps=9, eval_every=3, checkpoint_every=2, keep_last=2, log_every=2)
    result = Trainer(cfg, cache, tmp_path / "run", rec).run()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["best.pt", "step_0000008.pt", "step_0000009.pt"]
    assert result.last_checkpoint == str(ckpt_dir / "step_0000009.pt")
    assert result.best_val_loss == min(m["val/mel"] for m, _ in rec.evals)

    ckpt = load_checkpoint(ckpt_dir / "step_0000009.pt")
    assert set(CHECKPOINT_KEYS) <= set(ckpt)
    assert ckpt["step"] == 9 and ckpt["size"] == "tiny" and ckpt["symbols"] == SYMBOLS
    assert ckpt["config"]["batch_size"] == 4
    assert set(ckpt["speakers"]) == {"spk_a", "spk_b"} and len(ckpt["speakers"]["spk_a"]) == 256
    assert ckpt["text"] == {"lang": "en", "backend": "chars"}
    # The file also loads with torch's own weights_only loader.
    torch.load(ckpt_dir / "best.pt", weights_only=True)

    # log_every=2: steps 2, 4, 6, 8 (plus any step with an event) reach the callback.
    logged = [m["step"] for m in rec.steps]
    assert {2, 4, 6, 8} <= set(logged)
    m = rec.steps[0]
    for key in (
        "loss/total",
        "loss/mel",
        "loss/duration",
        "loss/pitch",
        "loss/energy",
        "loss/align",
        "loss/bin",
        "weight/mel",
        "weight/align",
        "grad_norm",
        "lr",
        "time/step",
        "time/data",
        "data_wait_share",
        "samples_per_s",
        "guard/skipped",
        "guard/rollbacks",
    ):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert isinstance(m["events"], list)
    assert 0 <= m["data_wait_share"] <= 1

    assert [m["step"] for m, _ in rec.evals] == [3, 6, 9]
    metrics, samples = rec.evals[-1]
    assert {"val/total", "val/mel", "val/align"} <= set(metrics)
    assert len(samples) == 2 and samples[0].id < samples[1].id
    for s in samples:
        assert s.audio.dtype == np.float32 and s.audio.ndim == 1 and s.audio.size > 0
        assert s.sample_rate == 22050 and s.mel.shape[0] == 80
        assert np.isfinite(s.audio).all()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val/mel" in x] == [3, 6, 9]
    paths = [p for p, info in rec.checkpoints if not info["best"]]
    assert [Path(p).name for p in paths] == [f"step_000000{n}.pt" for n in (2, 4, 6, 8, 9)]


class NaNBatches(Trainer):
    """Poisons the mels of chosen steps, the way a corrupt feature file would."""

    poisoned: set[int] = set()

    def next_batch(self):
        batch = super().next_batch()
        if self.step + 1 in self.poisoned:
            batch["mels"] = torch.full_like(batch["mels"], float("nan"))
        return batch


def test_guard_skips_bad_steps_and_rolls_back(cache, tmp_path):
    NaNBatches.poisoned = {3} | set(range(6, 9))
    rec = Recorder()
    cfg = tiny_config(steps=12, max_consecutive_skips=3, checkpoint_every=4, rollback_lr_factor=0.5)
    trainer = NaNBatches(cfg, cache, tmp_path / "run", rec)
    trainer.run()
    events = [e for m in rec.steps for e in m["events"]]
    skips = [e for e in events if e["kind"] == "skip"]
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert [e["step"] for e in skips] == [3, 6, 7, 8]
    assert "non-finite loss" in skips[0]["message"]
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 8
    assert rollbacks[0]["data"] == {"to_step": 4, "lr_scale": 0.5}
    assert rec.steps[-1]["guard/skipped"] == 4.0 and rec.steps[-1]["guard/rollbacks"] == 1.0
    # The learning rate after the rollback is half the schedule's.
    assert trainer.schedule.scale == 0.5
    unscaled = LRSchedule(cfg.learning_rate, cfg.lr_warmup_steps, cfg.steps).lr(11)
    assert rec.steps[-1]["lr"] == pytest.approx(0.5 * unscaled)
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
    assert all(math.isfinite(m["loss/total"]) for m in rec.steps if m["step"] > 8)


def test_rollback_before_any_checkpoint_returns_to_the_start(cache, tmp_path):
    NaNBatches.poisoned = {2, 3}
    rec = Recorder()
    cfg = tiny_config(steps=4, max_consecutive_skips=2)
    trainer = NaNBatches(cfg, cache, tmp_path / "run", rec)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()
    trainer.train_step()
    event = trainer.train_step()["events"][-1]
    assert event["kind"] == "rollback" and "starting weights" in event["message"]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_rollbacks_are_capped_and_never_go_back_to_random_weights(cache, tmp_path):
    """Weights that break on every batch: roll back to checkpoints only, then fail with why."""
    NaNBatches.poisoned = set(range(5, 200))
    rec = Recorder()
    cfg = tiny_config(
        steps=60, max_consecutive_skips=2, checkpoint_every=4, keep_last=1, max_rollbacks=3
    )
    trainer = NaNBatches(cfg, cache, tmp_path / "run", rec)
    with pytest.raises(TrainingDiverged, match="3 rollbacks did not cure the run"):
        trainer.run()
    rollbacks = [e for m in rec.steps for e in m["events"] if e["kind"] == "rollback"]
    assert len(rollbacks) == 3
    assert not any("starting weights" in e["message"] for e in rollbacks)
    # keep_last=1 would have pruned it; the checkpoint that cured the run once is kept.
    assert trainer.known_good and Path(trainer.known_good).is_file()
    # The learning rate was lowered three times, never to nothing.
    assert trainer.schedule.scale == pytest.approx(0.125)


class OutOfMemoryOnce(Trainer):
    """Runs out of memory once, at optimiser step 7, the way a long batch does on a GPU."""

    def train_step(self):
        if self.step + 1 == 7 and not self.oom_recoveries:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().train_step()


class RewindRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.rewinds = []

    def on_rewind(self, step, changes):
        self.rewinds.append((step, changes))


def test_out_of_memory_resumes_from_the_checkpoint_with_half_the_micro_batch(cache, tmp_path):
    rec = RewindRecorder()
    cfg = tiny_config(steps=10, checkpoint_every=4, batch_size=4, grad_accum_steps=1)
    trainer = OutOfMemoryOnce(cfg, cache, tmp_path / "run", rec)
    result = trainer.run()
    assert result.status == "finished" and result.step == 10
    assert (cfg.batch_size, cfg.grad_accum_steps) == (2, 2)  # the same 4 utterances per step
    assert rec.rewinds == [(4, {"batch_size": 2, "grad_accum_steps": 2})]
    oom = [e for m in rec.steps for e in m["events"] if e["kind"] == "oom"]
    assert len(oom) == 1 and "resumed from step 4 with micro-batch 2 x 2" in oom[0]["message"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    # The replayed steps replaced their first tries in the file, not repeated them.
    assert [x["step"] for x in lines if "loss/total" in x] == list(range(1, 11))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000010.pt")
    assert ckpt["config"]["batch_size"] == 2 and ckpt["data_position"]["batch_size"] == 2


def test_out_of_memory_at_micro_batch_one_fails_with_advice(cache, tmp_path):
    cfg = tiny_config(steps=10, batch_size=1)
    with pytest.raises(RuntimeError, match="micro-batch of one utterance"):
        OutOfMemoryOnce(cfg, cache, tmp_path / "run").run()


def test_resume_survives_a_torn_metrics_line_an_unreadable_checkpoint_and_temp_files(
    cache, tmp_path
):
    cfg = tiny_config(steps=12, checkpoint_every=4)
    out = tmp_path / "run"
    Trainer(cfg, cache, out, Recorder(stop_at=8)).run()
    ckpts = out / "checkpoints"
    (ckpts / "step_0000008.pt").write_bytes(b"PK\x03\x04 torn by a full disk")
    (ckpts / ".step_0000012.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "loss/to')  # the worker died mid-line
    resumed = Trainer(cfg, cache, out, Recorder(), resume=True)
    assert resumed.step == 4
    assert any("unreadable checkpoint" in w for w in resumed.warnings)
    assert not list(ckpts.glob(".*.tmp"))
    assert resumed.run().status == "finished"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss/total" in x] == list(range(1, 13))


def test_stop_saves_a_checkpoint(cache, tmp_path):
    rec = Recorder(stop_at=2)
    result = Trainer(tiny_config(steps=50), cache, tmp_path / "run", rec).run()
    assert result.status == "stopped" and result.step == 2
    assert Path(result.last_checkpoint).name == "step_0000002.pt"
    assert rec.checkpoints[-1][1]["step"] == 2


def test_init_from_maps_embeddings_by_symbol(cache, tmp_path):
    Trainer(tiny_config(steps=2), cache, tmp_path / "base").run()
    base = load_checkpoint(tmp_path / "base" / "checkpoints" / "step_0000002.pt")
    # A new corpus: one symbol gone, one new, the rest in another order.
    symbols = ["<pad>", "h", "g", "f", "e", "d", "c", "b", "z"]
    other = write_synthetic_cache(tmp_path / "other", symbols=symbols, seed=1)
    tuned = Trainer(tiny_config(steps=1), other, tmp_path / "tuned", init_from=base_path(tmp_path))
    rows = tuned.model.embed.weight.detach()
    old = base["model"]["embed.weight"]
    assert torch.equal(rows[1], old[SYMBOLS.index("h")])
    assert torch.equal(rows[7], old[SYMBOLS.index("b")])
    assert torch.equal(
        tuned.model.mel_out.weight.detach(), base["model"]["mel_out.weight"]
    )  # weights only: step and optimiser start fresh
    assert tuned.step == 0


def base_path(tmp_path):
    return tmp_path / "base" / "checkpoints" / "step_0000002.pt"


def test_unsafe_config_is_refused(cache, tmp_path):
    with pytest.raises(UnsafeConfig, match="mel_loss_weight"):
        Trainer(tiny_config(mel_loss_weight=35.0), cache, tmp_path / "run")


@pytest.mark.slow
def test_tiny_learns_on_cpu(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache", n_train=64, n_val=8, max_tokens=10)
    rec = Recorder()
    cfg = tiny_config(
        steps=300,
        batch_size=8,
        learning_rate=2e-3,
        lr_warmup_steps=30,
        eval_every=100,
        checkpoint_every=1000,
        use_adaptive_weights=False,
    )
    trainer = Trainer(cfg, cache, tmp_path / "run", rec)
    start = trainer.evaluate()["val/mel"]
    trainer.run()
    final = rec.evals[-1][0]["val/mel"]
    curve = [m["val/mel"] for m, _ in rec.evals]
    assert final < 0.2 * start, (start, curve)
    # The aligner learned too: the forward-sum loss fell.
    assert rec.evals[-1][0]["val/align"] < 0.7 * rec.evals[0][0]["val/align"]
