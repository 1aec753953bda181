"""Celery tasks of the datasets area, on the `cpu` queue, and everything that queues them.

    datasets.import       read the metadata, probe every file, store the rows
    datasets.preprocess   decode, check and cache features

Each task is idempotent and claims the dataset first (`Dataset.claim`): it does only the step
that is still due, and nothing while a live worker holds the dataset, so a task delivered twice,
or queued again after its worker died, does no harm. A step whose worker keeps vanishing (killed
for memory) is given up after STUDIO_MAX_ATTEMPTS attempts with the reason. A worker that starts
queues again any dataset whose worker is gone (`resume_stale`); preprocessing then keeps every
finished feature file. A dataset whose task waits in the queue counts as busy.

Feature extraction uses several processes only where the task may start them: Celery's
prefork pool runs tasks in daemonic processes, which may not have children (a known Celery
limitation), so there it runs in one. Run the cpu worker with `--pool solo` (or threads) to
use STUDIO_PREPROCESS_WORKERS processes.
"""

from __future__ import annotations

import logging
import socket

from celery import signals
from django.db import transaction
from django.db.models.functions import Now

from studio import workers
from studio.celery import app
from studio.datasets import importing
from studio.datasets import parts as _parts  # noqa: F401  (registers datasets.preprocess_part)
from studio.models import Dataset

log = logging.getLogger(__name__)

# Data work goes to the `cpu` queue, so an import never waits behind a training run.
QUEUE = "cpu"


@app.task(bind=True, name="datasets.import")
def import_dataset(self, dataset_id: int, preprocess: bool = True) -> str:
    dataset = importing.import_dataset(dataset_id, workers.worker_ident(self.request.hostname))
    if dataset is None:
        return "skipped"
    if preprocess and dataset.status == dataset.Status.IMPORTED:
        _send(dataset, preprocess_dataset, (dataset_id,))
    return dataset.status


@app.task(bind=True, name="datasets.preprocess")
def preprocess_dataset(self, dataset_id: int) -> str:
    ident = workers.worker_ident(self.request.hostname)
    dataset = importing.preprocess_dataset(dataset_id, worker=ident)
    return dataset.status if dataset is not None else "skipped"


@signals.worker_ready.connect
def resume_stale_datasets(sender=None, **kwargs) -> None:
    """A worker that starts picks up the datasets a dead worker left half done."""
    host = workers.host_of(getattr(sender, "hostname", None) or socket.gethostname())
    try:
        resumed = resume_stale(host)
    except Exception:  # the worker must start even when the database is briefly unavailable
        log.exception("could not look for interrupted datasets")
        return
    if resumed:
        log.info("resumed interrupted datasets: %s", resumed)


def _send(dataset: Dataset, task, args: tuple) -> None:
    """Queue `task` now, the dataset marked busy until a worker takes it; a broker that cannot
    be reached leaves a reason and a dataset that can be retried, never one queued forever."""
    dataset.mark_queued()
    try:
        task.apply_async(args, queue=QUEUE)
    except Exception as exc:  # kombu/redis raise many kinds; all mean "not queued"
        reason = (
            f"Could not reach the task queue ({type(exc).__name__}: {exc}); "
            "press Retry when the queue is back."
        )
        log.error("dataset %s: %s", dataset.pk, reason)
        # A failed import is redone from scratch on retry; an imported dataset keeps its rows
        # (an upload's archive is gone once unpacked) and retry queues its preprocessing.
        status = Dataset.Status.FAILED if dataset.status == Dataset.Status.NEW else dataset.status
        Dataset.objects.filter(pk=dataset.pk).update(
            status=status, status_message=reason, queued_at=None
        )
        dataset.status, dataset.status_message, dataset.queued_at = status, reason, None


def queue_import(dataset: Dataset, preprocess: bool = True) -> None:
    """Send the import to the cpu queue once the transaction that created the row commits."""
    dataset.mark_queued()
    transaction.on_commit(lambda: _send(dataset, import_dataset, (dataset.pk, preprocess)))


def queue_preprocess(dataset: Dataset) -> None:
    dataset.mark_queued()
    transaction.on_commit(lambda: _send(dataset, preprocess_dataset, (dataset.pk,)))


def _host() -> str:
    return workers.host_of(socket.gethostname())


def is_stale(dataset: Dataset) -> bool:
    """Busy, but its worker is gone: judged by the heartbeat's age on the database's clock (and
    on the worker's own machine by its pid), never by this machine's clock."""
    return dataset.is_stale(_host())


def can_retry(dataset: Dataset) -> bool:
    """Retry is offered for a failed dataset, a step whose worker is gone, and an imported
    dataset whose preprocessing could not be queued."""
    if dataset.status == Dataset.Status.FAILED:
        return True
    if dataset.status == Dataset.Status.IMPORTED and dataset.queued_at is None:
        return True
    return is_stale(dataset)


def retry(dataset: Dataset) -> str:
    """Start the step that failed or lost its worker again; finished work is kept.

    Returns what was queued ("import" or "preprocess"), or "" when nothing needs doing (a
    dataset that is ready, new, waiting in the queue, or held by a live worker).
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


def resume_stale(host: str | None = None) -> list[int]:
    """Queue again every busy dataset whose worker is gone; called when a worker starts.

    The dead attempt's claim is released (worker cleared) in the same conditional write that
    marks the dataset queued, so a second worker starting at the same time skips it, and the
    old attempt, should it only have been slow, writes nothing more.
    """
    host = host or _host()
    resumed = []
    for dataset in Dataset.objects.filter(status__in=Dataset.WORKING, queued_at__isnull=True):
        if not dataset.is_stale(host):
            continue
        with transaction.atomic():
            released = Dataset.objects.filter(
                pk=dataset.pk,
                status=dataset.status,
                worker=dataset.worker,
                attempts=dataset.attempts,
                queued_at__isnull=True,
            ).update(worker="", queued_at=Now(), status_message="Resumed after the worker stopped.")
            if not released:
                continue
            if dataset.status == Dataset.Status.IMPORTING:
                queue_import(dataset)
            else:
                queue_preprocess(dataset)
        resumed.append(dataset.pk)
    return resumed
