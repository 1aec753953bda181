"""Celery discovers tasks here; each area keeps its tasks in its own module."""

from studio import (
    tasks_datasets,  # noqa: F401  (registers datasets.import / datasets.preprocess)
    tasks_scores,  # noqa: F401  (registers studio.score_checkpoint)
    tasks_training,  # noqa: F401  (registers studio.train_run, the worker-start sweep)
)
