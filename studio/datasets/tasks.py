"""Celery tasks of the datasets area, on the `cpu` queue, and everything that queues them.

    datasets.import       read the metadata, probe every file, store the rows
    datasets.preprocess   decode, check and cache features

Each task is idempotent: it looks at the dataset's status and does only the step that is
still due, so a task delivered twice, or queued again after its worker died, does no harm.
A worker that starts queues again any dataset whose previous worker stopped mid-step
(`resume_stale`); preprocessing then keeps every finished feature file.

Feature extraction uses several processes only where the task may start them: Celery's
prefork pool runs tasks in daemonic processes, which may not have children (a known Celery
limitation), so there it runs in one. Run the cpu worker with `--pool solo` (or threads) to
use STUDIO_PREPROCESS_WORKERS processes.
"""

from __future__ import annotations

import logging

from celery import signals
from django.db import transaction
from django.utils import timezone

from studio.celery import app
from studio.datasets import importing
from studio.models import Dataset

log = logging.getLogger(__name__)

# Data work goes to the `cpu` queue, so an import never waits behind a training run.
QUEUE = "cpu"


@app.task(name="datasets.import")
def import_dataset(dataset_id: int, preprocess: bool = True) -> str:
    dataset = importing.import_dataset(dataset_id)
    if dataset is None:
        return "skipped"
    if preprocess and dataset.status == dataset.Status.IMPORTED:
        preprocess_dataset.apply_async((dataset_id,), queue=QUEUE)
    return dataset.status


@app.task(name="datasets.preprocess")
def preprocess_dataset(dataset_id: int) -> str:
    dataset = importing.preprocess_dataset(dataset_id)
    return dataset.status if dataset is not None else "skipped"


@signals.worker_ready.connect
def resume_stale_datasets(sender=None, **kwargs) -> None:
    """A worker that starts picks up the datasets a dead worker left half done."""
    try:
        resumed = resume_stale()
    except Exception:  # the worker must start even when the database is briefly unavailable
        log.exception("could not look for interrupted datasets")
        return
    if resumed:
        log.info("resumed interrupted datasets: %s", resumed)


def queue_import(dataset: Dataset, preprocess: bool = True) -> None:
    """Send the import to the cpu queue once the transaction that created the row commits."""
    pk = dataset.pk
    transaction.on_commit(lambda: import_dataset.apply_async((pk, preprocess), queue=QUEUE))


def queue_preprocess(dataset: Dataset) -> None:
    pk = dataset.pk
    transaction.on_commit(lambda: preprocess_dataset.apply_async((pk,), queue=QUEUE))


def is_stale(dataset: Dataset) -> bool:
    return dataset.is_busy and dataset.updated < timezone.now() - importing.stale_after()


def retry(dataset: Dataset) -> str:
    """Start the step that failed or lost its worker again; finished work is kept.

    Returns what was queued ("import" or "preprocess"), or "" when nothing needs doing.
    """
    if dataset.status in (Dataset.Status.NEW, Dataset.Status.READY):
        return ""
    if dataset.is_busy and not is_stale(dataset):
        return ""
    # The feature folder exists only once an import has finished and preprocessing began.
    preprocessing_began = importing.features_dir(dataset).is_dir()
    if dataset.status == Dataset.Status.PREPROCESSING or (
        dataset.status in (Dataset.Status.FAILED, Dataset.Status.IMPORTED) and preprocessing_began
    ):
        Dataset.objects.filter(pk=dataset.pk).update(
            status=Dataset.Status.IMPORTED, status_message="Preprocessing queued again."
        )
        queue_preprocess(dataset)
        return "preprocess"
    if dataset.status == Dataset.Status.IMPORTED:
        queue_preprocess(dataset)
        return "preprocess"
    if dataset.status == Dataset.Status.FAILED:
        # A failed import is cheap to redo from scratch, and the person may have fixed the files.
        dataset.utterances.all().delete()
        dataset.speakers.all().delete()
        importing.extraction_record(dataset).unlink(missing_ok=True)
    Dataset.objects.filter(pk=dataset.pk).update(
        status=Dataset.Status.NEW, status_message="Import queued again."
    )
    queue_import(dataset)
    return "import"


def resume_stale() -> list[int]:
    """Queue again every busy dataset whose worker stopped writing; called when a worker starts."""
    resumed = []
    cutoff = timezone.now() - importing.stale_after()
    busy = (Dataset.Status.IMPORTING, Dataset.Status.PREPROCESSING)
    for dataset in Dataset.objects.filter(status__in=busy, updated__lt=cutoff):
        with transaction.atomic():
            # Touch the row first so a second worker starting at the same time skips it.
            claimed = Dataset.objects.filter(pk=dataset.pk, updated=dataset.updated).update(
                updated=timezone.now(), status_message="Resumed after the worker stopped."
            )
            if not claimed:
                continue
            if dataset.status == Dataset.Status.IMPORTING:
                queue_import(dataset)
            else:
                queue_preprocess(dataset)
        resumed.append(dataset.pk)
    return resumed
