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
