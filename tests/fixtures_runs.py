"""Rows for runs tests: a ready dataset on the session's feature cache and tiny runs on it."""

from __future__ import annotations

from studio.models import Dataset, Run, TrainingConfig
from tests.fixtures_audio import feature_cache
from training.config import TrainConfig

TINY = dict(
    model_size="tiny",
    optimization_level="enhanced",
    batch_size=4,
    steps=24,
    learning_rate=2e-3,
    lr_warmup_steps=4,
    eval_every=12,
    checkpoint_every=8,
)


def ready_dataset(owner, name: str = "synth") -> Dataset:
    return Dataset.objects.create(
        owner=owner,
        name=name,
        status=Dataset.Status.READY,
        cache_dir=str(feature_cache()),
        n_utterances=12,
        n_speakers=2,
    )


def tiny_config(owner, **fields) -> TrainingConfig:
    values = dict(TINY, **fields)
    return TrainingConfig.objects.create(owner=owner, name="tiny test", **values)


def tiny_run(owner, dataset=None, config=None, **snapshot) -> Run:
    """A queued tiny run whose snapshot is the config plus `snapshot` overrides (CPU, 1 thread
    of data loading), the way RunForm freezes one."""
    dataset = dataset or ready_dataset(owner)
    config = config or tiny_config(owner)
    values = TrainConfig.from_flat(dict(config.values(), device="cpu", **snapshot)).flat()
    run = Run.objects.create(
        owner=owner,
        dataset=dataset,
        config=config,
        config_snapshot=values,
        total_steps=values["steps"],
    )
    run.assign_out_dir()
    return run
