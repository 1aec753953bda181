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


def owner_gone(worker: str, heartbeat_age: float, host: str) -> bool:
    """Is the process `worker` (a worker_ident) certainly gone, its heartbeat this old (s)?

    A heartbeat older than STUDIO_RUN_STALE_SECONDS means gone anywhere. On this machine a
    dead pid says so at once; a live one does not prove the owner lives, because after a
    container restart the pid is commonly reused by an unrelated process.
    """
    if heartbeat_age > settings.STUDIO_RUN_STALE_SECONDS:
        return True
    nodename, _, pid = worker.rpartition(":")
    if nodename and pid.isdigit() and host_of(nodename) == host:
        return not pid_alive(int(pid))
    return False


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
