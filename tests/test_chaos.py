"""Runs under faults, each through a real Celery worker on real Redis: a worker whose claim is
taken, a run that kills its worker every time, an out-of-memory error in a step, and a Redis
restart in the middle of a run.

The faults that must happen inside the training process go in through tests/chaos_app.py
(the trainer's `train_step` seam, patched before the pool forks); the rest is the real worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.db.models import F
from django.db.models.functions import Now

from studio import live
from studio.models import TRAIN_QUEUE, TRAIN_TASK, MetricPoint, Run, RunEvent
from studio.runtime import redis_server_binary, wait_for_redis
from tests.conftest import wait_until
from tests.fixtures_runs import tiny_run
from tests.test_runs_tasks import assert_no_duplicates, loss_steps, status_of

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CHAOS_APP = "tests.chaos_app"


def metric_rows(run: Run) -> int:
    return MetricPoint.objects.filter(run=run).count()


def test_a_worker_whose_claim_was_taken_stops_and_writes_nothing_after(user, start_worker):
    worker = start_worker("gpu")
    run = tiny_run(user, steps=3000, checkpoint_every=3000, eval_every=3000)
    run.enqueue()
    wait_until(lambda: len(loss_steps(run)) >= 3, 120, message="training")
    # Another worker took the run over (this one was thought dead while it was only slow).
    Run.objects.filter(pk=run.pk).update(
        worker="celery@elsewhere:1", attempts=F("attempts") + 1, heartbeat=Now()
    )
    rows, events = metric_rows(run), RunEvent.objects.filter(run=run).count()
    taken = Run.objects.get(pk=run.pk)
    wait_until(lambda: "'claim lost'" in worker.log(), 60, message="the worker to stop")
    log = (Path(taken.out_dir) / "worker.log").read_text()
    assert f"run {run.pk}: stopped, run {run.pk} is no longer held" in log
    after = Run.objects.get(pk=run.pk)
    assert (after.status, after.worker, after.attempts) == ("running", "celery@elsewhere:1", 2)
    assert after.current_step == taken.current_step and after.last_loss == taken.last_loss
    assert metric_rows(run) == rows and RunEvent.objects.filter(run=run).count() == events
    assert not run.checkpoints.exists()
    assert max(loss_steps(run)) < 3000


def test_a_run_that_kills_its_worker_every_time_fails_with_the_reason(user, start_worker):
    start_worker("gpu", app=CHAOS_APP, env={"CHAOS_KILL_AT_STEP": "3", "STUDIO_MAX_ATTEMPTS": "3"})
    run = tiny_run(user, steps=12, checkpoint_every=12, eval_every=12)
    run.enqueue()
    wait_until(lambda: status_of(run) in ("failed", "succeeded"), 150, message="the give-up")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error.startswith("gave up after 3 attempts in a row that ended with the worker gone")
    assert run.attempts == 3 and run.retries == 3  # redelivered twice, the third refused
    lost = RunEvent.objects.filter(run=run, kind="interrupted").count()
    assert lost == 3 and set(loss_steps(run)) <= {1, 2}  # each loss noticed, the last refused


@pytest.mark.slow
def test_kills_between_new_checkpoints_do_not_use_up_the_attempts(user, start_worker):
    """The cap is for a run that dies again and again at the same place: one that wrote a new
    checkpoint since its last death gets its full STUDIO_MAX_ATTEMPTS again."""
    start_worker("gpu", env={"STUDIO_MAX_ATTEMPTS": "2"})
    run = tiny_run(user, steps=40, checkpoint_every=5, eval_every=40)
    run.enqueue()
    kills = []
    for at in (8, 18, 28):  # each a few steps past a checkpoint the previous attempt wrote

        def reached(at=at):
            row = Run.objects.get(pk=run.pk)
            return row.status == "running" and row.current_step >= at and row

        held = wait_until(reached, 180, interval=0.05, message=f"step {at}")
        os.kill(int(held.worker.rpartition(":")[2]), signal.SIGKILL)
        kills.append(held.current_step)
        wait_until(
            lambda a=held.attempts: Run.objects.get(pk=run.pk).attempts > a,
            120,
            message="the redelivery",
        )
    wait_until(lambda: status_of(run) in ("failed", "succeeded"), 180, message="the run")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, (run.error, kills)
    assert run.attempts == 4 and loss_steps(run) == list(range(1, 41))
    assert_no_duplicates(run)


def test_an_out_of_memory_step_resumes_with_half_the_micro_batch(user, start_worker):
    start_worker("gpu", app=CHAOS_APP, env={"CHAOS_OOM_AT_STEP": "6"})
    run = tiny_run(user, steps=12, checkpoint_every=4, eval_every=12)
    assert run.config_snapshot["batch_size"] == 4
    run.enqueue()
    wait_until(lambda: status_of(run) in ("failed", "succeeded"), 180, message="the run")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, run.error
    oom = RunEvent.objects.get(run=run, kind="oom")
    assert oom.message.startswith("out of memory at step 6: resumed from step 4 with micro-batch")
    assert "micro-batch 2 x 2 accumulation (was 4 x 1)" in oom.message
    # Later attempts start with what fitted.
    assert run.config_snapshot["batch_size"] == 2 and run.config_snapshot["grad_accum_steps"] == 2
    assert run.attempts == 1 and loss_steps(run) == list(range(1, 13))
    assert_no_duplicates(run)


# --------------------------------------------------------------------------- Redis restarts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test alone, on a TCP port, its append-only file fsynced on every
    write, so a SIGKILL and a start on the same folder lose nothing (as the embedded one)."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.folder), "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_redis(self.url), "the private redis did not start"
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.kill()


def live_steps(url: str, group: str, timeout: float) -> list[int]:
    """The steps of the first live message with points that the run's group sends to a new
    listener on `url` within `timeout` seconds."""
    from channels_redis.core import RedisChannelLayer

    async def listen() -> list[int]:
        import asyncio

        import redis.exceptions

        layer = RedisChannelLayer(hosts=[url])
        channel = await layer.new_channel()
        try:
            async with asyncio.timeout(timeout):
                await layer.group_add(group, channel)
                while True:
                    try:
                        message = await layer.receive(channel)
                    except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError):
                        # A loaded machine can starve the private Redis past the client's
                        # read timeout; the listener asks again, as a page's socket would.
                        continue
                    steps = [p["step"] for p in message.get("data", {}).get("points", [])]
                    if steps:
                        return steps
        finally:
            await layer.group_discard(group, channel)
            await layer.flush()

    return async_to_sync(listen)()


@pytest.mark.slow
def test_a_redis_restart_mid_run_loses_nothing(user, start_worker, private_redis):
    from celery import Celery

    steps = 200
    start_worker("gpu", env={"REDIS_URL": private_redis.url})
    run = tiny_run(user, steps=steps, checkpoint_every=steps, eval_every=steps)
    # Sent through the private broker, the way the studio would with REDIS_URL pointing there.
    # Not the current app: the studio's own enqueues in later tests must not go to this broker.
    sender = Celery(broker=private_redis.url, set_as_current=False)
    sender.send_task(TRAIN_TASK, (run.pk,), queue=TRAIN_QUEUE)
    sender.close()
    group = live.run_group(run.pk)
    assert live_steps(private_redis.url, group, 120)  # live before the restart

    private_redis.kill()
    down_at = Run.objects.get(pk=run.pk).current_step
    # Training goes on, and its rows reach the database, while Redis is away.
    wait_until(lambda: Run.objects.get(pk=run.pk).current_step >= down_at + 20, 60, message="steps")
    private_redis.start()
    back_at = Run.objects.get(pk=run.pk).current_step
    assert back_at < steps, "the run finished before Redis came back: make it longer"
    assert min(live_steps(private_redis.url, group, 30)) > down_at  # live again
    wait_until(lambda: status_of(run) in ("failed", "succeeded"), 240, message="the run")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.attempts == 1 and loss_steps(run) == list(range(1, steps + 1))
    assert_no_duplicates(run)
