import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

from training.data import (
    MEL_PAD,
    BucketBatchSampler,
    FeatureDataset,
    collate,
    read_items,
    read_meta,
)

STATS = {"pitch_mean": 150.0, "pitch_std": 30.0, "energy_mean": 2.0, "energy_std": 0.5}


@pytest.fixture
def cache(tmp_path):
    """A small cache written by hand, so every value a test checks is known exactly."""
    (tmp_path / "feats").mkdir()
    lines = []
    for i in range(12):
        frames, n_tok = 20 + 7 * i, 5 + i
        pitch = torch.full((frames,), 180.0)
        pitch[::3] = 0.0  # unvoiced frames
        feats = {
            "mel": torch.full((80, frames), float(i), dtype=torch.float16),
            "pitch": pitch,
            "energy": torch.full((frames,), 3.0),
            "tokens": torch.arange(1, n_tok + 1),
            "spk_emb": torch.full((256,), 1 / 16),
        }
        torch.save(feats, tmp_path / "feats" / f"u{i}.pt")
        split = "val" if i in (3, 7) else "train"
        lines.append(
            json.dumps(
                {
                    "id": f"u{i}",
                    "speaker": "a" if i % 2 else "b",
                    "text": f"text {i}",
                    "n_tokens": n_tok,
                    "n_frames": frames,
                    "duration_s": frames * 256 / 22050,
                    "split": split,
                    "feats": f"feats/u{i}.pt",
                }
            )
        )
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    meta = {
        "symbols": ["<pad>"] + [str(i) for i in range(20)],
        "stats": STATS,
        "speakers": ["a", "b"],
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_read_meta_and_items(cache, tmp_path_factory):
    assert read_meta(cache)["speakers"] == ["a", "b"]
    assert len(read_items(cache)) == 12
    assert [it["id"] for it in read_items(cache, "val")] == ["u3", "u7"]
    with pytest.raises(ValueError, match="split"):
        read_items(cache, "test")
    with pytest.raises(FileNotFoundError, match="not a finished feature cache"):
        read_meta(tmp_path_factory.mktemp("empty"))


@pytest.mark.parametrize("preload", [False, True])
def test_dataset_normalises_pitch_and_energy(cache, preload):
    ds = FeatureDataset(cache, "train", preload=preload)
    assert len(ds) == 10 and len(FeatureDataset(cache, "val")) == 2
    assert ds.symbols[0] == "<pad>" and ds.lengths[0] == 20
    item = ds[0]
    voiced = item["pitch"][1:3]
    assert torch.allclose(voiced, torch.full_like(voiced, (180 - 150) / 30))
    assert (item["pitch"][::3] == 0).all()  # unvoiced stays exactly zero
    assert torch.allclose(item["energy"], torch.full_like(item["energy"], (3 - 2) / 0.5))
    assert item["tokens"].dtype == torch.long and item["id"] == "u0"


def test_collate_pads_and_reports_lengths(cache):
    ds = FeatureDataset(cache, "all")
    batch = collate([ds[0], ds[5]])
    assert batch["tokens"].shape == (2, 10) and batch["tokens"].dtype == torch.long
    assert batch["token_lens"].tolist() == [5, 10]
    assert batch["mel_lens"].tolist() == [20, 55]
    assert batch["mels"].shape == (2, 80, 55) and batch["mels"].dtype == torch.float32
    assert batch["pitch"].shape == (2, 55) and batch["energy"].shape == (2, 55)
    assert batch["spk_emb"].shape == (2, 256)
    # Padding: token 0, silent mel, zero pitch and energy.
    assert (batch["tokens"][0, 5:] == 0).all()
    assert (batch["mels"][0, :, 20:] == MEL_PAD).all() and pytest.approx(math.log(1e-5)) == MEL_PAD
    assert (batch["pitch"][0, 20:] == 0).all() and (batch["energy"][0, 20:] == 0).all()
    assert (batch["mels"][1, :, :55] == 5).all()
    assert batch["ids"] == ["u0", "u5"] and batch["speakers"] == ["b", "a"]
    assert batch["texts"] == ["text 0", "text 5"]


def _flat(batches):
    return sorted(i for b in batches for i in b)


def test_bucket_sampler_covers_everything_once_and_is_deterministic():
    lengths = [
        int(x) for x in torch.randint(50, 800, (503,), generator=torch.Generator().manual_seed(1))
    ]
    s = BucketBatchSampler(lengths, batch_size=16, seed=7, pool_batches=4)
    epoch0 = s.batches(0)
    assert _flat(epoch0) == list(range(503))
    assert len(s) == len(epoch0) == len(list(iter(s)))
    assert BucketBatchSampler(lengths, 16, seed=7, pool_batches=4).batches(0) == epoch0
    assert s.batches(1) != epoch0
    assert BucketBatchSampler(lengths, 16, seed=8, pool_batches=4).batches(0) != epoch0
    # Iterating advances the epoch; set_epoch rewinds it (what resume does).
    s.set_epoch(0)
    assert list(iter(s)) == epoch0 and list(iter(s)) == s.batches(1)
    s.set_epoch(1)
    assert list(iter(s)) == s.batches(1)


def test_bucket_sampler_cuts_padding():
    lengths = [
        int(x) for x in torch.randint(50, 800, (640,), generator=torch.Generator().manual_seed(2))
    ]

    def padding(batches):
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    bucketed = BucketBatchSampler(lengths, 16, seed=0).batches(0)
    perm = torch.randperm(640, generator=torch.Generator().manual_seed(0)).tolist()
    random = [perm[i : i + 16] for i in range(0, 640, 16)]
    assert padding(bucketed) < 0.2 * padding(random)


def test_bucket_sampler_options():
    lengths = list(range(100, 0, -1))
    ordered = BucketBatchSampler(lengths, 8, shuffle=False).batches()
    assert ordered[0] == [99, 98, 97, 96, 95, 94, 93, 92]  # shortest first
    assert len(ordered) == 13 and len(ordered[-1]) == 4
    dropped = BucketBatchSampler(lengths, 8, shuffle=False, drop_last=True)
    assert len(dropped) == len(dropped.batches()) == 12
    shards = [BucketBatchSampler(lengths, 8, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    a, b = (s.batches(0) for s in shards)
    assert len(a) == len(b) == len(shards[0]) and not set(_flat(a)) & set(_flat(b))
    with pytest.raises(ValueError):
        BucketBatchSampler(lengths, 0)


def bucket_loader(cache, batch_size: int, seed: int, workers: int = 0) -> DataLoader:
    """The trainer's way: a dataset of a split, bucketed batches, one collate."""
    dataset = FeatureDataset(cache, "train")
    sampler = BucketBatchSampler(dataset.lengths, batch_size, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 1])
def test_bucketed_loader_covers_the_split_once_and_repeats_by_seed(cache, workers):
    seen = []
    for batch in bucket_loader(cache, 4, seed=3, workers=workers):
        assert batch["mels"].shape[0] == len(batch["ids"]) <= 4
        seen += batch["ids"]
    assert sorted(seen) == sorted(f"u{i}" for i in range(12) if i not in (3, 7))
    again = [b["ids"] for b in bucket_loader(cache, 4, seed=3)]
    assert again == [b["ids"] for b in bucket_loader(cache, 4, seed=3)]
