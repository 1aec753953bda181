"""A sharded feature store for corpora of hundreds of hours, beside the per-file cache.

One `.pt` per utterance means a LibriTTS-sized corpus is ~375,000 small files: opening them
dominates a training step once the model is fast. Here utterances are packed into shards of
about SHARD_BYTES each, one folder per shard holding plain `.npy` arrays that are memory-mapped
(no copy, no unpickling; the page cache is shared by every loader worker and every rank):

    <cache>/shards/manifest.json          shards, items (with shard, offsets), source items hash
    <cache>/shards/00000/mel.npy          [frames, n_mels] float16, utterances end to end
                       /pitch.npy         [frames] float32
                       /energy.npy        [frames] float32
                       /tokens.npy        [tokens] int32
                       /spk_emb.npy       [utterances, 256] float32

The manifest is written last (atomically), so a half-written store is never read; it records
the items.jsonl it was built from, so a cache re-made later falls back to the per-file reader
instead of serving stale shards. Items keep their order inside a shard, grouped by split and
sorted by length, so a batch of similar lengths reads neighbouring bytes ("length bucketing
inside shards": `shard_groups` lets the batch sampler cut its pools within a shard).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data import FeatureDataset, read_items, read_meta

SHARD_BYTES = 256 * 1024 * 1024
MANIFEST = Path("shards") / "manifest.json"
FORMAT_VERSION = 1


def items_digest(cache_dir: str | Path) -> str:
    return hashlib.sha256((Path(cache_dir) / "items.jsonl").read_bytes()).hexdigest()


def has_shards(cache_dir: str | Path) -> bool:
    """True when the cache has a finished store built from its current items.jsonl."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return manifest.get("items_sha256") == items_digest(cache_dir)
    except (OSError, ValueError):
        return False


def _item_bytes(it: dict, n_mels: int) -> int:
    # float16 mel + float32 pitch and energy + int32 tokens + the embedding
    return it["n_frames"] * (2 * n_mels + 8) + 4 * it["n_tokens"] + 1024


def plan_shards(
    items: Sequence[dict], shard_bytes: int = SHARD_BYTES, n_mels: int = 80, seed: int = 0
):
    """Lists of item indices, one per shard, each up to shard_bytes.

    Items go to shards at random (a fixed seed: the plan is reproducible), so every shard is a
    fair sample of speakers and lengths and an epoch that walks shard by shard sees no drift;
    inside a shard they are sorted by split and length, so a bucket of similar lengths lies
    in neighbouring bytes.
    """
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    shards, current, size = [], [], 0
    for i in order:
        b = _item_bytes(items[i], n_mels)
        if current and size + b > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += b
    if current:
        shards.append(current)
    return [sorted(s, key=lambda i: (items[i]["split"], items[i]["n_frames"], i)) for s in shards]


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_shard(cache_dir: Path, folder: Path, items: list[dict]) -> list[dict]:
    """Pack `items` (their per-file features) into one shard folder; their index entries."""
    folder.mkdir(parents=True, exist_ok=True)
    mels, pitch, energy, tokens, spk = [], [], [], [], []
    index, frame, tok = [], 0, 0
    for it in items:
        feats = torch.load(cache_dir / it["feats"], map_location="cpu", weights_only=True)
        mel = feats["mel"].to(torch.float16).numpy()  # [n_mels, T]
        t, n = mel.shape[1], int(feats["tokens"].numel())
        mels.append(mel.T)
        pitch.append(feats["pitch"].float().numpy())
        energy.append(feats["energy"].float().numpy())
        tokens.append(feats["tokens"].numpy().astype(np.int32))
        spk.append(feats["spk_emb"].float().numpy())
        index.append({**it, "frame": frame, "frames": t, "token": tok, "tokens": n})
        frame, tok = frame + t, tok + n
    _save_npy(folder / "mel.npy", np.concatenate(mels).astype(np.float16))
    _save_npy(folder / "pitch.npy", np.concatenate(pitch).astype(np.float32))
    _save_npy(folder / "energy.npy", np.concatenate(energy).astype(np.float32))
    _save_npy(folder / "tokens.npy", np.concatenate(tokens).astype(np.int32))
    _save_npy(folder / "spk_emb.npy", np.stack(spk).astype(np.float32))
    return index


def write_manifest(cache_dir: Path, shard_names: list[str], indexes: list[list[dict]]) -> Path:
    items = []
    for s, index in enumerate(indexes):
        for slot, row in enumerate(index):
            items.append({**row, "shard": s, "slot": slot})
    manifest = {
        "format_version": FORMAT_VERSION,
        "items_sha256": items_digest(cache_dir),
        "shards": shard_names,
        "items": items,
    }
    path = Path(cache_dir) / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False)
    os.replace(tmp, path)
    return path


def build_shards(cache_dir: str | Path, shard_bytes: int = SHARD_BYTES, progress=None) -> int:
    """Pack a finished per-file cache into shards (in this process); the number of shards.

    The studio packs big corpora shard by shard on several cpu workers instead
    (studio.datasets.tasks), through the same write_shard and write_manifest.
    """
    cache = Path(cache_dir)
    meta = read_meta(cache)
    items = read_items(cache, "all")
    plan = plan_shards(items, shard_bytes, int(meta["audio"].get("n_mels", 80)))
    names, indexes = [], []
    for s, members in enumerate(plan):
        name = f"{s:05d}"
        indexes.append(write_shard(cache, cache / "shards" / name, [items[i] for i in members]))
        names.append(name)
        if progress:
            progress(s + 1, len(plan))
    write_manifest(cache, names, indexes)
    return len(plan)


class ShardedFeatureDataset(Dataset):
    """FeatureDataset's items from memory-mapped shards (same dict per item, same `items`).

    The arrays are opened lazily in the process that reads them and never pickled, so each
    DataLoader worker maps the files itself and the OS shares the pages between them.
    """

    def __init__(self, cache_dir: str | Path, split: str = "train", exclude_speakers=()):
        self.cache_dir = Path(cache_dir)
        self.meta = read_meta(cache_dir)
        manifest = json.loads((self.cache_dir / MANIFEST).read_text(encoding="utf-8"))
        excluded = set(exclude_speakers)
        self.shard_names = manifest["shards"]
        self.items = [
            it
            for it in manifest["items"]
            if (split == "all" or it["split"] == split) and it["speaker"] not in excluded
        ]
        self.split = split
        self.stats = self.meta["stats"]
        self.lengths = [it["n_frames"] for it in self.items]
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    @property
    def symbols(self) -> list[str]:
        return self.meta["symbols"]

    def shard_groups(self) -> list[int]:
        return [it["shard"] for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}}  # maps are per process

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        arrays = self._arrays.get(s)
        if arrays is None:
            folder = self.cache_dir / "shards" / self.shard_names[s]
            arrays = {
                name: np.load(folder / f"{name}.npy", mmap_mode="r")
                for name in ("mel", "pitch", "energy", "tokens", "spk_emb")
            }
            self._arrays[s] = arrays
        return arrays

    def __getitem__(self, index: int) -> dict:
        it = self.items[index]
        a = self._shard(it["shard"])
        f0, f1 = it["frame"], it["frame"] + it["frames"]
        t0, t1 = it["token"], it["token"] + it["tokens"]
        # np.array copies out of the map: the batch must not pin the file's pages.
        mel = torch.from_numpy(np.array(a["mel"][f0:f1].T))
        pitch = torch.from_numpy(np.array(a["pitch"][f0:f1]))
        voiced = pitch > 0
        stats = self.stats
        pitch = torch.where(voiced, (pitch - stats["pitch_mean"]) / stats["pitch_std"], pitch)
        energy = torch.from_numpy(np.array(a["energy"][f0:f1]))
        return {
            "id": it["id"],
            "speaker": it["speaker"],
            "text": it["text"],
            "tokens": torch.from_numpy(np.array(a["tokens"][t0:t1])).long(),
            "mel": mel,
            "pitch": pitch,
            "energy": (energy - stats["energy_mean"]) / stats["energy_std"],
            "spk_emb": torch.from_numpy(np.array(a["spk_emb"][it["slot"]])),
        }


def open_features(
    cache_dir: str | Path, split: str = "train", preload: bool = False, exclude_speakers=()
):
    """The shard store when the cache has a current one, else the per-file reader."""
    if has_shards(cache_dir):
        return ShardedFeatureDataset(cache_dir, split, exclude_speakers=exclude_speakers)
    return FeatureDataset(cache_dir, split, preload=preload, exclude_speakers=exclude_speakers)
