"""The synthesis engine end to end, from a checkpoint trained here on a tiny espeak corpus.

Two espeak voices speak ten sentences each; the real preprocessing and the real trainer make a
`tiny` checkpoint in a few dozen steps. That is far from a good voice, but enough for the
duration predictor to give speech-length output whose length follows the speed control.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from synthesis import engine
from synthesis.engine import ModelCache, Synthesizer, split_text
from synthesis.evaluate import evaluate_checkpoint
from synthesis.reference_clips import ReferenceAudioError
from synthesis.vocoders import GRIFFIN_LIM, VocoderError, default_vocoder_name
from tests.fixtures_audio import bare_checkpoint, espeak_speech
from training.checkpoint import CheckpointError, save_checkpoint
from training.config import TrainConfig
from training.corpus import CorpusItem
from training.preprocess import preprocess_corpus
from training.trainer import Trainer

SENTENCES = [
    "The quiet teacher collected two loaves of bread.",
    "A young doctor measured the evening train.",
    "What a lovely surprise that was!",
    "The small child painted a strange noise.",
    "Please call Stella and ask her to bring these things.",
    "She sells sea shells by the sea shore.",
    "The museum guide watched the heavy wooden box.",
    "We will meet again on a sunny morning.",
    "Bright lights shone over the old harbour.",
    "Nobody noticed the green door at the end of the street.",
]
VOICES = {"voice0": "en-us", "voice1": "en-us+f3"}
TRAIN_STEPS = 25


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synth-engine")
    (root / "wavs").mkdir()
    items = []
    for name, voice in VOICES.items():
        for i, sentence in enumerate(SENTENCES):
            wav, sr = espeak_speech(sentence, voice)
            path = root / "wavs" / f"{name}_{i:02d}.wav"
            sf.write(path, wav, sr)
            items.append(CorpusItem(f"{name}_{i:02d}", path, sentence, name))
    preprocess_corpus(items, root / "cache", val_fraction=0.1)
    cfg = TrainConfig(
        size="tiny",
        batch_size=8,
        steps=TRAIN_STEPS,
        eval_every=TRAIN_STEPS,
        checkpoint_every=TRAIN_STEPS,
        lr_warmup_steps=5,
        learning_rate=2e-3,
        device="cpu",
    )
    result = Trainer(cfg, root / "cache", root / "run").run()
    assert result.status == "finished"
    return {"checkpoint": Path(result.last_checkpoint), "cache": root / "cache", "root": root}


def test_round_trip_gives_non_silent_speech_length_audio(trained):
    synth = Synthesizer(trained["checkpoint"], "cpu")
    assert synth.speakers == ["voice0", "voice1"]
    out = synth.synthesize(SENTENCES[0], speaker="voice1")
    assert out.audio.dtype == np.float32 and out.audio.ndim == 1
    assert out.sample_rate == 22050
    assert np.isfinite(out.audio).all() and np.abs(out.audio).max() <= 1.0
    assert float(np.sqrt(np.mean(out.audio**2))) > 1e-3  # not silence
    assert 0.3 < out.duration_s < 10
    assert out.mel.shape[0] == 80 and out.mel.shape[1] > 10
    assert {"frontend_s", "model_s", "vocoder_s", "total_s", "first_audio_s", "rtf"} <= set(
        out.timings
    )
    data, sr = sf.read(io.BytesIO(out.wav_bytes()))
    assert sr == 22050 and len(data) == len(out.audio)


def test_length_follows_the_speed_control(trained):
    synth = Synthesizer(trained["checkpoint"], "cpu")
    lengths = {
        speed: len(synth.synthesize(SENTENCES[1], speaker="voice0", speed=speed).audio)
        for speed in (0.5, 1.0, 2.0)
    }
    assert lengths[0.5] > lengths[1.0] > lengths[2.0]
    # Durations are rounded per token (a few frames each after so little training), so the
    # ratio is near, not exactly, the speed ratio.
    assert 1.4 < lengths[0.5] / lengths[1.0] < 3.5
    assert 1.4 < lengths[1.0] / lengths[2.0] < 3.5


def test_pitch_and_energy_controls_change_the_output(trained):
    synth = Synthesizer(trained["checkpoint"], "cpu")
    emb = synth.speaker_embedding("voice0")
    plain = synth.synthesize(SENTENCES[2], emb).mel
    higher = synth.synthesize(SENTENCES[2], emb, pitch=6.0).mel
    louder = synth.synthesize(SENTENCES[2], emb, energy=1.8).mel
    assert plain.shape == higher.shape == louder.shape  # durations do not depend on pitch/energy
    assert not np.allclose(plain, higher) and not np.allclose(plain, louder)
    with pytest.raises(ValueError, match="speed must be between"):
        synth.synthesize(SENTENCES[2], emb, speed=5)
    with pytest.raises(ValueError, match="pitch"):
        synth.synthesize(SENTENCES[2], emb, pitch=float("nan"))


def test_a_reference_clip_drives_the_voice(trained, tmp_path):
    wav, sr = espeak_speech(" ".join(SENTENCES[3:6]), "en-us+f3")
    path = tmp_path / "ref.flac"
    sf.write(path, wav, sr)
    synth = Synthesizer(trained["checkpoint"], "cpu")
    out = synth.synthesize("Hello there.", references=str(path))
    assert out.duration_s > 0.1
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(4 * sr, dtype=np.float32), sr)
    with pytest.raises(ReferenceAudioError, match="silent"):
        synth.synthesize("Hello there.", references=str(silent))


def test_long_text_is_split_into_sentences_joined_by_pauses(trained):
    synth = Synthesizer(trained["checkpoint"], "cpu")
    text = " ".join(SENTENCES[:3])
    out = synth.synthesize(text, speaker="voice0")
    assert len(out.chunks) == 3
    silent_frames = (out.mel.max(axis=0) <= np.log(1e-5) + 1e-3).sum()
    pause_frames = 2 * round(engine.SENTENCE_PAUSE_S * 22050 / 256)
    assert silent_frames >= pause_frames
    singles = sum(len(synth.synthesize(s, speaker="voice0").audio) for s in SENTENCES[:3])
    assert len(out.audio) > singles  # the same speech plus the pauses


def test_split_text_cuts_long_sentences_at_clauses_and_spaces():
    chunks = split_text("Dr. Smith paid $5 for 3 apples. Really? Yes!", "en")
    assert [c for c, _ in chunks] == [
        "doctor smith paid five dollars for three apples.",
        "really?",
        "yes!",
    ]
    assert [p for _, p in chunks] == [engine.SENTENCE_PAUSE_S, engine.SENTENCE_PAUSE_S, 0.0]
    long = ", ".join(["the rain in spain falls mainly on the plain"] * 15) + "."
    parts = split_text(long, "en")
    assert len(parts) > 1 and all(len(c) <= engine.MAX_CHUNK_CHARS for c, _ in parts)
    assert " ".join(c for c, _ in parts).replace(" ", "") == long.replace(" ", "")
    endless = "word " * 200
    assert all(len(c) <= engine.MAX_CHUNK_CHARS for c, _ in split_text(endless, "en"))
    fa = split_text("سلام. حال شما چطور است؟ خوبم", "fa")
    assert len(fa) == 3


def test_nothing_to_say_is_a_clear_error(trained):
    synth = Synthesizer(trained["checkpoint"], "cpu")
    for text in ("", "   ", "... ?!", "\n\n"):
        with pytest.raises(ValueError, match=r"text|Nothing to say"):
            synth.synthesize(text, speaker="voice0")


class Payload:
    """Any class at all: loading it would mean unpickling code."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_checkpoint_with_a_pickled_payload_is_refused(trained, tmp_path):
    from training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained["checkpoint"])
    ckpt["extra"] = Payload()
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)  # plain torch.save pickles the object; save_checkpoint would refuse
    with pytest.raises(CheckpointError, match="refused"):
        Synthesizer(path, "cpu", cache=ModelCache())
    (tmp_path / "junk.pt").write_bytes(pickle.dumps({"model": 1}))
    with pytest.raises(CheckpointError):
        Synthesizer(tmp_path / "junk.pt", "cpu", cache=ModelCache())
    with pytest.raises(CheckpointError, match=r"no such checkpoint|not found"):
        engine.load_model(tmp_path / "missing.pt")


def test_models_are_cached_least_recently_used_and_reloaded_when_rewritten(trained, tmp_path):
    from training.checkpoint import load_checkpoint

    cache = ModelCache(size=1)
    first = Synthesizer(trained["checkpoint"], "cpu", cache=cache).loaded
    assert Synthesizer(trained["checkpoint"], "cpu", cache=cache).loaded is first
    copy = tmp_path / "copy.pt"
    save_checkpoint(copy, load_checkpoint(trained["checkpoint"]))
    other = Synthesizer(copy, "cpu", cache=cache).loaded
    assert other is not first and len(cache) == 1
    assert Synthesizer(trained["checkpoint"], "cpu", cache=cache).loaded is not first  # evicted
    save_checkpoint(copy, load_checkpoint(trained["checkpoint"]))
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert Synthesizer(copy, "cpu", cache=cache).loaded is not other


def test_a_checkpoint_without_seen_speakers_needs_a_reference(tmp_path):
    synth = Synthesizer(bare_checkpoint(tmp_path, SENTENCES), "cpu", cache=ModelCache())
    with pytest.raises(ReferenceAudioError, match="reference clip"):
        synth.synthesize("Hello.")
    # Untrained, but the pipeline still gives audio of the right type.
    out = synth.synthesize("Hello.", np.ones(256, dtype=np.float32) / 16)
    assert out.audio.dtype == np.float32 and len(out.audio) > 0


def test_weights_that_do_not_fit_the_model_are_a_clear_error(tmp_path):
    from training.checkpoint import load_checkpoint

    path = bare_checkpoint(tmp_path, SENTENCES)
    ckpt = load_checkpoint(path)
    del ckpt["model"]["mel_out.weight"]
    save_checkpoint(tmp_path / "old.pt", ckpt)
    with pytest.raises(CheckpointError, match="do not fit this version"):
        Synthesizer(tmp_path / "old.pt", "cpu", cache=ModelCache())
    del ckpt["symbols"]
    save_checkpoint(tmp_path / "partial.pt", ckpt)
    with pytest.raises(CheckpointError, match="missing symbols"):
        Synthesizer(tmp_path / "partial.pt", "cpu", cache=ModelCache())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_synthesis_on_the_gpu_matches_the_cpu(trained):
    cpu = Synthesizer(trained["checkpoint"], "cpu").synthesize(SENTENCES[0], speaker="voice0")
    gpu = Synthesizer(trained["checkpoint"], "cuda").synthesize(SENTENCES[0], speaker="voice0")
    assert gpu.mel.shape == cpu.mel.shape
    assert np.abs(gpu.mel - cpu.mel).max() < 0.05


def test_evaluate_checkpoint_scores_held_out_utterances(trained, tmp_path):
    # An unseen voice: 3 clips to clone it from, 2 others to compare with (synthesis.cloning),
    # and another voice's clips for the floor.
    def clips(voice: str, sentences: list[str]) -> list:
        paths = []
        for i, text in enumerate(sentences):
            clip, sr = espeak_speech(text, voice)
            paths.append(tmp_path / f"{voice}_{i}.wav")
            sf.write(paths[-1], clip, sr)
        return paths

    held_out = {"gb": clips("en-gb-scotland", SENTENCES[5:10])}
    floor = {"us": clips("en-us+m3", SENTENCES[:2])}
    scores = evaluate_checkpoint(
        trained["checkpoint"],
        trained["cache"],
        n_utterances=2,
        held_out=held_out,
        floor_clips=floor,
        unseen_texts=SENTENCES[:1],
    )
    assert scores["n_utterances"] == 2 and scores["step"] == TRAIN_STEPS
    assert scores["unseen_speakers"] == ["gb"] and scores["normalised_secs_unseen"] is not None
    for key in (
        "secs_seen",
        "secs_unseen",
        "secs_unseen_ceiling",
        "secs_unseen_floor",
        "secs_real_same_speaker",
        "secs_real_different_speakers",
    ):
        assert -1.0 <= scores[key] <= 1.0, key
    assert scores["secs_real_same_speaker"] > scores["secs_real_different_speakers"]
    assert scores["mcd_db"] > 0 and scores["rtf"] > 0
    assert scores["wer_output"] >= 0 and scores["wer_ground_truth"] >= 0
    assert scores["ground_truth"] in ("recording", "vocoded_ground_truth_mel")
    # Every score says which vocoder made it, and DNSMOS sits beside SECS/MCD/WER.
    assert scores["vocoder"] == default_vocoder_name()
    assert 1.0 <= scores["dnsmos_ovrl"] <= 5.0
    assert [u["speaker"] for u in scores["utterances"]] == [
        "voice0",
        "voice1",
    ]  # one per voice first
    json.dumps(scores)  # a plain dict, ready for Checkpoint.scores


def test_the_vocoder_is_chosen_by_name_and_streams(trained):
    synth = Synthesizer(trained["checkpoint"], "cpu", vocoder=GRIFFIN_LIM)
    out = synth.synthesize(SENTENCES[0], speaker="voice0")
    assert out.vocoder == GRIFFIN_LIM
    default = Synthesizer(trained["checkpoint"], "cpu")
    assert default.vocoder.name == default_vocoder_name()
    timings: dict = {}
    pieces = list(
        default.audio_chunks(
            " ".join(SENTENCES[:2]), default.speaker_embedding("voice0"), timings=timings
        )
    )
    assert len(pieces) >= 3  # two sentences and the pause between them
    assert all(p.dtype == np.float32 and np.isfinite(p).all() for p in pieces)
    assert 0 < timings["first_audio_s"] <= timings["total_s"]
    with pytest.raises(VocoderError, match="unknown vocoder"):
        Synthesizer(trained["checkpoint"], "cpu", vocoder="wavenet")
