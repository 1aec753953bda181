"""The training task with a real Celery worker, real Redis and the real channel layer.

A `tiny` run on the session's synthetic corpus goes queued -> running -> succeeded, its
metrics reach the database and a WebSocket; a cancel stops it and a resume finishes it; a
worker killed with SIGKILL leaves it `interrupted` and a new worker resumes it from its last
checkpoint. Runs are a dozen or two steps so the module stays around a few minutes on a
shared 2-core machine.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db.models import Count

from studio.models import MetricPoint, Run, RunEvent
from studio.routing import websocket_urlpatterns
from studio.runs.tasks import train
from tests.conftest import wait_until
from tests.fixtures_runs import tiny_config, tiny_run

pytestmark = pytest.mark.django_db(transaction=True)

HOST = socket.gethostname()


def status_of(run: Run) -> str:
    return Run.objects.values_list("status", flat=True).get(pk=run.pk)


def loss_steps(run: Run) -> list[int]:
    return list(
        MetricPoint.objects.filter(run=run, name="loss/total")
        .order_by("step")
        .values_list("step", flat=True)
    )


def assert_no_duplicates(run: Run) -> None:
    dupes = (
        MetricPoint.objects.filter(run=run)
        .values("step", "name")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    assert not dupes.exists()


# --------------------------------------------------------------------------- through a worker


@pytest.mark.integration
async def test_tiny_run_goes_queued_running_succeeded_live(user, start_worker):
    run = await sync_to_async(tiny_run)(user, steps=12, checkpoint_every=4, eval_every=12)
    await sync_to_async(start_worker)("gpu")
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/runs/{run.pk}/")
    comm.scope["user"] = user
    assert (await comm.connect(timeout=5))[0]
    history = await comm.receive_json_from(timeout=5)
    assert history["run"]["status"] == "queued" and history["points"] == []

    await sync_to_async(run.enqueue)()
    statuses, live_steps, samples = [], [], []
    while "succeeded" not in statuses and "failed" not in statuses:
        msg = await comm.receive_json_from(timeout=180)
        live_steps += [p["step"] for p in msg.get("points", []) if "loss/total" in p["m"]]
        samples += msg.get("samples", [])
        if "status" in msg:
            statuses.append(msg["status"]["status"])
    await comm.disconnect()

    run = await sync_to_async(Run.objects.get)(pk=run.pk)
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert statuses[0] == "running" and statuses[-1] == "succeeded"
    assert live_steps == list(range(1, 13))  # every step reached the browser side, in order
    assert len(samples) >= 1 and samples[0]["audio_url"].endswith("audio.wav")

    def check_db():
        assert loss_steps(run) == list(range(1, 13))
        assert_no_duplicates(run)
        assert MetricPoint.objects.filter(run=run, name="val/mel").exists()
        assert run.current_step == 12 and run.last_loss is not None
        assert run.best_val_loss is not None and run.attempts == 1
        steps = sorted(run.checkpoints.values_list("step", flat=True))
        assert steps[-1] == 12 and all(Path(c.path).is_file() for c in run.checkpoints.all())
        assert run.checkpoints.filter(is_best=True).count() == 1
        sample = run.samples.first()
        assert sample.audio.read(4) == b"RIFF" and sample.mel_image.read(4) == b"\x89PNG"
        log = (Path(run.out_dir) / "worker.log").read_text()
        assert "attempt 1" in log and "succeeded at step 12" in log

    await sync_to_async(check_db)()


@pytest.mark.integration
def test_cancel_stops_the_run_and_resume_finishes_it(user, client, start_worker):
    start_worker("gpu")
    run = tiny_run(user, steps=400, checkpoint_every=400, eval_every=400)
    run.enqueue()
    wait_until(lambda: status_of(run) == "running" and loss_steps(run), 120, message="training")
    client.force_login(user)
    client.post(f"/runs/{run.pk}/cancel/")
    wait_until(lambda: status_of(run) == "cancelled", 60, message="the cancel")
    run.refresh_from_db()
    stopped_at = run.current_step
    assert 0 < stopped_at < 400
    # Stopping saves where it got to, so the resume loses nothing.
    assert run.checkpoints.filter(step=stopped_at).exists()

    client.post(f"/runs/{run.pk}/resume/", {"steps": stopped_at + 3})
    wait_until(lambda: status_of(run) in ("succeeded", "failed"), 180, message="the resume")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.attempts == 2 and run.current_step == stopped_at + 3
    assert loss_steps(run) == list(range(1, stopped_at + 4))
    assert_no_duplicates(run)


@pytest.mark.integration
def test_killed_worker_leaves_run_interrupted_and_a_new_one_resumes_it(user, start_worker):
    first = start_worker("gpu")
    run = tiny_run(user, steps=14, checkpoint_every=4, eval_every=100)
    run.enqueue()

    def past_a_checkpoint():
        run.refresh_from_db()
        ckpt = run.latest_checkpoint()
        return ckpt is not None and run.current_step >= ckpt.step + 1

    wait_until(past_a_checkpoint, 180, message="a checkpoint and a step after it")
    first.kill()
    run.refresh_from_db()
    killed_at = run.current_step
    assert run.status == Run.Status.RUNNING  # nobody has noticed yet
    wait_until(lambda: run.owner_gone(HOST), 15, message="the killed process to be gone")

    # Any worker starting on this machine notices. A cpu-only one cannot train it, so the
    # run stays visibly interrupted until a gpu worker comes.
    sweeper = start_worker("cpu")
    wait_until(lambda: status_of(run) == "interrupted", 60, message="the sweep")
    assert RunEvent.objects.filter(run=run, kind="interrupted").exists()
    sweeper.stop()

    start_worker("gpu")
    wait_until(lambda: status_of(run) in ("succeeded", "failed"), 240, message="the resumed run")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.attempts == 2 and run.current_step == 14
    assert loss_steps(run) == list(range(1, 15))
    assert_no_duplicates(run)
    log = (Path(run.out_dir) / "worker.log").read_text()
    resumed_from = int(log.split("resuming from step ")[1].split()[0])
    assert 4 <= resumed_from <= killed_at


# --------------------------------------------------------------------------- in this process


def test_worker_refuses_a_stored_config_outside_the_safe_ranges(user):
    run = tiny_run(user)
    # Written around every form and the admin, straight into the row.
    Run.objects.filter(pk=run.pk).update(
        config_snapshot=dict(run.config_snapshot, mel_loss_weight=40.0, learning_rate=0.5)
    )
    assert train(run.pk) == "failed"
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert "mel_loss_weight: 40 is outside the safe range 1-5" in run.error
    assert "learning_rate" in run.error
    assert not MetricPoint.objects.filter(run=run).exists()


def test_a_run_that_is_not_ready_fails_with_the_reason(user):
    run = tiny_run(user)
    run.dataset.status = "preprocessing"
    run.dataset.save()
    assert train(run.pk) == "failed"
    run.refresh_from_db()
    assert "not ready for training" in run.error


def test_claim_takes_a_run_once_and_never_from_a_live_worker(user, other_user):
    run = tiny_run(user)
    me = f"celery@{HOST}:{os.getpid()}"
    taken, how = Run.claim(run.pk, me, HOST)
    assert taken is not None and how == "start" and taken.attempts == 1
    # The same message again while this (live) process trains it: a duplicate, dropped, even
    # after a cancel request (the live worker answers that itself).
    assert Run.claim(run.pk, "other@" + HOST + ":1", HOST) == (None, f"duplicate: {me}")
    Run.objects.filter(pk=run.pk).update(cancel_requested=True)
    assert Run.claim(run.pk, "other@" + HOST + ":1", HOST) == (None, f"duplicate: {me}")
    assert status_of(run) == "running"
    Run.objects.filter(pk=run.pk).update(cancel_requested=False)
    # The process that held it is gone: the redelivered message resumes it.
    Run.objects.filter(pk=run.pk).update(worker=f"celery@{HOST}:999999999")
    taken, how = Run.claim(run.pk, me, HOST)
    assert how == "redelivered" and taken.attempts == 2
    assert RunEvent.objects.filter(run=run, kind="interrupted").exists()
    # Held on another machine with a fresh heartbeat: not taken (the task retries later).
    Run.objects.filter(pk=run.pk).update(worker="celery@elsewhere:1")
    assert Run.claim(run.pk, me, HOST)[1] == "busy elsewhere: celery@elsewhere:1"
    # Finished runs are never trained again, whatever the broker redelivers.
    Run.objects.filter(pk=run.pk).update(status=Run.Status.SUCCEEDED)
    assert Run.claim(run.pk, me, HOST) == (None, "already succeeded")
    assert train(run.pk) == "already succeeded"


def test_a_cancelled_queued_run_is_not_started(user):
    run = tiny_run(user, config=tiny_config(user))
    Run.objects.filter(pk=run.pk).update(cancel_requested=True)
    assert train(run.pk) == "cancelled before it started"
    assert status_of(run) == "cancelled"
