"""Celery tasks of the datasets area, on the `cpu` queue.

Each task is idempotent: it looks at the dataset's status and does only the step that is
still due, so a task delivered twice, or queued again after its worker died, does no harm.
A worker that starts queues again any dataset whose previous worker stopped mid-step
(`studio.datasets.resume_stale`); preprocessing then keeps every finished feature file.

Feature extraction uses several processes only where the task may start them: Celery's
prefork pool runs tasks in daemonic processes, which may not have children (a known Celery
limitation), so there it runs in one. Run the cpu worker with `--pool solo` (or threads) to
use STUDIO_PREPROCESS_WORKERS processes.
"""

from __future__ import annotations

import logging

from celery import signals

from studio import datasets
from studio.celery import app

log = logging.getLogger(__name__)


# Data work goes to the `cpu` queue, so an import never waits behind a training run.
QUEUE = "cpu"


@app.task(name="datasets.import")
def import_dataset_task(dataset_id: int, preprocess: bool = True) -> str:
    dataset = datasets.import_dataset(dataset_id)
    if dataset is None:
        return "skipped"
    if preprocess and dataset.status == dataset.Status.IMPORTED:
        preprocess_dataset_task.apply_async((dataset_id,), queue=QUEUE)
    return dataset.status


@app.task(name="datasets.preprocess")
def preprocess_dataset_task(dataset_id: int) -> str:
    dataset = datasets.preprocess_dataset(dataset_id)
    return dataset.status if dataset is not None else "skipped"


@signals.worker_ready.connect
def resume_stale_datasets(sender=None, **kwargs) -> None:
    """A worker that starts picks up the datasets a dead worker left half done."""
    try:
        resumed = datasets.resume_stale()
    except Exception:  # the worker must start even when the database is briefly unavailable
        log.exception("could not look for interrupted datasets")
        return
    if resumed:
        log.info("resumed interrupted datasets: %s", resumed)
