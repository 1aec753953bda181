"""Who runs what: worker identities, liveness, heartbeats and the per-job log.

Shared by every area whose Celery tasks outlive a request (training runs, checkpoint scores,
dataset imports), so there is one answer to "is the process that held this job still alive?".
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import connections
from django.db.models import QuerySet
from django.db.models.functions import Now

logger = logging.getLogger("studio.workers")


def worker_ident(nodename: str | None) -> str:
    """`name@host:pid` of the process that trains: enough to tell later whether it still lives."""
    return f"{nodename or 'worker@' + socket.gethostname()}:{os.getpid()}"


def host_of(nodename: str) -> str:
    return nodename.partition("@")[2] or nodename


def pid_alive(pid: int) -> bool:
    """A zombie counts as dead: a killed worker's children may never be reaped in a container."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(
    worker: str, heartbeat_age: float, host: str, stale_seconds: float | None = None
) -> bool:
    """Is the process `worker` (a worker_ident) certainly gone, its heartbeat this old (s)?

    A heartbeat older than `stale_seconds` (STUDIO_RUN_STALE_SECONDS unless the job's kind has
    its own) means gone anywhere. On this machine a dead pid says so at once; a live one does
    not prove the owner lives, because after a container restart the pid is commonly reused by
    an unrelated process.
    """
    if stale_seconds is None:
        stale_seconds = settings.STUDIO_RUN_STALE_SECONDS
    if heartbeat_age > stale_seconds:
        return True
    nodename, _, pid = worker.rpartition(":")
    if nodename and pid.isdigit() and host_of(nodename) == host:
        return not pid_alive(int(pid))
    return False


def heartbeat_age(row: QuerySet, fallback: str = "updated") -> float | None:
    """Seconds since the `heartbeat` of the one row in `row`, both ends read from the database's
    clock, so a web machine and a worker whose clocks disagree still agree on the age.

    A row that never had a heartbeat (written before heartbeats were kept) is as old as its
    `fallback` time column; None when the row is gone.
    """
    found = row.annotate(db_now=Now()).values("db_now", "heartbeat", fallback).first()
    if not found:
        return None
    since = found["heartbeat"] or found[fallback]
    return (found["db_now"] - since).total_seconds()


class RunLog:
    """Everything logged while the task trains goes to `<out_dir>/worker.log` as well."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "worker.log"
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        self.handler.setLevel(logging.INFO)

    def __enter__(self):
        root = logging.getLogger()
        self._old_level = root.level
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(self.handler)
        logging.captureWarnings(True)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self._old_level)
        self.handler.close()


class Heartbeat(threading.Thread):
    """Calls `beat` every STUDIO_RUN_HEARTBEAT_SECONDS while a job runs: the proof of life
    that owner_gone reads on other machines."""

    def __init__(self, name: str, beat: Callable[[], object]):
        super().__init__(name=f"heartbeat-{name}", daemon=True)
        self.beat = beat
        self.stopped = threading.Event()

    def run(self):
        try:
            while not self.stopped.wait(settings.STUDIO_RUN_HEARTBEAT_SECONDS):
                try:
                    self.beat()
                except Exception as exc:  # a busy database must not kill the job
                    logger.warning("%s not written: %s", self.name, exc)
        finally:
            connections.close_all()

    def stop(self):
        self.stopped.set()
        self.join(5)
