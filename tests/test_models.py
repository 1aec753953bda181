import pytest
from django.core.exceptions import ValidationError

from studio.models import Checkpoint, Dataset, MetricPoint, Run, TrainingConfig
from training.config import TrainConfig

pytestmark = pytest.mark.django_db


def make_run(owner, **kw):
    ds = Dataset.objects.create(
        owner=owner, name=f"{owner}-ds", status=Dataset.Status.READY, cache_dir="/x"
    )
    cfg = TrainingConfig.objects.create(owner=owner, name=f"{owner}-cfg")
    return Run.objects.create(
        owner=owner, dataset=ds, config=cfg, config_snapshot=cfg.values(), **kw
    )


def test_visibility_owner_sees_own_staff_sees_all(user, other_user, staff_user):
    mine, theirs = make_run(user), make_run(other_user)
    assert list(Run.objects.visible_to(user)) == [mine]
    assert list(Run.objects.visible_to(other_user)) == [theirs]
    assert set(Run.objects.visible_to(staff_user)) == {mine, theirs}
    assert mine.is_visible_to(user)
    assert not mine.is_visible_to(other_user) and mine.is_visible_to(staff_user)
    assert set(Dataset.objects.visible_to(user)) == {mine.dataset}
    assert set(TrainingConfig.objects.visible_to(other_user)) == {theirs.config}


def test_anonymous_sees_nothing(user):
    from django.contrib.auth.models import AnonymousUser

    make_run(user)
    assert not Run.objects.visible_to(AnonymousUser()).exists()
    assert not Checkpoint.objects.visible_to(AnonymousUser()).exists()


def test_config_round_trips_to_training_config(user):
    cfg = TrainingConfig.objects.create(
        owner=user, name="c", model_size="small", batch_size=24, mel_loss_weight=3.0
    )
    tc = cfg.to_train_config()
    assert isinstance(tc, TrainConfig)
    assert (tc.size, tc.batch_size, tc.loss.mel_loss_weight) == ("small", 24, 3.0)


def test_config_clean_refuses_old_mel_weight_with_range(user):
    cfg = TrainingConfig(owner=user, name="old", mel_loss_weight=35.0)
    with pytest.raises(ValidationError) as exc:
        cfg.full_clean()
    msg = str(exc.value.message_dict["mel_loss_weight"])
    assert "35" in msg and "1-5" in msg


def test_config_batch_warning(user):
    assert TrainingConfig(owner=user, model_size="tiny", batch_size=12).batch_warning is None
    assert "8-16" in TrainingConfig(owner=user, model_size="tiny", batch_size=64).batch_warning


def test_run_state_changes(user):
    run = make_run(user, total_steps=100)
    assert run.is_active and run.status == Run.Status.QUEUED
    run.mark_running("gpu@host")
    assert run.status == Run.Status.RUNNING and run.attempts == 1 and run.started
    run.mark_interrupted("worker lost")
    assert run.can_resume and run.error == "worker lost"
    run.mark_running("gpu@other")
    assert run.attempts == 2 and run.error == ""
    run.mark_finished(Run.Status.SUCCEEDED)
    assert run.finished and not run.is_active


def test_cancel_of_queued_run_is_immediate(user):
    run = make_run(user)
    run.request_cancel()
    assert run.cancel_requested and run.status == Run.Status.CANCELLED


def test_cancel_of_running_run_sets_flag_only(user):
    run = make_run(user)
    run.mark_running()
    run.request_cancel()
    assert run.cancel_requested and run.status == Run.Status.RUNNING


def test_metric_points_bulk_insert_is_idempotent(user):
    run = make_run(user)
    MetricPoint.record(
        run.id, 5, {"step": 5, "loss/total": 1.5, "lr": 1e-3, "events": [], "flag": True}
    )
    MetricPoint.record(run.id, 5, {"loss/total": 9.9})  # a resumed worker repeating step 5
    rows = {(m.name, m.value) for m in run.metrics.all()}
    assert rows == {("loss/total", 1.5), ("lr", 1e-3)}


def test_latest_checkpoint_and_label(user):
    run = make_run(user)
    Checkpoint.objects.create(run=run, step=100, path="/a", val_loss=1.25)
    Checkpoint.objects.create(run=run, step=200, path="/b")
    assert run.latest_checkpoint().step == 200
    assert "val 1.250" in Checkpoint.objects.get(step=100).label


# --------------------------------------------------------------------------- claims (issue 13)

HOST = "box"


def claimed_run(owner, pid=None):
    import os

    run = make_run(owner)
    found, how = Run.claim(run.pk, f"gpu@{HOST}:{pid or os.getpid()}", HOST)
    assert found is not None and how == "start"
    return found


def test_a_live_pid_with_a_stale_heartbeat_counts_as_gone(user, settings):
    """After a container restart the pid is commonly reused: the heartbeat decides too."""
    from datetime import timedelta

    from django.db.models.functions import Now

    run = claimed_run(user)  # this test process's pid: alive
    assert not run.owner_gone(HOST)
    stale = settings.STUDIO_RUN_STALE_SECONDS + 60
    Run.objects.filter(pk=run.pk).update(heartbeat=Now() - timedelta(seconds=stale))
    assert run.owner_gone(HOST)
    assert run.beat()  # the owner beats again: alive
    assert not run.owner_gone(HOST)


def test_writes_of_an_attempt_that_lost_its_claim_are_refused(user):
    from studio.runs.callbacks import ClaimLost, StudioCallbacks

    run = claimed_run(user)
    # Declared dead while it was only slow: another worker took the run over.
    taken = Run.objects.get(pk=run.pk)
    taken.mark_running("gpu@other:4242")
    callbacks = StudioCallbacks(run, publisher=None)
    callbacks.buffer.append((7, {"loss/total": 1.0}, 0.0))
    with pytest.raises(ClaimLost):
        callbacks.flush()
    with pytest.raises(ClaimLost):
        callbacks.should_stop()
    assert not MetricPoint.objects.filter(run=run).exists()
    assert not run.beat() and not run.finish_claimed(Run.Status.SUCCEEDED)
    assert Run.objects.get(pk=run.pk).status == Run.Status.RUNNING  # the new owner's


def test_automatic_attempts_are_capped_and_a_resume_by_a_person_resets_them(user, settings):
    settings.STUDIO_MAX_ATTEMPTS = 3
    run = make_run(user)
    for attempt in range(1, 4):
        Run.objects.filter(pk=run.pk).update(status=Run.Status.INTERRUPTED)
        found, how = Run.claim(run.pk, f"gpu@{HOST}:{attempt}", HOST)
        if attempt < 3:
            assert found is not None, how
    assert found is None and how.startswith("failed: gave up after 3 attempts")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "lower the batch size" in run.error
    assert run.requeue(by="user")
    run.refresh_from_db()
    assert run.retries == 0 and run.status == Run.Status.QUEUED


def test_a_failed_enqueue_leaves_the_run_resumable_with_the_reason(
    user, monkeypatch, django_capture_on_commit_callbacks
):
    from celery import current_app

    def broker_down(*args, **kwargs):
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(current_app, "send_task", broker_down)
    run = make_run(user)
    with django_capture_on_commit_callbacks(execute=True):
        run.enqueue()
    run.refresh_from_db()
    assert run.status == Run.Status.INTERRUPTED and run.can_resume
    assert "could not reach the task queue" in run.error and "Resume" in run.error
