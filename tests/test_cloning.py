"""Held-out speakers on the training side, and the cloning score (synthesis.cloning).

Voices are espeak-ng variants (clearly different speakers to the Resemblyzer encoder); the
"synthesiser" in the scoring tests is a stand-in that speaks with a chosen espeak voice, so
the score's arithmetic is checked against known answers: a clone that *is* the target voice
must score near the ceiling, one that speaks another voice near the floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from synthesis import cloning
from tests.fixtures_audio import bare_checkpoint, espeak_speech, feature_cache
from training.config import TrainConfig

SENTENCES = [
    "The quiet teacher collected two loaves of bread.",
    "A young doctor measured the evening train.",
    "The small child painted a strange picture.",
    "Please call Stella and ask her to bring these things.",
    "The museum guide watched the heavy wooden box.",
    "Bright lights shone over the old harbour.",
]
VOICES = {"anna": "en-us+f3", "bob": "en-us", "carl": "en-us+m7"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("cloning-clips")
    out: dict[str, list[Path]] = {}
    for name, voice in VOICES.items():
        for i, sentence in enumerate(SENTENCES):
            wav, sr = espeak_speech(sentence, voice)
            path = root / f"{name}_{i:02d}.wav"
            sf.write(path, wav, sr)
            out.setdefault(name, []).append(path)
    return out


@dataclass
class _Out:
    audio: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


class _Vocoder:
    name = "espeak-stand-in"


class SpeaksAs:
    """A stand-in synthesiser that always speaks with one espeak voice, whatever it is given;
    it records the conditioning embeddings it received."""

    sample_rate = 22050
    vocoder = _Vocoder()

    def __init__(self, voice: str):
        self.voice = voice
        self.given: list[np.ndarray] = []

    def speaker_embedding(self, speaker=None, references=None) -> np.ndarray:
        from synthesis.reference_clips import embed_references

        return embed_references(references)

    def synthesize(self, text: str, speaker_embedding) -> _Out:
        self.given.append(np.asarray(speaker_embedding))
        wav, sr = espeak_speech(text, self.voice)
        return _Out(wav, sr)


TEXTS = ["Seven ships sailed before the storm.", "Water the tomatoes on Thursday."]


def test_a_perfect_clone_scores_near_the_ceiling_and_a_wrong_voice_near_the_floor(clips):
    held = {"anna": clips["anna"]}
    floor = {"bob": clips["bob"][:3], "carl": clips["carl"][:3]}
    perfect = cloning.clone_scores(
        SpeaksAs(VOICES["anna"]), held, TEXTS, floor_clips=floor, transcribe=False
    )
    wrong = cloning.clone_scores(
        SpeaksAs(VOICES["bob"]), held, TEXTS, floor_clips=floor, transcribe=False
    )
    p, w = perfect["speakers"][0], wrong["speakers"][0]
    assert p["ceiling"] > p["floor"]
    # Same real clips, same floor and ceiling whatever the model does.
    assert (p["ceiling"], p["floor"]) == (w["ceiling"], w["floor"])
    assert p["normalised"] > 0.6, p
    assert w["normalised"] < 0.4, w
    assert perfect["normalised_secs_unseen"] == pytest.approx(p["normalised"])
    assert perfect["vocoder"] == "espeak-stand-in"


def test_outputs_are_compared_with_other_clips_never_the_conditioning_ones(clips):
    from synthesis.evaluate import joined_clips
    from synthesis.reference_clips import embed_references

    synth = SpeaksAs(VOICES["anna"])
    result = cloning.clone_scores(
        synth, {"anna": clips["anna"], "bob": clips["bob"]}, TEXTS[:1], transcribe=False
    )
    anna = next(s for s in result["speakers"] if s["speaker"] == "anna")
    assert anna["reference_clips"] == [p.name for p in sorted(clips["anna"])[:3]]
    assert not set(anna["reference_clips"]) & set(anna["target_clips"])
    assert len(anna["target_clips"]) == 3
    # Without floor_clips the other held-out speaker sets the floor.
    assert anna["floor_speakers"] == ["bob"]
    # The model was conditioned on the three reference clips, joined as `synthesis say` does.
    expected = embed_references(joined_clips(sorted(clips["anna"])[:3], synth.sample_rate))
    assert np.allclose(synth.given[0], expected, atol=1e-5)


def test_wer_of_each_output_is_reported(clips):
    result = cloning.clone_scores(
        SpeaksAs(VOICES["anna"]),
        {"anna": clips["anna"]},
        TEXTS[:1],
        floor_clips={"bob": clips["bob"][:2]},
    )
    wer = result["speakers"][0]["outputs"][0]["wer"]
    assert wer >= 0.0 and result["wer_unseen"] == pytest.approx(wer)


def test_too_few_clips_or_no_floor_is_a_clear_error(clips):
    synth = SpeaksAs("en-us")
    with pytest.raises(ValueError, match=r"needs? 3 for the reference and at least 2 others"):
        cloning.clone_scores(synth, {"anna": clips["anna"][:4], "bob": clips["bob"]}, TEXTS)
    with pytest.raises(ValueError, match="floor needs real clips of other speakers"):
        cloning.clone_scores(synth, {"anna": clips["anna"]}, TEXTS)
    with pytest.raises(ValueError, match="no held-out speakers"):
        cloning.clone_scores(synth, {}, TEXTS)


def test_normalisation():
    assert cloning.normalised_secs(0.8, 0.6, 0.9) == pytest.approx(2 / 3)
    assert cloning.normalised_secs(0.5, 0.6, 0.9) < 0
    assert cloning.normalised_secs(0.8, 0.7, 0.7) is None  # no scale to measure on


def test_clone_scores_through_a_real_checkpoint(clips, tmp_path):
    from synthesis.engine import ModelCache, Synthesizer

    path = bare_checkpoint(tmp_path, SENTENCES + TEXTS)
    synth = Synthesizer(path, "cpu", vocoder="griffin-lim", cache=ModelCache())
    result = cloning.clone_scores(
        synth,
        {"anna": clips["anna"], "bob": clips["bob"]},
        TEXTS[:1],
        transcribe=False,
    )
    assert result["vocoder"] == "griffin-lim" and result["n_speakers"] == 2
    for row in result["speakers"]:
        assert np.isfinite([row["secs"], row["ceiling"], row["floor"]]).all()


# ---------------------------------------------------------------------- training side


def test_held_out_speakers_never_enter_training_or_validation(tmp_path):
    from training.trainer import Trainer

    cache = feature_cache()
    cfg = TrainConfig(size="tiny", batch_size=4, steps=1, device="cpu", held_out_speakers=["high"])
    trainer = Trainer(cfg, cache, tmp_path / "run")
    for subset in (trainer.train_set, trainer.val_set):
        speakers = {subset.dataset.items[i]["speaker"] for i in subset.indices}
        assert speakers == {"low"}
    # The checkpoint does not offer the held-out voice as a seen speaker, and records it.
    ckpt = trainer.checkpoint_dict()
    assert set(ckpt["speakers"]) == {"low"}
    assert ckpt["config"]["held_out_speakers"] == ["high"]
    assert TrainConfig.from_flat(ckpt["config"]).held_out_speakers == ["high"]


def test_a_misspelt_held_out_speaker_is_refused(tmp_path):
    from training.trainer import Trainer

    cfg = TrainConfig(size="tiny", steps=1, device="cpu", held_out_speakers=["hihg"])
    with pytest.raises(ValueError, match=r"hihg are not in .*its speakers are high, low"):
        Trainer(cfg, feature_cache(), tmp_path / "run")


def test_the_cli_flag_holds_speakers_out(tmp_path, capsys):
    from training import cli

    args = cli.build_parser().parse_args(
        ["train", "--data", "x", "--out", "y", "--hold-out-speakers", "rms, esf2"]
    )
    assert args.hold_out_speakers == "rms, esf2"
    code = cli.main(
        [
            "train",
            "--data",
            str(feature_cache()),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--device",
            "cpu",
            "--hold-out-speakers",
            "rms,esf2",
        ]
    )
    assert code == 2
    assert "esf2, rms are not in" in capsys.readouterr().err


def test_synthesis_speaks_with_the_weight_average(tmp_path):
    from synthesis.engine import load_model
    from training.checkpoint import load_checkpoint
    from training.trainer import Trainer

    cfg = TrainConfig(
        size="tiny", batch_size=4, steps=2, checkpoint_every=2, eval_every=2, device="cpu"
    )
    result = Trainer(cfg, feature_cache(), tmp_path / "run").run()
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["ema"]["updates"] == 2
    averaged = ckpt["ema"]["weights"]["mel_out.weight"]
    assert not torch.equal(averaged, ckpt["model"]["mel_out.weight"])
    loaded = load_model(result.last_checkpoint, "cpu")
    assert torch.equal(loaded.model.mel_out.weight, averaged)
    # Resuming carries the average on; switched off, no average is kept.
    resumed = Trainer(cfg, feature_cache(), tmp_path / "run", resume=True)
    assert resumed.ema.updates == 2
    cfg_off = TrainConfig(size="tiny", batch_size=4, steps=1, device="cpu", ema_decay=0.0)
    assert "ema" not in Trainer(cfg_off, feature_cache(), tmp_path / "off").checkpoint_dict()


def test_resuming_a_checkpoint_from_before_conditional_norms_is_refused(tmp_path):
    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.model import is_conditioning_key
    from training.trainer import Trainer

    cfg = TrainConfig(size="tiny", batch_size=4, steps=1, checkpoint_every=1, device="cpu")
    result = Trainer(cfg, feature_cache(), tmp_path / "run").run()
    ckpt = load_checkpoint(result.last_checkpoint)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not is_conditioning_key(k)}
    save_checkpoint(result.last_checkpoint, ckpt)
    cfg.steps = 2
    with pytest.raises(ValueError, match=r"before the model conditioned every block.*--init-from"):
        Trainer(cfg, feature_cache(), tmp_path / "run", resume=True)
    # As the start of a new run it is fine: the new norms begin as plain layer norms.
    fresh = Trainer(cfg, feature_cache(), tmp_path / "new", init_from=result.last_checkpoint)
    assert fresh.step == 0


# ---------------------------------------------------------------------- speaker augmentation


def test_a_shifted_copy_is_higher_and_shorter():
    from tests.fixtures_audio import SR, voiced_clip
    from training.augment import shift

    wav = torch.from_numpy(voiced_clip(150.0, 1.0, seed=0))
    up = shift(wav, SR, 1.16)
    assert len(up) == pytest.approx(len(wav) / 1.16, rel=0.01)

    def peak_hz(x):
        spectrum = torch.fft.rfft(x * torch.hann_window(len(x)))
        return float(spectrum.abs()[20:].argmax() + 20) * SR / len(x)

    assert peak_hz(up) == pytest.approx(1.16 * peak_hz(wav), rel=0.03)


def test_augmented_copies_are_speakers_of_their_own(tmp_path):
    from tests.fixtures_audio import write_corpus
    from training.augment import augmented_items, base_speaker

    items = write_corpus(tmp_path / "corpus", n=2)
    copies = augmented_items(items, tmp_path / "aug", factors=(0.9, 1.1))
    assert {c.speaker for c in copies} == {"low@down2", "low@up2", "high@down2", "high@up2"}
    assert len(copies) == 4 and all("@" in c.id for c in copies)
    assert all(c.audio_path.is_file() for c in copies)
    assert {base_speaker(c.speaker) for c in copies} == {"low", "high"}
    again = augmented_items(items, tmp_path / "aug", factors=(0.9, 1.1))  # reused, not rewritten
    assert [c.id for c in again] == [c.id for c in copies]


def test_held_out_speakers_take_their_copies_with_them(tmp_path):
    import json

    from training.data import FeatureDataset

    (tmp_path / "meta.json").write_text(json.dumps({"stats": {}}))
    rows = [
        {"id": f"u{i}", "speaker": spk, "split": "train", "n_frames": 10, "feats": "x"}
        for i, spk in enumerate(["rms", "rms@up2", "awb", "awb@down2"])
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = FeatureDataset(tmp_path, "train", exclude_speakers=["rms"]).items
    assert [it["speaker"] for it in kept] == ["awb", "awb@down2"]
