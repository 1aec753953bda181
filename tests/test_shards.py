"""The sharded feature store: packs a per-file cache into memory-mapped shards that read back
the same items, falls back to the per-file reader when stale, buckets within shards, and feeds
the trainer through persistent loader workers."""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.fixtures_audio import feature_cache, write_corpus
from training.data import BucketBatchSampler, FeatureDataset
from training.shards import (
    ShardedFeatureDataset,
    build_shards,
    has_shards,
    open_features,
    plan_shards,
)


@pytest.fixture
def cache(tmp_path):
    """A private copy of the session cache: shards must not change what other tests read."""
    dst = tmp_path / "cache"
    shutil.copytree(feature_cache(), dst)
    return dst


def test_shards_read_back_the_same_items_as_the_files(cache):
    assert not has_shards(cache)
    n = build_shards(cache, shard_bytes=60_000)  # a few utterances per shard
    assert n >= 3 and has_shards(cache)
    for split in ("train", "val"):
        files = FeatureDataset(cache, split)
        shards = open_features(cache, split)
        assert isinstance(shards, ShardedFeatureDataset)
        assert sorted(it["id"] for it in shards.items) == sorted(it["id"] for it in files.items)
        by_id = {files.items[i]["id"]: files[i] for i in range(len(files))}
        for i in range(len(shards)):
            got = shards[i]
            want = by_id[got["id"]]
            for key in ("tokens", "mel", "pitch", "energy", "spk_emb"):
                assert got[key].dtype == want[key].dtype, key
                assert torch.equal(got[key], want[key]), (got["id"], key)
            assert (got["speaker"], got["text"]) == (want["speaker"], want["text"])


def test_a_remade_cache_falls_back_to_its_files(cache):
    build_shards(cache, shard_bytes=60_000)
    items = cache / "items.jsonl"
    items.write_text(items.read_text().splitlines()[0] + "\n")  # preprocessed again, smaller
    assert not has_shards(cache)
    dataset = open_features(cache, "all")
    assert isinstance(dataset, FeatureDataset) and len(dataset) == 1


def test_every_shard_is_a_fair_sample_and_sorted_inside():
    items = [
        {"id": str(i), "split": "train", "n_frames": 50 + (i * 37) % 400, "n_tokens": 20}
        for i in range(400)
    ]
    plan = plan_shards(items, shard_bytes=40 * 200 * 170)
    assert len(plan) > 4 and sorted(i for s in plan for i in s) == list(range(400))
    for members in plan:
        lengths = [items[i]["n_frames"] for i in members]
        assert lengths == sorted(lengths)
        assert max(lengths) - min(lengths) > 200  # not one length band per shard


def test_batches_stay_inside_a_shard_and_cover_the_epoch_once():
    groups = [i % 5 for i in range(103)]
    lengths = [(i * 7) % 50 + 10 for i in range(103)]
    sampler = BucketBatchSampler(lengths, 4, seed=1, groups=groups, pool_batches=3)
    batches = sampler.batches(0)
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert Counter(i for b in batches for i in b) == Counter(range(103))
    assert len(sampler) == len(batches)
    assert sampler.batches(0) == batches and sampler.batches(1) != batches
    # Shards are walked one after another: a shard's batches are contiguous.
    order = [groups[b[0]] for b in batches]
    assert sum(1 for a, b in itertools.pairwise(order) if a != b) == 4
    halves = [
        BucketBatchSampler(
            lengths, 4, seed=1, groups=groups, pool_batches=3, num_replicas=2, rank=r
        ).batches(0)
        for r in (0, 1)
    ]
    assert not {tuple(b) for b in halves[0]} & {tuple(b) for b in halves[1]}


def test_trainer_reads_shards_through_persistent_workers(cache, tmp_path):
    from training.config import preset
    from training.trainer import Trainer

    build_shards(cache, shard_bytes=60_000)
    cfg = preset("tiny", "enhanced")
    cfg.steps, cfg.batch_size, cfg.device, cfg.num_workers = 20, 4, "cpu", 1
    cfg.eval_every = cfg.checkpoint_every = 100
    trainer = Trainer(cfg, cache, tmp_path / "run")
    assert isinstance(trainer.train_set.dataset, ShardedFeatureDataset)
    assert trainer.sampler.groups is not None
    loaders = set()
    for _ in range(len(trainer.sampler.batches(0)) + 1):  # into the second epoch
        metrics = trainer.train_step()
        loaders.add(id(trainer._persistent))
        assert torch.isfinite(torch.tensor(metrics["loss/total"]))
    assert trainer.epoch >= 1 and len(loaders) == 1  # one loader, its workers kept


# --------------------------------------------------------------------------- preprocessing in parts


def test_parts_cover_the_corpus_once(tmp_path):
    from test_datasets_tasks import make_corpus

    from training.corpus import read_corpus
    from training.preprocess import preprocess_corpus

    items, _ = read_corpus(make_corpus(tmp_path / "corpus", per_speaker=3))
    out = tmp_path / "cache"
    seen = []
    for k in range(3):
        part = preprocess_corpus(items, out, lang="en", part=(k, 3), quality=False)
        assert part.total == 2 and not (out / "meta.json").exists()  # features only
        seen += sorted(p.name for p in (out / "feats").glob("*.pt") if p.name not in seen)
    assert len(seen) == len(set(seen)) == 6
    whole = preprocess_corpus(items, out, lang="en", quality=False)
    assert whole.reused == whole.kept == 6 and (out / "meta.json").exists()
    with pytest.raises(ValueError, match="part 3 of 3"):
        preprocess_corpus(items, out, lang="en", part=(3, 3))


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_large_corpus_is_preprocessed_in_parts_by_the_cpu_workers(
    user, tmp_path, settings, monkeypatch, start_worker
):
    from test_datasets_tasks import folder_dataset

    from studio.datasets import tasks
    from studio.datasets.parts import Board
    from studio.models import Dataset
    from tests.conftest import wait_until

    root = tmp_path / "media"
    settings.STUDIO_DATASETS_DIR = root / "datasets"
    monkeypatch.setenv("STUDIO_MEDIA_ROOT", str(root))
    settings.STUDIO_DATASET_ROOTS = [tmp_path.resolve()]
    monkeypatch.setenv("STUDIO_DATASET_ROOTS", str(tmp_path.resolve()))
    monkeypatch.setenv("STUDIO_PREPROCESS_WORKERS", "1")
    monkeypatch.setenv("STUDIO_PREPROCESS_PART_ITEMS", "2")  # 6 utterances: 3 parts
    for _ in range(2):
        start_worker(queues="cpu")
    # The session cache's clips: ones the quality gate keeps.
    corpus = tmp_path / "corpus"
    lines = ["audio_file|text|speaker_name"]
    lines += [f"wavs/{it.audio_path.name}|{it.text}|{it.speaker}" for it in write_corpus(corpus, 6)]
    (corpus / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = folder_dataset(user, corpus)
    tasks.queue_import(dataset)

    def final():
        d = Dataset.objects.get(pk=dataset.pk)
        return d if d.status in (Dataset.Status.READY, Dataset.Status.FAILED) else None

    dataset = wait_until(final, 300, message="preprocessing")
    assert dataset.status == Dataset.Status.READY, dataset.status_message
    assert dataset.n_utterances == 6 and dataset.progress == 1.0
    board = Board(dataset.pk, dataset.attempts)
    assert board.done() == {0, 1, 2}  # every part done, each once
    assert board.items_done() == 6
    assert len(list(Path(dataset.cache_dir, "feats").glob("*.pt"))) == 6
