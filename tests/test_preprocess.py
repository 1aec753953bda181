import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from training.audio import n_frames
from training.data import BucketBatchSampler, FeatureDataset, collate, read_meta
from training.preprocess import feature_name, preprocess_corpus, split_of
from training.text import SymbolTable

SR = 22050
TEXTS = (
    "The cat sat on the mat.",
    "A bird sings at dawn!",
    "Is it 5 already?",
    "We walked home slowly.",
    "Bread and butter, please.",
    "Rain fell all night.",
)


def voiced_clip(f0: float, seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """Silence, then a vowel-like harmonic tone with vibrato and a noise burst, then silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    freq = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    tone = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6))
    tone *= np.hanning(t.size) ** 0.3
    burst = np.zeros_like(tone)
    burst[: sr // 10] = rng.normal(0, 0.05, sr // 10)
    pad = np.zeros(int(0.3 * sr))
    return np.concatenate([pad, burst[: sr // 10], tone, pad]).astype(np.float32)


def make_corpus(root: Path, n: int = 8) -> list:
    """Two speakers (low and high voice); one file at 16 kHz to be resampled."""
    (root / "wavs").mkdir(parents=True)
    items = []
    for i in range(n):
        spk = "low" if i % 2 == 0 else "high"
        f0 = (110 if spk == "low" else 220) + 5 * i
        sr = 16000 if i == 1 else SR
        path = root / "wavs" / f"{spk}_{i}.flac"
        sf.write(path, voiced_clip(f0, 0.8 + 0.1 * i, seed=i, sr=sr), sr)
        items.append(
            SimpleNamespace(id=f"{spk}_{i}", audio_path=path, text=TEXTS[i % 6], speaker=spk)
        )
    return items


def broken_items(root: Path) -> list:
    bad = root / "wavs" / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    silent = root / "wavs" / "silent.flac"
    sf.write(silent, np.zeros(SR, dtype=np.float32), SR)
    return [
        SimpleNamespace(id="broken", audio_path=bad, text="Hello.", speaker="low"),
        SimpleNamespace(id="silent", audio_path=silent, text="Hello.", speaker="low"),
        SimpleNamespace(
            id="gone", audio_path=root / "wavs" / "gone.wav", text="Hi.", speaker="low"
        ),
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root), broken_items(root)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    _, items, broken = corpus
    out = tmp_path_factory.mktemp("cache")
    calls = []
    result = preprocess_corpus(
        items + broken,
        out,
        lang="en",
        text_backend="chars",
        progress=lambda d, t: calls.append((d, t)),
    )
    return out, result, calls


def test_result_counts_and_progress(built):
    _out, result, calls = built
    assert (result.total, result.kept, result.dropped, result.reused) == (11, 8, 3, 0)
    assert result.train + result.val == 8 and result.val >= 1
    assert not result.stopped and result.text_backend == "chars"
    assert calls[0] == (0, 11) and calls[-1] == (11, 11) and len(calls) == 12
    assert 5 < result.audio_seconds < 12


def test_problems_are_reported_per_file(built):
    out, result, _ = built
    codes = {(p.item_id, p.code, p.severity) for p in result.problems}
    assert ("broken", "undecodable", "error") in codes
    assert ("silent", "mostly_silence", "error") in codes
    assert ("gone", "undecodable", "error") in codes
    assert ("high_1", "resampled", "warning") in codes
    lines = [json.loads(x) for x in (out / "problems.jsonl").read_text().splitlines()]
    assert {(p["item_id"], p["code"]) for p in lines} == {(i, c) for i, c, _ in codes}
    assert all(p["message"] for p in lines)


def test_meta_and_items(built):
    out, _result, _ = built
    meta = read_meta(out)
    assert meta["audio"]["sample_rate"] == 22050 and meta["audio"]["n_mels"] == 80
    assert meta["language"] == "en" and meta["text"] == {"lang": "en", "backend": "chars"}
    assert meta["speakers"] == ["high", "low"]
    assert meta["symbols"][0] == "<pad>" and "5" not in meta["symbols"]  # digits were spoken
    for name in meta["speakers"]:
        assert np.linalg.norm(meta["speaker_embeddings"][name]) == pytest.approx(1, abs=1e-4)
    stats = meta["stats"]
    assert 100 < stats["pitch_mean"] < 260 and stats["pitch_std"] > 10
    assert stats["energy_std"] > 0 and meta["val_fraction"] == 0.05
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert [it["id"] for it in items] == [
        f"{'low' if i % 2 == 0 else 'high'}_{i}" for i in range(8)
    ]
    for it in items:
        assert set(it) >= {
            "id",
            "speaker",
            "text",
            "n_tokens",
            "n_frames",
            "duration_s",
            "split",
            "feats",
        }
        assert it["split"] in ("train", "val")


def test_feature_files(built):
    out, _, _ = built
    meta = read_meta(out)
    table = SymbolTable.from_list(meta["symbols"])
    for it in (json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()):
        feats = torch.load(out / it["feats"], weights_only=True)
        T = it["n_frames"]
        assert feats["mel"].shape == (80, T) and feats["mel"].dtype == torch.float16
        assert feats["pitch"].shape == (T,) and feats["energy"].shape == (T,)
        assert n_frames(round(it["duration_s"] * SR)) == T
        assert feats["spk_emb"].shape == (256,)
        assert feats["tokens"].dtype == torch.long and feats["tokens"].numel() == it["n_tokens"]
        assert table.decode(feats["tokens"].tolist()) == [
            c for c in it["text"].lower().replace("5", "five") if c in table
        ]
        # Trimmed: the 0.3 s of silence at each end is gone.
        assert it["duration_s"] < 0.1 + 0.8 + 0.1 * int(it["id"].split("_")[1]) + 0.15
        voiced = feats["pitch"][feats["pitch"] > 0]
        assert voiced.numel() > T / 2
        expected = (110 if it["speaker"] == "low" else 220) + 5 * int(it["id"].split("_")[1])
        assert voiced.median().item() == pytest.approx(expected, rel=0.06)
    assert not list(out.glob("feats/.*.tmp"))


def test_speaker_embeddings_are_unit_vectors(built):
    out, _, _ = built
    embs = {}
    for it in (json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()):
        embs[it["id"]] = torch.load(out / it["feats"], weights_only=True)["spk_emb"]
    assert all(torch.linalg.norm(e).item() == pytest.approx(1, abs=1e-4) for e in embs.values())


def test_the_cache_feeds_a_loader(built):
    out, _, _ = built
    dataset = FeatureDataset(out, "train")
    batch = collate([dataset[i] for i in BucketBatchSampler(dataset.lengths, 4).batches()[0]])
    assert batch["mels"].shape[:2] == (len(batch["ids"]), 80)
    assert batch["tokens"].max() < len(read_meta(out)["symbols"])


def test_rerun_reuses_and_redoes_only_what_changed(corpus, tmp_path):
    _root, items, _ = corpus
    first = preprocess_corpus(items[:4], tmp_path, text_backend="chars")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "feats").iterdir()}
    again = preprocess_corpus(items[:4], tmp_path, text_backend="chars")
    assert again.reused == 4 and again.kept == first.kept == 4
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "feats").iterdir()} == stamps

    # A changed transcript redoes that utterance; a new symbol re-encodes the others' tokens
    # without touching their audio features.
    changed = [SimpleNamespace(**vars(items[0])), *items[1:4]]
    changed[0].text = "Zebras quiz xylophones."
    third = preprocess_corpus(changed, tmp_path, text_backend="chars")
    assert third.reused == 3
    table = SymbolTable.from_list(read_meta(tmp_path)["symbols"])
    assert "z" in table
    for it in changed:
        feats = torch.load(tmp_path / feature_name(it.id), weights_only=True)
        decoded = "".join(table.decode(feats["tokens"].tolist()))
        assert decoded == it.text.lower().replace("5", "five")


def test_truncated_feature_file_is_redone(corpus, tmp_path):
    _, items, _ = corpus
    preprocess_corpus(items[:2], tmp_path, text_backend="chars")
    target = tmp_path / feature_name(items[0].id)
    target.write_bytes(target.read_bytes()[:100])
    result = preprocess_corpus(items[:2], tmp_path, text_backend="chars")
    assert result.reused == 1 and result.kept == 2
    assert torch.load(target, weights_only=True)["mel"].shape[0] == 80


def test_stop_then_resume(corpus, tmp_path):
    _, items, _ = corpus
    done = []
    stopped = preprocess_corpus(
        items,
        tmp_path,
        text_backend="chars",
        progress=lambda d, t: done.append(d),
        should_stop=lambda: len(done) > 3,
    )
    assert stopped.stopped and not (tmp_path / "meta.json").exists()
    finished = preprocess_corpus(items, tmp_path, text_backend="chars")
    assert not finished.stopped and finished.reused == 3 and finished.kept == 8
    assert read_meta(tmp_path)["counts"]["items"] == 8


def test_two_workers_give_the_same_cache(corpus, built, tmp_path):
    _, items, broken = corpus
    out1, single, _ = built
    result = preprocess_corpus(items + broken, tmp_path, text_backend="chars", workers=2)
    assert (result.kept, result.dropped) == (single.kept, single.dropped)
    assert (tmp_path / "items.jsonl").read_text() == (out1 / "items.jsonl").read_text()
    assert read_meta(tmp_path) == read_meta(out1)
    for name in os.listdir(out1 / "feats"):
        a = torch.load(out1 / "feats" / name, weights_only=True)
        b = torch.load(tmp_path / "feats" / name, weights_only=True)
        for key in ("mel", "pitch", "energy", "tokens", "spk_emb"):
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_split_is_stable_and_about_five_percent():
    ids = [f"spk{i % 7}_{i:05d}" for i in range(4000)]
    share = sum(split_of(i) == "val" for i in ids) / len(ids)
    assert 0.04 < share < 0.06
    assert [split_of(i) for i in ids[:50]] == [split_of(i) for i in ids[:50]]
    assert split_of("abc") == split_of("abc")


def test_two_items_get_one_validation_item(corpus, tmp_path):
    _, items, _ = corpus
    result = preprocess_corpus(items[:2], tmp_path, text_backend="chars")
    assert (result.train, result.val) == (1, 1)


def test_feature_names_are_safe_and_distinct():
    assert feature_name("abc_01") == "feats/abc_01.pt"
    a, b = feature_name("a/b"), feature_name("a?b")
    assert a != b and "/" not in a[len("feats/") :] and a.startswith("feats/a_b-")
