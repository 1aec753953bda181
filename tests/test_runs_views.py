"""Pages of the runs area: starting a run, watching it, stopping and resuming, private files.

No worker here: what a run produces (metrics, samples, checkpoints) is written as the task
writes it; the worker itself is exercised in test_runs_tasks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.base import ContentFile

from studio.models import (
    AudioSample,
    Checkpoint,
    Dataset,
    MetricPoint,
    Run,
    RunEvent,
    TrainingConfig,
)
from synthesis.pictures import mel_png
from tests.fixtures_runs import ready_dataset, tiny_config, tiny_run
from training.audio import wav_bytes
from training.config import preset

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset(user):
    return ready_dataset(user)


def checkpoint_file(run: Run, step: int) -> Path:
    path = Path(run.out_dir) / "checkpoints" / f"step_{step:07d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights of step %d" % step)
    return path


def sample_row(run: Run, step: int = 10) -> AudioSample:
    import numpy as np

    s = AudioSample(run=run, step=step, utterance_id="low_00", speaker="low", text="The cat.")
    s.audio.save("t.wav", ContentFile(wav_bytes(np.zeros(2205, "float32"), 22050)), save=False)
    s.mel_image.save("t.png", ContentFile(mel_png(np.zeros((80, 20)))), save=False)
    s.save()
    return s


# --------------------------------------------------------------------------- starting a run


def test_new_run_form_shows_ranges_presets_and_batch_table(client_user, dataset):
    page = client_user.get("/runs/new/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "mel_loss_weight" in html and "1.0 – 5.0" in html  # the safe-range table
    assert "Batch size per model size" in html and "8 – 16" in html
    assert 'id="presets"' in html and "plateau_breaker" in html
    assert dataset.name in html


def test_starting_a_preset_run_queues_it_on_the_gpu_queue_after_commit(
    client_user, user, dataset, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        page = client_user.post(
            "/runs/new/",
            {
                "name": "first voice",
                "dataset": dataset.pk,
                "source": "preset",
                "model_size": "tiny",
                "optimization_level": "enhanced",
                "steps": 30,
                "eval_every": 10,
                "start": "scratch",
            },
        )
    run = Run.objects.get(name="first voice")
    assert page.status_code == 302 and page["Location"] == f"/runs/{run.pk}/"
    assert run.status == Run.Status.QUEUED and len(callbacks) == 1
    assert run.celery_task_id and Path(run.out_dir).name.startswith(f"{run.pk}-")
    snap = run.config_snapshot
    assert snap["size"] == "tiny" and snap["steps"] == 30 and snap["eval_every"] == 10
    # The preset's own learning rate, so retuning the presets does not break this test.
    assert snap["learning_rate"] == preset("tiny", "enhanced").learning_rate
    assert snap["use_adaptive_weights"] is True
    assert run.total_steps == 30
    assert run.config.owner == user and run.config.model_size == "tiny"
    # The run page opens at once, queued.
    detail = client_user.get(page["Location"])
    assert detail.status_code == 200 and "Queued" in detail.content.decode()


def test_batch_outside_the_recommended_range_warns_but_starts(client_user, dataset):
    with_warning = client_user.post(
        "/runs/new/",
        {
            "dataset": dataset.pk,
            "source": "preset",
            "model_size": "tiny",
            "optimization_level": "basic",
            "batch_size": 64,
            "start": "scratch",
        },
        follow=True,
    )
    assert with_warning.status_code == 200
    assert "outside the recommended 8-16" in with_warning.content.decode()
    assert Run.objects.get().config_snapshot["batch_size"] == 64


def test_a_config_written_around_the_forms_is_refused_with_its_range(client_user, user, dataset):
    bad = TrainingConfig.objects.create(owner=user, name="old system", mel_loss_weight=40.0)
    page = client_user.post(
        "/runs/new/",
        {"dataset": dataset.pk, "source": "config", "config": bad.pk, "start": "scratch"},
    )
    assert page.status_code == 400
    assert "outside the safe range 1-5" in page.content.decode()
    assert not Run.objects.exists()


def test_only_ready_datasets_and_own_configs_can_be_picked(client_user, user, other_user):
    raw = Dataset.objects.create(owner=user, name="raw", status=Dataset.Status.IMPORTED)
    theirs = tiny_config(other_user)
    page = client_user.post(
        "/runs/new/",
        {"dataset": raw.pk, "source": "config", "config": theirs.pk, "start": "scratch"},
    )
    assert page.status_code == 400
    errors = page.context["form"].errors
    assert "dataset" in errors and "config" in errors


def test_resume_and_finetune_need_a_matching_checkpoint(client_user, user, dataset):
    old = tiny_run(user, dataset)
    ckpt = Checkpoint.objects.create(
        run=old, step=20, path=str(checkpoint_file(old, 20)), size_bytes=10
    )
    base = {"dataset": dataset.pk, "source": "preset", "optimization_level": "enhanced"}
    # Missing checkpoint; a checkpoint of another model size; too few steps to resume.
    missing = client_user.post("/runs/new/", dict(base, model_size="tiny", start="resume"))
    assert "Pick the checkpoint" in missing.content.decode()
    wrong_size = client_user.post(
        "/runs/new/",
        dict(base, model_size="small", start="finetune", checkpoint=ckpt.pk),
    )
    assert "of a &#x27;tiny&#x27; model" in wrong_size.content.decode()
    short = client_user.post(
        "/runs/new/", dict(base, model_size="tiny", start="resume", checkpoint=ckpt.pk, steps=20)
    )
    assert "more steps than that" in short.content.decode()
    assert Run.objects.count() == 1

    ok = client_user.post(
        "/runs/new/", dict(base, model_size="tiny", start="finetune", checkpoint=ckpt.pk)
    )
    assert ok.status_code == 302
    assert Run.objects.latest("pk").init_from == ckpt


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"dataset": "x", "source": "nope", "start": "?"},
        {"dataset": "999999", "source": "preset", "model_size": "huge", "start": "scratch"},
        {"source": "preset", "model_size": "tiny", "optimization_level": "basic", "steps": "-3"},
        {"source": "config", "config": "1e9", "start": "resume", "checkpoint": "abc"},
    ],
)
def test_bad_form_input_is_a_400_with_errors_never_a_500(client_user, dataset, data):
    page = client_user.post("/runs/new/", data)
    assert page.status_code == 400 and page.context["form"].errors


# --------------------------------------------------------------------------- the run page


def test_run_page_shows_record_controls_and_diagnoses(client_user, user, dataset):
    run = tiny_run(user, dataset)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, current_step=12)
    MetricPoint.record(run.pk, 12, {"loss/total": 3.5, "grad_norm": 1.2})
    RunEvent.objects.create(
        run=run, step=11, kind="adaptive", message="mel weight 2.5 -> 2.375 applied: grad growing"
    )
    RunEvent.objects.create(
        run=run,
        step=12,
        kind="diagnosis",
        message="Input-bound steps: ...",
        data={
            "code": "input_bound",
            "title": "Input-bound steps",
            "evidence": "steps wait 80%",
            "advice": ["raise num_workers"],
            "severity": "warning",
        },
    )
    sample = sample_row(run, step=12)
    ckpt = Checkpoint.objects.create(run=run, step=12, path=str(checkpoint_file(run, 12)))
    html = client_user.get(f"/runs/{run.pk}/").content.decode()
    assert f'data-ws-path="/ws/runs/{run.pk}/"' in html
    assert "vendor/uplot/uPlot.iife.min.js" in html and 'id="chart-loss"' in html
    assert "mel weight 2.5 -&gt; 2.375 applied: grad growing" in html
    assert "Input-bound steps" in html and "raise num_workers" in html
    assert f"/runs/samples/{sample.pk}/audio.wav" in html
    assert f"/runs/checkpoints/{ckpt.pk}/download/" in html
    assert f"/synthesize/?checkpoint={ckpt.pk}" in html
    assert 'id="cancel-form"' in html and 'id="resume-form" hidden' in html


def test_run_page_counts_controller_decisions_and_hold_reasons(client_user, user, dataset):
    """The controller is seen to be alive: decisions by outcome and, per reason, its holds."""
    run = tiny_run(user, dataset)
    decision = {"step": 150, "old": 2.5, "new": 2.625, "reason": "loss rising"}
    RunEvent.objects.create(
        run=run, step=150, kind="adaptive", message="up", data={**decision, "applied": True}
    )
    RunEvent.objects.create(
        run=run, step=260, kind="adaptive", message="no", data={**decision, "applied": False}
    )
    for step, totals in ((200, {"dead_band": 3, "noisy": 1}), (300, {"dead_band": 9, "noisy": 4})):
        RunEvent.objects.create(
            run=run,
            step=step,
            kind="adaptive",
            message="held",
            data={
                "weight": 2.625,
                "held": {},
                "holds_total": {**totals, "cooling": 0},
                "last": None,
            },
        )
    page = client_user.get(f"/runs/{run.pk}/")
    summary = page.context["controller"]
    assert (summary["applied"], summary["rejected"], summary["as_of"]) == (1, 1, 300)
    assert [(h["code"], h["count"]) for h in summary["holds"]] == [("dead_band", 9), ("noisy", 4)]
    html = page.content.decode()
    assert 'id="hold-reasons"' in html and "no clear trend of the loss" in html


def test_run_page_without_controller_events_says_when_it_starts(client_user, user, dataset):
    run = tiny_run(user, dataset)
    page = client_user.get(f"/runs/{run.pk}/")
    assert page.context["controller"] is None
    assert "after its warm-up" in page.content.decode()


def test_other_users_runs_and_their_files_are_404(client, user, other_user, dataset):
    run = tiny_run(user, dataset)
    ckpt = Checkpoint.objects.create(run=run, step=4, path=str(checkpoint_file(run, 4)))
    sample = sample_row(run)
    client.force_login(other_user)
    for url in (
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/log/",
        f"/runs/{run.pk}/metrics.json",
        f"/runs/checkpoints/{ckpt.pk}/download/",
        f"/runs/samples/{sample.pk}/audio.wav",
        f"/runs/samples/{sample.pk}/mel.png",
    ):
        assert client.get(url).status_code == 404, url
    for url in (f"/runs/{run.pk}/cancel/", f"/runs/{run.pk}/resume/"):
        assert client.post(url).status_code == 404, url
    assert str(run) not in client.get("/runs/").content.decode()
    run.refresh_from_db()
    assert not run.cancel_requested


def test_staff_see_every_run(client, user, staff_user, dataset):
    run = tiny_run(user, dataset)
    client.force_login(staff_user)
    assert client.get(f"/runs/{run.pk}/").status_code == 200
    assert f'data-run-id="{run.pk}"' in client.get("/runs/").content.decode()


def test_anonymous_is_sent_to_login(client, user, dataset):
    run = tiny_run(user, dataset)
    page = client.get(f"/runs/{run.pk}/")
    assert page.status_code == 302 and "/accounts/login/" in page["Location"]


def test_checkpoint_download_streams_the_file_and_refuses_paths_outside_runs(
    client_user, user, dataset, tmp_path
):
    run = tiny_run(user, dataset)
    ckpt = Checkpoint.objects.create(run=run, step=8, path=str(checkpoint_file(run, 8)))
    page = client_user.get(f"/runs/checkpoints/{ckpt.pk}/download/")
    assert page.status_code == 200
    assert b"".join(page.streaming_content) == b"weights of step 8"
    assert f"run{run.pk}_step0000008.pt" in page["Content-Disposition"]
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"not yours")
    Checkpoint.objects.filter(pk=ckpt.pk).update(path=str(secret))
    assert client_user.get(f"/runs/checkpoints/{ckpt.pk}/download/").status_code == 404
    Checkpoint.objects.filter(pk=ckpt.pk).update(path=f"{settings.STUDIO_RUNS_DIR}/../../x")
    assert client_user.get(f"/runs/checkpoints/{ckpt.pk}/download/").status_code == 404


def test_samples_are_served_privately(client_user, user, dataset):
    sample = sample_row(tiny_run(user, dataset))
    audio = client_user.get(f"/runs/samples/{sample.pk}/audio.wav")
    assert audio.status_code == 200 and audio["Content-Type"] == "audio/wav"
    assert b"".join(audio.streaming_content)[:4] == b"RIFF"
    mel = client_user.get(f"/runs/samples/{sample.pk}/mel.png")
    assert b"".join(mel.streaming_content)[:4] == b"\x89PNG"
    sample.audio.delete(save=False)
    assert client_user.get(f"/runs/samples/{sample.pk}/audio.wav").status_code == 404


# --------------------------------------------------------------------------- cancel, resume, log


def test_cancelling_a_queued_run_cancels_it_at_once(client_user, user, dataset):
    run = tiny_run(user, dataset)
    page = client_user.post(f"/runs/{run.pk}/cancel/", follow=True)
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED and run.cancel_requested
    assert "cancelled before it started" in page.content.decode()
    # A second cancel, or a GET, does nothing harmful.
    assert client_user.post(f"/runs/{run.pk}/cancel/").status_code == 302
    assert client_user.get(f"/runs/{run.pk}/cancel/").status_code == 405


def test_cancelling_a_running_run_sets_the_flag_the_worker_polls(client_user, user, dataset):
    run = tiny_run(user, dataset)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING)
    client_user.post(f"/runs/{run.pk}/cancel/")
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING and run.cancel_requested
    assert run.events.filter(kind="status", message__contains="cancel requested").exists()


def test_resume_requeues_a_stopped_run_optionally_for_longer(
    client_user, user, dataset, django_capture_on_commit_callbacks
):
    run = tiny_run(user, dataset)
    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.CANCELLED, cancel_requested=True, current_step=10, attempts=1
    )
    too_short = client_user.post(f"/runs/{run.pk}/resume/", {"steps": 5}, follow=True)
    assert "pick more steps than that" in too_short.content.decode()
    with django_capture_on_commit_callbacks() as callbacks:
        client_user.post(f"/runs/{run.pk}/resume/", {"steps": 40})
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED and not run.cancel_requested and len(callbacks) == 1
    assert run.total_steps == 40 and run.config_snapshot["steps"] == 40
    # Resuming a run that is not stopped is refused politely.
    again = client_user.post(f"/runs/{run.pk}/resume/", {"steps": "lots"}, follow=True)
    assert again.status_code == 200 and "cannot be resumed" in again.content.decode()


def test_worker_log_is_viewable(client_user, user, dataset):
    run = tiny_run(user, dataset)
    assert "No log yet" in client_user.get(f"/runs/{run.pk}/log/").content.decode()
    log = Path(run.out_dir) / "worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("INFO studio.training: run 1 attempt 1 <on> worker\n")
    page = client_user.get(f"/runs/{run.pk}/log/").content.decode()
    assert "attempt 1 &lt;on&gt; worker" in page
    text = client_user.get(f"/runs/{run.pk}/log/?format=text")
    assert text["Content-Type"].startswith("text/plain") and b"<on>" in text.content


# --------------------------------------------------------------------------- list, metrics, compare


def test_metrics_json_filters_names_and_fills_gaps(client_user, user, dataset):
    run = tiny_run(user, dataset)
    for step in range(1, 6):
        MetricPoint.record(run.pk, step, {"loss/total": 5.0 - step, "lr": 0.001})
    MetricPoint.record(run.pk, 5, {"val/total": 2.0})
    data = client_user.get(f"/runs/{run.pk}/metrics.json?name=loss/total").json()
    assert [p["step"] for p in data["points"]] == [1, 2, 3, 4, 5]
    assert all(set(p["m"]) == {"loss/total"} for p in data["points"])
    gap = client_user.get(f"/runs/{run.pk}/metrics.json?since=3").json()
    assert gap["type"] == "gap" and [p["step"] for p in gap["points"]] == [4, 5]
    assert gap["points"][-1]["m"] == {"loss/total": 0.0, "lr": 0.001, "val/total": 2.0}
    assert client_user.get(f"/runs/{run.pk}/metrics.json?since=x").status_code == 200


def test_compare_puts_chosen_runs_on_one_chart_and_ignores_junk(client_user, user, other_user):
    dataset = ready_dataset(user)
    a, b = tiny_run(user, dataset), tiny_run(user, dataset)
    theirs = tiny_run(other_user)
    page = client_user.get(f"/runs/compare/?ids={a.pk}&ids={b.pk},{theirs.pk}&ids=zz&ids=")
    assert page.status_code == 200
    assert [r.pk for r in page.context["runs"]] == [a.pk, b.pk]
    html = page.content.decode()
    assert 'id="compare-chart"' in html and f"/runs/{a.pk}/metrics.json" in html
    one = client_user.get(f"/runs/compare/?ids={a.pk}")
    assert "Pick two or more runs" in one.content.decode()


def test_runs_list_shows_status_and_last_loss(client_user, user, dataset):
    run = tiny_run(user, dataset)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, last_loss=1.23456)
    html = client_user.get("/runs/").content.decode()
    assert f'data-run-id="{run.pk}"' in html and "1.2346" in html and "Running" in html
    assert "js/runs_list.js" in html
