"""The Celery app: a `gpu` queue for training and a `cpu` queue for data work.

Tasks are acknowledged late and rejected when their worker dies, so a killed worker's run goes
back to the broker instead of vanishing; one task at a time per worker process (prefetch 1)
keeps a long training from holding short jobs hostage.
"""

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")

app = Celery("studio")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(
    task_queues=(Queue("gpu"), Queue("cpu")),
    task_default_queue="cpu",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    # A training task can run for days; the Redis visibility timeout must outlast the longest
    # run or the broker hands the same run to a second worker.
    broker_transport_options={"visibility_timeout": 7 * 24 * 3600},
    worker_hijack_root_logger=False,
)
# Each area keeps its tasks in its own tasks.py, named "<area>.<verb>".
app.autodiscover_tasks(["studio.datasets", "studio.runs"], related_name="tasks")
