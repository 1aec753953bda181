"""Objective scores on the checkpoint rows of the run page: the task, the button, the hook.

A `tiny` checkpoint trained here for two steps on the session's synthetic corpus is enough:
the numbers mean little, but every stage runs for real (synthesis, Resemblyzer, DTW,
pocketsphinx). One test runs a whole tiny run through a real Celery worker and watches the
best checkpoint's scores reach the page's WebSocket, then asks for another one by the button.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path

import pytest
import torch
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from studio.models import Checkpoint, Run
from studio.routing import websocket_urlpatterns
from studio.runs.tasks import score_checkpoint
from tests.fixtures_audio import feature_cache
from tests.fixtures_runs import tiny_run
from training.config import TrainConfig
from training.trainer import Trainer

DONE = {
    "state": "done",
    "scored_at": "2025-01-01T00:00:00+00:00",
    "n": 4,
    "n_utterances": 3,
    "secs_seen": 0.6318,
    "secs_real_same_speaker": 0.89,
    "secs_real_different_speakers": 0.56,
    "mcd_db": 6.0908,
    "wer_output": 1.0,
    "wer_ground_truth": 0.5,
    "rtf": 0.0395,
    "dnsmos_ovrl": 2.671,
    "dnsmos_ovrl_ground_truth": 3.012,
    "vocoder": "hifigan",
    "utterances": [{"id": "x", "secs": 0.6}],
}


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    cfg = TrainConfig(
        size="tiny",
        batch_size=4,
        steps=2,
        eval_every=2,
        checkpoint_every=2,
        lr_warmup_steps=1,
        learning_rate=2e-3,
        device="cpu",
    )
    result = Trainer(cfg, feature_cache(), tmp_path_factory.mktemp("scores") / "run").run()
    assert result.status == "finished"
    return Path(result.last_checkpoint)


def checkpoint_row(run: Run, path, step: int = 2, **fields) -> Checkpoint:
    return Checkpoint.objects.create(run=run, step=step, path=str(path), **fields)


def fresh(ckpt: Checkpoint) -> dict:
    return Checkpoint.objects.values_list("scores", flat=True).get(pk=ckpt.pk)


# --------------------------------------------------------------------------- the task


@pytest.mark.django_db
def test_the_task_scores_a_trained_checkpoint_and_keeps_the_threads(user, trained_checkpoint):
    ckpt = checkpoint_row(tiny_run(user), trained_checkpoint, is_best=True)
    torch.set_num_threads(2)
    try:
        assert score_checkpoint(ckpt.pk) == "done"
        assert torch.get_num_threads() == 2  # one thread while scoring, then given back
    finally:
        torch.set_num_threads(2)
    scores = fresh(ckpt)
    assert scores["state"] == "done" and scores["n"] == settings.STUDIO_SCORE_UTTERANCES
    assert datetime.fromisoformat(scores["scored_at"]).tzinfo is not None
    assert 1 <= scores["n_utterances"] <= settings.STUDIO_SCORE_UTTERANCES and scores["step"] == 2
    assert -1.0 <= scores["secs_seen"] <= 1.0
    assert scores["mcd_db"] > 0 and math.isfinite(scores["mcd_db"])
    assert scores["wer_output"] >= 0 and scores["wer_ground_truth"] >= 0
    assert scores["rtf"] > 0
    assert len(scores["utterances"]) == scores["n_utterances"]
    # Made with the studio's eval vocoder (Griffin-Lim in tests), which the scores name.
    assert scores["vocoder"] == settings.STUDIO_EVAL_VOCODER == "griffin-lim"
    assert "dnsmos_ovrl" in scores and "dnsmos_ovrl_ground_truth" in scores


@pytest.mark.django_db
def test_a_broken_or_missing_checkpoint_is_stored_as_a_readable_error(user, tmp_path):
    run = tiny_run(user)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file" * 10)
    broken = checkpoint_row(run, garbage, step=2)
    missing = checkpoint_row(run, tmp_path / "gone.pt", step=4)

    assert score_checkpoint(broken.pk) == "error"
    assert score_checkpoint(missing.pk) == "error"
    scores = fresh(broken)
    assert (
        scores["state"] == "error"
        and scores["n"] == settings.STUDIO_SCORE_UTTERANCES
        and scores["scored_at"]
    )
    assert "not a readable checkpoint" in scores["error"] and "garbage.pt" in scores["error"]
    assert fresh(missing)["error"] == f"the checkpoint file {tmp_path / 'gone.pt'} is missing"
    assert score_checkpoint(10**9) == "gone"


# --------------------------------------------------------------------------- the button


@pytest.fixture
def run_with_checkpoint(user, trained_checkpoint):
    run = tiny_run(user)
    return run, checkpoint_row(run, trained_checkpoint, is_best=True)


@pytest.mark.django_db
def test_score_button_queues_once_and_the_row_says_scoring(
    client_user, run_with_checkpoint, django_capture_on_commit_callbacks
):
    run, ckpt = run_with_checkpoint
    url = f"/runs/checkpoints/{ckpt.pk}/score/"
    page = client_user.get(run.get_absolute_url()).content.decode()
    assert f'action="{url}"' in page and "scoring…" not in page

    with django_capture_on_commit_callbacks() as sent:
        answer = client_user.post(url)
    assert answer.status_code == 302 and answer["Location"] == run.get_absolute_url()
    assert len(sent) == 2  # the task to the cpu queue, and the row to open pages
    assert fresh(ckpt)["state"] == "queued"
    page = client_user.get(run.get_absolute_url()).content.decode()
    assert "scoring…" in page and f'action="{url}"' not in page

    with django_capture_on_commit_callbacks() as again:
        client_user.post(url)
    assert again == []  # a second click while it is queued sends nothing
    assert client_user.get(url).status_code == 405


@pytest.mark.django_db
def test_only_the_owner_and_staff_may_score(
    client, user, other_user, staff_user, run_with_checkpoint, django_capture_on_commit_callbacks
):
    _, ckpt = run_with_checkpoint
    url = f"/runs/checkpoints/{ckpt.pk}/score/"
    anonymous = client.post(url)
    assert anonymous.status_code == 302 and "/accounts/login/" in anonymous["Location"]
    client.force_login(other_user)
    assert client.post(url).status_code == 404
    assert fresh(ckpt) == {}
    client.force_login(staff_user)
    with django_capture_on_commit_callbacks():
        assert client.post(url).status_code == 302
    assert fresh(ckpt)["state"] == "queued"


@pytest.mark.django_db
def test_the_button_needs_the_csrf_token_the_page_gives(user, run_with_checkpoint):
    run, ckpt = run_with_checkpoint
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    url = f"/runs/checkpoints/{ckpt.pk}/score/"
    assert browser.post(url).status_code == 403
    page = browser.get(run.get_absolute_url()).content.decode()
    form = re.search(rf'<form method="post" action="{url}".*?</form>', page, re.S).group(0)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    assert browser.post(url, {"csrfmiddlewaretoken": token}).status_code == 302


@pytest.mark.django_db
def test_the_row_shows_scores_and_errors(client_user, user, trained_checkpoint):
    run = tiny_run(user)
    checkpoint_row(run, trained_checkpoint, step=2, scores=DONE)
    checkpoint_row(
        run, trained_checkpoint, step=4, scores={"state": "error", "error": "the file is gone"}
    )
    page = client_user.get(run.get_absolute_url()).content.decode()
    assert "SECS 0.63" in page and "MCD 6.09 dB" in page and "RTF 0.040" in page
    assert "WER 100 % vs 50 % GT" in page and "on 3 utterances, vocoder hifigan" in page
    assert "MOS 2.67 vs 3.01 GT" in page
    assert "Not scored: the file is gone" in page


# --------------------------------------------------------------------------- through a worker


def _scores_in(msg: dict) -> dict[int, dict]:
    return {c["step"]: c["scores"] for c in msg.get("checkpoints", [])}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
async def test_every_checkpoint_of_a_run_is_scored_and_the_page_hears_it(
    user, celery_worker, tmp_path
):
    run = await sync_to_async(tiny_run)(user, steps=4, checkpoint_every=2, eval_every=4)
    # A folder of its own: run ids repeat between tests, and a runs/<id> folder another module
    # left behind would be resumed from.
    run.out_dir = str(tmp_path / "run")
    await sync_to_async(run.save)(update_fields=["out_dir"])
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/runs/{run.pk}/")
    comm.scope["user"] = user
    assert (await comm.connect(timeout=5))[0]
    await comm.receive_json_from(timeout=5)  # the history
    await sync_to_async(run.enqueue)()

    async def until_scored(steps: set[int]) -> tuple[dict, dict]:
        seen_pending: set[int] = set()
        done: dict[int, dict] = {}
        score_points: dict[int, dict] = {}
        while set(done) != steps:
            msg = await comm.receive_json_from(timeout=180)
            assert msg.get("status", {}).get("status") != "failed", msg["status"]["error"]
            for p in msg.get("points", []):
                if any(k.startswith("score/") for k in p["m"]):
                    score_points[p["step"]] = p["m"]
            for step, scores in _scores_in(msg).items():
                if step not in steps or step in done:
                    continue
                if scores.get("pending"):
                    seen_pending.add(step)
                elif scores.get("state") in ("done", "error") and step in seen_pending:
                    done[step] = scores
        return done, score_points

    # Both checkpoints are queued as the trainer writes them, not only the best at the end.
    done, points = await until_scored({2, 4})
    for step, scores in done.items():
        assert scores["state"] == "done", scores
        assert "utterances" not in scores  # the page gets the means; the rows stay stored
        assert scores["secs_seen"] is not None and scores["mcd_db"] > 0 and scores["rtf"] > 0
        assert scores["quality"] is not None
        assert points[step]["score/quality"] == pytest.approx(scores["quality"])

    def stored():
        run.refresh_from_db()
        assert run.status == Run.Status.SUCCEEDED, run.error
        assert run.checkpoints.get(step=4).is_best
        return run.checkpoints.get(step=2)

    first = await sync_to_async(stored)()

    def press_score():
        browser = Client()
        browser.force_login(user)
        return browser.post(f"/runs/checkpoints/{first.pk}/score/").status_code

    assert await sync_to_async(press_score)() == 302
    again, _ = await until_scored({2})
    assert again[2]["state"] == "done" and again[2]["n"] == settings.STUDIO_SCORE_UTTERANCES
    await comm.disconnect()


# --------------------------------------------------------------------------- issue 14: every checkpoint


@pytest.mark.django_db
def test_unseen_voices_quality_and_the_points_of_the_chart(user, trained_checkpoint):
    from studio.models import MetricPoint
    from synthesis.evaluate import quality_score
    from tests.test_heldout import dataset_with_rows

    run = tiny_run(user, dataset=dataset_with_rows(user), held_out_speakers=["high"])
    ckpt = checkpoint_row(run, trained_checkpoint)
    assert score_checkpoint(ckpt.pk) == "done"
    scores = fresh(ckpt)
    # "high" is cloned from 3 of its clips and compared with its other 3, never with the
    # conditioning clips; the floor is "low"'s real clips against "high".
    assert scores["unseen_speakers"] == ["high"] and scores["unseen"][0]["floor_speakers"] == [
        "low"
    ]
    unseen = scores["unseen"][0]
    assert not set(unseen["reference_clips"]) & set(unseen["target_clips"])
    for key in ("secs_unseen", "secs_unseen_ceiling", "secs_unseen_floor"):
        assert -1.0 <= scores[key] <= 1.0, key
    assert scores["normalised_secs_unseen"] == pytest.approx(
        (scores["secs_unseen"] - scores["secs_unseen_floor"])
        / (scores["secs_unseen_ceiling"] - scores["secs_unseen_floor"])
    )
    # Held-out voices are not scored as seen ones; the WER ground truth is the recording.
    assert {u["speaker"] for u in scores["utterances"]} == {"low"}
    assert scores["ground_truth"] == "recording"
    assert 0.0 <= scores["quality"] <= 1.0 and scores["quality"] == quality_score(scores)
    points = dict(
        MetricPoint.objects.filter(run=run, step=ckpt.step, name__startswith="score/").values_list(
            "name", "value"
        )
    )
    assert points["score/quality"] == pytest.approx(scores["quality"])
    assert points["score/normalised_secs_unseen"] == pytest.approx(scores["normalised_secs_unseen"])
    assert {"score/secs_seen", "score/mcd_db", "score/rtf"} <= set(points)


@pytest.mark.django_db
def test_a_missing_scorer_is_skipped_with_its_reason(
    client_user, user, trained_checkpoint, monkeypatch
):
    import synthesis.evaluate as evaluate

    monkeypatch.setitem(
        evaluate.SCORER_MODULES, "wer", ("no_such_recogniser_here", "WER needs a recogniser")
    )
    run = tiny_run(user)
    ckpt = checkpoint_row(run, trained_checkpoint)
    assert score_checkpoint(ckpt.pk) == "done"
    scores = fresh(ckpt)
    assert scores["wer_output"] is None and scores["wer_ground_truth"] is None
    assert scores["skipped"]["wer"] == "WER needs a recogniser"
    assert scores["skipped"]["secs_unseen"].startswith("no speaker is held out")
    assert scores["secs_seen"] is not None and scores["quality"] is not None
    page = client_user.get(run.get_absolute_url()).content.decode()
    assert "wer skipped: WER needs a recogniser" in page


@pytest.mark.django_db
def test_each_checkpoint_the_trainer_writes_is_queued_for_scoring(
    user, trained_checkpoint, django_capture_on_commit_callbacks
):
    from studio import live
    from studio.runs.callbacks import StudioCallbacks

    run = tiny_run(user)
    run.mark_running("worker@test:1")
    publisher = live.Publisher(run.pk, rate=None)
    try:
        callbacks = StudioCallbacks(run, publisher)
        with django_capture_on_commit_callbacks() as sent:
            callbacks.on_checkpoint(str(trained_checkpoint), {"step": 2, "val_loss": 1.5})
    finally:
        publisher.close()
    ckpt = run.checkpoints.get(step=2)
    assert fresh(ckpt)["state"] == "queued" and len(sent) == 1  # the task, to the cpu queue


@pytest.mark.django_db
def test_the_page_names_the_checkpoint_to_keep_and_the_formula(
    client_user, user, trained_checkpoint
):
    from synthesis.evaluate import QUALITY_FORMULA

    run = tiny_run(user)
    checkpoint_row(run, trained_checkpoint, step=2, scores=dict(DONE, quality=0.41))
    checkpoint_row(run, trained_checkpoint, step=4, scores=dict(DONE, quality=0.52), is_best=True)
    checkpoint_row(run, trained_checkpoint, step=6, scores=dict(DONE, quality=0.47))
    page = client_user.get(run.get_absolute_url()).content.decode()
    assert "Best by quality: <strong>step 4</strong> (Q 0.520)" in page
    assert QUALITY_FORMULA in page and "Q 0.410" in page
    assert 'id="chart-quality"' in page and 'id="chart-mcd"' in page
    assert "Overfitting" not in page


def _series(run, name, values):
    from studio.models import MetricPoint

    for step, value in values:
        MetricPoint.record(run.pk, step, {name: value})


@pytest.mark.django_db
def test_the_overfitting_flag_says_when_it_started(client_user, user):
    from studio.runs.scores import overfitting

    run = tiny_run(user)
    _series(run, "val/mel", [(100, 1.0), (200, 0.8), (300, 0.85), (400, 0.9)])
    _series(run, "loss/mel", [(s, 1.2 - s / 1000) for s in range(10, 410, 10)])
    flag = overfitting(run)
    assert flag["since"] == 300 and flag["best_step"] == 200 and flag["last_step"] == 400
    assert flag["train_now"] < flag["train_then"]
    page = client_user.get(run.get_absolute_url()).content.decode()
    assert "Overfitting since step 300" in page


@pytest.mark.django_db
def test_no_flag_when_training_worsens_too_or_validation_recovers(user):
    from studio.runs.scores import overfitting

    both = tiny_run(user)
    _series(both, "val/mel", [(100, 1.0), (200, 0.8), (300, 0.85), (400, 0.9)])
    _series(both, "loss/mel", [(s, 0.5 + s / 1000) for s in range(10, 410, 10)])
    assert overfitting(both) is None
    noisy = tiny_run(user)
    _series(noisy, "val/mel", [(100, 1.0), (200, 0.8), (300, 0.85), (400, 0.805)])
    _series(noisy, "loss/mel", [(s, 1.2 - s / 1000) for s in range(10, 410, 10)])
    assert overfitting(noisy) is None


@pytest.mark.django_db
def test_the_history_keeps_every_score_point_when_it_thins_the_rest(user):
    from studio import live

    run = tiny_run(user)
    _series(run, "loss/total", [(s, 1.0) for s in range(1, 400)])
    _series(run, "score/quality", [(7, 0.3), (13, 0.4)])
    data = live.history(run, max_points=50)
    assert data["downsampled"]
    steps = {p["step"] for p in data["points"] if "score/quality" in p["m"]}
    assert steps == {7, 13}
