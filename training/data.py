"""Reading the feature cache: dataset, padding collate, length-bucketed batches, loader.

The cache is written once by `training.preprocess`; nothing here decodes audio, so the data
side of a training step is a few small `torch.load`s and a pad.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from training.audio import LOG_FLOOR
from training.augment import base_speaker

SPLITS = ("train", "val", "all")
MEL_PAD = math.log(LOG_FLOOR)  # padding frames look like silence to anything that peeks


def read_meta(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{cache_dir} is not a finished feature cache (no meta.json); "
            "run `python -m training preprocess` on the corpus first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def read_items(cache_dir: str | Path, split: str = "all") -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    lines = (Path(cache_dir) / "items.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    return [it for it in items if split == "all" or it["split"] == split]


class FeatureDataset(Dataset):
    """Utterances of one split; pitch and energy come out normalised with the cache's stats
    (unvoiced frames stay exactly 0, so the model can still tell them apart)."""

    def __init__(
        self,
        cache_dir: str | Path,
        split: str = "train",
        preload: bool = False,
        exclude_speakers: Sequence[str] = (),
    ):
        self.cache_dir = Path(cache_dir)
        self.meta = read_meta(cache_dir)
        # Held-out speakers leave here, before batching, so no split ever carries them; their
        # pitch-shifted copies (training.augment) leave with them.
        excluded = set(exclude_speakers)
        self.items = [
            it for it in read_items(cache_dir, split) if base_speaker(it["speaker"]) not in excluded
        ]
        self.split = split
        self.stats = self.meta["stats"]
        self.lengths = [it["n_frames"] for it in self.items]
        # Preloading trades memory (about 50 kB per second of audio) for zero disk reads.
        self._cache = [self._load(i) for i in range(len(self.items))] if preload else None

    @property
    def symbols(self) -> list[str]:
        return self.meta["symbols"]

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> dict:
        it = self.items[index]
        feats = torch.load(self.cache_dir / it["feats"], map_location="cpu", weights_only=True)
        pitch = feats["pitch"].float()
        voiced = pitch > 0
        pitch = torch.where(
            voiced, (pitch - self.stats["pitch_mean"]) / self.stats["pitch_std"], pitch
        )
        energy = (feats["energy"].float() - self.stats["energy_mean"]) / self.stats["energy_std"]
        return {
            "id": it["id"],
            "speaker": it["speaker"],
            "text": it["text"],
            "tokens": feats["tokens"].long(),
            "mel": feats["mel"],
            "pitch": pitch,
            "energy": energy,
            "spk_emb": feats["spk_emb"].float(),
        }

    def __getitem__(self, index: int) -> dict:
        return self._cache[index] if self._cache is not None else self._load(index)


def collate(batch: list[dict]) -> dict:
    """Pad a list of dataset items into one batch (lengths let the model build its masks)."""
    n = len(batch)
    token_lens = torch.tensor([b["tokens"].numel() for b in batch], dtype=torch.long)
    mel_lens = torch.tensor([b["mel"].shape[-1] for b in batch], dtype=torch.long)
    n_mels = batch[0]["mel"].shape[0]
    L, T = int(token_lens.max()), int(mel_lens.max())
    tokens = torch.zeros(n, L, dtype=torch.long)
    mels = torch.full((n, n_mels, T), MEL_PAD, dtype=torch.float32)
    pitch = torch.zeros(n, T)
    energy = torch.zeros(n, T)
    for i, b in enumerate(batch):
        tokens[i, : b["tokens"].numel()] = b["tokens"]
        t = b["mel"].shape[-1]
        mels[i, :, :t] = b["mel"].float()
        pitch[i, :t] = b["pitch"]
        energy[i, :t] = b["energy"]
    return {
        "tokens": tokens,
        "token_lens": token_lens,
        "mels": mels,
        "mel_lens": mel_lens,
        "pitch": pitch,
        "energy": energy,
        "spk_emb": torch.stack([b["spk_emb"] for b in batch]),
        "ids": [b["id"] for b in batch],
        "speakers": [b["speaker"] for b in batch],
        "texts": [b["text"] for b in batch],
    }


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length, so little of each batch is padding.

    Shuffled: indices are shuffled, cut into pools of `pool_batches` batches, each pool is
    sorted by length and cut into batches, and the batch order is shuffled. All randomness
    comes from `seed + epoch`, so a given (seed, epoch) always yields the same batches: that
    is what makes resume exact. The epoch advances after each full pass; `set_epoch` sets it.
    `num_replicas`/`rank` give each process of a multi-GPU run its own share of the batches.
    `groups` (the shard of each item, training.shards) keeps every pool inside one shard and
    walks the shards one after another in a shuffled order, so reads stay within a mapped file.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pool_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        groups: Sequence[int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.groups = list(groups) if groups is not None else None
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pool_batches = pool_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: (self.lengths[i], i))
            batches = self._cut(order)
        elif self.groups is not None:
            batches = self._grouped(torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
            pool = self.batch_size * self.pool_batches
            batches = []
            for start in range(0, n, pool):
                chunk = sorted(order[start : start + pool], key=lambda i: self.lengths[i])
                batches += self._cut(chunk)
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        if self.num_replicas > 1:
            usable = len(batches) - len(batches) % self.num_replicas
            batches = batches[self.rank : usable : self.num_replicas]
        return batches

    def _grouped(self, g: torch.Generator) -> list[list[int]]:
        members: dict[int, list[int]] = {}
        for i, group in enumerate(self.groups):
            members.setdefault(group, []).append(i)
        keys = sorted(members)
        batches = []
        pool = self.batch_size * self.pool_batches
        for k in torch.randperm(len(keys), generator=g).tolist():
            items = members[keys[k]]
            order = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
            local = []
            for start in range(0, len(order), pool):
                chunk = sorted(order[start : start + pool], key=lambda i: self.lengths[i])
                local += self._cut(chunk)
            batches += [local[j] for j in torch.randperm(len(local), generator=g).tolist()]
        return batches

    def _cut(self, order: list[int]) -> list[list[int]]:
        out = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        # Pool sizes do not depend on the shuffle, so neither does the number of batches.
        n = len(self.lengths)
        pool = n if not self.shuffle else self.batch_size * self.pool_batches
        sizes = [n]
        if self.shuffle and self.groups is not None:
            sizes = list(Counter(self.groups).values())
        total = 0
        for group_size in sizes:
            for start in range(0, group_size, max(1, pool)):
                size = min(pool, group_size - start)
                total += size // self.batch_size if self.drop_last else -(-size // self.batch_size)
        return total // self.num_replicas if self.num_replicas > 1 else total
