"""Vocoder fine-tuning as a run of the studio: started from the run form, trained by the same
`runs.train` task as acoustic runs (metrics, eval audio with mel pictures, checkpoints,
resume), listed in the admin, and its best checkpoint offered as a vocoder to its owner only.

The trainer itself (losses, exact resume) is tested in test_vocoder_training.py; here a few
CPU steps of the universal generator with tiny segments and discriminators (~1 s a step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from django.urls import reverse

from studio import live
from studio.models import AudioSample, Checkpoint, Dataset, MetricPoint, Run, Utterance
from studio.runs.tasks import train
from studio.synthesis import vocoders as studio_vocoders
from tests.fixtures_runs import ready_dataset, tiny_run
from tests.test_api_synthesize import vocoder_checkpoint
from training.vocoder import VocoderConfig

pytestmark = pytest.mark.django_db

FAST = dict(
    steps=4,
    batch_size=1,
    segment_size=1024,
    discriminator_width=0.125,
    eval_every=2,
    checkpoint_every=2,
    log_every=1,
    device="cpu",
)


def recorded_dataset(owner):
    """A ready dataset on the session's feature cache, with Utterance rows naming the
    recordings, as an import leaves them: the vocoder trainer reads the audio again."""
    dataset = ready_dataset(owner)
    wavs = Path(dataset.cache_dir).parent / "audio" / "wavs"
    Utterance.objects.bulk_create(
        Utterance(dataset=dataset, item_id=p.stem, audio_path=str(p), text="x")
        for p in sorted(wavs.glob("*.wav"))
    )
    return dataset


def vocoder_run(owner, dataset=None, **overrides) -> Run:
    values = VocoderConfig(**{**FAST, **overrides}).to_dict()
    run = Run.objects.create(
        owner=owner,
        dataset=dataset or recorded_dataset(owner),
        kind=Run.Kind.VOCODER,
        config_snapshot=values,
        total_steps=values["steps"],
    )
    run.assign_out_dir()
    return run


# --------------------------------------------------------------------------- the run form


def test_the_run_form_starts_a_vocoder_run_on_the_gpu_queue(
    client_user, user, django_capture_on_commit_callbacks
):
    dataset = ready_dataset(user)
    page = client_user.get("/runs/new/")
    assert 'value="vocoder"' in page.content.decode()
    with django_capture_on_commit_callbacks() as callbacks:
        page = client_user.post(
            "/runs/new/",
            {
                "name": "my vocoder",
                "kind": "vocoder",
                "dataset": dataset.pk,
                "source": "preset",
                "steps": 300,
                "batch_size": 4,
                "start": "scratch",
            },
        )
    assert page.status_code == 302, page.content.decode()[:2000]
    run = Run.objects.get(name="my vocoder")
    assert run.kind == Run.Kind.VOCODER and run.config is None and len(callbacks) == 1
    snap = run.config_snapshot
    assert snap["steps"] == 300 and snap["batch_size"] == 4 and snap["init"] == "universal"
    assert snap["weight_mel"] == 45.0 and run.total_steps == 300
    assert client_user.get(page["Location"]).status_code == 200
    assert "vocoder fine-tune" in client_user.get("/runs/").content.decode()


def test_a_vocoder_run_takes_only_vocoder_checkpoints_to_start_from(client_user, user):
    acoustic = tiny_run(user)
    path = Path(acoustic.out_dir) / "checkpoints" / "step_0000010.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    ckpt = Checkpoint.objects.create(run=acoustic, step=10, path=str(path))
    page = client_user.post(
        "/runs/new/",
        {
            "kind": "vocoder",
            "dataset": acoustic.dataset.pk,
            "start": "finetune",
            "checkpoint": ckpt.pk,
            "source": "preset",
        },
    )
    assert page.status_code == 400 and "this run trains a vocoder" in page.content.decode()
    # The acoustic checkpoint is what teacher-forced mels come from, though.
    page = client_user.post(
        "/runs/new/",
        {
            "kind": "vocoder",
            "name": "teacher forced",
            "dataset": acoustic.dataset.pk,
            "acoustic_checkpoint": ckpt.pk,
            "start": "scratch",
            "source": "preset",
        },
    )
    assert page.status_code == 302
    assert Run.objects.get(name="teacher forced").acoustic_checkpoint == ckpt


def test_the_admin_shows_the_kind(client, admin_user_, user):
    run = vocoder_run(user, ready_dataset(user))
    client.force_login(admin_user_)
    page = client.get("/admin/studio/run/?kind__exact=vocoder")
    assert page.status_code == 200 and "Vocoder fine-tune" in page.content.decode()
    assert client.get(f"/admin/studio/run/{run.pk}/change/").status_code == 200


# --------------------------------------------------------------------------- the task
# train() closes the database connection when it ends, as a worker does: transaction tests.


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_vocoder_run_trains_through_the_task_and_resumes(user, client_user):
    run = vocoder_run(user)
    assert train(run.pk) == Run.Status.SUCCEEDED
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.current_step == 4, run.error
    names = set(MetricPoint.objects.filter(run=run).values_list("name", flat=True))
    assert {"loss/generator", "loss/discriminator", "loss/mel", "val/mel"} <= names
    assert {"grad_norm/generator", "grad_norm/discriminator"} <= names
    steps = {c.step: c for c in run.checkpoints.all()}
    assert set(steps) == {2, 4} and any(c.is_best for c in steps.values())
    assert all(Path(c.path).is_file() for c in steps.values())
    samples = AudioSample.objects.filter(run=run)
    assert samples.exists() and all(s.mel_image for s in samples)
    assert not any(c.scores for c in steps.values())  # scores are for acoustic checkpoints
    assert not run.events.filter(kind="diagnosis").exists()
    page = client_user.get(run.get_absolute_url())  # samples, checkpoints and all
    assert page.status_code == 200 and "step_0000004.pt" not in page.content.decode()

    # As if its worker had died before step 6: the same task resumes from the newest step
    # checkpoint in the run's folder.
    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.INTERRUPTED,
        config_snapshot=dict(run.config_snapshot, steps=6),
        total_steps=6,
    )
    assert train(run.pk) == Run.Status.SUCCEEDED
    run.refresh_from_db()
    assert run.current_step == 6 and run.attempts == 2
    assert "resuming from step 4" in (Path(run.out_dir) / "worker.log").read_text()
    assert MetricPoint.objects.filter(run=run, name="loss/generator", step=5).count() == 1

    # Its best checkpoint is now a vocoder its owner may pick (and load).
    (best,) = studio_vocoders.fine_tuned_vocoders(user)
    assert best.run == run and studio_vocoders.resolve(user, str(best.pk)) == best.path
    from synthesis.vocoders import load_vocoder

    assert load_vocoder(best.path).sample_rate == 22050


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
async def test_a_vocoder_run_on_a_real_gpu_worker_reports_live(user, start_worker):
    from asgiref.sync import sync_to_async
    from channels.routing import URLRouter
    from channels.testing import WebsocketCommunicator

    from studio.routing import websocket_urlpatterns

    run = await sync_to_async(vocoder_run)(user)
    await sync_to_async(start_worker)("gpu")
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/runs/{run.pk}/")
    comm.scope["user"] = user
    assert (await comm.connect(timeout=5))[0]
    await comm.receive_json_from(timeout=5)  # the history
    await sync_to_async(run.enqueue)()
    statuses, steps, samples, checkpoints = [], [], [], []
    while "succeeded" not in statuses and "failed" not in statuses:
        msg = await comm.receive_json_from(timeout=180)
        steps += [p["step"] for p in msg.get("points", []) if "loss/discriminator" in p["m"]]
        samples += msg.get("samples", [])
        checkpoints += msg.get("checkpoints", [])
        if "status" in msg:
            statuses.append(msg["status"]["status"])
    await comm.disconnect()
    run = await sync_to_async(Run.objects.get)(pk=run.pk)
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert steps == [1, 2, 3, 4] and samples and checkpoints


@pytest.mark.django_db(transaction=True)
def test_a_bad_vocoder_config_fails_the_run_with_the_reason(user):
    run = vocoder_run(user, ready_dataset(user))
    Run.objects.filter(pk=run.pk).update(
        config_snapshot=dict(run.config_snapshot, learning_rate=0.5)
    )
    assert train(run.pk) == Run.Status.FAILED
    run.refresh_from_db()
    assert "learning_rate" in run.error


@pytest.mark.django_db(transaction=True)
def test_a_vocoder_run_without_recordings_fails_with_the_reason(user, tmp_path):
    # A cache whose recordings were moved away since preprocessing, and no Utterance rows.
    cache = tmp_path / "cache"
    shutil.copytree(ready_dataset(user).cache_dir, cache)
    lines = (cache / "items.jsonl").read_text().splitlines()
    records = [dict(json.loads(line), audio_path=str(tmp_path / "gone.wav")) for line in lines]
    (cache / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = ready_dataset(user, name="moved")
    Dataset.objects.filter(pk=dataset.pk).update(cache_dir=str(cache))
    run = vocoder_run(user, Dataset.objects.get(pk=dataset.pk))
    assert train(run.pk) == Run.Status.FAILED
    run.refresh_from_db()
    assert "no training utterance has a readable recording" in run.error


# --------------------------------------------------------------------------- who sees them


def test_fine_tuned_vocoders_are_offered_to_their_owner_only(user, other_user, tmp_path):
    mine = vocoder_checkpoint(user, tmp_path, "mine")
    vocoder_checkpoint(other_user, tmp_path, "theirs")
    assert [c.pk for c in studio_vocoders.fine_tuned_vocoders(user)] == [mine.pk]
    with pytest.raises(studio_vocoders.VocoderChoiceError):
        studio_vocoders.resolve(other_user, str(mine.pk))
    assert studio_vocoders.resolve(user, "") == "griffin-lim"  # STUDIO_VOCODER in tests
    assert studio_vocoders.resolve(user, "HiFiGAN") == "hifigan"


# --------------------------------------------------------------------------- acoustic runs


def test_acoustic_eval_samples_use_the_studio_eval_vocoder(user, settings):
    from studio.runs.tasks import eval_vocoder

    run = tiny_run(user)
    settings.STUDIO_EVAL_VOCODER = "griffin-lim"
    assert eval_vocoder(run, "cpu") is None  # the trainer's own Griffin-Lim
    settings.STUDIO_EVAL_VOCODER = "hifigan"
    assert eval_vocoder(run, "cpu").name == "hifigan"
    settings.STUDIO_EVAL_VOCODER = "/nowhere/vocoder.pt"
    assert eval_vocoder(run, "cpu") is None  # never worth failing a run for: a warning
    assert run.events.filter(kind="warning", message__contains="use Griffin-Lim").exists()


def test_the_trainer_vocodes_eval_samples_with_the_vocoder_it_is_given(tmp_path):
    import numpy as np

    from tests.fixtures_audio import feature_cache
    from training.config import TrainConfig
    from training.trainer import Callbacks, Trainer

    heard = []

    def vocoder(mel):
        heard.append(mel.shape)
        return np.full(mel.shape[1] * 256, 0.25, dtype=np.float32)

    class Samples(Callbacks):
        def on_eval(self, metrics, samples):
            self.samples = samples

    callbacks = Samples()
    cfg = TrainConfig(size="tiny", batch_size=4, steps=1, eval_every=1, device="cpu")
    Trainer(cfg, feature_cache(), tmp_path / "run", callbacks, vocoder=vocoder).run()
    assert heard and all(s[0] == 80 for s in heard)
    assert callbacks.samples and all(float(s.audio[0]) == 0.25 for s in callbacks.samples)


def test_the_task_hands_the_trainer_its_start_point_and_teacher(user, monkeypatch):
    from studio.runs import tasks

    seen = {}

    def fake_trainer(cfg, cache_dir, out_dir, callbacks, resume, audio_files):
        seen.update(cfg=cfg, cache_dir=cache_dir, resume=resume, audio_files=audio_files)
        return "trainer"

    monkeypatch.setattr(tasks, "VocoderTrainer", fake_trainer)
    acoustic = tiny_run(user)
    teacher = Checkpoint.objects.create(run=acoustic, step=8, path="/runs/a/step_0000008.pt")
    run = vocoder_run(user)
    run.acoustic_checkpoint = teacher
    run.save()
    assert tasks.build_trainer(run, None, False, "/runs/v/best.pt") == "trainer"
    assert seen["cfg"].init == "/runs/v/best.pt" and seen["cfg"].steps == 4
    assert seen["cfg"].acoustic_checkpoint == teacher.path and not seen["resume"]
    assert len(seen["audio_files"]) == 12 and all(
        Path(p).is_file() for p in seen["audio_files"].values()
    )


def test_the_run_page_shows_the_kind_and_teacher_and_never_scores_a_vocoder(
    client_user, user, monkeypatch
):
    acoustic = tiny_run(user)
    acoustic.name = "teacher-run"
    acoustic.save()
    teacher = Checkpoint.objects.create(run=acoustic, step=8, path="/runs/a/step_0000008.pt")
    run = vocoder_run(user)
    run.acoustic_checkpoint = teacher
    run.save()
    ckpt = Checkpoint.objects.create(run=run, step=4, path="/runs/v/step_0000004.pt")

    page = client_user.get(run.get_absolute_url()).content.decode()
    assert "Vocoder fine-tune" in page
    assert "teacher-forced mels of" in page and "teacher-run" in page and "step 8" in page
    assert f'data-checkpoint-id="{ckpt.pk}"' in page
    assert "score-form" not in page  # no Score button on a vocoder checkpoint
    assert live.checkpoint_dict(ckpt)["score_url"] is None  # nor in the live updates

    # The endpoint, posted by hand, says why and queues nothing.
    sent = []
    monkeypatch.setattr(Checkpoint, "queue_scoring", lambda self: sent.append(self) or True)
    response = client_user.post(reverse("checkpoint_score", args=[ckpt.pk]), follow=True)
    assert response.status_code == 200 and not sent
    assert "is a vocoder checkpoint: scores are for acoustic models" in response.content.decode()

    # Without a teacher it says what it learns from; an acoustic run keeps its Score button.
    run.acoustic_checkpoint = None
    run.save()
    assert "the recordings' own mels" in client_user.get(run.get_absolute_url()).content.decode()
    acoustic_page = client_user.get(acoustic.get_absolute_url()).content.decode()
    assert "Acoustic model" in acoustic_page and "score-form" in acoustic_page
